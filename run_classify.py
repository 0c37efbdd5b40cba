"""Label every sample memorized, spurious or generalized from its nearest-neighbour distances.

A sample is memorized when its distance to the nearest training image is <= delta_m,
spurious when it is not memorized and its distance to the nearest other sample is
<= delta_s, and generalized otherwise. LPIPS distances default to delta_m = 0.03 and
delta_s = 0.02 (Pham et al. 2025); L2 distances need --delta-m and --delta-s, or
--calibrate, which sets delta_m = --calibrate-scale x the --calibrate-quantile quantile
(numpy method 'lower') of the distances from each of the first --calibrate-size images of
the seeded training permutation to its nearest other image, and delta_s = delta_m x 2/3.

--eval-path contains the samples to label (the files the distances were computed for);
--synth-path contains the samples that the distance files' synth-indices point into, and
defaults to --eval-path. Files are paired by the K in their names.

Writes identified/{memorized,spurious,generalized}/<K>.npz, summary.csv, summary.json,
fractions.png and grids/<class>-<K>.png under --result-path. A run on a slice
(--start-idx, --final-idx) merges its rows into an existing summary.json, so the jobs of
a sharded run add up to one table and one figure.

Examples:
    python run_classify.py --dist-path results/dists --eval-path results/samples \\
        --data-path data --result-path results/classify
    python run_classify.py --dist-path results/dists-l2 --eval-path results/samples \\
        --data-path data --result-path results/classify-l2 --calibrate
    python run_classify.py --dist-path results/dists-l2 --eval-path results/samples \\
        --delta-m 2.0 --delta-s 1.5 --start-idx 0 --final-idx 4
"""

from memgen.classify import ClassifyOptions, classify
from memgen.config import parse_sections
from memgen.errors import run_cli
from memgen.runtime import setup_logging


def main() -> None:
    options = parse_sections({"classify": ClassifyOptions}, description=__doc__)
    setup_logging()
    classify(options["classify"])


if __name__ == "__main__":
    run_cli(main)
