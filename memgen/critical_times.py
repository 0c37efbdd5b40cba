"""Basins of attraction: how much noise a sample survives before the model loses it.

For an image x0 and a step t, one trial noises it, `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`,
denoises x_t back to t = 0 with a DDIM of min(ddim_steps, t) steps, and calls x0
recovered when the distance (LPIPS or L2) between the final clipped x0 prediction and x0
is at most delta. Steps are scanned on the grid t = 1, 1 + stride, ... <= T - 1. The
critical time of a trial is the last grid step before its first failure (0 when it fails
at t = 1), and the scan stops at the first grid step where every image has fewer than a
fraction p of its trials still unbroken. The radius ||x_t - x0|| at the critical time
measures the basin in pixel space (0 for critical time 0).

Choices that differ from the code released with Pham et al. 2025 (arXiv:2505.21777):

- A trial is one noise direction eps, drawn from its own generator seeded by
  (seed, image, trial) and kept for every t. A trial thus follows one ray out of x0, and
  the result does not depend on the batch size. The released code draws fresh noise at
  each t and again for the radius.
- The fraction that stops the scan counts the trials that have not failed yet. The
  released code counts the trials recovered at the current t, over one batch of images.
- A trial that fails at the first step gets 0, not the first step.
- L2 is the Euclidean norm of the flattened difference (the released code used its inverse).

`--search bisect` finds each trial's first failure by bisection on the same grid. It gives
the scan's critical times whenever recovery along a trial's ray is monotone in t (recovered
up to some step, failed after it) and usually needs fewer network evaluations.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from memgen import __version__
from memgen.config import PAPER_SEED
from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir, list_k_files, load_npz, read_meta, save_npz, skip_existing
from memgen.sampling import ddim_denoise, ddim_denoise_timesteps

logger = logging.getLogger(__name__)

METRICS = ("lpips", "l2")
SEARCHES = ("scan", "bisect")
FIGURE_NAME = "critical_times.png"

# A distance takes denoised images (m, C, H, W) and the rows (m,) of the probed images
# they should equal, and returns m distances.
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CriticalTimesOptions:
    """Options of run_critical_times.py."""

    ckpt_path: str = ""
    """Folder of checkpoints <K>.pt (memgen, the paper's release or the ideal memorizer), or one such file."""
    sample_path: str | None = None
    """Folder of class files <K>.npz of run_classify.py (or sample files of run_generate.py); unset: probe training images."""
    result_path: str = "results/critical_times"
    """Folder for <K>.npz results, critical_times.png and critical_times.log."""
    data_path: str | None = None
    """Dataset root for training images and ideal-memorizer checkpoints; unset: the path in each checkpoint."""
    sample_size: int = 64
    """Images probed per K: the first ones of the class file (or of the training subset); -1 for all."""
    batch_size: int = 256
    """Noisy copies (images x trials) per network call."""
    metric: str = "lpips"
    """Recovery distance: lpips (LPIPS v0.1) or l2 (Euclidean norm of the flattened [-1, 1] difference)."""
    network: str = "alex"
    """LPIPS backbone: alex or vgg."""
    lpips_weights: str | None = None
    """File with the LPIPS backbone weights; unset: search the usual places (see memgen.lpips)."""
    p_trials: int = 10
    """Noisy copies (trials) of each image, each with its own fixed noise."""
    stride: int = 25
    """Spacing of the scanned steps t = 1, 1 + stride, ... <= T - 1."""
    ddim_steps: int = 20
    """DDIM steps from t back to 0 (min(ddim_steps, t) are taken)."""
    delta: float = 0.1
    """A trial is recovered when the distance between the denoised image and the original is <= delta."""
    eta: float = 0.0
    """DDIM eta: 0 is deterministic; step noise for eta > 0 is seeded per image, trial and t."""
    p: float = 0.9
    """The scan stops once every image has fewer than this fraction of its trials unbroken (0 < p <= 1)."""
    use_least: bool = False
    """Probe the 'least' part of each class file instead of 'top'."""
    search: str = "scan"
    """scan (every grid step until the first failure) or bisect (same result when recovery is monotone in t)."""
    start_idx: int = 0
    """First pair (sorted by K) to process."""
    final_idx: int = -1
    """End (exclusive) of the pairs to process; -1 for all."""
    overwrite: bool = False
    """Recompute a K whose result file exists; by default it is kept, so a rerun resumes."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    seed: int = PAPER_SEED
    """Seed of the trial noise."""


@dataclass
class CriticalTimes:
    """Result of one image set: critical time and radius per image and trial.

    `time` (int64, `(n, trials)`) holds step indices in [0, T - 1] and `radius` (float32,
    `(n, trials)`) the distances ||x_t - x0||. `grid` lists the scanned steps, `stop_step` is
    the grid step where the scan stopped, and `evaluations` counts the images passed
    through the network.
    """

    time: np.ndarray
    radius: np.ndarray
    grid: list[int]
    stop_step: int
    evaluations: int


def scan_grid(timesteps: int, stride: int) -> list[int]:
    """Return the scanned steps 1, 1 + stride, ..., up to T - 1."""
    if stride < 1:
        raise MemgenError(f"--stride {stride} is invalid; use a positive number of steps")
    if timesteps < 2:
        raise MemgenError(f"a schedule of {timesteps} step(s) has no step t >= 1 to scan")
    return list(range(1, timesteps, stride))


def trial_seed(seed: int, image: int, trial: int, step: int | None = None) -> int:
    """Return the 64-bit seed of one trial's noise (or, with `step`, of its DDIM step noise at t = step).

    It is the first word of numpy's `SeedSequence(seed, spawn_key=(image, trial[, step]))`,
    so streams of different images, trials and steps are independent.
    """
    key = (image, trial) if step is None else (image, trial, step)
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, dtype=np.uint64)
    return int(state[0])


class RowNoise:
    """Standard normal noise, row i drawn from a CPU generator seeded with `seeds[i]`.

    Callable as a sampler noise function: `noise(like)` returns `(m, C, H, W)` on the device
    and in the dtype of `like`, and successive calls continue each row's stream.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def draw(self, image_shape: Sequence[int]) -> torch.Tensor:
        rows = [torch.randn((1, *image_shape), generator=generator) for generator in self.generators]
        return torch.cat(rows)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.draw(like.shape[1:]).to(device=like.device, dtype=like.dtype)


def l2_distance(images: torch.Tensor) -> Distance:
    """Return the Euclidean distance between denoised images and `images[rows]`, flattened."""
    def distance(denoised: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (denoised - images[rows]).flatten(1).norm(dim=1)
    return distance


def lpips_distance(embedding: torch.nn.Module, images: torch.Tensor, batch_size: int) -> Distance:
    """Return LPIPS between denoised images and `images[rows]`, with `images` embedded once.

    `embedding` is a `memgen.lpips.LPIPSEmbedding`; LPIPS(x, y) = ||phi(x) - phi(y)||^2.
    """
    with torch.no_grad():
        reference = torch.cat([embedding(images[start:start + batch_size])
                               for start in range(0, len(images), batch_size)])

    def distance(denoised: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (embedding(denoised) - reference[rows]).pow(2).sum(dim=1)
    return distance


class RecoveryProbe:
    """Noise, denoise and compare (image, trial) rows of one image set at a step t.

    images: float32 `(n, C, H, W)` in [-1, 1]. Rows are int64 arrays `(m, 2)` of (image,
    trial) pairs. `evaluations` counts the images passed through the network so far.
    """

    def __init__(self, network: torch.nn.Module, schedule, images: torch.Tensor, distance: Distance, *,
                 seed: int, ddim_steps: int, eta: float, delta: float, batch_size: int,
                 device: torch.device | str = "cpu"):
        self.network = network
        self.schedule = schedule
        self.images = images.to(device)
        self.distance = distance
        self.seed = seed
        self.ddim_steps = ddim_steps
        self.eta = eta
        self.delta = delta
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.evaluations = 0

    def noisy_images(self, rows: np.ndarray, t: int) -> torch.Tensor:
        """Return x_t `(m, C, H, W)` of each row's trial noise at step t."""
        noise = RowNoise([trial_seed(self.seed, int(image), int(trial)) for image, trial in rows])
        x0 = self.images[torch.as_tensor(rows[:, 0], device=self.device)]
        steps = torch.full((len(rows),), t, dtype=torch.long, device=self.device)
        return self.schedule.q_sample(x0, steps, noise(x0))

    def recovered(self, rows: np.ndarray, t: int) -> np.ndarray:
        """Return for each row whether its trial at step t is recovered, bool `(m,)`."""
        outcome = np.zeros(len(rows), dtype=bool)
        steps_per_image = len(ddim_denoise_timesteps(t, self.ddim_steps))
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            x_t = self.noisy_images(chunk, t)
            step_noise = None
            if self.eta > 0:
                step_noise = RowNoise([trial_seed(self.seed, int(image), int(trial), t) for image, trial in chunk])
            denoised = ddim_denoise(self.network, self.schedule, x_t, t, self.ddim_steps, eta=self.eta,
                                    noise_fn=step_noise)
            distances = self.distance(denoised, torch.as_tensor(chunk[:, 0], device=self.device))
            outcome[start:start + len(chunk)] = (distances <= self.delta).cpu().numpy()
            self.evaluations += len(chunk) * steps_per_image
        return outcome

    def radii(self, rows: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Return ||x_t - x0|| of each row's trial at its step `times[i]` (0 where it is 0), float32."""
        radius = np.zeros(len(rows), dtype=np.float32)
        for t in np.unique(times[times > 0]):
            selected = np.flatnonzero(times == t)
            for start in range(0, len(selected), self.batch_size):
                positions = selected[start:start + self.batch_size]
                chunk = rows[positions]
                x0 = self.images[torch.as_tensor(chunk[:, 0], device=self.device)]
                difference = self.noisy_images(chunk, int(t)) - x0
                radius[positions] = difference.flatten(1).norm(dim=1).cpu().numpy()
        return radius


def scan_first_failures(probe: RecoveryProbe, count: int, trials: int, grid: Sequence[int],
                        p: float) -> np.ndarray:
    """Scan the grid in order and return each trial's first failing grid index, int64 `(n, trials)`.

    Trials that have failed are not evaluated again. Trials still unbroken when the scan
    stops keep the value len(grid), which means "no failure seen".
    """
    first_failure = np.full((count, trials), len(grid), dtype=np.int64)
    unbroken = np.ones((count, trials), dtype=bool)
    for index, t in enumerate(tqdm(grid, desc="scan steps", unit="step", leave=False)):
        rows = np.argwhere(unbroken)
        failed = rows[~probe.recovered(rows, t)]
        first_failure[failed[:, 0], failed[:, 1]] = index
        unbroken[failed[:, 0], failed[:, 1]] = False
        if np.all(unbroken.mean(axis=1) < p):
            break
    return first_failure


def bisect_first_failures(probe: RecoveryProbe, count: int, trials: int, grid: Sequence[int]) -> np.ndarray:
    """Bisect each trial's first failing grid index, int64 `(n, trials)` (len(grid) when none).

    Each trial keeps a bracket (last recovered index, first failed index), starting from the
    virtual (-1, len(grid)), and halves it with one evaluation per round. All trials advance
    together, and rows whose midpoints share a step go through the network in one batch.

    NOTE: later rounds split the rows into one batch per distinct step, so with few rows the
    wall time can exceed the scan's even when the evaluations are fewer.
    """
    recovered_below = np.full((count, trials), -1, dtype=np.int64)
    failed_from = np.full((count, trials), len(grid), dtype=np.int64)
    rounds = int(np.ceil(np.log2(len(grid) + 1)))
    for _ in tqdm(range(rounds), desc="bisection rounds", unit="round", leave=False):
        open_bracket = failed_from - recovered_below > 1
        if not open_bracket.any():
            break
        middle = (recovered_below + failed_from) // 2
        for index in np.unique(middle[open_bracket]):
            rows = np.argwhere(open_bracket & (middle == index))
            outcome = probe.recovered(rows, grid[index])
            recovered_below[rows[outcome, 0], rows[outcome, 1]] = index
            failed_from[rows[~outcome, 0], rows[~outcome, 1]] = index
    return failed_from


def stop_index(first_failure: np.ndarray, grid_length: int, p: float) -> int:
    """Return the grid index where the scan stops: the first index m at which every image has
    fewer than a fraction p of its trials with first failure after m (else the last index)."""
    for index in range(grid_length):
        if np.all((first_failure > index).mean(axis=1) < p):
            return index
    return grid_length - 1


def critical_times_from_failures(first_failure: np.ndarray, grid: Sequence[int], p: float) -> tuple[np.ndarray, int]:
    """Turn first failing grid indices into critical times, int64 `(n, trials)`, and the stop index.

    A trial's critical time is the grid step before its first failure, capped at the step
    where the scan stops, and 0 when it fails at the first step.
    """
    stop = stop_index(first_failure, len(grid), p)
    last_recovered = np.minimum(first_failure, stop + 1) - 1
    steps = np.asarray(grid, dtype=np.int64)
    time = np.where(last_recovered >= 0, steps[np.maximum(last_recovered, 0)], 0)
    return time.astype(np.int64), stop


def check_search_options(p_trials: int, stride: int, ddim_steps: int, delta: float, eta: float, p: float,
                         search: str, batch_size: int) -> None:
    """Raise MemgenError for settings outside their valid ranges."""
    if p_trials < 1:
        raise MemgenError(f"--p-trials {p_trials} is invalid; use 1 or more trials per image")
    if stride < 1:
        raise MemgenError(f"--stride {stride} is invalid; use a positive number of steps")
    if ddim_steps < 1:
        raise MemgenError(f"--ddim-steps {ddim_steps} is invalid; use 1 or more")
    if not delta >= 0:
        raise MemgenError(f"--delta {delta} is invalid; use a distance >= 0")
    if not eta >= 0:
        raise MemgenError(f"--eta {eta} is invalid; use 0 (deterministic DDIM) or more")
    if not 0 < p <= 1:
        raise MemgenError(f"--p {p} is invalid; use a fraction in (0, 1]")
    if search not in SEARCHES:
        raise MemgenError(f"--search {search!r} is not supported; use one of {', '.join(SEARCHES)}")
    if batch_size < 1:
        raise MemgenError(f"--batch-size {batch_size} is invalid; use 1 or more")


@torch.no_grad()
def find_critical_times(network: torch.nn.Module, schedule, images: torch.Tensor, distance: Distance, *,
                        p_trials: int = 10, stride: int = 25, ddim_steps: int = 20, delta: float = 0.1,
                        eta: float = 0.0, p: float = 0.9, search: str = "scan", seed: int = PAPER_SEED,
                        batch_size: int = 256, device: torch.device | str = "cpu") -> CriticalTimes:
    """Measure the critical time and radius of every trial of `images` (n, C, H, W) in [-1, 1].

    `network(x_t, t)` returns the prediction of `schedule.prediction_type`; `distance`
    compares denoised images with `images` (see `l2_distance`, `lpips_distance`).
    """
    check_search_options(p_trials, stride, ddim_steps, delta, eta, p, search, batch_size)
    grid = scan_grid(schedule.timesteps, stride)
    probe = RecoveryProbe(network, schedule, images, distance, seed=seed, ddim_steps=ddim_steps, eta=eta,
                          delta=delta, batch_size=batch_size, device=device)
    count = len(images)

    if search == "scan":
        first_failure = scan_first_failures(probe, count, p_trials, grid, p)
    else:
        first_failure = bisect_first_failures(probe, count, p_trials, grid)
    time_steps, stop = critical_times_from_failures(first_failure, grid, p)

    rows = np.argwhere(np.ones((count, p_trials), dtype=bool))
    radius = probe.radii(rows, time_steps.reshape(-1)).reshape(count, p_trials)
    return CriticalTimes(time=time_steps, radius=radius, grid=grid, stop_step=grid[stop],
                         evaluations=probe.evaluations)


def build_distance(metric: str, images: torch.Tensor, embedding: torch.nn.Module | None,
                   batch_size: int) -> Distance:
    """Return the recovery distance of `--metric` against `images` on their device."""
    if metric == "l2":
        return l2_distance(images)
    return lpips_distance(embedding, images, batch_size)


def run_critical_times(options: CriticalTimesOptions) -> list[Path]:
    """Run the stage: for every selected K, probe its images and write `<result>/<K>.npz`.

    Existing results are kept unless `options.overwrite`, so an interrupted run resumes.
    Afterwards `critical_times.png` is redrawn from every result in the folder. Returns the
    result files written in this call.
    """
    from memgen.pairing import first_rows, pair_by_k
    from memgen.runtime import pick_device, setup_logging

    setup_logging()
    if not options.ckpt_path:
        raise MemgenError("--ckpt-path is required: a folder of <K>.pt checkpoints or one such file")
    if options.metric not in METRICS:
        raise MemgenError(f"--metric {options.metric!r} is not supported; use one of {', '.join(METRICS)}")
    check_search_options(options.p_trials, options.stride, options.ddim_steps, options.delta, options.eta,
                         options.p, options.search, options.batch_size)
    first_rows(1, options.sample_size)  # checks --sample-size
    pairs = pair_by_k(options.ckpt_path, options.sample_path, options.start_idx, options.final_idx)

    result_path = ensure_writable_dir(options.result_path)
    setup_logging(result_path / "critical_times.log")
    logger.info("critical times for K = %s (%s search, metric %s, delta %g, stride %d, %d trials)",
                ", ".join(str(pair.k) for pair in pairs), options.search, options.metric, options.delta,
                options.stride, options.p_trials)
    device = pick_device(options.device)
    embedding = None
    if options.metric == "lpips":
        from memgen.lpips import LPIPSEmbedding

        embedding = LPIPSEmbedding.from_pretrained(options.network, options.lpips_weights).to(device)

    written = []
    for pair in tqdm(pairs, desc="K", unit="K"):
        output = result_path / f"{pair.k}.npz"
        if skip_existing(output, options.overwrite):
            continue
        process_pair(pair, options, output, device, embedding)
        written.append(output)

    if any(result_path.glob("*.npz")):
        figure = plot_critical_times(result_path)
        logger.info("wrote '%s'", figure)
    return written


def process_pair(pair, options: CriticalTimesOptions, output: Path, device: torch.device,
                 embedding: torch.nn.Module | None) -> None:
    """Measure the critical times of one K (a `memgen.pairing.KPair`) and write them to `output`."""
    from memgen.checkpoint import load_model
    from memgen.pairing import load_probe_images

    started = time.perf_counter()
    model = load_model(pair.checkpoint, device, data_path=options.data_path)
    probe_set = load_probe_images(pair, model, options.data_path, options.sample_size, options.use_least)
    images = probe_set.images.to(device)
    if len(images):
        distance = build_distance(options.metric, images, embedding, options.batch_size)
        result = find_critical_times(model.network, model.schedule, images, distance, p_trials=options.p_trials,
                                     stride=options.stride, ddim_steps=options.ddim_steps, delta=options.delta,
                                     eta=options.eta, p=options.p, search=options.search, seed=options.seed,
                                     batch_size=options.batch_size, device=device)
    else:
        logger.warning("K = %d: '%s' contains no %s image; writing an empty result", pair.k, pair.samples,
                       probe_set.source["part"])
        empty = np.zeros((0, options.p_trials))
        result = CriticalTimes(time=empty.astype(np.int64), radius=empty.astype(np.float32),
                               grid=scan_grid(model.schedule.timesteps, options.stride), stop_step=0, evaluations=0)

    meta = {
        **model.data_meta(),
        **probe_set.source,
        "K": pair.k,
        "checkpoint": str(pair.checkpoint),
        "checkpoint_kind": model.kind,
        "use_least": options.use_least,
        "metric": options.metric,
        "network": options.network if options.metric == "lpips" else None,
        "delta": options.delta,
        "stride": options.stride,
        "ddim_steps": options.ddim_steps,
        "eta": options.eta,
        "p": options.p,
        "p_trials": options.p_trials,
        "search": options.search,
        "seed": options.seed,
        "timesteps": model.schedule.timesteps,
        "stop_step": result.stop_step,
        "evaluations": result.evaluations,
        "memgen_version": __version__,
    }
    save_npz(output, meta=meta, time=result.time, radius=result.radius, delta=np.float64(options.delta),
             **{"sample-indices": probe_set.indices})
    mean_time = float(result.time.mean()) if result.time.size else float("nan")
    logger.info("K = %d: %d images x %d trials, mean critical time %.1f, %d network evaluations, %.1f s; "
                "wrote '%s'", pair.k, len(images), options.p_trials, mean_time, result.evaluations,
                time.perf_counter() - started, output)


def describe_images(source: dict) -> str:
    """Name the probed images for a figure title: the class, and the part of a class file."""
    name = str(source.get("class", "?"))
    part = source.get("part")
    return f"{name} ({part})" if part in ("top", "least") else name


def plot_critical_times(result_path: str | Path) -> Path:
    """Plot the mean critical time (bars: standard deviation over images and trials) against K.

    Reads every `<K>.npz` in `result_path` and writes `critical_times.png` there.
    """
    from matplotlib.figure import Figure

    from memgen.plots import save_figure

    result_path = Path(result_path)
    ks, means, spreads, labels = [], [], [], set()
    for k, path in list_k_files(result_path, "npz"):
        arrays = load_npz(path, required=["time"])
        meta = read_meta(arrays, path)
        if arrays["time"].size == 0:
            continue
        ks.append(k)
        means.append(float(arrays["time"].mean()))
        spreads.append(float(arrays["time"].std()))
        labels.add(describe_images(meta))

    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.errorbar(ks, means, yerr=spreads, marker="o", capsize=3)
    axes.set_xscale("log")
    axes.set_xlabel("training-set size K")
    axes.set_ylabel("critical time (step)")
    axes.set_title("critical time of " + ", ".join(sorted(labels)))
    return save_figure(figure, result_path / FIGURE_NAME)
