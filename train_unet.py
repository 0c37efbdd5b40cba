"""Train a DDPM UNet on the first K images of a dataset.

Examples:
    python train_unet.py --config_path configs/fashionmnist-cpu.yaml
    python train_unet.py --config_path configs/fashionmnist.yaml --train-size 16000 --dim 128
    torchrun --nproc-per-node 4 train_unet.py --config_path configs/cifar10.yaml --train-size 1024

A rerun with the same --results-path resumes from the newest checkpoint.
"""

from memgen.config import TRAINING_SECTIONS, parse_sections
from memgen.errors import run_cli
from memgen.train import train


def main() -> None:
    options = parse_sections(TRAINING_SECTIONS, description=__doc__)
    train(options["data"], options["train"], options["model"])


if __name__ == "__main__":
    run_cli(main)
