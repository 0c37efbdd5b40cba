"""Draw samples from one checkpoint into <result-path>/<K>.npz, with a grid <K>.png.

Examples:
    python run_generate.py --ckpt-path checkpoints/16.pt --result-path results/samples --num-samples 1000
    python run_generate.py --ckpt-path checkpoints/16.pt --result-path results/samples-ddim --sampler ddim --steps 50
    torchrun --nproc-per-node 4 run_generate.py --ckpt-path checkpoints/16.pt --result-path results/samples

An interrupted run resumes from the batches it finished when run again with the same options.
"""

from memgen.config import parse_sections
from memgen.errors import run_cli
from memgen.generate import GenerateOptions, generate


def main() -> None:
    options = parse_sections({"generate": GenerateOptions}, description=__doc__)
    generate(options["generate"])


if __name__ == "__main__":
    run_cli(main)
