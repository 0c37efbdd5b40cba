"""Plots of results: class fractions against K and samples next to their nearest neighbours.

Figures are drawn with matplotlib's object interface on the Agg canvas, so no global
backend is set and no display is needed, and written atomically as PNG.
"""

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from memgen.files import atomic_path

logger = logging.getLogger(__name__)

# Colours and markers of the three sample classes, the same in every figure.
CLASS_STYLES = {
    "memorized": {"color": "tab:red", "marker": "o"},
    "spurious": {"color": "tab:orange", "marker": "s"},
    "generalized": {"color": "tab:blue", "marker": "^"},
}

DPI = 100
# Inches per image cell in neighbour grids, and the gap between column groups in cell widths.
CELL_INCHES = 0.95
GROUP_GAP = 0.3
# Minimum width in inches of a neighbour grid, so that a two-line title fits when k is small.
MIN_GRID_WIDTH = 6.0


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` to `path` as PNG, atomically."""
    FigureCanvasAgg(figure)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return Path(path)


def plot_class_fractions(rows: Sequence[Mapping], path: str | os.PathLike, title: str) -> Path:
    """Plot the fraction of each class against K on a log x axis.

    rows: one mapping per K with the keys `K` and `<class>_fraction` for every class of
    `CLASS_STYLES`, sorted or not.
    """
    rows = sorted(rows, key=lambda row: row["K"])
    sizes = [row["K"] for row in rows]
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.add_subplot()
    for name, style in CLASS_STYLES.items():
        axes.plot(sizes, [row[f"{name}_fraction"] for row in rows], label=name, linewidth=1.5,
                  markersize=6, **style)
    axes.set_xscale("log")
    if sizes:
        # Every K gets a labelled tick, because a sweep has few, uneven values.
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.minorticks_off()
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("training-set size K")
    axes.set_ylabel("fraction of samples")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    return save_figure(figure, path)


def _as_display(image: np.ndarray) -> np.ndarray:
    """Map one `(C, H, W)` image in [-1, 1] to an `(H, W)` or `(H, W, 3)` array in [0, 1]."""
    image = np.clip((np.asarray(image, dtype=np.float32) + 1) / 2, 0, 1)
    if image.shape[0] == 1:
        return image[0]
    return np.transpose(image, (1, 2, 0))


def _show(axes, image: np.ndarray, label: str | None = None) -> None:
    axes.imshow(_as_display(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    if label is not None:
        axes.set_xlabel(label, fontsize=7, labelpad=2)


def plot_neighbour_grid(samples: np.ndarray, sample_indices: Sequence[int], data_images: np.ndarray,
                        data_dists: np.ndarray, synth_images: np.ndarray, synth_dists: np.ndarray,
                        path: str | os.PathLike, title: str) -> Path:
    """Draw each sample in a row, followed by its k nearest training images and k nearest samples.

    samples: `(n, C, H, W)` in [-1, 1]; data_images and synth_images: `(n, k, C, H, W)`;
    data_dists and synth_dists: `(n, k)`, printed under the neighbours. sample_indices are
    the row numbers in the sample file, printed under the samples. With n = 0 the figure
    only states that the class is empty.
    """
    count = len(samples)
    if count == 0:
        figure = Figure(figsize=(6.0, 1.2))
        figure.text(0.5, 0.5, f"{title}\n(no samples in this class)", ha="center", va="center", fontsize=10)
        return save_figure(figure, path)

    k = data_images.shape[1]
    # Columns: sample, gap, k training images, gap, k samples.
    ratios = [1.0, GROUP_GAP] + [1.0] * k + [GROUP_GAP] + [1.0] * k
    grid_width = CELL_INCHES * sum(ratios)
    width = max(grid_width + 0.4, MIN_GRID_WIDTH)
    height = CELL_INCHES * 1.2 * count + 1.1
    figure = Figure(figsize=(width, height))
    # A figure widened for its title keeps the image cells at their size, centred.
    margin = (width - grid_width) / 2 / width
    grid = figure.add_gridspec(count, len(ratios), width_ratios=ratios, left=margin, right=1 - margin,
                               bottom=0.02, top=1 - 0.95 / height, wspace=0.08, hspace=0.35)
    data_start = 2
    synth_start = data_start + k + 1
    for row in range(count):
        _show(figure.add_subplot(grid[row, 0]), samples[row], f"#{sample_indices[row]}")
        for column in range(k):
            _show(figure.add_subplot(grid[row, data_start + column]), data_images[row, column],
                  f"{data_dists[row, column]:.3g}")
            _show(figure.add_subplot(grid[row, synth_start + column]), synth_images[row, column],
                  f"{synth_dists[row, column]:.3g}")

    top = 1 - 0.9 / height
    separator = " " if k >= 4 else "\n"
    figure.text(_column_centre(figure, grid, 0, 0), top, "sample", ha="center", va="bottom", fontsize=9)
    figure.text(_column_centre(figure, grid, data_start, data_start + k - 1), top,
                f"nearest training images{separator}(distance)", ha="center", va="bottom", fontsize=9)
    figure.text(_column_centre(figure, grid, synth_start, synth_start + k - 1), top,
                f"nearest other samples{separator}(distance)", ha="center", va="bottom", fontsize=9)
    figure.suptitle(title, y=1 - 0.06 / height, va="top", fontsize=10)
    return save_figure(figure, path)


def _column_centre(figure: Figure, grid, first: int, last: int) -> float:
    """Return the horizontal centre, in figure coordinates, of grid columns first..last."""
    left = grid[0, first].get_position(figure).x0
    right = grid[0, last].get_position(figure).x1
    return (left + right) / 2
