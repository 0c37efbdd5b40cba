"""Figures of the 2D toy model: data, exact and learned energy landscapes, training and basins.

Every function takes plain numpy arrays, draws one figure and writes it atomically as PNG.
Energies are drawn relative to their minimum on the grid, because only differences matter.
Figures are built with matplotlib's object API (no pyplot), so importing this module does
not change the caller's matplotlib backend.
"""

import logging
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from matplotlib.ticker import NullFormatter

from memgen.files import atomic_path

logger = logging.getLogger(__name__)

ENERGY_CMAP = "viridis"
POINT_STYLE = dict(marker="*", s=180, color="#e8372c", edgecolor="black", linewidth=0.6, zorder=5)
ATTRACTOR_COLORS = matplotlib.colormaps["tab10"]


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write `figure` to `path` (PNG) atomically."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    logger.info("wrote '%s'", path)
    return path


def draw_unit_circle(ax: Axes, **style) -> None:
    angles = np.linspace(0, 2 * np.pi, 400)
    style = {"color": "0.6", "linewidth": 1.0, "linestyle": "--", "zorder": 1} | style
    ax.plot(np.cos(angles), np.sin(angles), **style)


def draw_points(ax: Axes, points: np.ndarray, label: str | None = "training points") -> None:
    """Draw training points as red stars, or as small dots when there are many, so a ring stays visible."""
    if len(points) > 50:
        ax.scatter(points[:, 0], points[:, 1], s=2, color=POINT_STYLE["color"], zorder=2, label=label)
    else:
        ax.scatter(points[:, 0], points[:, 1], label=label, **POINT_STYLE)


def style_plane(ax: Axes, limit: float, title: str) -> None:
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title(title, fontsize=10)


def draw_energy(ax: Axes, grid: np.ndarray, energy: np.ndarray, vmax: float | None = None,
                reference: float | None = None):
    """Draw filled contours of energy - reference (default its minimum); return the contour set.

    grid: (G,) coordinates of both axes; energy: (G, G) indexed [y, x]. Levels stop at `vmax`
    (default the 90th percentile) so that the low region, where the minima are, gets most colours.
    """
    relative = energy - (np.nanmin(energy) if reference is None else reference)
    if vmax is None:
        vmax = float(np.nanpercentile(relative, 90))
    levels = np.linspace(0.0, vmax, 25)
    return ax.contourf(grid, grid, relative, levels=levels, cmap=ENERGY_CMAP, extend="max", zorder=0)


def draw_arrows(ax: Axes, grid: np.ndarray, step: np.ndarray) -> None:
    """Draw arrows of the retrieval step (G, G, 2) on a grid (G,).

    Lengths are proportional to the step, scaled so that the longest arrow spans about
    1.5 grid spacings. Far from the points the step is long, so arrows drawn to scale
    would hide the minima.
    """
    x, y = np.meshgrid(grid, grid)
    longest = float(np.nanmax(np.linalg.norm(step, axis=-1)))
    spacing = float(grid[1] - grid[0])
    scale = longest / (1.5 * spacing) if longest > 0 else 1.0
    ax.quiver(x, y, step[..., 0], step[..., 1], angles="xy", scale_units="xy", scale=scale,
              color="white", alpha=0.8, width=0.004, zorder=2)


def data_figure(points_by_k: dict[int, np.ndarray], seed: int, path: Path) -> Path:
    """Draw one panel per K with the training points on the unit circle."""
    ks = sorted(points_by_k)
    figure = Figure(figsize=(3.2 * len(ks), 3.4))
    axes = figure.subplots(1, len(ks), squeeze=False)
    for ax, k in zip(axes[0], ks):
        draw_unit_circle(ax)
        draw_points(ax, points_by_k[k])
        style_plane(ax, 1.3, f"K = {k}")
    figure.suptitle(f"Training points on the unit circle (angles uniform, seed {seed})")
    figure.tight_layout()
    return save_figure(figure, path)


def exact_figure(grid: np.ndarray, finite_energy: np.ndarray, finite_step: np.ndarray,
                 circle_energy: np.ndarray, circle_step: np.ndarray, arrow_grid: np.ndarray,
                 points: np.ndarray, beta: float, t: float, std: float, ring: float, path: Path) -> Path:
    """Draw the exact energy of K points next to the dense-circle limit, with retrieval-step arrows."""
    figure = Figure(figsize=(11, 5), layout="constrained")
    axes = figure.subplots(1, 2)
    limit = float(grid[-1])
    vmax = float(np.nanpercentile(circle_energy - circle_energy.min(), 90))

    contours = draw_energy(axes[0], grid, finite_energy, vmax)
    draw_arrows(axes[0], arrow_grid, finite_step)
    draw_unit_circle(axes[0])
    draw_points(axes[0], points)
    style_plane(axes[0], limit, f"K = {len(points)} points: $E_K(x) = -\\beta^{{-1}}\\log\\sum_\\mu "
                                f"e^{{-\\beta\\|x-\\xi_\\mu\\|^2}}$")

    draw_energy(axes[1], grid, circle_energy, vmax)
    draw_arrows(axes[1], arrow_grid, circle_step)
    draw_unit_circle(axes[1])
    if ring > 0:
        angles = np.linspace(0, 2 * np.pi, 400)
        axes[1].plot(ring * np.cos(angles), ring * np.sin(angles), color="white", linewidth=1.5,
                     linestyle=":", label=f"minimum, R* = {ring:.3f}")
        axes[1].legend(loc="upper right", fontsize=8)
    else:
        axes[1].scatter([0], [0], marker="x", color="white", label="minimum at the origin")
        axes[1].legend(loc="upper right", fontsize=8)
    style_plane(axes[1], limit, "dense circle: $E(R) = R^2 + 1 - \\beta^{-1}\\log I_0(2\\beta R)$")

    figure.colorbar(contours, ax=axes, label="energy minus its minimum", shrink=0.85, format="%.2f")
    figure.suptitle(f"Exact energy at $\\beta$ = {beta:.3g} (t = {t:.3g}, $\\sigma_t$ = {std:.3g}); "
                    "arrows: retrieval step $-\\nabla E / 2$ (lengths scaled)")
    return save_figure(figure, path)


def loss_figure(losses: np.ndarray, k: int, path: Path) -> Path:
    """Draw the training loss per iteration and its moving average on a log scale."""
    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    iterations = np.arange(1, len(losses) + 1)
    ax.plot(iterations, losses, color="0.75", linewidth=0.5, label="per iteration")
    window = min(200, max(1, len(losses) // 10))
    if len(losses) >= window > 1:
        average = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(iterations[window - 1:], average, color="#1f77b4", label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("denoising score matching loss")
    ax.set_title(f"Training loss, K = {k}")
    ax.legend()
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def samples_figure(samples: np.ndarray, points: np.ndarray, iteration: int, path: Path) -> Path:
    """Draw generated samples next to the training points."""
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    draw_unit_circle(ax)
    ax.scatter(samples[:, 0], samples[:, 1], s=4, alpha=0.4, color="#1f77b4", label="samples", zorder=3)
    draw_points(ax, points)
    style_plane(ax, 1.5, f"{len(samples)} samples at iteration {iteration}, K = {len(points)}")
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(figure, path)


def draw_attractors(ax: Axes, states: np.ndarray, labels: np.ndarray, representatives: np.ndarray,
                    energies: np.ndarray, sizes: np.ndarray, min_share: float = 0.01,
                    max_labels: int = 12) -> None:
    """Draw retrieved states coloured by attractor, and circle and label the largest attractors."""
    colors = [ATTRACTOR_COLORS(label % 10) for label in labels]
    ax.scatter(states[:, 0], states[:, 1], s=10, c=colors, edgecolor="black", linewidth=0.2, zorder=4)
    labelled = np.flatnonzero(sizes >= min_share * sizes.sum())[:max_labels]
    ax.scatter(representatives[labelled, 0], representatives[labelled, 1], s=160, facecolor="none",
               edgecolor="white", linewidth=1.5, zorder=6)
    for index in labelled:
        x, y = representatives[index]
        # Adding 0.0 turns -0.0 into 0.0, so a rounded tiny negative value prints as 0.000.
        label = f"{round(float(energies[index]), 3) + 0.0:.3f}"
        ax.annotate(label, (x, y), xytext=(7, 7), textcoords="offset points", fontsize=8,
                    color="white", zorder=6,
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.5, linewidth=0))


def origin_scale(grid: np.ndarray, energy: np.ndarray) -> float:
    """Return 1.25 times the energy at the origin above the minimum, the top of the colour scale.

    The origin is equally far from every point on the unit circle, so its energy sets a
    scale that suits every regime.
    """
    center = int(np.argmin(np.abs(grid)))
    relative = energy - np.nanmin(energy)
    return 1.25 * float(relative[center, center])


def landscape_panels(axes: list[Axes], data: dict, vmax: float | None = None):
    """Draw the learned (axes[0]) and exact (axes[1]) energy of one landscape; return the contours.

    `data` contains the arrays of memgen.toy.landscape.compute_landscape. Both panels share
    the colour scale, so equal colours mean equal energy differences.
    """
    grid = data["grid"]
    if vmax is None:
        vmax = origin_scale(grid, data["exact_energy"])
    contours = None
    for ax, prefix, energy_key in ((axes[0], "", "energy"), (axes[1], "exact_", "exact_energy")):
        # An attractor can lie below every grid node, so the reference includes the attractors.
        attractor_energy = data[f"{prefix}attractor_energy"]
        reference = min(np.nanmin(data[energy_key]), np.nanmin(attractor_energy))
        contours = draw_energy(ax, grid, data[energy_key] - reference, vmax, reference=0.0)
        draw_arrows(ax, data["arrow_grid"], data[f"{prefix}step"])
        draw_unit_circle(ax)
        draw_attractors(ax, data[f"{prefix}attractor_states"], data[f"{prefix}labels"],
                        data[f"{prefix}representatives"], attractor_energy - reference, data[f"{prefix}sizes"])
        draw_points(ax, data["points"])
    return contours


def attractor_summary(data: dict, prefix: str = "", match_distance: float = 0.1, min_share: float = 0.01) -> str:
    """Describe the attractors with >= min_share of the states: how many, how many at a point, rings.

    An attractor is at a training point when its representative lies within `match_distance`
    of one. It is a ring when its states cover more than half of the angles around the origin.
    """
    sizes = data[f"{prefix}sizes"]
    major = np.flatnonzero(sizes >= min_share * sizes.sum())
    representatives = data[f"{prefix}representatives"][major]
    distances = np.linalg.norm(representatives[:, None, :] - data["points"][None, :, :], axis=-1).min(axis=1)
    states, labels = data[f"{prefix}attractor_states"], data[f"{prefix}labels"]
    rings = sum(angular_coverage(states[labels == index]) > 0.5 for index in major)
    if rings and len(major) == 1:
        return "one attractor: a ring around the origin"
    if rings:
        return f"{len(major)} attractors, {rings} of them ring-shaped"
    at_points = int((distances <= match_distance).sum())
    return f"{len(major)} attractors: {at_points} at a point, {len(major) - at_points} between points"


def angular_coverage(states: np.ndarray, num_bins: int = 36) -> float:
    """Fraction of 10-degree sectors around the origin that contain at least one state."""
    angles = np.arctan2(states[:, 1], states[:, 0])
    counts, _ = np.histogram(angles, bins=num_bins, range=(-np.pi, np.pi))
    return float((counts > 0).mean())


def landscape_figure(data: dict, path: Path) -> Path:
    """Draw the learned energy next to the exact energy of the same points at the landscape's time t."""
    figure = Figure(figsize=(11, 5.4), layout="constrained")
    axes = figure.subplots(1, 2)
    contours = landscape_panels(list(axes), data)
    k = len(data["points"])
    limit = float(data["grid"][-1])
    style_plane(axes[0], limit, f"learned: {attractor_summary(data)}")
    style_plane(axes[1], limit, f"exact (K points): {attractor_summary(data, 'exact_')}")
    figure.colorbar(contours, ax=list(axes), label="energy $-2\\sigma_t^2 \\log p_t$ minus its minimum",
                    shrink=0.85, format="%.2f")
    t, beta = float(data["t"]), float(data["beta"])
    figure.suptitle(f"Energy landscape of K = {k} points at t = {t:g} ($\\beta$ = {beta:.3g})\n"
                    "dots: samples carried to their attractors (circled, with their energy); "
                    "arrows: retrieval step", fontsize=10)
    return save_figure(figure, path)


def summary_figure(results: dict[int, dict], path: Path) -> Path:
    """Draw the regimes side by side: learned (top) and exact (bottom) energy for each K at one t."""
    ks = sorted(results)
    t, beta = float(results[ks[0]]["t"]), float(results[ks[0]]["beta"])
    figure = Figure(figsize=(4.8 * len(ks) + 1, 9.6), layout="constrained")
    axes = figure.subplots(2, len(ks), squeeze=False)
    contours = None
    for column, k in enumerate(ks):
        data = results[k]
        contours = landscape_panels([axes[0, column], axes[1, column]], data)
        limit = float(data["grid"][-1])
        style_plane(axes[0, column], limit, f"K = {k}, learned\n{attractor_summary(data)}")
        style_plane(axes[1, column], limit, f"K = {k}, exact\n{attractor_summary(data, 'exact_')}")
    figure.colorbar(contours, ax=axes.ravel().tolist(), label="energy minus its minimum", shrink=0.6, format="%.2f")
    figure.suptitle(f"Energy at t = {t:g} ($\\beta$ = {beta:.3g}). Few points: a minimum at each point. "
                    "More points: nearby points merge into spurious minima.\nMany points: one continuous ring. "
                    "Dots: samples carried to their attractors; stars: training points.", fontsize=11)
    return save_figure(figure, path)


def basin_figure(points: np.ndarray, times: np.ndarray, radii: np.ndarray, scan_times: np.ndarray,
                 recovered_fraction: np.ndarray, fraction: float, delta: float, path: Path) -> Path:
    """Draw the basin radius around each training point and the recovered fraction against noise time."""
    figure = Figure(figsize=(11, 4.8))
    axes = figure.subplots(1, 2)
    ax = axes[0]
    draw_unit_circle(ax)
    positive = times[times > 0]
    norm = Normalize(vmin=positive.min() if len(positive) else scan_times[0], vmax=max(times.max(), scan_times[0]))
    colormap = matplotlib.colormaps["plasma"]
    for point, radius, time_value in zip(points, radii, times):
        if radius > 0:
            ax.add_patch(Circle(point, radius, color=colormap(norm(time_value)), alpha=0.25, zorder=2))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=times, cmap=colormap, norm=norm, s=60 if len(points) < 50 else 6,
                         marker="*" if len(points) < 50 else "o", edgecolor="black", linewidth=0.4, zorder=5)
    figure.colorbar(scatter, ax=ax, label="critical time $t_c$")
    style_plane(ax, 1.8, f"K = {len(points)}: basin radius (discs) and critical time")

    ax = axes[1]
    if len(points) <= 20:
        for index, row in enumerate(recovered_fraction):
            ax.plot(scan_times, row, marker="o", markersize=3, linewidth=1, label=f"point {index}")
    else:
        mean = np.nanmean(np.where(np.isnan(recovered_fraction), 0.0, recovered_fraction), axis=0)
        ax.plot(scan_times, mean, marker="o", markersize=3,
                label="mean over points (0 after a point's first failure)")
    ax.axhline(fraction, color="black", linestyle="--", linewidth=1, label=f"p = {fraction:g}")
    if len(points) <= 10 or len(points) > 20:
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("noise time t")
    ax.set_ylabel(f"fraction of trials back within {delta:g}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("recovery by reverse sampling")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)
