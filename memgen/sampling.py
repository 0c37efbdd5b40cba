"""Reverse-process samplers: ancestral DDPM and DDIM, with one random stream per sample.

Both samplers follow diffusers 0.42.1 step for step, and the tests compare them with it:

- DDPM is `DDPMScheduler` with its defaults: all T steps t = T-1, ..., 0, posterior variance
  "fixed_small" (beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t), the predicted x0
  clipped to [-1, 1], no noise added at t = 0.
- DDIM is `DDIMScheduler` with its defaults: timestep spacing "leading" (steps
  t_k = k * (T // steps) for k = steps-1, ..., 0), steps_offset 0, set_alpha_to_one True
  (abar = 1 after the last step), the predicted x0 clipped to [-1, 1], and the
  unclipped eps prediction in the direction term. These are also the choices of the DDIM
  paper's own code (Song et al. 2021), which steps through range(0, T, T // steps).

Every sample i of a run with seed s draws its initial noise and every step's noise from
its own CPU `torch.Generator` (see `sample_seed`). Its random numbers therefore depend on
(s, i) only, not on the batch size, the number of processes or the device. The network
itself may round differently for another batch size, because matrix products of other
shapes sum in another order: about 1e-6 per call in float32 on CPU, which the tests bound.
"""

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from memgen.diffusion import NoiseSchedule
from memgen.errors import MemgenError

logger = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddim")
DEFAULT_DDIM_STEPS = 50
CLIP_RANGE = 1.0

# A noise function takes the current batch `(B, C, H, W)` and returns standard normal
# noise of the same shape, dtype and device.
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
# Called after every step with (t, x_prev, x0_pred); the tests record trajectories with it.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def sample_seed(seed: int, index: int) -> int:
    """Return the 64-bit seed of sample `index` in a run seeded with `seed`.

    It is the first word of numpy's `SeedSequence(seed, spawn_key=(index,))`, the state of
    child `index` of `SeedSequence(seed).spawn(...)`, so streams of different samples are
    independent for any number of samples.
    """
    if seed < 0 or index < 0:
        raise MemgenError(f"seed {seed} and sample index {index} must be non-negative; pass --seed 0 or more")
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, dtype=np.uint64)
    return int(state[0])


class PerSampleNoise:
    """Standard normal noise for a batch, row i drawn from the generator of sample `indices[i]`.

    Each call draws one `(1, C, H, W)` tensor per row on the CPU in float32 and moves the
    batch to the device and dtype of its argument. This is what diffusers' `randn_tensor`
    does with a list of CPU generators, so both libraries see the same noise.
    """

    def __init__(self, seed: int, indices: Sequence[int]):
        self.indices = [int(index) for index in indices]
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, index)) for index in self.indices]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} rows but noise for {len(self.generators)} samples")
        return self.draw(like.shape[1:]).to(device=like.device, dtype=like.dtype)

    def draw(self, image_shape: Sequence[int]) -> torch.Tensor:
        """Draw one float32 image of `image_shape` (C, H, W) per sample, `(B, C, H, W)` on the CPU."""
        row_shape = (1, *image_shape)
        rows = [torch.randn(row_shape, generator=generator, dtype=torch.float32) for generator in self.generators]
        return torch.cat(rows)


def _abar(schedule: NoiseSchedule, t: int) -> float:
    """Return abar_t as a Python float, with abar = 1 for t < 0 (the state after the last step)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _batch_steps(t: int, x_t: torch.Tensor) -> torch.Tensor:
    return torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)


def ddpm_step(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: int,
              noise_fn: NoiseFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Take one ancestral step from x_t to x_{t-1} (Ho et al. 2020, eqs. 6-7 and 15).

    Returns (x_{t-1}, x0_pred), both `(B, C, H, W)`; x0_pred is clipped to [-1, 1]. Noise
    is drawn only for t > 0, as diffusers does.
    """
    abar_t = _abar(schedule, t)
    abar_prev = _abar(schedule, t - 1)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t

    x0_pred = schedule.predict_x0(model_output, x_t, _batch_steps(t, x_t))
    x0_pred = x0_pred.clamp(-CLIP_RANGE, CLIP_RANGE)

    # Posterior mean mu~_t(x_t, x0) of q(x_{t-1} | x_t, x0).
    x0_coef = abar_prev ** 0.5 * beta_t / (1 - abar_t)
    xt_coef = alpha_t ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    x_prev = x0_coef * x0_pred + xt_coef * x_t

    if t > 0:
        # "fixed small" variance beta~_t, floored at 1e-20 as in diffusers.
        variance = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
        x_prev = x_prev + variance ** 0.5 * noise_fn(x_t)
    return x_prev, x0_pred


def ddim_step(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
              eta: float, noise_fn: NoiseFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Take one DDIM step from x_t to x_{t_prev} (Song et al. 2021, eqs. 12 and 16).

    `t_prev < 0` means the clean end of the chain (abar = 1). Returns (x_{t_prev}, x0_pred),
    both `(B, C, H, W)`; x0_pred is clipped to [-1, 1], eps_pred is not. Noise is drawn
    only when eta > 0.
    """
    abar_t = _abar(schedule, t)
    abar_prev = _abar(schedule, t_prev)

    t_batch = _batch_steps(t, x_t)
    x0_pred = schedule.predict_x0(model_output, x_t, t_batch)
    eps = schedule.predict_eps(model_output, x_t, t_batch)
    x0_pred = x0_pred.clamp(-CLIP_RANGE, CLIP_RANGE)

    # sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    sigma = eta * variance ** 0.5

    direction = (1 - abar_prev - sigma ** 2) ** 0.5 * eps
    x_prev = abar_prev ** 0.5 * x0_pred + direction
    if eta > 0:
        if noise_fn is None:
            raise ValueError("ddim_step with eta > 0 needs a noise_fn")
        x_prev = x_prev + sigma * noise_fn(x_t)
    return x_prev, x0_pred


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """Return the DDIM steps of "leading" spacing: k * (T // steps) for k = steps-1, ..., 0.

    With T = 1000 and 50 steps: 980, 960, ..., 20, 0 (diffusers' DDIMScheduler default).
    """
    if not 1 <= steps <= timesteps:
        raise MemgenError(f"--steps {steps} is invalid for a schedule of {timesteps} steps; "
                          f"use 1 to {timesteps}")
    ratio = timesteps // steps
    return [k * ratio for k in reversed(range(steps))]


def ddim_denoise_timesteps(t_start: int, steps: int) -> list[int]:
    """Return the steps that `ddim_denoise` visits from `t_start` down to 0.

    n = min(steps, t_start), at least 1, evenly spaced steps round(t_start * (n-1-k) / (n-1))
    for k = 0, ..., n-1 (numpy rounding, halves to even): they start at t_start and, for
    n >= 2, end at 0. With n = 1 the only step is t_start. Consecutive steps differ by
    at least 1 because n <= t_start.
    """
    if t_start < 0 or steps < 1:
        raise ValueError(f"t_start {t_start} must be >= 0 and steps {steps} >= 1")
    count = max(1, min(steps, t_start))
    if count == 1:
        return [t_start]
    return [int(t) for t in np.linspace(t_start, 0, count).round()]


def run_chain(model: torch.nn.Module, schedule: NoiseSchedule, x: torch.Tensor, timesteps: Sequence[int],
              sampler: str, eta: float = 0.0, noise_fn: NoiseFn | None = None,
              on_step: StepCallback | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse chain from x at `timesteps[0]` through every listed step.

    DDPM steps go from t to t - 1, DDIM steps from `timesteps[k]` to `timesteps[k+1]` and
    from the last one to the clean end. Returns (x after the last step, x0_pred of the
    last step), both `(B, C, H, W)`.
    """
    from tqdm.auto import tqdm

    x0_pred = x
    for k, t in enumerate(tqdm(timesteps, desc=f"{sampler} steps", leave=False, disable=not progress)):
        model_output = model(x, _batch_steps(t, x))
        if sampler == "ddpm":
            x, x0_pred = ddpm_step(schedule, model_output, x, t, noise_fn)
        else:
            t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
            x, x0_pred = ddim_step(schedule, model_output, x, t, t_prev, eta, noise_fn)
        if on_step is not None:
            on_step(t, x, x0_pred)
    return x, x0_pred


def check_sampler(sampler: str, steps: int | None, eta: float, timesteps: int) -> int:
    """Validate sampler settings and return the number of network evaluations.

    DDPM always runs all T steps, so `steps` must be None or T. DDIM takes 1 to T steps
    (None means 50) and eta >= 0 (0 is deterministic, 1 has DDPM's variance).
    """
    if sampler not in SAMPLERS:
        raise MemgenError(f"--sampler {sampler!r} is not supported; use one of {', '.join(SAMPLERS)}")
    if sampler == "ddpm":
        if steps is not None and steps != timesteps:
            raise MemgenError(f"--steps {steps} does not apply to the DDPM sampler, which runs all "
                              f"{timesteps} steps of the schedule; drop --steps or use --sampler ddim")
        return timesteps
    steps = DEFAULT_DDIM_STEPS if steps is None else steps
    ddim_timesteps(timesteps, steps)
    if not eta >= 0:
        raise MemgenError(f"--eta {eta} is invalid; use 0 (deterministic DDIM) or more (1 = DDPM variance)")
    return steps


@torch.no_grad()
def sample_images(model: torch.nn.Module, schedule: NoiseSchedule, image_shape: Sequence[int],
                  indices: Sequence[int], seed: int, sampler: str = "ddpm", steps: int | None = None,
                  eta: float = 0.0, device: torch.device | str = "cpu", on_step: StepCallback | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Draw the samples with the given global `indices` from noise to images.

    image_shape: (C, H, W). Sample i starts from noise of its own generator seeded by
    `sample_seed(seed, i)`. Returns float32 `(len(indices), C, H, W)` on the CPU in [-1, 1]
    (the last step of both samplers returns the clipped x0_pred).
    """
    steps = check_sampler(sampler, steps, eta, schedule.timesteps)
    noise = PerSampleNoise(seed, indices)
    x = noise.draw(image_shape).to(device)
    if sampler == "ddpm":
        timesteps = list(reversed(range(schedule.timesteps)))
    else:
        timesteps = ddim_timesteps(schedule.timesteps, steps)
    x, _ = run_chain(model, schedule, x, timesteps, sampler, eta=eta, noise_fn=noise,
                     on_step=on_step, progress=progress)
    return x.float().clamp(-CLIP_RANGE, CLIP_RANGE).cpu()


@torch.no_grad()
def ddim_denoise(model: torch.nn.Module, schedule: NoiseSchedule, x_t: torch.Tensor, t_start: int,
                 steps: int, eta: float = 0.0, noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """Denoise x_t, noised to step `t_start`, back to t = 0 with DDIM; return the last x0_pred.

    x_t: `(B, C, H, W)`. The chain visits `ddim_denoise_timesteps(t_start, steps)`:
    min(steps, t_start) steps (at least 1) evenly spaced from t_start down to 0. The result is
    the predicted x0 of the last step, clipped to [-1, 1], `(B, C, H, W)`. With eta > 0,
    `noise_fn` supplies the step noise (for example a `PerSampleNoise`); without one it
    falls back to `torch.randn_like`, which uses the global random state.
    """
    if not 0 <= t_start < schedule.timesteps:
        raise MemgenError(f"t_start {t_start} is outside the schedule's steps 0 to {schedule.timesteps - 1}")
    if eta > 0 and noise_fn is None:
        noise_fn = torch.randn_like
    timesteps = ddim_denoise_timesteps(t_start, steps)
    _, x0_pred = run_chain(model, schedule, x_t, timesteps, "ddim", eta=eta, noise_fn=noise_fn)
    return x0_pred
