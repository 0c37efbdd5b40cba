r"""Measure basins of attraction: the critical time and radius of samples or training images per K.

Examples:
    python run_critical_times.py --ckpt-path results/checkpoints --sample-path results/identified/memorized \
        --result-path results/critical_times/memorized --data-path data
    python run_critical_times.py --ckpt-path results/checkpoints --result-path results/critical_times/training \
        --metric l2 --delta 2.0 --search bisect

Without --sample-path the first --sample-size training images of each checkpoint are probed.
A rerun keeps the K already written (pass --overwrite to recompute them).
"""

from memgen.config import parse_sections
from memgen.critical_times import CriticalTimesOptions, run_critical_times
from memgen.errors import run_cli


def main() -> None:
    options = parse_sections({"critical_times": CriticalTimesOptions}, description=__doc__)
    run_critical_times(options["critical_times"])


if __name__ == "__main__":
    run_cli(main)
