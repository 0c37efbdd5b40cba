"""Learned and exact energy landscapes at one time t, with the attractors that samples reach.

Both energies are E = -2 sigma_t^2 log p_t on the same absolute scale: the learned one from
the probability-flow ODE, the exact one from the noised training set (1/K) sum_mu
N(xi_mu, sigma_t^2 I), which is the DAM energy E_K plus (log K + log(2 pi sigma_t^2)) / beta.
Samples are drawn by the reverse SDE from t_max down to t and then carried to a minimum
by retrieval (memgen.toy.attractors), once with the learned score and once with the exact one.
"""

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from memgen.toy import energy as exact
from memgen.toy.attractors import cluster_attractors, retrieve
from memgen.toy.likelihood import energy_from_log_density, ode_log_likelihood
from memgen.toy.model import ScoreNet
from memgen.toy.sde import VESDE, make_prior

logger = logging.getLogger(__name__)


@dataclass
class LandscapeOptions:
    """Resolution of a landscape.

    grid_size: energy grid points per axis on [-limit, limit].
    arrow_size: arrow grid points per axis.
    limit: half width of the square shown, in x units.
    num_samples: samples carried to their attractors.
    retrieval_iterations: retrieval steps x <- x + sigma_t^2 s(x, t) per sample. A few tens
        settle the states in the minima at and between separate points. Hundreds also drag
        them along a dense ring into ripples about 0.01 deep (from the random spacing of the
        points), which breaks the ring into arcs.
    cluster_threshold: single-linkage distance threshold in x units; None finds it from the gaps.
    ode_steps: RK4 steps of the probability-flow ODE from t to t_max.
    prior: p_T at t_max, 'points' or 'gaussian' (see memgen.toy.sde.make_prior).
    seed: seed of the sampling noise.
    """

    grid_size: int = 61
    arrow_size: int = 17
    limit: float = 1.5
    num_samples: int = 1000
    retrieval_iterations: int = 30
    cluster_threshold: float | None = None
    ode_steps: int = 100
    prior: str = "points"
    seed: int = 0


def square_grid(limit: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Axis coordinates (size,) and the (size * size, 2) points, row-major over [y, x]."""
    axis = np.linspace(-limit, limit, size)
    x, y = np.meshgrid(axis, axis)
    return axis, np.stack([x.ravel(), y.ravel()], axis=1)


def compute_landscape(model: ScoreNet, points: np.ndarray, sde: VESDE, t: float, options: LandscapeOptions,
                      device: torch.device) -> dict[str, np.ndarray]:
    """Learned and exact energies on a grid and the attractors of both, as numpy arrays.

    Keys:
        grid (G,), energy and exact_energy (G, G) indexed [y, x];
        arrow_grid (A,), step and exact_step (A, A, 2): retrieval steps;
        samples (N, 2): states at t before retrieval;
        attractor_states, labels, representatives, sizes, attractor_energy, last_step,
            threshold: attractors of the learned energy (see memgen.toy.attractors);
        the same with the prefix exact_ for the exact energy (without last_step);
        points (K, 2); t and beta as 0-d arrays.
    """
    started = time.perf_counter()
    std = float(sde.marginal_std(t))
    beta = exact.beta_from_std(std)
    model = model.to(device).eval()
    prior = make_prior(options.prior, sde, points)
    logger.info("landscape of K = %d at t = %g (sigma_t = %.4f, beta = %.4g)", len(points), t, std, beta)

    def to_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float32, device=device)

    grid, grid_points = square_grid(options.limit, options.grid_size)
    arrow_grid, arrow_points = square_grid(options.limit, options.arrow_size)
    size, arrows = options.grid_size, options.arrow_size

    # Samples at time t, carried to their attractors.
    generator = torch.Generator().manual_seed(options.seed)
    samples = sde.sample(model, prior, options.num_samples, t_end=t, generator=generator, device=device)
    states, last_step = retrieve(model, samples, t, sde, options.retrieval_iterations)
    found = cluster_attractors(states.cpu().numpy(), options.cluster_threshold)
    samples = samples.cpu().numpy()
    exact_states = exact.dam_retrieve(samples, points, beta, options.retrieval_iterations)
    exact_found = cluster_attractors(exact_states, options.cluster_threshold)
    logger.info("learned energy: %d attractors; exact energy: %d attractors",
                len(found.sizes), len(exact_found.sizes))

    # Learned energy on the grid and at the attractors, in one ODE batch.
    queries = np.concatenate([grid_points, found.representatives])
    log_density = ode_log_likelihood(model, to_tensor(queries), t, sde, prior.log_density,
                                     num_steps=options.ode_steps)
    learned_energy = energy_from_log_density(log_density, t, sde).cpu().numpy().astype(np.float64)

    def exact_energy(x: np.ndarray) -> np.ndarray:
        return -2 * std**2 * exact.mixture_log_density(x, points, std)

    with torch.no_grad():
        t_batch = torch.full((len(arrow_points),), t, device=device)
        step = (std**2 * model(to_tensor(arrow_points), t_batch)).cpu().numpy()
    exact_step = 0.5 * exact.dam_force(arrow_points, points, beta)

    logger.info("landscape done in %.1f s", time.perf_counter() - started)
    return {
        "grid": grid,
        "energy": learned_energy[:size * size].reshape(size, size),
        "exact_energy": exact_energy(grid_points).reshape(size, size),
        "arrow_grid": arrow_grid,
        "step": step.reshape(arrows, arrows, 2),
        "exact_step": exact_step.reshape(arrows, arrows, 2),
        "samples": samples,
        "attractor_states": states.cpu().numpy(),
        "last_step": last_step.cpu().numpy(),
        "labels": found.labels,
        "representatives": found.representatives,
        "sizes": found.sizes,
        "attractor_energy": learned_energy[size * size:],
        "threshold": np.asarray(found.threshold),
        "exact_attractor_states": exact_states,
        "exact_labels": exact_found.labels,
        "exact_representatives": exact_found.representatives,
        "exact_sizes": exact_found.sizes,
        "exact_attractor_energy": exact_energy(exact_found.representatives),
        "exact_threshold": np.asarray(exact_found.threshold),
        "points": np.asarray(points, dtype=np.float64),
        "t": np.asarray(t),
        "beta": np.asarray(beta),
    }
