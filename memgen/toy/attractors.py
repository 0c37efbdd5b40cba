"""Attractors of the learned energy at a time t: Hopfield-style retrieval, then clustering.

At time t the energy is E = -2 sigma_t^2 log p_t, so the score is s = -grad E / (2 sigma_t^2)
and the Tweedie denoiser x + sigma_t^2 s(x, t) = x - 1/2 grad E(x) is a gradient step on E.
For the exact energy of K points this step is the Dense Associative Memory update
x <- sum_mu softmax(-beta ||x - xi_mu||^2) xi_mu, whose fixed points are the minima of
E_K. Iterating it with the learned score carries each sample to a minimum of the learned
energy. Samples that end within a distance threshold of one another form one attractor.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from memgen.errors import MemgenError
from memgen.toy.sde import VESDE, ScoreFunction

logger = logging.getLogger(__name__)


@torch.no_grad()
def retrieve(score: ScoreFunction, x: torch.Tensor, t: float, sde: VESDE, num_iterations: int = 30,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterate x <- x + sigma_t^2 s(x, t) `num_iterations` times from x (N, 2).

    Returns the final states (N, 2) and the length of each one's last step (N,), which is
    near 0 for a state that reached a minimum.
    """
    variance = float(sde.marginal_std(t)) ** 2
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    step = torch.zeros_like(x)
    for _ in range(num_iterations):
        step = variance * score(x, t_batch)
        x = x + step
    return x, step.norm(dim=1)


@dataclass
class Attractors:
    """Clusters of retrieved states.

    labels: (N,) attractor index of every state, 0 for the largest attractor, 1 for the next.
    representatives: (A, 2) for each attractor, its member nearest to the members' mean
        (for a ring of states the mean is off the ring, but the nearest member is on it).
    sizes: (A,) number of members.
    threshold: the distance threshold that was used.
    """

    labels: np.ndarray
    representatives: np.ndarray
    sizes: np.ndarray
    threshold: float


def cluster_attractors(states: np.ndarray, threshold: float | None = None) -> Attractors:
    """Group states (N, 2) into attractors by single-linkage clustering.

    Two states share an attractor when a chain of states links them with steps shorter than
    `threshold`, so a continuum of minima (a ring) stays one attractor. With threshold None
    it comes from `gap_threshold`.
    """
    states = np.asarray(states, dtype=np.float64)
    if len(states) < 2:
        raise MemgenError(f"clustering needs at least 2 samples, got {len(states)}; raise --num-samples")
    merge_heights = linkage(states, method="single")
    if threshold is None:
        threshold = gap_threshold(merge_heights[:, 2])
    raw_labels = fcluster(merge_heights, t=threshold, criterion="distance")

    # Renumber so that attractor 0 is the largest.
    unique, counts = np.unique(raw_labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    relabel = {unique[i]: rank for rank, i in enumerate(order)}
    labels = np.array([relabel[label] for label in raw_labels])
    sizes = counts[order]

    representatives = np.empty((len(sizes), 2))
    for index in range(len(sizes)):
        members = states[labels == index]
        nearest = np.argmin(((members - members.mean(axis=0)) ** 2).sum(axis=1))
        representatives[index] = members[nearest]
    return Attractors(labels=labels, representatives=representatives, sizes=sizes, threshold=float(threshold))


def gap_threshold(merge_heights: np.ndarray, floor: float = 1e-3, min_ratio: float = 3.0) -> float:
    """Cut the single-linkage tree at the largest jump between successive merge heights.

    Within an attractor the merge heights are small and similar (the spread of retrieved
    states); the first merge between two attractors is much larger. The threshold is the
    geometric mean of the two heights around the largest ratio. Heights below `floor` are
    raised to it, so that exact duplicates do not make a huge ratio. When no ratio reaches
    `min_ratio`, every state is one attractor, so the threshold is above the largest height.
    """
    heights = np.sort(np.maximum(np.asarray(merge_heights, dtype=np.float64), floor))
    if len(heights) < 2:
        return float(heights[-1] * 1.01)
    ratios = heights[1:] / heights[:-1]
    jump = int(np.argmax(ratios))
    if ratios[jump] < min_ratio:
        return float(heights[-1] * 1.01)
    return float(np.sqrt(heights[jump] * heights[jump + 1]))
