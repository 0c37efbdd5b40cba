"""Exact energies of the 2D toy model: Dense Associative Memory and its dense-circle limit.

A variance-exploding diffusion trained on K points xi_mu has, at noise std sigma_t, the
marginal p_t(x) = (1/K) sum_mu N(x; xi_mu, sigma_t^2 I). With beta = 1 / (2 sigma_t^2),

    E(x) = -2 sigma_t^2 log p_t(x) = E_K(x) + (log K + log(2 pi sigma_t^2)) / beta,
    E_K(x) = -(1/beta) log sum_mu exp(-beta ||x - xi_mu||^2),

so up to a constant the energy of the exact score is the Dense Associative Memory (modern
Hopfield) energy E_K, and the score is grad log p_t = -beta grad E_K. Forces in this module
are -grad E (not the score): they point downhill in energy.

For K points spread evenly over the unit circle, the sum over mu becomes K / (2 pi) times an
integral over the angle, which gives E_K(x) -> E_circle(|x|) - (log K) / beta with

    E_circle(R) = R^2 + 1 - (1/beta) log I0(2 beta R),   -dE_circle/dR = 2 (I1/I0 (2 beta R) - R).

E_circle has its minimum at the origin for beta <= 1 and on a ring of radius R* > 0 with
R* = I1(2 beta R*) / I0(2 beta R*) for beta > 1. Bessel functions use the exponentially
scaled scipy.special.i0e / i1e, so E_circle stays finite where I0 itself overflows a
float64 (2 beta R > 713).
"""

import numpy as np
from scipy.optimize import brentq
from scipy.spatial.distance import cdist
from scipy.special import i0e, i1e, logsumexp, softmax


def beta_from_std(std: float) -> float:
    """Inverse temperature beta = 1 / (2 sigma_t^2) for the marginal noise std sigma_t."""
    return 1.0 / (2.0 * std**2)


def dam_energy(x: np.ndarray, patterns: np.ndarray, beta: float) -> np.ndarray:
    """Dense Associative Memory energy E_K(x) = -(1/beta) log sum_mu exp(-beta ||x - xi_mu||^2).

    x: (N, D) states; patterns: (K, D) stored patterns xi_mu; returns (N,). For one pattern
    this is exactly ||x - xi||^2.
    """
    squared_distances = _squared_distances(x, patterns)
    return -logsumexp(-beta * squared_distances, axis=1) / beta


def dam_force(x: np.ndarray, patterns: np.ndarray, beta: float) -> np.ndarray:
    """Negative gradient of `dam_energy`: -grad E_K(x) = 2 (sum_mu w_mu xi_mu - x), shape (N, D).

    The weights w_mu = softmax_mu(-beta ||x - xi_mu||^2) are the attention of x on each pattern.
    """
    weights = softmax(-beta * _squared_distances(x, patterns), axis=1)
    return 2.0 * (weights @ patterns - x)


def dam_retrieve(x: np.ndarray, patterns: np.ndarray, beta: float, num_iterations: int) -> np.ndarray:
    """Iterate the DAM update x <- sum_mu softmax_mu(-beta ||x - xi_mu||^2) xi_mu from x (N, D).

    The update is x + dam_force(x) / 2 and lowers E_K at every step; its fixed points are the
    stationary points of E_K.
    """
    x = np.asarray(x, dtype=np.float64)
    patterns = np.asarray(patterns, dtype=np.float64)
    for _ in range(num_iterations):
        x = softmax(-beta * _squared_distances(x, patterns), axis=1) @ patterns
    return x


def mixture_log_density(x: np.ndarray, patterns: np.ndarray, std: float) -> np.ndarray:
    """log p_t(x) of the noised training set, (1/K) sum_mu N(x; xi_mu, std^2 I), for x (N, D).

    Equals -beta E_K(x) - log K - (D/2) log(2 pi std^2) with beta = 1 / (2 std^2).
    """
    dimension = np.asarray(x).shape[1]
    beta = beta_from_std(std)
    return -beta * dam_energy(x, patterns, beta) - np.log(len(patterns)) \
        - 0.5 * dimension * np.log(2 * np.pi * std**2)


def circle_energy(radius: np.ndarray, beta: float) -> np.ndarray:
    """Dense-circle limit E_circle(R) = R^2 + 1 - (1/beta) log I0(2 beta R) for radii R >= 0."""
    radius = np.asarray(radius, dtype=np.float64)
    z = 2.0 * beta * radius
    log_i0 = np.log(i0e(z)) + z
    return radius**2 + 1.0 - log_i0 / beta


def circle_radial_force(radius: np.ndarray, beta: float) -> np.ndarray:
    """Radial component of -grad E_circle: 2 (I1(2 beta R) / I0(2 beta R) - R)."""
    radius = np.asarray(radius, dtype=np.float64)
    z = 2.0 * beta * radius
    return 2.0 * (i1e(z) / i0e(z) - radius)


def circle_force(x: np.ndarray, beta: float) -> np.ndarray:
    """-grad E_circle at 2D states x (N, 2): the radial force along x / |x|, zero at the origin."""
    radius = np.linalg.norm(x, axis=1)
    safe_radius = np.where(radius > 0, radius, 1.0)
    return (circle_radial_force(radius, beta) / safe_radius)[:, None] * x


def ring_radius(beta: float) -> float:
    """Radius R* of the minimum of E_circle: the root of R = I1(2 beta R) / I0(2 beta R).

    Returns 0 for beta <= 1, where the origin is the only minimum. Above beta = 1 the ratio
    I1/I0 (2 beta R) starts with slope beta > 1 and stays below 1, so exactly one positive
    root lies in (0, 1).
    """
    if beta <= 1.0:
        return 0.0

    def stationarity(radius: float) -> float:
        z = 2.0 * beta * radius
        return i1e(z) / i0e(z) - radius

    return float(brentq(stationarity, 1e-12, 1.0, xtol=1e-14))


def _squared_distances(x: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Pairwise ||x_n - xi_mu||^2, shape (N, K), in float64."""
    return cdist(np.asarray(x, dtype=np.float64), np.asarray(patterns, dtype=np.float64), "sqeuclidean")
