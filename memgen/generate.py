"""Generation stage: draw N samples from one checkpoint into `<result-path>/<K>.npz`.

Samples are drawn in batches of global indices. Each finished batch is written at once to
`<result-path>/.<K>.parts/batch-<start>-<end>.npz`, so an interrupted run resumes from the
batches it finished. When all N samples exist, rank 0 writes `<K>.npz` (array `samples`,
float32 `(N, C, H, W)` in [-1, 1], and JSON `meta`) and the grid `<K>.png` of the first 64,
then removes the part folder. Under `torchrun` the processes take turns over the batches.
Sample i depends on `--seed` and i only (see memgen.sampling), so the result does not
depend on `--batch-size` or the number of processes beyond float rounding.
"""

import json
import logging
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memgen import __version__
from memgen.config import PAPER_SEED
from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir, load_npz, read_meta, save_npz
from memgen.runtime import Distributed, init_distributed, setup_logging, shutdown_distributed

logger = logging.getLogger(__name__)

GRID_SIZE = 64
PART_NAME = re.compile(r"^batch-(\d+)-(\d+)\.npz$")
# Settings that every part of one run must share; num_samples may change between resumes.
PART_KEYS = ("data_name", "train_size", "seed", "image_size", "in_channels", "centercrop", "sampler", "steps",
             "eta", "sample_seed", "ckpt_path", "iteration", "checkpoint_kind", "use_ema", "memgen_version")


@dataclass
class GenerateOptions:
    """Options of run_generate.py."""

    ckpt_path: str = ""
    """Checkpoint <K>.pt to sample from: memgen's own, the released format of Pham et al. 2025, or an ideal memorizer."""
    result_path: str = "results/samples"
    """Folder for <K>.npz, <K>.png and the part folder .<K>.parts of an unfinished run."""
    num_samples: int = 10_000
    """Number of samples N."""
    batch_size: int = 256
    """Samples per network call in each process."""
    sampler: str = "ddpm"
    """Sampler: ddpm (ancestral, all T steps, the default protocol) or ddim."""
    steps: int | None = None
    """DDIM steps (default 50); DDPM always runs all T steps of the schedule."""
    eta: float = 0.0
    """DDIM noise scale: 0 is deterministic, 1 has the DDPM posterior variance. Unused by DDPM."""
    seed: int = PAPER_SEED
    """Sample seed: sample i draws all its noise from a generator seeded by (seed, i)."""
    use_ema: bool = True
    """Sample from the EMA weights (True, as Pham et al. 2025 do) or the raw weights (False)."""
    overwrite: bool = False
    """Recompute <K>.npz even when it exists, and discard the parts of an earlier unfinished run."""
    data_path: str | None = None
    """Dataset root for an ideal-memorizer checkpoint; defaults to the path stored in it."""
    device: str = "auto"
    """Device: auto (CUDA when present, else CPU), cpu or cuda."""


def check_options(options: GenerateOptions) -> None:
    """Raise MemgenError for option values that no run can use."""
    if not options.ckpt_path:
        raise MemgenError("--ckpt-path is missing; pass the checkpoint <K>.pt to sample from")
    if options.num_samples < 1:
        raise MemgenError(f"--num-samples {options.num_samples} is invalid; use 1 or more")
    if options.batch_size < 1:
        raise MemgenError(f"--batch-size {options.batch_size} is invalid; use 1 or more")
    if options.seed < 0:
        raise MemgenError(f"--seed {options.seed} is invalid; use 0 or more")


def run_settings(loaded, options: GenerateOptions, steps: int) -> dict:
    """Return the metadata that identifies the samples of this run (all of PART_KEYS)."""
    settings = loaded.data_meta()
    settings.update({
        "sampler": options.sampler,
        "steps": steps,
        "eta": float(options.eta) if options.sampler == "ddim" else None,
        "sample_seed": options.seed,
        "ckpt_path": str(Path(options.ckpt_path).resolve()),
        "iteration": loaded.iteration,
        "checkpoint_kind": loaded.kind,
        "use_ema": bool(options.use_ema),
        "memgen_version": __version__,
        "data_path": str(options.data_path or loaded.config["data"]["data_path"]),
    })
    return settings


def plan_batches(missing: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """Split the missing indices into batches `(start, end)` of contiguous indices.

    missing: boolean `(N,)`. Each batch covers at most `batch_size` indices and never
    crosses an index that is already done, so every part file contains one range.
    """
    batches = []
    index = 0
    total = len(missing)
    while index < total:
        if not missing[index]:
            index += 1
            continue
        start = index
        while index < total and missing[index] and index - start < batch_size:
            index += 1
        batches.append((start, index))
    return batches


def _read_part_meta(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(str(archive["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise MemgenError(f"the part file '{path}' cannot be read ({error}); delete it and run "
                          "the same command again to redraw its samples") from error


def list_parts(parts_dir: Path, settings: dict) -> list[tuple[int, int, Path]]:
    """List the finished batches in `parts_dir` as `(start, end, path)`, sorted.

    Raises MemgenError when a part was drawn with other settings (checkpoint, sampler,
    seeds, ...), because mixing them would give a file whose samples differ in kind.
    """
    parts = []
    if not parts_dir.is_dir():
        return parts
    for path in sorted(parts_dir.iterdir()):
        match = PART_NAME.match(path.name)
        if match is None:
            continue
        start, end = int(match.group(1)), int(match.group(2))
        meta = _read_part_meta(path)
        for key in PART_KEYS:
            if meta.get(key) != settings[key]:
                raise MemgenError(
                    f"'{parts_dir}' contains batches of another run: {path.name} has {key} = "
                    f"{meta.get(key)!r} but this run has {settings[key]!r}; pass --overwrite to discard "
                    f"them, or rerun with the settings of that run to finish it")
        parts.append((start, end, path))
    return parts


def missing_mask(parts: list[tuple[int, int, Path]], num_samples: int) -> np.ndarray:
    """Return a boolean `(num_samples,)` mask of the indices that no part covers."""
    missing = np.ones(num_samples, dtype=bool)
    for start, end, _ in parts:
        missing[start:min(end, num_samples)] = False
    return missing


def part_path(parts_dir: Path, start: int, end: int) -> Path:
    return parts_dir / f"batch-{start:08d}-{end:08d}.npz"


def draw_batches(loaded, settings: dict, batches: list[tuple[int, int]], parts_dir: Path,
                 distributed: Distributed) -> int:
    """Draw this process's share of `batches` and write each as a part file; return the count."""
    from tqdm.auto import tqdm

    from memgen.sampling import sample_images

    mine = batches[distributed.rank::distributed.world_size]
    drawn = 0
    progress = tqdm(mine, desc=f"K = {settings['train_size']}", unit="batch", disable=not distributed.is_main)
    for start, end in progress:
        samples = sample_images(loaded.network, loaded.schedule, loaded.image_shape, range(start, end),
                                settings["sample_seed"], settings["sampler"], steps=settings["steps"],
                                eta=settings["eta"] or 0.0, device=distributed.device)
        save_npz(part_path(parts_dir, start, end), meta={**settings, "start": start, "end": end},
                 samples=samples.numpy())
        drawn += end - start
    return drawn


def assemble(parts_dir: Path, final_path: Path, settings: dict, num_samples: int) -> np.ndarray:
    """Combine the parts into `final_path` atomically and remove the part folder."""
    parts = list_parts(parts_dir, settings)
    samples = None
    for start, end, path in parts:
        if start >= num_samples:
            continue
        block = load_npz(path, required=["samples"])["samples"]
        if samples is None:
            samples = np.empty((num_samples, *block.shape[1:]), dtype=np.float32)
        stop = min(end, num_samples)
        samples[start:stop] = block[:stop - start]

    missing = np.flatnonzero(missing_mask(parts, num_samples))
    if len(missing):
        raise MemgenError(f"{len(missing)} of {num_samples} samples are missing from '{parts_dir}' "
                          f"(first index {missing[0]}); a process may have failed, so run the same "
                          "command again to draw them")

    save_npz(final_path, meta={**settings, "num_samples": num_samples}, samples=samples)
    shutil.rmtree(parts_dir)
    return samples


def _check_kept_samples(path: Path, settings: dict) -> None:
    """Raise MemgenError when an existing sample file was drawn with other settings than requested."""
    kept = read_meta(load_npz(path, required=["samples"]), path)
    for key in (*PART_KEYS, "num_samples"):
        if key != "memgen_version" and kept.get(key) != settings.get(key):
            raise MemgenError(f"the existing '{path}' was drawn with {key} = {kept.get(key)!r}, but this run asks "
                              f"for {settings.get(key)!r}; pass --overwrite to replace it, or another --result-path")


def generate_samples(options: GenerateOptions, distributed: Distributed) -> Path:
    """Draw the samples of one checkpoint into `<result_path>/<K>.npz`; return its path.

    Every process of `distributed` calls this; rank 0 writes the final file.
    """
    from memgen.checkpoint import load_model
    from memgen.figures import save_image_grid
    from memgen.sampling import check_sampler

    check_options(options)
    loaded = load_model(options.ckpt_path, distributed.device, use_ema=options.use_ema,
                        data_path=options.data_path)
    steps = check_sampler(options.sampler, options.steps, options.eta, loaded.schedule.timesteps)
    settings = run_settings(loaded, options, steps)

    result_dir = Path(options.result_path)
    k = loaded.train_size
    final_path = result_dir / f"{k}.npz"
    parts_dir = result_dir / f".{k}.parts"

    exists = final_path.exists()
    distributed.barrier()
    if exists and not options.overwrite:
        _check_kept_samples(final_path, {**settings, "num_samples": options.num_samples})
        logger.info("keeping existing '%s'; pass --overwrite to draw it again", final_path)
        grid_path = result_dir / f"{k}.png"
        if distributed.is_main and not grid_path.exists():
            # A run killed between writing <K>.npz and its grid left no grid.
            save_image_grid(load_npz(final_path, required=["samples"])["samples"][:GRID_SIZE], grid_path)
        return final_path
    if distributed.is_main:
        ensure_writable_dir(result_dir)
        if options.overwrite and parts_dir.exists():
            logger.info("--overwrite: discarding the parts in '%s'", parts_dir)
            shutil.rmtree(parts_dir)
        ensure_writable_dir(parts_dir)
    distributed.barrier()

    parts = list_parts(parts_dir, settings)
    missing = missing_mask(parts, options.num_samples)
    batches = plan_batches(missing, options.batch_size)
    if parts:
        logger.info("resuming: %d of %d samples already drawn in '%s'", options.num_samples - int(missing.sum()),
                    options.num_samples, parts_dir)
    logger.info("drawing %d samples of K = %d with %s (%d steps, seed %d) in %d batches on %d process(es)",
                int(missing.sum()), k, options.sampler, steps, options.seed, len(batches), distributed.world_size)

    started = time.perf_counter()
    draw_batches(loaded, settings, batches, parts_dir, distributed)
    distributed.barrier()
    elapsed = time.perf_counter() - started
    if not distributed.is_main:
        return final_path

    drawn = int(missing.sum())
    if drawn:
        logger.info("drew %d samples in %.1f s (%.2f samples/s over %d process(es))", drawn, elapsed,
                    drawn / elapsed, distributed.world_size)
    samples = assemble(parts_dir, final_path, settings, options.num_samples)
    grid_path = save_image_grid(samples[:GRID_SIZE], result_dir / f"{k}.png")
    logger.info("wrote %d samples to '%s' and a grid to '%s'", len(samples), final_path, grid_path)
    return final_path


def generate(options: GenerateOptions) -> Path:
    """Entry point of run_generate.py: set up processes and logging, then generate."""
    # Log the device choice of init_distributed, then keep only rank 0's INFO lines.
    setup_logging()
    distributed = init_distributed(options.device)
    setup_logging(rank=distributed.rank)
    try:
        return generate_samples(options, distributed)
    finally:
        shutdown_distributed()
