"""Checkpoints paired with sample files by K, and the images that a probing stage reads.

The critical-time and energy stages read a folder of checkpoints `<K>.pt` and, with
`--sample-path`, a folder of sample files `<K>.npz`. A K that has a checkpoint but no
sample file (or the reverse) is skipped with a warning that lists it, because partial
sweeps are common. An error is raised only when no K has both. The stage then works on
the slice `--start-idx:--final-idx` of the pairs sorted by K.

Accepted sample files:

| kind | arrays | images used |
| --- | --- | --- |
| class file of run_classify.py | `top`, `least`, `top-indices`, `least-indices`, `meta` | `top`, or `least` with `--use-least` |
| samples of run_generate.py | `samples`, `meta` | all of `samples` |

Without `--sample-path` the probed images are the first `--sample-size` training images
of the checkpoint, in the order of the seeded training subset.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memgen.data import check_image_values
from memgen.errors import MemgenError
from memgen.files import load_npz, read_meta, resolve_k_path, select_slice

logger = logging.getLogger(__name__)

# Metadata keys that must agree between a sample file and the checkpoint it is paired with.
MATCHING_DATA_KEYS = ("data_name", "seed", "image_size", "in_channels", "centercrop")

# Pixel values may overshoot [-1, 1] by this much (float rounding) before a file is rejected.


@dataclass(frozen=True)
class KPair:
    """One unit of work: the checkpoint of training-set size K and its sample file (or None)."""

    k: int
    checkpoint: Path
    samples: Path | None


@dataclass
class ProbeImages:
    """Images a stage probes, float32 `(n, C, H, W)` in [-1, 1], with where they came from.

    `indices` (int64, `(n,)`) are the rows of the generated sample file for a class file,
    the rows of `samples` for a generation file, and positions in the training subset for
    training images. `source` is JSON-ready metadata for the result file.
    """

    images: torch.Tensor
    indices: np.ndarray
    source: dict


def pair_by_k(ckpt_path: str | Path, sample_path: str | Path | None, start_idx: int = 0,
              final_idx: int = -1) -> list[KPair]:
    """Pair `<K>.pt` checkpoints with `<K>.npz` sample files and return the selected slice.

    `ckpt_path` and `sample_path` may each be one file or a folder. Without `sample_path`
    every checkpoint is paired with None (probe training images).
    """
    checkpoints = dict(resolve_k_path(ckpt_path, "pt"))
    if sample_path is None:
        pairs = [KPair(k, path, None) for k, path in sorted(checkpoints.items())]
    else:
        sample_files = dict(resolve_k_path(sample_path, "npz"))
        only_checkpoints = sorted(set(checkpoints) - set(sample_files))
        only_samples = sorted(set(sample_files) - set(checkpoints))
        if only_checkpoints:
            logger.warning("skipping K = %s: a checkpoint in '%s' but no sample file in '%s'",
                           _join(only_checkpoints), ckpt_path, sample_path)
        if only_samples:
            logger.warning("skipping K = %s: a sample file in '%s' but no checkpoint in '%s'",
                           _join(only_samples), sample_path, ckpt_path)
        common = sorted(set(checkpoints) & set(sample_files))
        if not common:
            raise MemgenError(f"no K has both a checkpoint in '{ckpt_path}' (K = {_join(sorted(checkpoints))}) "
                              f"and a sample file in '{sample_path}' (K = {_join(sorted(sample_files))}); "
                              "pass folders of the same sweep")
        pairs = [KPair(k, checkpoints[k], sample_files[k]) for k in common]

    selected = select_slice(pairs, start_idx, final_idx)
    if not selected:
        logger.warning("--start-idx %d --final-idx %d selects none of the %d K (%s); nothing to do",
                       start_idx, final_idx, len(pairs), _join([pair.k for pair in pairs]))
    return selected


def _join(values: list[int]) -> str:
    return ", ".join(str(value) for value in values)


def check_image_batch(images: np.ndarray | torch.Tensor, image_shape: tuple[int, ...], source: str,
                      allow_empty: bool = False) -> None:
    """Raise MemgenError unless `images` is `(n, *image_shape)` with values in [-1, 1] (and n >= 1
    unless `allow_empty`)."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != tuple(image_shape):
        raise MemgenError(f"{source} has shape {shape}, but the model takes images (n, {', '.join(map(str, image_shape))}); "
                          "pass images of the dataset the checkpoint was trained on")
    if shape[0] == 0:
        if allow_empty:
            return
        raise MemgenError(f"{source} contains no image")
    check_image_values(images, source)


def check_pair_meta(pair: KPair, file_meta: dict, model_meta: dict, model_k: int) -> None:
    """Raise MemgenError when the sample file, its name and the checkpoint disagree on K or data."""
    if model_k != pair.k:
        raise MemgenError(f"checkpoint '{pair.checkpoint}' was trained on K = {model_k} images but is "
                          f"named {pair.k}.pt; rename it to {model_k}.pt")
    if pair.samples is None:
        return
    file_k = file_meta.get("K", file_meta.get("train_size"))
    if file_k is not None and int(file_k) != pair.k:
        raise MemgenError(f"sample file '{pair.samples}' records K = {file_k} but is named {pair.k}.npz; "
                          "pass the file written for this K")
    for key in MATCHING_DATA_KEYS:
        if key in file_meta and key in model_meta and file_meta[key] != model_meta[key]:
            raise MemgenError(f"sample file '{pair.samples}' has {key} = {file_meta[key]!r} but checkpoint "
                              f"'{pair.checkpoint}' has {key} = {model_meta[key]!r}; pair files of the same run")


def read_sample_file(path: Path, use_least: bool) -> tuple[np.ndarray, np.ndarray, dict, str]:
    """Read the images of a class file (`top` or `least`) or of a generation file (`samples`).

    Returns (images, indices, meta, part) with part "top", "least" or "samples".
    """
    arrays = load_npz(path)
    meta = read_meta(arrays, path)
    if "top" in arrays:
        part = "least" if use_least else "top"
        if part not in arrays:
            raise MemgenError(f"class file '{path}' has no '{part}' array; rerun run_classify.py")
        images = arrays[part]
        indices = arrays.get(f"{part}-indices", np.arange(len(images)))
    elif "samples" in arrays:
        if use_least:
            raise MemgenError(f"'{path}' is a file of generated samples, which has no 'least' part; "
                              "drop --use-least or pass the class files of run_classify.py")
        part = "samples"
        images = arrays["samples"]
        indices = np.arange(len(images))
    else:
        raise MemgenError(f"'{path}' has neither 'top' (a class file of run_classify.py) nor 'samples' "
                          f"(a file of run_generate.py); it has {sorted(arrays)}")
    return images, np.asarray(indices, dtype=np.int64), meta, part


def first_rows(count: int, sample_size: int) -> int:
    """Return how many rows `--sample-size` keeps of `count` (-1 keeps all)."""
    if sample_size == -1:
        return count
    if sample_size < 1:
        raise MemgenError(f"--sample-size {sample_size} is invalid; use a positive number or -1 for all")
    return min(count, sample_size)


def first_training_images(meta: dict, data_path: str | Path, sample_size: int) -> torch.Tensor:
    """Load the first `sample_size` images of the training subset recorded in `meta`, float32 `(n, C, H, W)`.

    Only those images are decoded, not all K, because K can be the whole dataset.
    """
    from memgen.data import load_dataset, load_images, subset_indices

    dataset = load_dataset(meta["data_name"], data_path, image_size=meta["image_size"],
                           centercrop=meta["centercrop"], train=True)
    indices = subset_indices(len(dataset), meta["train_size"], meta["seed"])
    return load_images(dataset, indices[:first_rows(len(indices), sample_size)])


def load_probe_images(pair: KPair, model, data_path: str | Path | None, sample_size: int,
                      use_least: bool = False) -> ProbeImages:
    """Load the first `sample_size` images to probe for one K, checked against the model.

    `model` is a `memgen.checkpoint.LoadedModel`. Without a sample file these are the
    model's training images, rebuilt from the dataset at `data_path` (default: the path in
    the checkpoint's configuration).
    """
    model_meta = model.data_meta()
    if pair.samples is None:
        check_pair_meta(pair, {}, model_meta, model.train_size)
        images = first_training_images(model_meta, data_path or model.config["data"]["data_path"], sample_size)
        source = {"sample_file": None, "class": "training", "part": "training"}
        return ProbeImages(images, np.arange(len(images), dtype=np.int64), source)

    images, indices, file_meta, part = read_sample_file(pair.samples, use_least)
    check_pair_meta(pair, file_meta, model_meta, model.train_size)
    # A class can be empty for some K, for example no memorized sample at large K. The stage
    # then records an empty result instead of stopping the sweep.
    check_image_batch(images, model.image_shape, f"'{pair.samples}' ({part})", allow_empty=True)
    count = first_rows(len(images), sample_size)
    source = {"sample_file": str(pair.samples), "class": file_meta.get("class", "samples"), "part": part}
    tensor = torch.from_numpy(np.ascontiguousarray(images[:count], dtype=np.float32))
    return ProbeImages(tensor, indices[:count], source)
