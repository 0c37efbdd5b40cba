"""Convert a checkpoint released by Pham et al. 2025 (arXiv:2505.21777) into a native memgen checkpoint.

The released `<K>.pt` files store score_sde's DDPM UNet and the paper's option classes.
The converted file holds the same weights under memgen's parameter names, the
configuration as plain data, and loads with `torch.load(weights_only=True)`.
memgen's checkpoint loader also reads released files directly, so conversion is optional.

Example:
    python convert_checkpoint.py --src released/fashionmnist/16.pt --dst checkpoints/16.pt
"""

import argparse

from memgen.errors import run_cli
from memgen.paper_checkpoint import convert_paper_checkpoint
from memgen.runtime import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, metavar="FILE.pt", help="released checkpoint to read")
    parser.add_argument("--dst", required=True, metavar="FILE.pt",
                        help="native memgen checkpoint to write; its folder is created if needed")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --dst when it exists (default: keep it and do nothing)")
    options = parser.parse_args()

    setup_logging()
    convert_paper_checkpoint(options.src, options.dst, overwrite=options.overwrite)


if __name__ == "__main__":
    run_cli(main)
