"""List or fetch the paper's released <K>.pt checkpoints from a model hub (optional, needs network).

memgen never needs the network; this helper needs `pip install huggingface_hub`.

Examples:
    python fetch_released_checkpoints.py --repo-id OWNER/NAME --list-only True
    python fetch_released_checkpoints.py --repo-id OWNER/NAME --folder fashionmnist \\
        --train-sizes 16 1024 --result-path ckpts/fashionmnist
"""

from memgen.config import parse_sections
from memgen.errors import run_cli
from memgen.release import FetchOptions, fetch
from memgen.runtime import setup_logging


def main() -> None:
    options = parse_sections({"fetch": FetchOptions}, description=__doc__)["fetch"]
    setup_logging()
    fetch(options)


if __name__ == "__main__":
    run_cli(main)
