r"""Compute the relative energy between samples and reference images for every K.

For each pair (reference r, sample x) the gradient of the model's potential at step --time
is integrated along the quarter circle from x to r. The result is u(r) - u(x).

Examples:
    python run_energy.py --ref-path refs.npz --ckpt-path results/checkpoints \
        --sample-path results/classify/identified/spurious --result-path results/energy/spurious
    python run_energy.py --ref-path refs.npz --ckpt-path results/checkpoints --data-path data \
        --result-path results/energy/training --quadrature simpson --num-points 21

--ref-path is an .npz with reference images (N, C, H, W) in [-1, 1] under 'samples' or
'images', or a class file of run_classify.py (its 'top' images). Without --sample-path the
first --sample-size training images of each checkpoint are used. A rerun keeps the K
already written (pass --overwrite to recompute them).
"""

from memgen.config import parse_sections
from memgen.energy import EnergyOptions, run_energy
from memgen.errors import run_cli


def main() -> None:
    options = parse_sections({"energy": EnergyOptions}, description=__doc__)
    run_energy(options["energy"])


if __name__ == "__main__":
    run_cli(main)
