"""Run every memgen stage for a sweep of K and write a report: the quick start.

Example:
    python run_pipeline.py --config_path configs/quickstart.yaml
    python run_pipeline.py --config_path configs/quickstart.yaml --train-sizes 2 64 --num-samples 32

Sections of the YAML file: data, train and model (as for train_unet.py; train_size is set per
K) and pipeline (the sweep and the settings of the later stages). A rerun keeps finished
work and resumes interrupted work; delete the result folder to start over.
"""

from memgen.errors import run_cli
from memgen.config import parse_sections
from memgen.pipeline import PIPELINE_SECTIONS, run


def main() -> None:
    options = parse_sections(PIPELINE_SECTIONS, description=__doc__)
    run(options["data"], options["train"], options["model"], options["pipeline"])


if __name__ == "__main__":
    run_cli(main)
