"""Find the k nearest training images and the k nearest other samples of every sample.

Examples:
    python run_distances.py --synth-path results/samples --data-path data --result-path results/distances
    python run_distances.py --synth-path results/samples --result-path results/distances-l2 --metric l2
    # one job per row shard, then one merge:
    python run_distances.py --synth-path results/samples --result-path results/distances --num-shards 4 --shard-index 0
    python run_distances.py --synth-path results/samples --result-path results/distances --num-shards 4 --merge

Each sample file <K>.npz gives <result-path>/<K>.npz; existing results are kept unless --overwrite.
"""

from memgen.config import parse_sections
from memgen.distances import DistanceOptions, compute_distances
from memgen.errors import run_cli


def main() -> None:
    options = parse_sections({"distances": DistanceOptions}, description=__doc__)
    compute_distances(options["distances"])


if __name__ == "__main__":
    run_cli(main)
