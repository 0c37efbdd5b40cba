"""Relative energy against closed forms: Gaussian data, whose score is exact.

For data N(mu, s^2 I), x_t ~ N(sqrt(abar) mu, v I) with v = abar s^2 + 1 - abar, so the
exact noise prediction is eps = sqrt(1 - abar) (y - sqrt(abar) mu) / v and the score is
s(y) = -(y - sqrt(abar) mu) / v. Then grad_u(y) = -beta/2 y - beta s(y) is the gradient of

    U(y) = -beta/4 ||y||^2 + beta / (2 v) ||y - sqrt(abar) mu||^2,

and the line integral from x to r along any path is U(r) - U(x). Everything runs in
float64 so that only the quadrature error remains.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from memgen.config import parse_sections
from memgen.diffusion import NoiseSchedule
from memgen.energy import (EnergyOptions, load_reference_images, quadrature_weights, relative_energy,
                           run_energy)
from memgen.errors import MemgenError
from memgen.files import load_npz, read_meta, save_npz
from memgen.ideal import IdealDenoiser

from probe_inputs import data_meta, training_images, write_class_file, write_dataset, write_ideal_sweep

T = 1000
SHAPE = (1, 4, 4)



class GaussianEpsilon(nn.Module):
    """The exact noise prediction for data N(mu, std^2 I) (prediction_type epsilon)."""

    def __init__(self, mu: torch.Tensor, std: float, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mu = mu
        self.std = std
        self.alphas_cumprod = alphas_cumprod

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].to(y).view(-1, 1, 1, 1)
        variance = abar * self.std ** 2 + 1 - abar
        return (1 - abar).sqrt() * (y - abar.sqrt() * self.mu) / variance


def gaussian_potential(y: torch.Tensor, mu: torch.Tensor, std: float, schedule: NoiseSchedule, t: int) -> torch.Tensor:
    """U(y) of the module docstring for each image of y, float64 (N,)."""
    abar = float(schedule.alphas_cumprod[t])
    beta = float(schedule.betas[t])
    variance = abar * std ** 2 + 1 - abar
    flat = y.flatten(1)
    shifted = (y - math.sqrt(abar) * mu).flatten(1)
    return -beta / 4 * (flat ** 2).sum(1) + beta / (2 * variance) * (shifted ** 2).sum(1)


def gaussian_gradient(y: torch.Tensor, mu: torch.Tensor, std: float, schedule: NoiseSchedule, t: int) -> torch.Tensor:
    abar = float(schedule.alphas_cumprod[t])
    beta = float(schedule.betas[t])
    variance = abar * std ** 2 + 1 - abar
    return -beta / 2 * y + beta * (y - math.sqrt(abar) * mu) / variance


def random_images(count: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * (torch.rand(count, *SHAPE, generator=generator, dtype=torch.float64) * 2 - 1)


@pytest.fixture
def gaussian_case():
    schedule = NoiseSchedule(timesteps=T)
    mu = random_images(1, seed=0, scale=0.5)
    std = 0.5
    samples = random_images(3, seed=1)
    references = random_images(2, seed=2)
    return {"schedule": schedule, "mu": mu, "std": std, "samples": samples, "references": references,
            "network": GaussianEpsilon(mu, std, schedule.alphas_cumprod)}


def energy_error(case, t: int, num_points: int, quadrature: str) -> float:
    """Largest |computed - exact| over all (reference, sample) pairs, relative to the largest |exact|."""
    result = relative_energy(case["network"], case["schedule"], case["samples"], case["references"], t=t,
                             num_points=num_points, quadrature=quadrature, batch_size=2, ref_batch_size=1)
    exact_u = lambda y: gaussian_potential(y, case["mu"], case["std"], case["schedule"], t)
    exact = (exact_u(case["references"])[:, None] - exact_u(case["samples"])[None, :]).numpy()
    return float(np.abs(result.potential - exact).max() / np.abs(exact).max())


@pytest.mark.parametrize("t", [0, 500])
def test_trapezoid_matches_closed_form(gaussian_case, t):
    # Measured on this case: 2.5e-3 (t = 0) and 3.1e-3 (t = 500) at 20 nodes.
    assert energy_error(gaussian_case, t, 20, "trapezoid") < 5e-3


@pytest.mark.parametrize("t", [0, 500])
def test_trapezoid_error_falls_as_h_squared(gaussian_case, t):
    errors = {n: energy_error(gaussian_case, t, n, "trapezoid") for n in (10, 20, 40)}
    # The spacing is (pi/2) / (n - 1), so the O(h^2) error ratios are (19/9)^2 = 4.46 and (39/19)^2 = 4.21.
    assert errors[10] / errors[20] == pytest.approx((19 / 9) ** 2, rel=0.02)
    assert errors[20] / errors[40] == pytest.approx((39 / 19) ** 2, rel=0.02)


def test_simpson_error_falls_as_h_to_fourth(gaussian_case):
    errors = {n: energy_error(gaussian_case, 0, n, "simpson") for n in (10, 20, 40)}
    assert errors[20] < 1e-4
    assert errors[10] / errors[20] == pytest.approx((19 / 9) ** 4, rel=0.1)
    assert errors[20] / errors[40] == pytest.approx((39 / 19) ** 4, rel=0.1)


def test_paper_rule_adds_endpoint_halves(gaussian_case):
    """paper - trapezoid = h/2 (f(0) + f(pi/2)), with f(0) = grad_u(x).r and f(pi/2) = -grad_u(r).x."""
    case = gaussian_case
    num_points = 20
    spacing = (math.pi / 2) / (num_points - 1)
    common = dict(t=0, num_points=num_points, batch_size=3, ref_batch_size=2)
    paper = relative_energy(case["network"], case["schedule"], case["samples"], case["references"],
                            quadrature="paper", **common).potential
    trapezoid = relative_energy(case["network"], case["schedule"], case["samples"], case["references"],
                                quadrature="trapezoid", **common).potential

    x = case["samples"].flatten(1)
    r = case["references"].flatten(1)
    grad_x = gaussian_gradient(case["samples"], case["mu"], case["std"], case["schedule"], 0).flatten(1)
    grad_r = gaussian_gradient(case["references"], case["mu"], case["std"], case["schedule"], 0).flatten(1)
    start = r @ grad_x.T
    end = -(grad_r @ x.T)
    np.testing.assert_allclose(paper - trapezoid, (spacing / 2 * (start + end)).numpy(), rtol=1e-9, atol=1e-15)


def test_paper_rule_overcounts_cosine_integrand():
    """With abar s^2 + 1 - abar = 2 the field is constant, grad_u = -beta sqrt(abar) mu / 2, so with
    x orthogonal to mu the integrand is f(a) = cos(a) grad_u.r and the exact integral is grad_u.r.
    h sum_i cos(i h) = h sin(n h / 2) cos(pi / 4) / sin(h / 2), a factor 1.0408 for n = 20."""
    schedule = NoiseSchedule(timesteps=T)
    abar = float(schedule.alphas_cumprod[0])
    std = math.sqrt((1 + abar) / abar)
    mu = torch.zeros(1, *SHAPE, dtype=torch.float64)
    mu[0, 0, 0, 1] = 0.5
    sample = torch.zeros(1, *SHAPE, dtype=torch.float64)
    sample[0, 0, 0, 0] = 1.0
    reference = torch.zeros(1, *SHAPE, dtype=torch.float64)
    reference[0, 0, 0, 1] = 1.0
    network = GaussianEpsilon(mu, std, schedule.alphas_cumprod)

    exact = -float(schedule.betas[0]) * math.sqrt(abar) * 0.5 / 2
    num_points = 20
    spacing = (math.pi / 2) / (num_points - 1)
    factor = spacing * math.sin(num_points * spacing / 2) * math.cos(math.pi / 4) / math.sin(spacing / 2)
    paper = relative_energy(network, schedule, sample, reference, num_points=num_points, quadrature="paper")
    assert paper.potential[0, 0] == pytest.approx(factor * exact, rel=1e-10)
    assert factor == pytest.approx(1.0408, abs=1e-4)


def test_quadrature_weights():
    right_angle = math.pi / 2
    assert quadrature_weights("trapezoid", 20).sum() == pytest.approx(right_angle, rel=1e-14)
    # A constant integrand comes out num_points / (num_points - 1) too large under "paper".
    assert quadrature_weights("paper", 20).sum() == pytest.approx(right_angle * 20 / 19, rel=1e-14)
    # Simpson integrates cubics exactly on an odd number of nodes. On an even number scipy
    # corrects the last interval (Cartwright's rule), which is exact for quadratics only.
    odd_nodes = np.linspace(0, right_angle, 21)
    assert quadrature_weights("simpson", 21) @ odd_nodes ** 3 == pytest.approx(right_angle ** 4 / 4, rel=1e-12)
    even_nodes = np.linspace(0, right_angle, 20)
    assert quadrature_weights("simpson", 20) @ even_nodes ** 2 == pytest.approx(right_angle ** 3 / 3, rel=1e-12)
    with pytest.raises(MemgenError, match="--num-points 2 is too few for simpson"):
        quadrature_weights("simpson", 2)
    with pytest.raises(MemgenError, match="--num-points 1 is too few for trapezoid"):
        quadrature_weights("trapezoid", 1)
    with pytest.raises(MemgenError, match="--quadrature 'midpoint' is not supported"):
        quadrature_weights("midpoint", 20)


def test_chunk_sizes_do_not_change_result(gaussian_case):
    case = gaussian_case
    results = [relative_energy(case["network"], case["schedule"], case["samples"], case["references"],
                               batch_size=batch, ref_batch_size=refs, num_points=10)
               for batch, refs in ((1, 1), (2, 1), (3, 2), (64, 64))]
    for other in results[1:]:
        np.testing.assert_allclose(other.potential, results[0].potential, rtol=1e-13, atol=0)
        assert other.evaluations == 2 * 3 * 10


def test_sample_prediction_memorizer_matches_closed_form():
    """An ideal memorizer of one image m predicts x0 = m, so its score is that of N(m, 0 I)."""
    schedule = NoiseSchedule(timesteps=T, prediction_type="sample")
    memory = random_images(1, seed=3, scale=0.8)
    network = IdealDenoiser(memory, schedule.alphas_cumprod)
    samples = random_images(2, seed=4)
    references = torch.cat([memory, random_images(1, seed=5)])
    for t in (0, 300):
        result = relative_energy(network, schedule, samples, references, t=t, num_points=40)
        exact_u = lambda y: gaussian_potential(y, memory, 0.0, schedule, t)
        exact = (exact_u(references)[:, None] - exact_u(samples)[None, :]).numpy()
        error = np.abs(result.potential - exact).max() / np.abs(exact).max()
        assert error < 5e-4
        # The memorized image sits at the bottom of the landscape.
        assert np.all(result.potential[0] < 0)


# --- the stage over a sweep of K -----------------------------------------------------------


@pytest.fixture
def sweep(tmp_path):
    dataset = write_dataset(tmp_path)
    checkpoints = write_ideal_sweep(tmp_path / "checkpoints", dataset, (1, 2), timesteps=100)
    references = tmp_path / "refs.npz"
    reference_images = training_images(dataset, 6)[3:6]
    np.savez(references, images=reference_images.numpy())
    return {"dataset": dataset, "checkpoints": checkpoints, "references": references, "root": tmp_path,
            "reference_images": reference_images}


def stage_options(sweep, result, *extra) -> EnergyOptions:
    argv = ["--ref-path", str(sweep["references"]), "--ckpt-path", str(sweep["checkpoints"]), "--result-path",
            str(result), "--data-path", str(sweep["dataset"]), "--device", "cpu", "--ref-batch-size", "2",
            "--batch-size", "1", *extra]
    return parse_sections({"energy": EnergyOptions}, argv)["energy"]


def test_stage_on_training_images(sweep):
    result = sweep["root"] / "energy"
    written = run_energy(stage_options(sweep, result))
    assert [path.name for path in written] == ["1.npz", "2.npz"]
    assert (result / "energy_2.png").stat().st_size > 0

    arrays = load_npz(result / "2.npz", required=["potential", "sample-indices"])
    meta = read_meta(arrays)
    assert arrays["potential"].shape == (3, 2)
    assert arrays["potential"].dtype == np.float64
    np.testing.assert_array_equal(arrays["sample-indices"], [0, 1])
    assert meta["class"] == "training"
    assert meta["quadrature"] == "trapezoid"
    assert meta["num_points"] == 20
    assert meta["time"] == 0
    assert meta["ref_key"] == "images"
    assert meta["evaluations"] == 3 * 2 * 20
    # Training images are the minima of an ideal memorizer, so every reference lies above them.
    assert np.all(arrays["potential"] > 0)

    assert run_energy(stage_options(sweep, result)) == []
    again = run_energy(stage_options(sweep, result, "--overwrite", "true", "--final-idx", "1",
                                     "--quadrature", "paper"))
    assert [path.name for path in again] == ["1.npz"]
    assert read_meta(load_npz(result / "1.npz"))["quadrature"] == "paper"


def test_stage_on_class_files(sweep):
    classes = sweep["root"] / "spurious"
    for k in (1, 2):
        train = training_images(sweep["dataset"], k)
        write_class_file(classes / f"{k}.npz", top=train, least=-train, meta=data_meta(k, **{"class": "spurious"}))
    result = sweep["root"] / "energy"
    run_energy(stage_options(sweep, result, "--sample-path", str(classes), "--use-least", "true",
                             "--num-points", "5", "--quadrature", "simpson"))
    arrays = load_npz(result / "2.npz")
    meta = read_meta(arrays)
    assert arrays["potential"].shape == (3, 2)
    assert meta["class"] == "spurious"
    assert meta["part"] == "least"
    np.testing.assert_array_equal(arrays["sample-indices"], [100, 101])


def test_reference_file_formats(tmp_path):
    images = np.zeros((2, *SHAPE), np.float32)
    for key in ("samples", "images"):
        np.savez(tmp_path / f"{key}.npz", **{key: images})
        loaded, used = load_reference_images(tmp_path / f"{key}.npz")
        assert used == key
        assert loaded.shape == (2, *SHAPE)
    save_npz(tmp_path / "class.npz", top=images, least=images[:1])
    assert load_reference_images(tmp_path / "class.npz")[1] == "top"

    np.savez(tmp_path / "other.npz", pictures=images)
    with pytest.raises(MemgenError, match="has none of the arrays samples, images, top"):
        load_reference_images(tmp_path / "other.npz")
    np.savez(tmp_path / "pixels.npz", images=images + 255)
    with pytest.raises(MemgenError, match="rescale them"):
        load_reference_images(tmp_path / "pixels.npz")
    with pytest.raises(MemgenError, match="shape"):
        load_reference_images(tmp_path / "samples.npz", image_shape=(3, 4, 4))


def test_stage_rejects_invalid_options(sweep):
    with pytest.raises(MemgenError, match="--ref-path is required"):
        run_energy(stage_options(sweep, sweep["root"] / "energy", "--ref-path", ""))
    with pytest.raises(MemgenError, match="--time 100 is outside"):
        run_energy(stage_options(sweep, sweep["root"] / "energy", "--time", "100"))
    with pytest.raises(MemgenError, match="--ref-batch-size 0"):
        run_energy(stage_options(sweep, sweep["root"] / "energy", "--ref-batch-size", "0"))
