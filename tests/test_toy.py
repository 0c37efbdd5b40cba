"""Tests of the 2D toy model: exact energies, likelihood ODE, attractors, basins, training, CLI."""

import logging
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize_scalar
from scipy.special import i0, i1

from memgen.errors import MemgenError
from memgen.files import load_npz, read_meta
from memgen.toy import commands
from memgen.toy import energy as exact
from memgen.toy.attractors import cluster_attractors, gap_threshold, retrieve
from memgen.toy.basin import critical_times
from memgen.toy.cli import build_parser, main
from memgen.toy.data import circle_points
from memgen.toy.landscape import LandscapeOptions
from memgen.toy.likelihood import energy_from_log_density, ode_log_likelihood, score_and_divergence
from memgen.toy.model import ScoreNetConfig
from memgen.toy.sde import VESDE, GaussianPrior, NoisedPointsPrior
from memgen.toy.train import TrainConfig, load_checkpoint, load_ema_model, train_score_model

SMALL_NET = ScoreNetConfig(hidden_dim=64, num_layers=3)


def mixture_score(points: torch.Tensor, sigma: float = 1.0):
    """Exact score of (1/K) sum N(xi, sigma^2 t I) as a torch function (x (B, 2), t (B,))."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        variance = sigma**2 * t[:, None]
        squared = ((x[:, None, :] - points[None].to(x.dtype)) ** 2).sum(dim=-1)
        weights = torch.softmax(-squared / (2 * variance), dim=1)
        return (weights @ points.to(x.dtype) - x) / variance

    return score


# Exact energies.

def test_dam_energy_one_pattern_is_squared_distance():
    pattern = np.array([[0.6, -0.8]])
    x = np.array([[0.0, 0.0], [0.6, -0.8], [1.5, 2.0], [-0.3, 0.1]])
    for beta in (0.1, 1.0, 37.0):
        np.testing.assert_allclose(exact.dam_energy(x, pattern, beta), [1.0, 0.0, 0.81 + 7.84, 0.81 + 0.81],
                                   atol=1e-12)


def test_dam_energy_two_patterns_closed_form():
    # Patterns (+-a, 0): E = |x|^2 + a^2 - log(2 cosh(2 beta a x_1)) / beta.
    a, beta = 0.7, 3.0
    patterns = np.array([[a, 0.0], [-a, 0.0]])
    x = np.array([[0.0, 0.0], [0.2, 0.5], [-1.1, 0.3], [0.7, 0.0]])
    expected = (x**2).sum(axis=1) + a**2 - np.log(2 * np.cosh(2 * beta * a * x[:, 0])) / beta
    np.testing.assert_allclose(exact.dam_energy(x, patterns, beta), expected, rtol=1e-12)
    # Hand value: x = 0, patterns +-1, beta = 1 gives 1 - log 2.
    unit = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert exact.dam_energy(np.zeros((1, 2)), unit, 1.0)[0] == pytest.approx(1 - math.log(2), abs=1e-14)


def test_dam_force_matches_autograd():
    rng = np.random.default_rng(1)
    patterns = rng.normal(size=(7, 2))
    x = rng.normal(size=(11, 2)) * 1.5
    for beta in (0.3, 4.0, 40.0):
        x_torch = torch.tensor(x, requires_grad=True)
        squared = ((x_torch[:, None, :] - torch.tensor(patterns)[None]) ** 2).sum(dim=-1)
        energy = -torch.logsumexp(-beta * squared, dim=1) / beta
        gradient, = torch.autograd.grad(energy.sum(), x_torch)
        np.testing.assert_allclose(exact.dam_energy(x, patterns, beta), energy.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(exact.dam_force(x, patterns, beta), -gradient.numpy(), atol=1e-10)


def test_two_patterns_merge_below_critical_beta():
    # For patterns +-a on a line, E''(0) = 2 - 4 beta a^2: the midpoint turns from a
    # maximum into a minimum at beta_c = 1 / (2 a^2).
    a = 0.5
    beta_c = 1 / (2 * a**2)
    patterns = np.array([[a, 0.0], [-a, 0.0]])
    h = 1e-4
    line = np.array([[-h, 0.0], [0.0, 0.0], [h, 0.0]])
    for factor in (0.8, 1.25):
        beta = factor * beta_c
        left, middle, right = exact.dam_energy(line, patterns, beta)
        curvature = (left - 2 * middle + right) / h**2
        assert curvature == pytest.approx(2 - 4 * beta * a**2, abs=1e-5)

    # Below beta_c retrieval from anywhere on the line ends at the spurious midpoint.
    start = np.array([[0.3, 0.0], [-0.45, 0.0], [0.6, 0.0]])
    merged = exact.dam_retrieve(start, patterns, 0.8 * beta_c, num_iterations=2000)
    np.testing.assert_allclose(merged, 0.0, atol=1e-6)

    # Above beta_c it ends at the root of x = a tanh(2 beta a x), beside each pattern.
    beta = 1.25 * beta_c
    root = brentq(lambda value: value - a * math.tanh(2 * beta * a * value), 1e-6, a)
    split = exact.dam_retrieve(np.array([[0.3, 0.0], [-0.3, 0.0]]), patterns, beta, num_iterations=2000)
    np.testing.assert_allclose(split[:, 0], [root, -root], atol=1e-8)
    assert 0 < root < a


def test_two_patterns_minima_at_patterns_for_large_beta():
    a = 0.5
    patterns = np.array([[a, 0.0], [-a, 0.0]])
    split = exact.dam_retrieve(np.array([[0.1, 0.2], [-0.2, -0.1]]), patterns, 50.0, num_iterations=50)
    np.testing.assert_allclose(split, patterns, atol=1e-12)


def test_circle_limit_matches_many_even_patterns():
    k = 200
    angles = 2 * np.pi * np.arange(k) / k
    patterns = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    radii = np.array([0.0, 0.3, 0.9, 1.0, 1.4])
    x = np.stack([radii * np.cos(0.37), radii * np.sin(0.37)], axis=1)
    for beta in (0.5, 2.0, 10.0):
        finite = exact.dam_energy(x, patterns, beta) + np.log(k) / beta
        np.testing.assert_allclose(finite, exact.circle_energy(radii, beta), atol=1e-10)


def test_circle_energy_against_scipy_bessel():
    beta, radius = 2.0, np.array([0.0, 0.5, 1.2])
    expected = radius**2 + 1 - np.log(i0(2 * beta * radius)) / beta
    np.testing.assert_allclose(exact.circle_energy(radius, beta), expected, rtol=1e-13)
    force = 2 * (i1(2 * beta * radius) / i0(2 * beta * radius) - radius)
    np.testing.assert_allclose(exact.circle_radial_force(radius, beta), force, rtol=1e-12, atol=1e-15)
    # No overflow where I0 itself would overflow a float64 (2 beta R > 713).
    assert np.isfinite(exact.circle_energy(np.array([1.0]), 500.0)).all()


def test_circle_force_is_negative_derivative():
    beta, h = 6.0, 1e-6
    radius = np.array([0.2, 0.8, 1.0, 1.3])
    derivative = (exact.circle_energy(radius + h, beta) - exact.circle_energy(radius - h, beta)) / (2 * h)
    np.testing.assert_allclose(exact.circle_radial_force(radius, beta), -derivative, atol=1e-7)


def test_circle_minimum_solves_bessel_condition():
    for beta in (1.5, 3.0, 10.0, 50.0):
        root = brentq(lambda r: r - i1(2 * beta * r) / i0(2 * beta * r), 1e-9, 1.0, xtol=1e-14)
        minimum = minimize_scalar(lambda r: exact.circle_energy(r, beta), bounds=(0.0, 2.0), method="bounded",
                                  options={"xatol": 1e-10}).x
        assert minimum == pytest.approx(root, abs=1e-6)
        assert exact.ring_radius(beta) == pytest.approx(root, abs=1e-12)
    # Below beta = 1 the only minimum is the origin.
    assert exact.ring_radius(0.8) == 0.0
    minimum = minimize_scalar(lambda r: exact.circle_energy(r, 0.8), bounds=(0.0, 2.0), method="bounded").x
    assert minimum == pytest.approx(0.0, abs=1e-4)


def test_mixture_energy_is_dam_energy_plus_constant():
    points = circle_points(5, seed=3)
    x = np.array([[0.1, 0.2], [1.0, 0.0], [-0.5, 0.9]])
    t, sde = 0.08, VESDE()
    std = math.sqrt(t)
    beta = exact.beta_from_std(std)
    energy = energy_from_log_density(torch.tensor(exact.mixture_log_density(x, points, std)), t, sde).numpy()
    expected = exact.dam_energy(x, points, beta) + (math.log(5) + math.log(2 * math.pi * std**2)) / beta
    np.testing.assert_allclose(energy, expected, rtol=1e-12)
    # E = -2 sigma_t^2 log p: sigma = 1, t = 0.25, log p = -2 gives 1.
    assert energy_from_log_density(torch.tensor([-2.0]), 0.25, sde).item() == pytest.approx(1.0)


# Probability-flow likelihood.

def test_divergence_is_exact():
    def field(x, t):
        return torch.stack([x[:, 0] ** 2 * t, x[:, 0] * x[:, 1]], dim=1)

    x = torch.tensor([[1.0, 2.0], [-0.5, 3.0]], dtype=torch.float64)
    t = torch.tensor([2.0, 0.5], dtype=torch.float64)
    value, divergence = score_and_divergence(field, x, t)
    np.testing.assert_allclose(divergence.numpy(), [2 * 1.0 * 2.0 + 1.0, 2 * -0.5 * 0.5 - 0.5])
    np.testing.assert_allclose(value.numpy(), field(x, t).numpy())


def test_ode_likelihood_of_gaussian_matches_closed_form():
    # Data N(m, s0^2 I) gives p_t = N(m, (s0^2 + t) I) and score -(x - m) / (s0^2 + t).
    m, s0 = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.5
    sde = VESDE()

    def log_normal(x, variance):
        return -math.log(2 * math.pi * variance) - ((x - m) ** 2).sum(dim=1) / (2 * variance)

    def score(x, t):
        return -(x - m) / (s0**2 + t[:, None])

    x = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.3, -0.2], [-2.0, 1.5]], dtype=torch.float64)
    for t in (0.01, 0.2):
        log_density = ode_log_likelihood(score, x, t, sde, lambda z: log_normal(z, s0**2 + 1.0), num_steps=64,
                                         progress=False)
        np.testing.assert_allclose(log_density.numpy(), log_normal(x, s0**2 + t).numpy(), atol=1e-6)


def test_ode_likelihood_of_point_mixture_matches_exact():
    points = torch.tensor(circle_points(3, seed=0))
    sde = VESDE()
    prior = NoisedPointsPrior(points, 1.0)
    x = torch.tensor([[0.9, 0.1], [0.0, 0.0], [0.5, 0.5], [-0.3, 1.2]], dtype=torch.float64)
    t = 0.05
    log_density = ode_log_likelihood(mixture_score(points), x, t, sde, prior.log_density, num_steps=100,
                                     progress=False)
    expected = exact.mixture_log_density(x.numpy(), points.numpy(), math.sqrt(t))
    np.testing.assert_allclose(log_density.numpy(), expected, atol=1e-4)


def test_sampler_reproduces_gaussian_data():
    # Exact score of data N(m, s0^2 I) and the exact prior N(m, (s0^2 + 1) I): the samples
    # must follow N(m, s0^2 I) up to the t_min = 1e-3 of noise left and the step error.
    m, s0 = torch.tensor([0.5, -1.0]), 0.5
    sde = VESDE()
    prior = NoisedPointsPrior(m[None].double(), math.sqrt(s0**2 + 1))
    samples = sde.sample(lambda x, t: -(x - m) / (s0**2 + t[:, None]), prior, 20000,
                         generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(samples.mean(dim=0).numpy(), m.numpy(), atol=0.02)
    np.testing.assert_allclose(samples.std(dim=0).numpy(), [s0, s0], rtol=0.03)


def test_reverse_rejects_forward_times():
    with pytest.raises(ValueError, match="t_start must be the larger"):
        VESDE().reverse(lambda x, t: x, torch.zeros(1, 2), 0.001, 0.01)


def test_priors_log_density_closed_form():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    gaussian = GaussianPrior(2.0)
    np.testing.assert_allclose(gaussian.log_density(x).numpy(),
                               [-math.log(8 * math.pi), -math.log(8 * math.pi) - 5 / 8])
    one_point = NoisedPointsPrior(torch.tensor([[1.0, 2.0]], dtype=torch.float64), 2.0)
    np.testing.assert_allclose(one_point.log_density(x).numpy(),
                               [-math.log(8 * math.pi) - 5 / 8, -math.log(8 * math.pi)])


# Attractors and basins.

def test_retrieval_with_exact_score_is_dam_update():
    points = torch.tensor(circle_points(6, seed=2))
    t = 0.05
    x = torch.tensor([[0.2, 0.1], [-0.7, 0.6], [1.2, -0.4]], dtype=torch.float64)
    states, last_step = retrieve(mixture_score(points), x, t, VESDE(), num_iterations=30)
    expected = exact.dam_retrieve(x.numpy(), points.numpy(), 1 / (2 * t), num_iterations=30)
    np.testing.assert_allclose(states.numpy(), expected, atol=1e-10)
    assert last_step.max().item() < 1e-6


def test_cluster_attractors_blobs_and_ring():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(size=(60, 2)) * 1e-3 + [1, 0], rng.normal(size=(30, 2)) * 1e-3 + [0, 1],
                            rng.normal(size=(10, 2)) * 1e-3 + [-0.9, -0.3]])
    found = cluster_attractors(blobs)
    np.testing.assert_array_equal(found.sizes, [60, 30, 10])
    np.testing.assert_allclose(found.representatives, [[1, 0], [0, 1], [-0.9, -0.3]], atol=5e-3)
    assert (found.labels[:60] == 0).all()
    assert (found.labels[60:90] == 1).all()

    angles = rng.uniform(0, 2 * np.pi, 800)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    ring_found = cluster_attractors(ring)
    assert len(ring_found.sizes) == 1
    assert np.linalg.norm(ring_found.representatives[0]) == pytest.approx(1.0)

    fixed = cluster_attractors(blobs, threshold=2.0)
    assert len(fixed.sizes) == 1


def test_gap_threshold_cuts_largest_jump():
    heights = np.array([0.002, 0.003, 0.0025, 0.5, 0.004])
    assert gap_threshold(heights) == pytest.approx(math.sqrt(0.004 * 0.5))
    even = np.array([0.01, 0.012, 0.02, 0.025])
    assert gap_threshold(even) > even.max()


def test_basin_scan_with_zero_score_matches_rayleigh():
    # With a zero score the reverse SDE is Brownian motion, so the end point is x0 plus
    # N(0, v I) noise with v = t + (t - t_min - dt_last), and P(recover) = 1 - exp(-delta^2 / 2v).
    sde = VESDE(t_min=1e-3, num_steps=1000)
    times = np.array([0.0015, 0.003, 0.006, 0.012, 0.05])
    delta, trials = 0.1, 3000
    points = torch.tensor([[1.0, 0.0]])
    result = critical_times(lambda x, t: torch.zeros_like(x), points, sde, times, num_trials=trials, delta=delta,
                            fraction=0.3, generator=torch.Generator().manual_seed(0))
    for j, t in enumerate(times):
        if np.isnan(result.recovered_fraction[0, j]):
            break
        num_steps = max(1, round((t - sde.t_min) / sde.step_size()))
        variance = t + (t - sde.t_min) * (1 - 1 / num_steps)
        expected = 1 - math.exp(-delta**2 / (2 * variance))
        tolerance = 4 * math.sqrt(expected * (1 - expected) / trials) + 1e-3
        assert result.recovered_fraction[0, j] == pytest.approx(expected, abs=tolerance)
    # P(recover) >= 0.3 up to v = 0.01 / (2 ln(1/0.7)) = 0.0140, so t = 0.006 passes and 0.012 fails.
    assert result.time[0] == pytest.approx(0.006)
    assert not result.censored[0]
    assert np.isnan(result.recovered_fraction[0, 4])


def test_basin_scan_with_exact_score_never_fails():
    points = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    sde = VESDE()
    times = np.array([0.01, 0.1, 0.5])
    result = critical_times(mixture_score(points), points, sde, times, num_trials=20,
                            generator=torch.Generator().manual_seed(0))
    assert result.censored[0]
    assert result.time[0] == pytest.approx(0.5)
    # The radius is the mean noise distance, about sigma_t sqrt(pi / 2) = 0.886.
    assert result.radius[0] == pytest.approx(math.sqrt(0.5 * math.pi / 2), rel=0.25)


# Training.

def test_short_training_memorizes_two_points(tmp_path):
    points = circle_points(2)
    sde = VESDE()
    config = TrainConfig(iterations=3000, batch_size=256, lr=2e-3, ckpt_every=3000, model=SMALL_NET)
    state = train_score_model(points, sde, config, tmp_path / "checkpoint.pt", torch.device("cpu"))
    model = load_ema_model(state)
    samples = sde.sample(model, NoisedPointsPrior(torch.tensor(points), 1.0), 300,
                         generator=torch.Generator().manual_seed(0)).numpy()
    distances = np.linalg.norm(samples[:, None, :] - points[None], axis=-1)
    nearest = distances.argmin(axis=1)
    # Every sample lies within 0.2 of a training point (the largest distance over three seeds
    # was 0.11 when this test was written), and each point gets at least a fifth of them.
    assert distances.min(axis=1).max() < 0.2
    assert (np.bincount(nearest, minlength=2) > 60).all()


def test_resumed_training_equals_uninterrupted(tmp_path):
    points = circle_points(3)
    sde = VESDE()
    short = TrainConfig(iterations=20, batch_size=32, ckpt_every=10, model=SMALL_NET)
    long = TrainConfig(iterations=40, batch_size=32, ckpt_every=10, model=SMALL_NET)
    train_score_model(points, sde, short, tmp_path / "a.pt", torch.device("cpu"))
    resumed = train_score_model(points, sde, long, tmp_path / "a.pt", torch.device("cpu"))
    straight = train_score_model(points, sde, long, tmp_path / "b.pt", torch.device("cpu"))
    assert resumed["iteration"] == 40
    assert len(resumed["losses"]) == 40
    torch.testing.assert_close(resumed["losses"], straight["losses"], rtol=0, atol=0)
    for name, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, rtol=0, atol=0)


def test_resume_rejects_other_points(tmp_path):
    sde = VESDE()
    config = TrainConfig(iterations=2, batch_size=8, model=SMALL_NET)
    train_score_model(circle_points(3), sde, config, tmp_path / "c.pt", torch.device("cpu"))
    with pytest.raises(MemgenError, match="other points"):
        train_score_model(circle_points(4), sde, config, tmp_path / "c.pt", torch.device("cpu"))


def test_checkpoint_loads_without_pickle(tmp_path):
    path = tmp_path / "d.pt"
    train_score_model(circle_points(2), VESDE(), TrainConfig(iterations=3, batch_size=8, model=SMALL_NET), path,
                      torch.device("cpu"))
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == 3
    assert state["config"]["model"]["hidden_dim"] == SMALL_NET.hidden_dim
    with pytest.raises(MemgenError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


# Commands and CLI.

def test_plots_and_basin_commands_write_results(tmp_path):
    device = torch.device("cpu")
    config = TrainConfig(iterations=30, batch_size=32, ckpt_every=30, model=SMALL_NET)
    commands.run_train(tmp_path, 3, 5, VESDE(), config, device, num_samples=20)
    assert (tmp_path / "K3" / "loss.png").is_file()
    assert (tmp_path / "K3" / "samples_000030.png").is_file()

    options = LandscapeOptions(grid_size=9, arrow_size=5, num_samples=40, retrieval_iterations=5, ode_steps=3)
    commands.run_plots(tmp_path, 3, 0.1, options, device)
    arrays = load_npz(tmp_path / "K3" / "landscape_t0.1.npz", required=["energy", "exact_energy", "labels"])
    assert arrays["energy"].shape == (9, 9)
    assert arrays["labels"].shape == (40,)
    np.testing.assert_allclose(arrays["points"], circle_points(3, 5))
    meta = read_meta(arrays)
    assert meta["k"] == 3
    assert meta["t"] == 0.1
    assert meta["beta"] == pytest.approx(5.0)
    assert (tmp_path / "K3" / "landscape_t0.1.png").is_file()

    commands.run_basin(tmp_path, 3, 0.002, 0.02, 3, 4, 0.1, 0.9, 0, device)
    basin = load_npz(tmp_path / "K3" / "basin.npz", required=["time", "radius", "recovered_fraction"])
    assert basin["time"].shape == (3,)
    assert basin["recovered_fraction"].shape == (3, 3)
    assert (tmp_path / "K3" / "basin.png").is_file()

    with pytest.raises(MemgenError, match="outside the trained time range"):
        commands.run_plots(tmp_path, 3, 1.5, options, device)


def test_exact_command_needs_one_of_t_and_beta(tmp_path):
    with pytest.raises(MemgenError, match="exactly one"):
        commands.run_exact(tmp_path, 2, 0, None, None)
    path = commands.run_exact(tmp_path, 2, 0, None, 10.0, grid_size=11, arrow_size=5)
    assert path.name == "exact_K2_t0.05.png"
    assert path.is_file()


def test_cli_data_command_writes_figure(tmp_path):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        main(["data", "--out", str(tmp_path), "--ks", "2", "5"])
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    assert (tmp_path / "data.png").is_file()
    assert "toy_example.py data" in (tmp_path / "toy.log").read_text()


@pytest.mark.parametrize("command", ["data", "exact", "train", "plots", "basin", "all"])
def test_cli_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_cli_rejects_nonpositive_values():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--iterations", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["exact", "--t", "0.1", "--beta", "5"])
