"""Log-density of the toy model through the probability-flow ODE, and its energy.

The probability-flow ODE of the VE SDE, dx/dtau = f(x, tau) = -1/2 g^2 s(x, tau), moves
x_t at time t to x_T at t_max with the same marginals as the SDE. Along its path
d log p_tau(x(tau)) / dtau = -div f, so

    log p_t(x_t) = log p_T(x_T) + integral_t^T div f(x(tau), tau) dtau,
    div f = -1/2 g^2 (ds_1/dx_1 + ds_2/dx_2).

In 2D the divergence is exact with two autograd passes, one per output coordinate, so no
Hutchinson trace estimator (and no estimator noise) is needed.
"""

import logging
import math
from typing import Callable

import torch
from tqdm import tqdm

from memgen.toy.sde import VESDE, ScoreFunction

logger = logging.getLogger(__name__)


def score_and_divergence(score: ScoreFunction, x: torch.Tensor, t: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the score s(x, t) (B, 2) and its exact divergence (B,), both detached.

    Each row's score must depend only on that row of x, as in an MLP without batch
    statistics. The gradient of sum_b s_i(x_b) then contains ds_i/dx_i of every row.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = score(x, t)
        divergence = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(x.shape[1]):
            gradient, = torch.autograd.grad(value[:, i].sum(), x, retain_graph=i + 1 < x.shape[1])
            divergence = divergence + gradient[:, i]
    return value.detach(), divergence.detach()


def ode_log_likelihood(score: ScoreFunction, x: torch.Tensor, t: float, sde: VESDE,
                       prior_log_density: Callable[[torch.Tensor], torch.Tensor],
                       num_steps: int = 100, batch_size: int = 4096, progress: bool = True,
                       ) -> torch.Tensor:
    """log p_t(x) of the model by integrating the probability-flow ODE from t to t_max.

    x: (N, 2) points at time t, 0 < t < t_max. The integration uses classical RK4 on
    `num_steps` steps equally spaced in log tau, because the score changes on the scale of
    tau itself. prior_log_density: log p_T at t_max, (B, 2) -> (B,).
    Returns (N,) log-densities in nats.
    """
    times = torch.logspace(math.log10(t), math.log10(sde.t_max), num_steps + 1, dtype=torch.float64)
    results = []
    chunks = torch.split(x, batch_size)
    steps = range(num_steps)
    for chunk in chunks:
        state = chunk.detach().clone()
        log_density_change = torch.zeros(chunk.shape[0], dtype=chunk.dtype, device=chunk.device)
        bar = tqdm(steps, desc="probability-flow ODE", unit="step", leave=False, disable=not progress)
        for i in bar:
            state, increment = _rk4_step(score, state, float(times[i]), float(times[i + 1]), sde.sigma)
            log_density_change = log_density_change + increment
        results.append(prior_log_density(state) + log_density_change)
    return torch.cat(results)


def _rk4_step(score: ScoreFunction, x: torch.Tensor, t0: float, t1: float, sigma: float,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance (x, delta) from t0 to t1 by one RK4 step of dx/dtau = -1/2 g^2 s, d delta/dtau = -1/2 g^2 div s."""
    h = t1 - t0

    def derivatives(state: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        tau_batch = torch.full((state.shape[0],), tau, dtype=state.dtype, device=state.device)
        value, divergence = score_and_divergence(score, state, tau_batch)
        return -0.5 * sigma**2 * value, -0.5 * sigma**2 * divergence

    k1, d1 = derivatives(x, t0)
    k2, d2 = derivatives(x + 0.5 * h * k1, t0 + 0.5 * h)
    k3, d3 = derivatives(x + 0.5 * h * k2, t0 + 0.5 * h)
    k4, d4 = derivatives(x + h * k3, t1)
    x_next = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    increment = h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    return x_next, increment


def energy_from_log_density(log_density: torch.Tensor, t: float, sde: VESDE) -> torch.Tensor:
    """Energy E = -2 sigma_t^2 log p_t, the scale on which it matches the DAM energy.

    sigma_t^2 = sigma^2 t is the marginal variance (a square, not 2 sigma_t). With
    beta = 1 / (2 sigma_t^2) this is E = -(1/beta) log p_t, so the exact p_t of K points gives
    the DAM energy plus a constant (see memgen.toy.energy).
    """
    variance = sde.sigma**2 * t
    return -2.0 * variance * log_density
