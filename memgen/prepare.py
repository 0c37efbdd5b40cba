"""Set-up commands behind `make data` and `make weights`.

    python -m memgen.prepare data --data-path data   # Fashion-MNIST into data/FashionMNIST/raw
    python -m memgen.prepare weights                 # LPIPS AlexNet and VGG16 ImageNet weights
"""

import argparse
import logging

from memgen.errors import run_cli
from memgen.runtime import setup_logging

logger = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="make Fashion-MNIST available under --data-path")
    data.add_argument("--data-path", default="data", help="dataset root (default: data)")
    weights = commands.add_parser("weights", help="convert and cache the LPIPS backbone weights")
    weights.add_argument("--networks", nargs="+", default=["alex", "vgg"],
                         help="LPIPS backbones to prepare (default: alex vgg)")
    args = parser.parse_args()
    setup_logging()

    if args.command == "data":
        from memgen.data import prepare_fashion_mnist

        prepare_fashion_mnist(args.data_path)
    else:
        from memgen.lpips import prepare_weights

        for network in args.networks:
            prepare_weights(network)


if __name__ == "__main__":
    run_cli(main)
