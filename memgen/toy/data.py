"""Training points of the 2D toy model: K points on the unit circle at seeded random angles."""

import numpy as np

from memgen.errors import MemgenError

# Project-wide default seed.
DEFAULT_SEED = 3407


def circle_points(k: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Return K points (K, 2), float64, on the unit circle at angles drawn uniformly from [0, 2 pi).

    The angles come from numpy's default generator seeded with `seed`, so the same (K, seed)
    always gives the same points.
    """
    if k < 1:
        raise MemgenError(f"the number of training points K = {k} is invalid; use K >= 1")
    angles = np.random.default_rng(seed).uniform(0.0, 2.0 * np.pi, size=k)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)
