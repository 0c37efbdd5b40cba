"""The subcommands of toy_example.py: data, exact, train, plots, basin and all.

Results of one K live in `<out>/K<k>/`: checkpoint.pt, loss.png, samples_<iteration>.png,
landscape_t<t>.npz/.png, basin.npz/.png. `<out>` itself contains data.png, exact_K<k>_t<t>.png
and summary_t<t>.png.
"""

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir, save_npz
from memgen.toy import energy as exact
from memgen.toy import figures
from memgen.toy.basin import BasinResult, critical_times, scan_times
from memgen.toy.data import circle_points
from memgen.toy.landscape import LandscapeOptions, compute_landscape, square_grid
from memgen.toy.model import ScoreNet
from memgen.toy.sde import VESDE, make_prior
from memgen.toy.train import (TrainConfig, load_checkpoint, load_ema_model, sde_from_checkpoint,
                              train_score_model)

logger = logging.getLogger(__name__)


def k_folder(out: Path, k: int) -> Path:
    return Path(out) / f"K{k}"


def checkpoint_path(out: Path, k: int) -> Path:
    return k_folder(out, k) / "checkpoint.pt"


def run_data(out: Path, ks: list[int], seed: int) -> Path:
    """Draw the training points of every K in one figure, `<out>/data.png`."""
    ensure_writable_dir(out)
    points = {k: circle_points(k, seed) for k in ks}
    return figures.data_figure(points, seed, Path(out) / "data.png")


def run_exact(out: Path, k: int, seed: int, t: float | None, beta: float | None, sigma: float = 1.0,
              limit: float = 1.5, grid_size: int = 121, arrow_size: int = 17) -> Path:
    """Plot the exact energy of K points and of the dense circle at one beta (or time t).

    Exactly one of `t` and `beta` is given; they are related by beta = 1 / (2 sigma^2 t).
    """
    if (t is None) == (beta is None):
        raise MemgenError("pass exactly one of --t and --beta")
    if (t is not None and t <= 0) or (beta is not None and beta <= 0):
        raise MemgenError(f"--t {t} / --beta {beta} must be positive")
    if t is None:
        t = 1.0 / (2.0 * sigma**2 * beta)
    std = sigma * np.sqrt(t)
    beta = exact.beta_from_std(std)
    points = circle_points(k, seed)

    grid, grid_points = square_grid(limit, grid_size)
    arrow_grid, arrow_points = square_grid(limit, arrow_size)
    finite_energy = exact.dam_energy(grid_points, points, beta).reshape(grid_size, grid_size)
    finite_step = 0.5 * exact.dam_force(arrow_points, points, beta).reshape(arrow_size, arrow_size, 2)

    # Shift the circle limit by -log K / beta so that both panels share one energy scale.
    radius = np.linalg.norm(grid_points, axis=1)
    circle_energy = (exact.circle_energy(radius, beta) - np.log(k) / beta).reshape(grid_size, grid_size)
    circle_step = 0.5 * exact.circle_force(arrow_points, beta).reshape(arrow_size, arrow_size, 2)
    ring = exact.ring_radius(beta)
    logger.info("exact energy of K = %d at beta = %.4g (t = %.4g); dense-circle minimum at R = %.4f",
                k, beta, t, ring)
    path = Path(out) / f"exact_K{k}_t{t:g}.png"
    return figures.exact_figure(grid, finite_energy, finite_step, circle_energy, circle_step, arrow_grid,
                                points, beta, t, std, ring, path)


def run_train(out: Path, k: int, data_seed: int, sde: VESDE, config: TrainConfig, device: torch.device,
              num_samples: int = 500, prior: str = "points", overwrite: bool = False) -> dict:
    """Train the score model of K points (resuming from its checkpoint); return the checkpoint dict.

    Writes `K<k>/checkpoint.pt`, `K<k>/loss.png` and `K<k>/samples_<iteration>.png` at every
    checkpoint.
    """
    folder = ensure_writable_dir(k_folder(out, k))
    path = checkpoint_path(out, k)
    if overwrite and path.exists():
        logger.info("removing '%s' because --overwrite was given", path)
        path.unlink()
    points = circle_points(k, data_seed)
    start_distribution = make_prior(prior, sde, points)

    def draw_samples(iteration: int, model: ScoreNet) -> None:
        generator = torch.Generator().manual_seed(config.seed + 1)
        samples = sde.sample(model, start_distribution, num_samples, generator=generator, device=device)
        figures.samples_figure(samples.cpu().numpy(), points, iteration, folder / f"samples_{iteration:06d}.png")

    state = train_score_model(points, sde, config, path, device, after_checkpoint=draw_samples)
    figures.loss_figure(state["losses"].numpy(), k, folder / "loss.png")
    return state


def load_trained(out: Path, k: int, device: torch.device) -> tuple[dict, ScoreNet, VESDE, np.ndarray]:
    """Load `K<k>/checkpoint.pt`: the state, the EMA network, its SDE and its training points."""
    state = load_checkpoint(checkpoint_path(out, k))
    return state, load_ema_model(state, device), sde_from_checkpoint(state), state["points"].numpy()


def run_plots(out: Path, k: int, t: float, options: LandscapeOptions, device: torch.device) -> dict:
    """Compute and save the learned and exact landscape of K at time t; return its arrays."""
    state, model, sde, points = load_trained(out, k, device)
    if not sde.t_min <= t < sde.t_max:
        raise MemgenError(f"--t {t} is outside the trained time range [{sde.t_min}, {sde.t_max}); "
                          "choose a time inside it")
    data = compute_landscape(model, points, sde, t, options, device)
    folder = k_folder(out, k)
    meta = {"k": k, "t": t, "beta": float(data["beta"]), "sigma": sde.sigma, "iteration": int(state["iteration"]),
            "options": asdict(options)}
    save_npz(folder / f"landscape_t{t:g}.npz", meta=meta, **data)
    figures.landscape_figure(data, folder / f"landscape_t{t:g}.png")
    return data


def run_basin(out: Path, k: int, t_start: float, t_stop: float, num_times: int, num_trials: int,
              delta: float, fraction: float, seed: int, device: torch.device) -> BasinResult:
    """Measure the critical time and basin radius of every training point of K; save .npz and .png."""
    state, model, sde, points = load_trained(out, k, device)
    if not 0 < fraction <= 1:
        raise MemgenError(f"--p {fraction} is invalid; use a fraction in (0, 1]")
    if delta <= 0 or num_trials < 1:
        raise MemgenError(f"--delta {delta} and --trials {num_trials} must be positive")
    times = scan_times(t_start, min(t_stop, sde.t_max), num_times)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    result = critical_times(model, torch.as_tensor(points, dtype=torch.float32, device=device), sde, times,
                            num_trials=num_trials, delta=delta, fraction=fraction, generator=generator)
    logger.info("basins of K = %d in %.1f s: median critical time %.4g, median radius %.4g, %d of %d never failed",
                k, time.perf_counter() - started, np.median(result.time), np.median(result.radius),
                result.censored.sum(), k)

    folder = k_folder(out, k)
    meta = {"k": k, "delta": delta, "p": fraction, "trials": num_trials, "seed": seed,
            "iteration": int(state["iteration"]), "sigma": sde.sigma, "t_min": sde.t_min}
    save_npz(folder / "basin.npz", meta=meta, time=result.time, radius=result.radius, censored=result.censored,
             scan_times=result.scan_times, recovered_fraction=result.recovered_fraction, points=points,
             delta=np.asarray(delta))
    figures.basin_figure(points, result.time, result.radius, result.scan_times, result.recovered_fraction,
                         fraction, delta, folder / "basin.png")
    return result


def run_all(out: Path, ks: list[int], data_seed: int, sde: VESDE, config: TrainConfig, num_train_samples: int,
            overwrite: bool, t: float, options: LandscapeOptions, basin: dict, device: torch.device) -> Path:
    """Run every step for each K and write `<out>/summary_t<t>.png` with the regimes side by side.

    `basin` contains the keyword arguments of `run_basin` other than out, k and device.
    Training resumes from existing checkpoints unless `overwrite` is set.
    """
    run_data(out, ks, data_seed)
    landscapes = {}
    for k in ks:
        run_exact(out, k, data_seed, t, None, sde.sigma)
        run_train(out, k, data_seed, sde, config, device, num_train_samples, options.prior, overwrite)
        landscapes[k] = run_plots(out, k, t, options, device)
        run_basin(out, k, device=device, **basin)
    return figures.summary_figure(landscapes, Path(out) / f"summary_t{t:g}.png")
