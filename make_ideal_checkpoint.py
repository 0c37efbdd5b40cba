"""Write ideal-memorizer checkpoints <K>.pt, which every stage accepts in place of a trained one.

The ideal memorizer is the exact optimal denoiser of the K training images, so its samples
are copies of training images. A checkpoint stores only the dataset, K, the seed and the
noise schedule; the training images are loaded again when it is used.

Examples:
    python make_ideal_checkpoint.py --train-sizes 1 4 16 --result-path results/ideal
    python make_ideal_checkpoint.py --data-name npz --data-path images.npz --train-sizes 8 --seed 0
    python make_ideal_checkpoint.py --data-name lsun-church --data-path data --image-size 64 \\
        --centercrop --resize --train-sizes 64 256
"""

from memgen.config import parse_sections
from memgen.errors import run_cli
from memgen.ideal import IdealCheckpointOptions, write_ideal_checkpoints
from memgen.runtime import setup_logging


def main() -> None:
    options = parse_sections({"ideal": IdealCheckpointOptions}, description=__doc__)
    setup_logging()
    write_ideal_checkpoints(options["ideal"])


if __name__ == "__main__":
    run_cli(main)
