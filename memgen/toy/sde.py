"""Variance-exploding SDE of the toy model and its Euler–Maruyama reverse sampler.

Forward process dx = sigma dW on t in [0, T]: x_t = x_0 + sigma sqrt(t) z, so the marginal
std is sigma_t = sigma sqrt(t) and the diffusion coefficient is g(t) = sigma. The reverse
SDE is dx = -g^2 score(x, t) dt + g dW-bar, integrated from t down to `t_min`.

The prior p_T at T = t_max is either the usual N(0, sigma_T^2 I) or the exact marginal of
the training points, (1/K) sum_mu N(xi_mu, sigma_T^2 I). With sigma = 1 and T = 1 the
noise is no larger than the data, so the Gaussian is a rough stand-in. For the two points
of seed 3407, its log-density minus the exact one runs from -2.3 to +1.5 nats between the
1st and 99th percentile of the start points (-1.6 to +0.5 for a thousand points).
"""

import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from memgen.errors import MemgenError

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VESDE:
    """VE SDE with marginal std sigma sqrt(t) on [t_min, t_max].

    sigma: diffusion coefficient (1 in the toy model, so sigma_t^2 = t).
    t_min: end time of sampling and smallest training time, where sigma_t is sigma sqrt(t_min).
    t_max: start time of sampling, where the prior p_T is used.
    num_steps: Euler–Maruyama steps from t_max to t_min; a run from a smaller t uses the
        same step size.
    """

    sigma: float = 1.0
    t_min: float = 1e-3
    t_max: float = 1.0
    num_steps: int = 1000

    def marginal_std(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma_t = sigma sqrt(t)."""
        return self.sigma * torch.sqrt(torch.as_tensor(t))

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw x_t = x0 + sigma_t z for x0 (B, 2) and t (B,); returns (x_t, z)."""
        z = standard_normal(x0.shape, generator, x0.device, x0.dtype)
        return x0 + self.marginal_std(t)[:, None] * z, z

    def step_size(self) -> float:
        return (self.t_max - self.t_min) / self.num_steps

    @torch.no_grad()
    def reverse(self, score: ScoreFunction, x_t: torch.Tensor, t_start: float, t_end: float | None = None,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Integrate the reverse SDE with Euler–Maruyama from `t_start` down to `t_end` (default t_min).

        x_t: (B, 2) states at time t_start. The step size is about the one of a full run,
        (t_max - t_min) / num_steps, adjusted so that a whole number of steps ends exactly
        at t_end. The last step adds no noise, so the result is the mean of the last
        transition. Returns (B, 2).
        """
        t_end = self.t_min if t_end is None else t_end
        if not t_start > t_end:
            raise ValueError(f"the reverse SDE runs from t_start = {t_start} down to t_end = {t_end}, "
                             "so t_start must be the larger")
        num_steps = max(1, round((t_start - t_end) / self.step_size()))
        times = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
        x = x_t.clone()
        steps = range(num_steps)
        if progress:
            steps = tqdm(steps, desc="Euler-Maruyama", unit="step", leave=False)
        for i in steps:
            dt = float(times[i] - times[i + 1])
            g = self.sigma
            t_batch = torch.full((x.shape[0],), float(times[i]), device=x.device)

            # Drift of the reverse SDE: x <- x + g^2 score dt.
            x_mean = x + g**2 * score(x, t_batch) * dt
            if i == num_steps - 1:
                return x_mean

            # Diffusion: add g sqrt(dt) z.
            noise = standard_normal(x.shape, generator, x.device, x.dtype)
            x = x_mean + g * dt**0.5 * noise
        return x

    def sample(self, score: ScoreFunction, prior: "Prior", num_samples: int, t_end: float | None = None,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Draw (num_samples, 2) samples: `prior` at t_max, then reverse steps down to t_end (default t_min)."""
        x_start = prior.sample(num_samples, generator=generator, device=device)
        return self.reverse(score, x_start, self.t_max, t_end=t_end, generator=generator, progress=True)


class Prior(Protocol):
    """Distribution p_T at t_max that starts sampling and ends the likelihood ODE."""

    def sample(self, num_samples: int, generator: torch.Generator | None,
               device: torch.device | str) -> torch.Tensor: ...

    def log_density(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class GaussianPrior:
    """N(0, std^2 I) in 2D, the usual VE prior."""

    std: float

    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        return self.std * standard_normal((num_samples, 2), generator, device)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, std^2 I) for x (B, D); returns (B,)."""
        variance = self.std**2
        dimension = x.shape[1]
        return -0.5 * dimension * math.log(2 * math.pi * variance) - (x**2).sum(dim=1) / (2 * variance)


@dataclass(frozen=True)
class NoisedPointsPrior:
    """(1/K) sum_mu N(xi_mu, std^2 I): the exact marginal of the training points (K, 2) at std."""

    points: torch.Tensor
    std: float

    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        index = torch.randint(0, len(self.points), (num_samples,), generator=generator)
        centers = self.points[index].to(device=device, dtype=torch.float32)
        return centers + self.std * standard_normal((num_samples, 2), generator, device)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p_T(x) for x (B, D); returns (B,)."""
        points = self.points.to(device=x.device, dtype=x.dtype)
        squared_distances = torch.cdist(x, points) ** 2
        dimension = x.shape[1]
        return torch.logsumexp(-squared_distances / (2 * self.std**2), dim=1) - math.log(len(points)) \
            - 0.5 * dimension * math.log(2 * math.pi * self.std**2)


PRIOR_KINDS = ("points", "gaussian")


def make_prior(kind: str, sde: VESDE, points: np.ndarray) -> Prior:
    """Build the prior at t_max: 'points' (exact marginal of the training points) or 'gaussian'."""
    std = float(sde.marginal_std(sde.t_max))
    if kind == "points":
        return NoisedPointsPrior(torch.as_tensor(points, dtype=torch.float64), std)
    if kind == "gaussian":
        return GaussianPrior(std)
    raise MemgenError(f"--prior {kind!r} is unknown; use one of {', '.join(PRIOR_KINDS)}")


def standard_normal(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
                    device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw N(0, 1) noise on the CPU generator and move it to `device`.

    Drawing on the CPU makes the same seed give the same noise on every device.
    """
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)
