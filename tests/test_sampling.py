"""Noise schedule and samplers against diffusers 0.42.1, the reference implementation.

Trajectories are compared two ways. In float64 (network, schedule and diffusers' scheduler
all in double precision, same noise) every step's x_t must agree to 1e-10, which checks the
formulas. In float32 against diffusers as shipped they agree to 1e-3 only: diffusers computes
beta_t = 1 - abar_t / abar_{t-1} in float32, which loses about four digits at small t,
while memgen computes its coefficients in float64.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from diffusers.utils.torch_utils import randn_tensor

import memgen.unet as unet_module
from memgen.diffusion import NoiseSchedule
from memgen.errors import MemgenError
from memgen.sampling import (PerSampleNoise, check_sampler, ddim_denoise, ddim_denoise_timesteps, ddim_timesteps,
                             run_chain, sample_images, sample_seed)
from memgen.unet import UNet

T = 50
IMAGE_SHAPE = (1, 8, 8)
SEED = 7
INDICES = [0, 1, 2, 5]
FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-3


def make_unet(dtype: torch.dtype = torch.float32) -> UNet:
    torch.manual_seed(0)
    network = UNet(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                   num_res_blocks=1, dropout=0.0)
    return network.eval().to(dtype)


@pytest.fixture
def float64_unet(monkeypatch) -> UNet:
    """The test UNet in double precision; its time embedding is cast to float64 as well."""
    original = unet_module.timestep_embedding
    monkeypatch.setattr(unet_module, "timestep_embedding", lambda t, dim: original(t, dim).double())
    return make_unet(torch.float64)


def diffusers_scheduler(kind: str, prediction_type: str, steps: int, schedule: NoiseSchedule | None = None):
    """Return a diffusers scheduler with its defaults; with `schedule`, its float64 abar is used."""
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    scheduler = cls(num_train_timesteps=T, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    if schedule is not None:
        scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def diffusers_trajectory(network, scheduler, kind: str, eta: float, dtype: torch.dtype,
                         monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Run diffusers' step loop with the same per-sample noise as memgen; return every x_t."""
    noise = PerSampleNoise(SEED, INDICES)
    # diffusers draws step noise with randn_tensor in the model's dtype; hand it memgen's
    # float32 draws instead so the float64 run sees the same numbers.
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kwargs: noise.draw(shape[1:]).to(dtype))
    x = noise.draw(IMAGE_SHAPE).to(dtype)
    trajectory = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = network(x, torch.full((len(INDICES),), int(t)))
            if kind == "ddpm":
                x = scheduler.step(output, t, x).prev_sample
            else:
                variance_noise = noise.draw(IMAGE_SHAPE).to(dtype) if eta > 0 else None
                x = scheduler.step(output, t, x, eta=eta, variance_noise=variance_noise).prev_sample
            trajectory.append((int(t), x))
    return trajectory


def memgen_trajectory(network, schedule: NoiseSchedule, kind: str, steps: int, eta: float,
                      dtype: torch.dtype) -> list[tuple[int, torch.Tensor]]:
    noise = PerSampleNoise(SEED, INDICES)
    x = noise.draw(IMAGE_SHAPE).to(dtype)
    timesteps = list(reversed(range(T))) if kind == "ddpm" else ddim_timesteps(T, steps)
    trajectory = []
    with torch.no_grad():
        run_chain(network, schedule, x, timesteps, kind, eta=eta, noise_fn=noise,
                  on_step=lambda t, x_prev, x0_pred: trajectory.append((t, x_prev)))
    return trajectory


SAMPLER_CASES = [("ddpm", T, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0), ("ddim", 25, 0.5)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("kind, steps, eta", SAMPLER_CASES)
def test_sampler_matches_diffusers_float64(float64_unet, monkeypatch, prediction_type, kind, steps, eta):
    schedule = NoiseSchedule(timesteps=T, prediction_type=prediction_type)
    scheduler = diffusers_scheduler(kind, prediction_type, steps, schedule)

    expected = diffusers_trajectory(float64_unet, scheduler, kind, eta, torch.float64, monkeypatch)
    actual = memgen_trajectory(float64_unet, schedule, kind, steps, eta, torch.float64)

    assert [t for t, _ in actual] == [t for t, _ in expected]
    assert len(actual) == steps
    for (t, x_actual), (_, x_expected) in zip(actual, expected):
        error = (x_actual - x_expected).abs().max().item()
        assert error < FLOAT64_TOLERANCE, f"step t={t}: max |x_t difference| {error}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("kind, steps, eta", SAMPLER_CASES)
def test_sample_images_matches_diffusers_float32(prediction_type, kind, steps, eta):
    """sample_images against unmodified diffusers in float32, noise from its own randn_tensor."""
    network = make_unet()
    schedule = NoiseSchedule(timesteps=T, prediction_type=prediction_type)
    recorded = []
    samples = sample_images(network, schedule, IMAGE_SHAPE, INDICES, SEED, kind,
                            steps=None if kind == "ddpm" else steps, eta=eta,
                            on_step=lambda t, x_prev, x0_pred: recorded.append((t, x_prev)))

    scheduler = diffusers_scheduler(kind, prediction_type, steps)
    generators = [torch.Generator().manual_seed(sample_seed(SEED, i)) for i in INDICES]
    x = randn_tensor((len(INDICES), *IMAGE_SHAPE), generator=generators, dtype=torch.float32)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            output = network(x, torch.full((len(INDICES),), int(t)))
            extra = {"eta": eta} if kind == "ddim" else {}
            x = scheduler.step(output, t, x, generator=generators, **extra).prev_sample
            assert recorded[k][0] == int(t)
            error = (recorded[k][1] - x).abs().max().item()
            assert error < FLOAT32_TOLERANCE, f"step t={int(t)}: max |x_t difference| {error}"

    assert samples.dtype == torch.float32
    assert samples.shape == (len(INDICES), *IMAGE_SHAPE)
    assert (samples - x).abs().max().item() < FLOAT32_TOLERANCE


def test_noise_matches_diffusers_randn_tensor():
    noise = PerSampleNoise(SEED, INDICES)
    generators = [torch.Generator().manual_seed(sample_seed(SEED, i)) for i in INDICES]
    like = torch.zeros((len(INDICES), *IMAGE_SHAPE))

    for _ in range(3):
        expected = randn_tensor(like.shape, generator=generators, dtype=torch.float32)
        assert torch.equal(noise(like), expected)


def test_sample_seed_known_values():
    # First 64-bit word of numpy.random.SeedSequence(3407, spawn_key=(5,)).generate_state(1, np.uint64);
    # a change here changes every sample that memgen draws.
    assert sample_seed(3407, 5) == 14792130025630478740
    seeds = {sample_seed(3407, index) for index in range(1000)}
    assert len(seeds) == 1000
    assert sample_seed(3407, 0) != sample_seed(3408, 0)


def test_sample_seed_rejects_negative():
    with pytest.raises(MemgenError, match="non-negative"):
        sample_seed(-1, 0)


# Matrix products of different batch sizes round differently in float32 (about 1e-6 per
# network call for this UNet on CPU), so samples agree across batch sizes to this bound,
# and bit for bit when the batches are the same.
BATCH_TOLERANCE = 1e-5


@pytest.mark.parametrize("kind, steps, eta", [("ddim", 10, 1.0), ("ddpm", None, 0.0)])
def test_samples_independent_of_batch(kind, steps, eta):
    network = make_unet()
    schedule = NoiseSchedule(timesteps=T)
    indices = list(range(6))

    def draw(part):
        return sample_images(network, schedule, IMAGE_SHAPE, part, SEED, kind, steps=steps, eta=eta)

    whole = draw(indices)
    halves = torch.cat([draw(indices[:4]), draw(indices[4:])])
    singles = torch.cat([draw([index]) for index in indices])

    assert (whole - halves).abs().max().item() < BATCH_TOLERANCE
    assert (whole - singles).abs().max().item() < BATCH_TOLERANCE
    assert torch.equal(draw(indices[4:]), halves[4:])
    assert whole.min() >= -1
    assert whole.max() <= 1


def test_samples_depend_on_seed_and_index():
    network = make_unet()
    schedule = NoiseSchedule(timesteps=T)
    first = sample_images(network, schedule, IMAGE_SHAPE, [0, 1], SEED, "ddim", steps=5)
    other_seed = sample_images(network, schedule, IMAGE_SHAPE, [0, 1], SEED + 1, "ddim", steps=5)

    assert (first[0] - first[1]).abs().max().item() > 0.1
    assert (first - other_seed).abs().max().item() > 0.1


def test_ddim_timesteps_leading():
    assert ddim_timesteps(1000, 50)[:3] == [980, 960, 940]
    assert ddim_timesteps(1000, 50)[-1] == 0
    assert ddim_timesteps(50, 10) == [45, 40, 35, 30, 25, 20, 15, 10, 5, 0]
    assert ddim_timesteps(50, 50) == list(range(49, -1, -1))
    assert ddim_timesteps(1000, 3) == [666, 333, 0]


def test_ddim_timesteps_match_diffusers():
    for steps in (1, 3, 7, 50, 999, 1000):
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(steps)
        assert ddim_timesteps(1000, steps) == scheduler.timesteps.tolist()


def test_ddim_timesteps_reject_bad_steps():
    with pytest.raises(MemgenError, match="--steps 0"):
        ddim_timesteps(1000, 0)
    with pytest.raises(MemgenError, match="--steps 1001"):
        ddim_timesteps(1000, 1001)


@pytest.mark.parametrize("t_start, steps, expected", [
    (45, 10, [45, 40, 35, 30, 25, 20, 15, 10, 5, 0]),
    (1, 20, [1]),
    (0, 20, [0]),
    (2, 20, [2, 0]),
    (3, 20, [3, 2, 0]),
    (10, 6, [10, 8, 6, 4, 2, 0]),
    (10, 4, [10, 7, 3, 0]),
    (999, 4, [999, 666, 333, 0]),
])
def test_ddim_denoise_timesteps(t_start, steps, expected):
    assert ddim_denoise_timesteps(t_start, steps) == expected


def test_ddim_denoise_timesteps_distinct():
    for t_start in range(0, 200):
        for steps in (1, 2, 5, 20, 300):
            visited = ddim_denoise_timesteps(t_start, steps)
            assert visited[0] == t_start
            assert len(visited) == max(1, min(steps, t_start))
            assert all(a > b for a, b in zip(visited, visited[1:]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_denoise_matches_diffusers(float64_unet, prediction_type, eta):
    """From t_start = 45 with 10 steps the visited steps equal diffusers' 10-step DDIM."""
    schedule = NoiseSchedule(timesteps=T, prediction_type=prediction_type)
    scheduler = diffusers_scheduler("ddim", prediction_type, 10, schedule)
    x0 = torch.rand((len(INDICES), *IMAGE_SHAPE), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) * 2 - 1
    x_t = schedule.q_sample(x0, torch.full((len(INDICES),), 45), torch.randn_like(x0))

    actual = ddim_denoise(float64_unet, schedule, x_t, 45, 10, eta=eta,
                          noise_fn=PerSampleNoise(SEED, INDICES))

    noise = PerSampleNoise(SEED, INDICES)
    x = x_t
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = float64_unet(x, torch.full((len(INDICES),), int(t)))
            variance_noise = noise(x) if eta > 0 else None
            step = scheduler.step(output, t, x, eta=eta, variance_noise=variance_noise)
            x = step.prev_sample
    expected = step.pred_original_sample

    assert (actual - expected).abs().max().item() < FLOAT64_TOLERANCE
    assert actual.min() >= -1
    assert actual.max() <= 1


def test_ddim_denoise_one_step_is_clipped_x0_pred():
    """With t_start = 1 the only step is t = 1 and the result is its clipped x0 prediction."""
    network = make_unet()
    schedule = NoiseSchedule(timesteps=T)
    x_t = torch.randn((3, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(2))
    t = torch.full((3,), 1)
    with torch.no_grad():
        expected = schedule.predict_x0(network(x_t, t), x_t, t).clamp(-1, 1)

    assert torch.equal(ddim_denoise(network, schedule, x_t, 1, 20), expected)


def test_ddim_denoise_rejects_t_start():
    with pytest.raises(MemgenError, match="t_start 50"):
        ddim_denoise(make_unet(), NoiseSchedule(timesteps=T), torch.zeros(1, *IMAGE_SHAPE), 50, 10)


def test_check_sampler():
    assert check_sampler("ddpm", None, 0.0, 1000) == 1000
    assert check_sampler("ddpm", 1000, 0.0, 1000) == 1000
    assert check_sampler("ddim", None, 0.0, 1000) == 50
    assert check_sampler("ddim", 20, 1.0, 1000) == 20
    with pytest.raises(MemgenError, match="--steps 50 does not apply to the DDPM"):
        check_sampler("ddpm", 50, 0.0, 1000)
    with pytest.raises(MemgenError, match="--sampler 'euler'"):
        check_sampler("euler", None, 0.0, 1000)
    with pytest.raises(MemgenError, match="--eta -0.5"):
        check_sampler("ddim", 10, -0.5, 1000)


# Noise schedule


@pytest.mark.parametrize("beta_schedule, diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod_match_diffusers(beta_schedule, diffusers_name):
    schedule = NoiseSchedule(beta_schedule=beta_schedule)
    scheduler = DDPMScheduler(beta_schedule=diffusers_name)

    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.alphas_cumprod.shape == (1000,)
    # diffusers accumulates the product in float32, so it drifts by a few float32 ulps.
    assert (schedule.alphas_cumprod - scheduler.alphas_cumprod.double()).abs().max().item() < 1e-6
    assert torch.allclose(schedule.betas, scheduler.betas.double(), rtol=1e-6, atol=0)


def test_alphas_cumprod_closed_form():
    schedule = NoiseSchedule()
    betas = np.linspace(1e-4, 0.02, 1000)

    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert np.allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12, atol=0)
    # abar_999 = 4.035e-5 for the paper's schedule; cumprod(betas) would be about 1e-2000.
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)


def test_q_sample_matches_add_noise():
    schedule = NoiseSchedule()
    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(3)
    x0 = torch.rand((4, 1, 8, 8), generator=generator) * 2 - 1
    noise = torch.randn((4, 1, 8, 8), generator=generator)
    t = torch.tensor([0, 10, 500, 999])

    error = (schedule.q_sample(x0, t, noise) - scheduler.add_noise(x0, noise, t)).abs().max().item()
    assert error < 1e-5


def test_q_sample_closed_form():
    schedule = NoiseSchedule()
    x0 = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    noise = torch.full((2, 1, 2, 2), -1.0, dtype=torch.float64)
    t = torch.tensor([0, 999])
    x_t = schedule.q_sample(x0, t, noise)
    abar = schedule.alphas_cumprod

    assert x_t.dtype == torch.float64
    assert x_t[0, 0, 0, 0].item() == pytest.approx(0.5 * abar[0].sqrt().item() - (1 - abar[0]).sqrt().item())
    assert x_t[1, 0, 1, 1].item() == pytest.approx(0.5 * abar[999].sqrt().item() - (1 - abar[999]).sqrt().item())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_predictions_invert_q_sample(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(4)
    x0 = torch.rand((3, 1, 4, 4), generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn((3, 1, 4, 4), generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 300, 999])
    x_t = schedule.q_sample(x0, t, eps)
    output = eps if prediction_type == "epsilon" else x0

    assert torch.allclose(schedule.predict_x0(output, x_t, t), x0, atol=1e-9)
    assert torch.allclose(schedule.predict_eps(output, x_t, t), eps, atol=1e-9)


class ConstantModel(torch.nn.Module):
    def __init__(self, value: torch.Tensor | float):
        super().__init__()
        self.value = value

    def forward(self, x_t, t):
        return torch.zeros_like(x_t) + self.value


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_training_loss_known_values(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand((4, 1, 4, 4), generator=generator) * 2 - 1
    noise = torch.randn((4, 1, 4, 4), generator=generator)
    t = torch.tensor([0, 1, 500, 999])
    target = noise if prediction_type == "epsilon" else x0

    zero_loss = schedule.training_loss(ConstantModel(0.0), x0, t, noise)
    exact_loss = schedule.training_loss(ConstantModel(target), x0, t, noise)

    assert zero_loss.dim() == 0
    assert zero_loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-6)
    assert exact_loss.item() == 0.0


def test_from_config_reads_train_keys():
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear", "timesteps": 200, "prediction_type": "sample",
                                          "lr": 2e-4})

    assert schedule.timesteps == 200
    assert schedule.prediction_type == "sample"
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    assert NoiseSchedule.from_config({}).timesteps == 1000


@pytest.mark.parametrize("options, message", [
    ({"beta_schedule": "quadratic"}, "beta_schedule 'quadratic' is not supported; use one of linear, cosine"),
    ({"prediction_type": "v_prediction"}, "prediction_type 'v_prediction' is not supported"),
    ({"timesteps": 0}, "timesteps 0 is invalid"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start 0.1 and beta_end 0.01 are invalid"),
])
def test_schedule_rejects_bad_options(options, message):
    with pytest.raises(MemgenError, match=message):
        NoiseSchedule(**options)


def test_q_sample_rejects_out_of_range_steps():
    schedule = NoiseSchedule(timesteps=T)
    with pytest.raises(MemgenError, match="from 0 to 50"):
        schedule.q_sample(torch.zeros(2, 1, 2, 2), torch.tensor([0, 50]), torch.zeros(2, 1, 2, 2))
    with pytest.raises(MemgenError, match="integer tensor"):
        schedule.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([0.5]), torch.zeros(1, 1, 2, 2))
