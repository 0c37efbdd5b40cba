"""Relative energy of samples: the line integral of the model's potential gradient to a reference.

Following Raya and Ambrogioni, *Spontaneous Symmetry Breaking in Generative Diffusion
Models* (arXiv:2305.19693), the drift of the forward process at step t is minus the gradient
of a potential u, and with the learned score s(y, t),

    grad_u(y) = -beta_t / 2 * y - beta_t * s(y, t),   s(y, t) = -eps_theta(y, t) / sqrt(1 - abar_t),

where abar_t = cumprod(1 - betas)[t] (the released code of Pham et al. 2025 used
cumprod(betas), which makes the noise std about 1 instead of 0.01 at t = 0). The energy of
a reference r relative to a sample x is the integral of grad_u along the quarter circle
gamma(a) = cos(a) x + sin(a) r, a in [0, pi/2]:

    dU(x -> r) = integral_0^{pi/2} grad_u(gamma(a)) . gamma'(a) da,   gamma'(a) = -sin(a) x + cos(a) r,

which equals u(r) - u(x) when grad_u is a gradient field. A positive value means the
sample sits lower in the landscape than the reference. beta_t is the discrete beta of
step t (not scaled by T), as in the released code, so every potential carries the same
constant factor.

Quadratures on `num_points` equally spaced nodes a_i = i h, h = (pi/2) / (num_points - 1):

- `trapezoid` (default): error O(h^2).
- `simpson`: composite Simpson (scipy.integrate.simpson, which handles an even number of
  nodes), error O(h^4) for smooth integrands.
- `paper`: h times the sum of all nodes, the rule of the released code. It exceeds the
  trapezoid rule by h/2 (f(0) + f(pi/2)), so a constant integrand comes out
  num_points / (num_points - 1) too large (5.3 % for 20 points). Kept for comparison only.
"""

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import integrate
from tqdm import tqdm

from memgen import __version__
from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir, load_npz, read_meta, save_npz, skip_existing

logger = logging.getLogger(__name__)

QUADRATURES = ("trapezoid", "simpson", "paper")

# Arrays of a reference file, in the order they are looked for.
REFERENCE_KEYS = ("samples", "images", "top")


@dataclass
class EnergyOptions:
    """Options of run_energy.py."""

    ref_path: str = ""
    """.npz file of reference images (N, C, H, W) in [-1, 1] under 'samples' or 'images', or a class file ('top')."""
    ckpt_path: str = ""
    """Folder of checkpoints <K>.pt (memgen, the paper's release or the ideal memorizer), or one such file."""
    sample_path: str | None = None
    """Folder of class files <K>.npz of run_classify.py (or sample files of run_generate.py); unset: training images."""
    result_path: str = "results/energy"
    """Folder for <K>.npz results, energy_<K>.png figures and energy.log."""
    data_path: str | None = None
    """Dataset root for training images and ideal-memorizer checkpoints; unset: the path in each checkpoint."""
    sample_size: int = 2048
    """Samples per K: the first ones of the class file (or of the training subset); -1 for all."""
    batch_size: int = 64
    """Samples per chunk; each network call takes ref_batch_size x batch_size images."""
    ref_batch_size: int = 4
    """References per chunk; each network call takes ref_batch_size x batch_size images."""
    time: int = 0
    """Diffusion step t of the score and of beta_t."""
    num_points: int = 20
    """Quadrature nodes on the quarter circle (at least 2; 3 for simpson)."""
    quadrature: str = "trapezoid"
    """trapezoid, simpson or paper (sum of all nodes times the spacing; over-counts, for comparison)."""
    use_least: bool = False
    """Use the 'least' part of each class file instead of 'top'."""
    start_idx: int = 0
    """First pair (sorted by K) to process."""
    final_idx: int = -1
    """End (exclusive) of the pairs to process; -1 for all."""
    overwrite: bool = False
    """Recompute a K whose result file exists; by default it is kept, so a rerun resumes."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""


def quadrature_nodes(num_points: int) -> np.ndarray:
    """Return the angles a_i = i (pi/2) / (num_points - 1), float64 `(num_points,)`."""
    return np.linspace(0.0, math.pi / 2, num_points)


def quadrature_weights(rule: str, num_points: int) -> np.ndarray:
    """Return the weights w_i of `rule` on the nodes of `quadrature_nodes`, float64 `(num_points,)`."""
    if rule not in QUADRATURES:
        raise MemgenError(f"--quadrature {rule!r} is not supported; use one of {', '.join(QUADRATURES)}")
    minimum = 3 if rule == "simpson" else 2
    if num_points < minimum:
        raise MemgenError(f"--num-points {num_points} is too few for {rule}; use {minimum} or more")
    spacing = (math.pi / 2) / (num_points - 1)
    if rule == "paper":
        return np.full(num_points, spacing)
    if rule == "trapezoid":
        weights = np.full(num_points, spacing)
        weights[[0, -1]] = spacing / 2
        return weights
    # The Simpson weights are the rule applied to each unit vector.
    return integrate.simpson(np.eye(num_points), dx=spacing, axis=1)


def potential_gradient(network: torch.nn.Module, schedule, y: torch.Tensor, t: int) -> torch.Tensor:
    """Return grad_u(y) = -beta_t/2 y - beta_t s(y, t), `(B, C, H, W)` in the dtype of y.

    The score is s = -eps / sqrt(1 - abar_t), with eps from `schedule.predict_eps`, so
    networks that predict x0 (the ideal memorizer) work as well.
    """
    steps = torch.full((len(y),), t, dtype=torch.long, device=y.device)
    eps = schedule.predict_eps(network(y, steps), y, steps)
    beta = float(schedule.betas[t])
    noise_std = math.sqrt(1.0 - float(schedule.alphas_cumprod[t]))
    score = -eps / noise_std
    return -beta / 2 * y - beta * score


@dataclass
class EnergyResult:
    """Relative energies `potential` float64 `(references, samples)` and the network evaluations spent."""

    potential: np.ndarray
    evaluations: int


@torch.no_grad()
def relative_energy(network: torch.nn.Module, schedule, samples: torch.Tensor, references: torch.Tensor, *,
                    t: int = 0, num_points: int = 20, quadrature: str = "trapezoid", batch_size: int = 64,
                    ref_batch_size: int = 4, device: torch.device | str = "cpu") -> EnergyResult:
    """Integrate grad_u from every sample to every reference along the quarter circle.

    samples: `(N, C, H, W)`, references: `(R, C, H, W)`, both in [-1, 1] and of one dtype,
    which is the dtype passed to the network. Returns potential[r, n] = dU(samples[n] -> references[r]).
    Each network call takes up to ref_batch_size x batch_size images at one node.
    """
    if not 0 <= t < schedule.timesteps:
        raise MemgenError(f"--time {t} is outside the schedule's steps 0 to {schedule.timesteps - 1}")
    if batch_size < 1 or ref_batch_size < 1:
        raise MemgenError(f"--batch-size {batch_size} and --ref-batch-size {ref_batch_size} must be at least 1")
    if samples.shape[1:] != references.shape[1:]:
        raise MemgenError(f"samples of shape {tuple(samples.shape[1:])} and references of shape "
                          f"{tuple(references.shape[1:])} differ; pass references of the same dataset")
    angles = quadrature_nodes(num_points)
    weights = quadrature_weights(quadrature, num_points)
    potential = np.zeros((len(references), len(samples)), dtype=np.float64)
    evaluations = 0

    chunks = [(r, n) for r in range(0, len(references), ref_batch_size) for n in range(0, len(samples), batch_size)]
    for ref_start, sample_start in tqdm(chunks, desc="energy chunks", unit="chunk", leave=False):
        ref = references[ref_start:ref_start + ref_batch_size].to(device)
        x = samples[sample_start:sample_start + batch_size].to(device)
        # Every (reference, sample) pair of the chunk, flattened to one batch (r-major).
        ref_rows = ref.repeat_interleave(len(x), dim=0)
        x_rows = x.repeat(len(ref), 1, 1, 1)
        total = torch.zeros(len(x_rows), dtype=torch.float64, device=device)
        for angle, weight in zip(angles, weights):
            cos, sin = math.cos(angle), math.sin(angle)
            gamma = cos * x_rows + sin * ref_rows
            velocity = -sin * x_rows + cos * ref_rows
            gradient = potential_gradient(network, schedule, gamma, t)
            total += weight * (gradient.double() * velocity.double()).flatten(1).sum(dim=1)
            evaluations += len(x_rows)
        block = total.reshape(len(ref), len(x)).cpu().numpy()
        potential[ref_start:ref_start + len(ref), sample_start:sample_start + len(x)] = block
    return EnergyResult(potential=potential, evaluations=evaluations)


def load_reference_images(path: str | Path, image_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, str]:
    """Read reference images from `samples`, `images` or `top` (a class file) of an `.npz`.

    Returns float32 `(R, C, H, W)` in [-1, 1] and the name of the array used. With
    `image_shape` (C, H, W) the shape is checked against the model's.
    """
    from memgen.pairing import check_image_batch

    path = Path(path)
    if path.suffix != ".npz":
        raise MemgenError(f"--ref-path '{path}' is not an .npz file; pass an .npz with 'samples' or 'images'")
    arrays = load_npz(path)
    key = next((name for name in REFERENCE_KEYS if name in arrays), None)
    if key is None:
        raise MemgenError(f"--ref-path '{path}' has none of the arrays {', '.join(REFERENCE_KEYS)} "
                          f"(it has {sorted(arrays)}); store the references as 'samples' or 'images'")
    images = arrays[key]
    if image_shape is None:
        image_shape = tuple(images.shape[1:])
    check_image_batch(images, image_shape, f"--ref-path '{path}' ({key})")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), key


def check_energy_options(options: EnergyOptions) -> None:
    """Raise MemgenError for missing paths and settings outside their valid ranges."""
    from memgen.pairing import first_rows

    if not options.ref_path:
        raise MemgenError("--ref-path is required: an .npz of reference images under 'samples' or 'images'")
    if not options.ckpt_path:
        raise MemgenError("--ckpt-path is required: a folder of <K>.pt checkpoints or one such file")
    if options.batch_size < 1 or options.ref_batch_size < 1:
        raise MemgenError(f"--batch-size {options.batch_size} and --ref-batch-size {options.ref_batch_size} "
                          "must be at least 1")
    if options.time < 0:
        raise MemgenError(f"--time {options.time} is invalid; use a step from 0 to T - 1")
    first_rows(1, options.sample_size)  # checks --sample-size
    quadrature_weights(options.quadrature, options.num_points)


def run_energy(options: EnergyOptions) -> list[Path]:
    """Run the stage: for every selected K, write `<result>/<K>.npz` with the relative energies.

    Existing results are kept unless `options.overwrite`, so an interrupted run resumes.
    Returns the result files written in this call.
    """
    from memgen.pairing import pair_by_k
    from memgen.runtime import pick_device, setup_logging

    setup_logging()
    check_energy_options(options)
    references, reference_key = load_reference_images(options.ref_path)
    pairs = pair_by_k(options.ckpt_path, options.sample_path, options.start_idx, options.final_idx)

    result_path = ensure_writable_dir(options.result_path)
    setup_logging(result_path / "energy.log")
    logger.info("relative energy for K = %s against %d references of '%s' (t = %d, %d %s nodes)",
                ", ".join(str(pair.k) for pair in pairs), len(references), options.ref_path, options.time,
                options.num_points, options.quadrature)
    device = pick_device(options.device)

    written = []
    for pair in tqdm(pairs, desc="K", unit="K"):
        output = result_path / f"{pair.k}.npz"
        if skip_existing(output, options.overwrite):
            redraw_missing_figure(output, pair.k)
            continue
        process_pair(pair, options, references, reference_key, output, device)
        written.append(output)
    return written


def process_pair(pair, options: EnergyOptions, references: torch.Tensor, reference_key: str, output: Path,
                 device: torch.device) -> None:
    """Compute the relative energies of one K (a `memgen.pairing.KPair`), write them and their figure."""
    from memgen.checkpoint import load_model
    from memgen.pairing import check_image_batch, load_probe_images

    started = time.perf_counter()
    model = load_model(pair.checkpoint, device, data_path=options.data_path)
    check_image_batch(references, model.image_shape, f"--ref-path '{options.ref_path}' ({reference_key})")
    probe_set = load_probe_images(pair, model, options.data_path, options.sample_size, options.use_least)
    if len(probe_set.images):
        result = relative_energy(model.network, model.schedule, probe_set.images, references, t=options.time,
                                 num_points=options.num_points, quadrature=options.quadrature,
                                 batch_size=options.batch_size, ref_batch_size=options.ref_batch_size,
                                 device=device)
    else:
        logger.warning("K = %d: '%s' contains no %s image; writing an empty result", pair.k, pair.samples,
                       probe_set.source["part"])
        result = EnergyResult(potential=np.zeros((len(references), 0)), evaluations=0)

    meta = {
        **model.data_meta(),
        **probe_set.source,
        "K": pair.k,
        "checkpoint": str(pair.checkpoint),
        "checkpoint_kind": model.kind,
        "use_least": options.use_least,
        "ref_path": str(options.ref_path),
        "ref_key": reference_key,
        "time": options.time,
        "num_points": options.num_points,
        "quadrature": options.quadrature,
        "evaluations": result.evaluations,
        "memgen_version": __version__,
    }
    save_npz(output, meta=meta, potential=result.potential, **{"sample-indices": probe_set.indices})
    if result.potential.size:
        figure = plot_energy(result.potential, output.parent / f"energy_{pair.k}.png", pair.k, probe_set.source)
        logger.info("wrote '%s'", figure)
    median = float(np.median(result.potential)) if result.potential.size else float("nan")
    logger.info("K = %d: %d references x %d samples, median relative energy %.4g, %d network evaluations, "
                "%.1f s; wrote '%s'", pair.k, len(references), len(probe_set.images), median,
                result.evaluations, time.perf_counter() - started, output)


def redraw_missing_figure(output: Path, k: int) -> None:
    """Draw energy_<K>.png from a kept `<K>.npz` when a killed run wrote the file but not its figure."""
    figure = output.parent / f"energy_{k}.png"
    if figure.exists():
        return
    arrays = load_npz(output, required=["potential"])
    if arrays["potential"].size:
        plot_energy(arrays["potential"], figure, k, read_meta(arrays, output))
        logger.info("wrote the missing figure '%s'", figure)


def plot_energy(potential: np.ndarray, path: str | Path, k: int, source: dict) -> Path:
    """Draw the relative energies of one K: a histogram and the (references x samples) matrix."""
    from matplotlib.figure import Figure

    from memgen.critical_times import describe_images
    from memgen.plots import save_figure

    figure = Figure(figsize=(9, 3.5), layout="constrained")
    histogram, matrix = figure.subplots(1, 2)
    histogram.hist(potential.reshape(-1), bins=50)
    histogram.set_xlabel("relative energy dU (sample -> reference)")
    histogram.set_ylabel("pairs")
    limit = float(np.abs(potential).max()) or 1.0
    image = matrix.imshow(potential, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit,
                          interpolation="nearest")
    matrix.set_xlabel("sample")
    matrix.set_ylabel("reference")
    figure.colorbar(image, ax=matrix, label="dU")
    figure.suptitle(f"K = {k}, {describe_images(source)}")
    return save_figure(figure, path)
