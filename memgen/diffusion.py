"""Forward noising process of a DDPM: the noise schedule, `q_sample`, and the training loss.

Notation follows Ho et al. 2020 (arXiv:2006.11239): `betas[t]` is the variance added at
step t, `alphas = 1 - betas`, `alphas_cumprod[t] = prod_{s <= t} alphas[s]` (written abar_t),
and `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` with `eps ~ N(0, I)`. Step indices t
run from 0 to T - 1, as in diffusers, so `alphas_cumprod[0] = 1 - betas[0]`.
"""

import math

import torch
import torch.nn.functional as F

from memgen.errors import MemgenError

BETA_SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "sample")

# Largest beta of the cosine schedule, as in Nichol and Dhariwal 2021 and diffusers'
# "squaredcos_cap_v2".
COSINE_MAX_BETA = 0.999
COSINE_OFFSET = 0.008


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Return `timesteps` betas evenly spaced from `beta_start` to `beta_end` (float64)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int) -> torch.Tensor:
    """Return the betas of the cosine schedule of Nichol and Dhariwal 2021 (float64).

    abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2 for s in [0, 1], and
    beta_t = min(1 - abar((t + 1) / T) / abar(t / T), 0.999), which is diffusers'
    "squaredcos_cap_v2".
    """
    def alpha_bar(s: float) -> float:
        return math.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((t + 1) / timesteps) / alpha_bar(t / timesteps), COSINE_MAX_BETA)
             for t in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pick `values[t]` for each sample and shape it `(B, 1, ..., 1)` to broadcast over `like`."""
    picked = values[t.detach().to("cpu", torch.long)]
    picked = picked.to(device=like.device, dtype=like.dtype)
    return picked.reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """Betas of a discrete diffusion of `timesteps` steps and the formulas that use them.

    `betas`, `alphas` and `alphas_cumprod` are float64 tensors of shape `(timesteps,)` on
    the CPU. Every method casts the coefficients it needs to the dtype and device of its
    input, so the schedule serves float32 models on any device.
    """

    def __init__(self, timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, prediction_type: str = "epsilon"):
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise MemgenError(f"timesteps {timesteps!r} is invalid; use a positive integer such as 1000")
        if beta_schedule not in BETA_SCHEDULES:
            raise MemgenError(f"beta_schedule {beta_schedule!r} is not supported; "
                              f"use one of {', '.join(BETA_SCHEDULES)}")
        if prediction_type not in PREDICTION_TYPES:
            raise MemgenError(f"prediction_type {prediction_type!r} is not supported; "
                              f"use one of {', '.join(PREDICTION_TYPES)}")
        if not 0 < beta_start <= beta_end < 1:
            raise MemgenError(f"beta_start {beta_start} and beta_end {beta_end} are invalid; "
                              "they need 0 < beta_start <= beta_end < 1 (the default is 1e-4 to 0.02)")

        self.timesteps = timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.prediction_type = prediction_type

        if beta_schedule == "linear":
            self.betas = linear_betas(timesteps, beta_start, beta_end)
        else:
            self.betas = cosine_betas(timesteps)
        self.alphas = 1.0 - self.betas
        # The product runs over 1 - beta. A product over beta (a known slip in published energy
        # code) would leave a noise std of about 1 at t = 0 instead of 0.01.
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def from_config(cls, train: dict) -> "NoiseSchedule":
        """Build the schedule from the `train` section of a configuration.

        Reads `beta_schedule`, `timesteps` and `prediction_type`; a missing key takes the
        paper's value (linear, 1000, epsilon). The betas always run from 1e-4 to 0.02.
        """
        return cls(timesteps=int(train.get("timesteps", 1000)),
                   beta_schedule=str(train.get("beta_schedule", "linear")),
                   prediction_type=str(train.get("prediction_type", "epsilon")))

    def __repr__(self) -> str:
        return (f"NoiseSchedule(timesteps={self.timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"prediction_type={self.prediction_type!r})")

    def check_timesteps(self, t: torch.Tensor) -> None:
        """Raise MemgenError unless every entry of `t` is an integer step in [0, T - 1]."""
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise MemgenError(f"step indices must be an integer tensor, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.timesteps):
            raise MemgenError(f"step indices must lie in [0, {self.timesteps - 1}], "
                              f"got values from {int(t.min())} to {int(t.max())}")

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean images to step t: `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`.

        x0 and noise: `(B, C, H, W)`; t: int64 `(B,)`. Returns x_t, `(B, C, H, W)`.
        """
        self.check_timesteps(t)
        abar = self.alphas_cumprod
        return _gather(abar.sqrt(), t, x0) * x0 + _gather((1 - abar).sqrt(), t, x0) * noise

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the network's estimate of x0 (not clipped), `(B, C, H, W)`.

        For epsilon prediction, x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);
        for sample prediction the output is x0_pred itself.
        """
        if self.prediction_type == "sample":
            return model_output
        abar = self.alphas_cumprod
        return (x_t - _gather((1 - abar).sqrt(), t, x_t) * model_output) / _gather(abar.sqrt(), t, x_t)

    def predict_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the network's estimate of the noise eps in x_t, `(B, C, H, W)`.

        For sample prediction, eps = (x_t - sqrt(abar_t) x0_pred) / sqrt(1 - abar_t).
        """
        if self.prediction_type == "epsilon":
            return model_output
        return self.eps_from_x0(model_output, x_t, t)

    def eps_from_x0(self, x0_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the noise that takes `x0_pred` to x_t at step t, `(B, C, H, W)`."""
        abar = self.alphas_cumprod
        return (x_t - _gather(abar.sqrt(), t, x_t) * x0_pred) / _gather((1 - abar).sqrt(), t, x_t)

    def training_loss(self, model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """Return the denoising loss: the MSE between the network output and its target.

        The target is `noise` for epsilon prediction and `x0` for sample prediction; the mean
        runs over all elements. x0 and noise: `(B, C, H, W)` with x0 in [-1, 1]; t: int64 `(B,)`.
        """
        x_t = self.q_sample(x0, t, noise)
        target = noise if self.prediction_type == "epsilon" else x0
        return F.mse_loss(model(x_t, t), target)
