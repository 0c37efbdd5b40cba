"""Basins of attraction of the training points: noise injection and recovery by reverse sampling.

For a training point x0 and a noise time t, each trial draws x_t = x0 + sigma_t z and runs
the reverse SDE from t down to t_min; the trial recovers x0 when it ends within `delta` of
it. Times are scanned upwards. The critical time of a point is the last scanned t at which
at least a fraction p of its trials recovered, before the first t where fewer did; its
basin radius is the mean ||x_t - x0|| of the trials at that time (about sigma_t sqrt(pi/2)
in 2D). A point that fails at the first time gets critical time and radius 0.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from memgen.errors import MemgenError
from memgen.toy.sde import VESDE, ScoreFunction

logger = logging.getLogger(__name__)


@dataclass
class BasinResult:
    """Critical times of K points.

    time: (K,) critical time, 0 when the first scanned time already failed.
    radius: (K,) mean distance ||x_t - x0|| of the trials at the critical time.
    censored: (K,) True when the point still recovered at the last scanned time, so its
        critical time is only a lower bound.
    scan_times: (T,) the scanned times, ascending.
    recovered_fraction: (K, T) fraction of trials that recovered; NaN after the point failed.
    """

    time: np.ndarray
    radius: np.ndarray
    censored: np.ndarray
    scan_times: np.ndarray
    recovered_fraction: np.ndarray


def scan_times(t_start: float, t_stop: float, num_times: int) -> np.ndarray:
    """Geometrically spaced noise times from t_start to t_stop, both included."""
    if not 0 < t_start < t_stop:
        raise MemgenError(f"basin scan from t = {t_start} to {t_stop} is invalid; "
                          "use 0 < --t-start < --t-stop")
    if num_times < 2:
        raise MemgenError(f"--num-times {num_times} is too small; use 2 or more")
    return np.geomspace(t_start, t_stop, num_times)


def critical_times(score: ScoreFunction, points: torch.Tensor, sde: VESDE, times: np.ndarray,
                   num_trials: int = 10, delta: float = 0.1, fraction: float = 0.9,
                   generator: torch.Generator | None = None) -> BasinResult:
    """Scan `times` upwards for every point (K, 2) until each one recovers in < `fraction` of trials.

    All trials of the points still in the scan run as one batch per time. Times above
    `times[-1]` are not tried, so a point that never failed is marked censored.
    """
    if times[0] <= sde.t_min:
        raise MemgenError(f"the first basin time {times[0]:g} is not above the sampler's end time "
                          f"t_min = {sde.t_min:g}; raise --t-start")
    num_points = points.shape[0]
    critical = np.zeros(num_points)
    radius = np.zeros(num_points)
    recovered_fraction = np.full((num_points, len(times)), np.nan)
    active = np.ones(num_points, dtype=bool)

    for j, t in enumerate(tqdm(times, desc="basin scan", unit="time")):
        indices = np.flatnonzero(active)
        if len(indices) == 0:
            break
        x0 = points[indices].repeat_interleave(num_trials, dim=0)
        t_batch = torch.full((x0.shape[0],), float(t), device=x0.device)
        x_t, _ = sde.perturb(x0, t_batch, generator=generator)
        x_hat = sde.reverse(score, x_t, float(t), generator=generator)

        recovered = ((x_hat - x0).norm(dim=1) <= delta).float().view(len(indices), num_trials)
        noise_distance = (x_t - x0).norm(dim=1).view(len(indices), num_trials)
        share = recovered.mean(dim=1).cpu().numpy()
        recovered_fraction[indices, j] = share

        passed = share >= fraction
        critical[indices[passed]] = t
        radius[indices[passed]] = noise_distance.mean(dim=1).cpu().numpy()[passed]
        active[indices[~passed]] = False
        logger.debug("t = %.4g: %d of %d points still recover", t, passed.sum(), len(indices))

    return BasinResult(time=critical, radius=radius, censored=active.copy(), scan_times=np.asarray(times),
                       recovered_fraction=recovered_fraction)
