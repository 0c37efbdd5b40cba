"""Classification stage: label each sample memorized, spurious or generalized from its top-1 distances.

With d_data the distance of a sample to its nearest training image and d_synth the
distance to its nearest other sample (Pham et al. 2025, "Memorization to Generalization"):

    memorized    if d_data <= delta_m
    spurious     if d_data >  delta_m and d_synth <= delta_s
    generalized  otherwise.

The thresholds are rounded to the dtype of the stored distances (float32 in memgen's
distance files) and compared in that dtype, so a distance that reads as exactly delta in
the file is within the threshold. LPIPS distances default to the paper's delta_m = 0.03
and delta_s = 0.02. L2 distances have no default: pass both thresholds or `--calibrate`
(see `calibrate_thresholds` for the rule).

Inputs are paired by the K in their names: `<dist>/<K>.npz` from run_distances.py, the
samples it describes `<eval>/<K>.npz` from run_generate.py, and `<synth>/<K>.npz`, the
samples that its `synth-indices` point into. The last are the `<eval>` files unless the
synthetic distances were taken against another sample set. Outputs under `--result-path`:

- `identified/<class>/<K>.npz` per class (see `class_arrays` for the arrays), read by
  the critical-time and energy stages;
- `summary.csv` and `summary.json`: counts and fractions per K;
- `fractions.png`: the three fractions against K;
- `grids/<class>-<K>.png`: the most typical samples of a class beside their neighbours.
"""

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from memgen.errors import MemgenError
from memgen.files import (atomic_path, ensure_writable_dir, load_npz, read_meta, resolve_k_path,
                          save_npz, select_slice)

logger = logging.getLogger(__name__)

MEMORIZED, SPURIOUS, GENERALIZED = "memorized", "spurious", "generalized"
CLASSES = (MEMORIZED, SPURIOUS, GENERALIZED)

# Thresholds of Pham et al. 2025 for LPIPS (AlexNet) distances, with k = 5 neighbours.
PAPER_DELTA_M = 0.03
PAPER_DELTA_S = 0.02

DISTANCE_KEYS = ("data-dists", "data-indices", "synth-dists", "synth-indices")
# Metadata keys that a sample file and its distance file must agree on.
MATCHING_KEYS = ("data_name", "train_size", "seed", "num_samples")
# Metadata keys copied from the sample file into every class file, so that later stages
# can rebuild the training set.
DATA_KEYS = ("data_name", "train_size", "seed", "image_size", "in_channels", "centercrop")

SUMMARY_COLUMNS = ("K", "num_samples", "memorized", "spurious", "generalized", "memorized_fraction",
                   "spurious_fraction", "generalized_fraction", "metric", "network", "delta_m", "delta_s",
                   "thresholds", "calibration", "sample_file", "distance_file")


@dataclass
class ClassifyOptions:
    """Options of run_classify.py."""

    dist_path: str = ""
    """Distance files <K>.npz written by run_distances.py: a folder, or one file."""
    eval_path: str = ""
    """Sample files <K>.npz to label (run_generate.py output): the samples whose rows the distance files describe."""
    synth_path: str = ""
    """Sample files <K>.npz that the distance files' synth-indices point into; default: --eval-path."""
    data_path: str = ""
    """Dataset root (the .npz file for --data-name npz); default: the data_path recorded in the sample metadata."""
    result_path: str = "results/classify"
    """Folder for identified/<class>/<K>.npz, summary.csv, summary.json, fractions.png and grids/."""
    delta_m: float | None = None
    """Memorization threshold on d_data, in the units of the distances; default 0.03 for LPIPS, required for L2."""
    delta_s: float | None = None
    """Spurious threshold on d_synth, in the units of the distances; default 0.02 for LPIPS, required for L2."""
    k: int = 5
    """Nearest neighbours stored per sample; the distance files must have at least k."""
    top_size: int = 256
    """Most typical samples stored per class (the first of the class order)."""
    least_size: int = 64
    """Least typical samples stored per class (the last of the class order)."""
    start_idx: int = 0
    """First position, in the list of K sorted ascending, to process."""
    final_idx: int = -1
    """Position after the last K to process; -1 processes to the end."""
    overwrite: bool = False
    """Replace existing class files and grids instead of keeping them."""
    calibrate: bool = False
    """Derive delta_m and delta_s from the training set's nearest-neighbour distances instead of passing them."""
    calibrate_quantile: float = 0.05
    """q of the calibration: delta_m = --calibrate-scale x the q-quantile (method 'lower') of those distances."""
    calibrate_scale: float = 0.5
    """Factor applied to the quantile to get delta_m; delta_s = delta_m x 2/3 (the paper's 0.02 / 0.03)."""
    calibrate_size: int = 4096
    """Calibration images: the first N of the seeded training permutation (all when the dataset is smaller)."""
    lpips_weights: str = ""
    """LPIPS backbone weights for --calibrate with LPIPS distances; default: the places memgen.lpips searches."""
    grid_rows: int = 8
    """Samples per class shown in grids/<class>-<K>.png; 0 writes no grids."""
    device: str = "auto"
    """Device for the calibration's embedding and search: auto, cpu or cuda."""


@dataclass(frozen=True)
class FilePair:
    """The distance file of one K and the two sample files it refers to."""

    k: int
    distances: Path
    samples: Path
    synth: Path


@dataclass(frozen=True)
class Thresholds:
    """delta_m and delta_s, where they came from, and the calibration rule if one was used."""

    delta_m: float
    delta_s: float
    source: str
    calibration: str = ""


# --- the rule ------------------------------------------------------------------------------


def _threshold_in(dtype: np.dtype, delta: float) -> np.generic:
    return np.asarray(delta, dtype=dtype if np.issubdtype(dtype, np.floating) else np.float64)[()]


def label_samples(d_data: np.ndarray, d_synth: np.ndarray, delta_m: float, delta_s: float) -> np.ndarray:
    """Return the class code of each sample: 0 memorized, 1 spurious, 2 generalized.

    d_data, d_synth: top-1 distances (N,). Each threshold is rounded to the dtype of its
    distances and compared there with <=, so the boundary belongs to the smaller class.
    """
    memorized = d_data <= _threshold_in(d_data.dtype, delta_m)
    spurious = ~memorized & (d_synth <= _threshold_in(d_synth.dtype, delta_s))
    labels = np.full(len(d_data), CLASSES.index(GENERALIZED), dtype=np.int64)
    labels[memorized] = CLASSES.index(MEMORIZED)
    labels[spurious] = CLASSES.index(SPURIOUS)
    return labels


def class_order(labels: np.ndarray, d_data: np.ndarray, d_synth: np.ndarray, name: str) -> np.ndarray:
    """Return the sample indices of class `name`, most typical first.

    Memorized samples sort by ascending d_data, spurious by ascending d_synth and
    generalized by descending d_synth. The sort is stable, so ties keep ascending index.
    """
    members = np.flatnonzero(labels == CLASSES.index(name))
    if name == MEMORIZED:
        key = d_data[members]
    elif name == SPURIOUS:
        key = d_synth[members]
    else:
        key = -d_synth[members].astype(np.float64)
    return members[np.argsort(key, kind="stable")]


def split_top_least(order: np.ndarray, top_size: int, least_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the first `top_size` and the last `least_size` of `order`, both in class order.

    The two parts overlap when the class has fewer than top_size + least_size samples.
    """
    top = order[:top_size]
    least = order[max(len(order) - least_size, 0):]
    return top, least


# --- inputs ------------------------------------------------------------------------------


def pair_files(dist_path: str | Path, eval_path: str | Path, synth_path: str | Path | None = None) -> list[FilePair]:
    """Pair distance files with sample files by K, sorted by K.

    Each path may be a folder of `<K>.npz` files or one such file. Raises MemgenError
    naming the file and the missing counterpart when a K is present on one side only.
    """
    distances = dict(resolve_k_path(dist_path, "npz"))
    sides = {"sample": (eval_path, dict(resolve_k_path(eval_path, "npz")))}
    if synth_path:
        sides["synthetic sample"] = (synth_path, dict(resolve_k_path(synth_path, "npz")))
    for kind, (path, files) in sides.items():
        for k in sorted(set(distances) - set(files)):
            raise MemgenError(f"distance file '{distances[k]}' (K = {k}) has no {kind} file "
                              f"'{_expected(path, k)}'; pass the {kind} files the distances were computed "
                              "from, or remove the distance file")
        for k in sorted(set(files) - set(distances)):
            raise MemgenError(f"{kind} file '{files[k]}' (K = {k}) has no distance file "
                              f"'{_expected(dist_path, k)}'; run run_distances.py on it first")
    samples = sides["sample"][1]
    synth = sides.get("synthetic sample", sides["sample"])[1]
    return [FilePair(k, distances[k], samples[k], synth[k]) for k in sorted(distances)]


def _expected(path: str | Path, k: int) -> Path:
    path = Path(path)
    return path / f"{k}.npz" if path.is_dir() else path.with_name(f"{k}.npz")


@dataclass
class PairData:
    """The arrays of one K, loaded and checked: distances (first k columns) and samples."""

    pair: FilePair
    data_dists: np.ndarray
    data_indices: np.ndarray
    synth_dists: np.ndarray
    synth_indices: np.ndarray
    samples: np.ndarray
    synth_samples: np.ndarray
    sample_meta: dict
    distance_meta: dict

    @property
    def metric(self) -> str:
        return str(self.distance_meta["metric"])

    @property
    def network(self) -> str:
        return str(self.distance_meta.get("network") or "")

    def data_meta(self) -> dict:
        """Return the keys that rebuild the training set, from the sample file's metadata."""
        meta = {key: self.sample_meta.get(key) for key in DATA_KEYS}
        meta["in_channels"] = meta["in_channels"] or int(self.samples.shape[1])
        meta["image_size"] = meta["image_size"] or int(self.samples.shape[-1])
        meta["centercrop"] = bool(meta["centercrop"])
        return meta


def read_metas(pair: FilePair) -> tuple[dict, dict]:
    """Return (sample metadata, distance metadata) of a pair, checking the keys classification needs."""
    sample_meta = _read_meta_only(pair.samples)
    distance_meta = _read_meta_only(pair.distances)
    missing = [key for key in ("data_name", "train_size", "seed") if sample_meta.get(key) is None]
    if missing:
        raise MemgenError(f"sample file '{pair.samples}' has no {', '.join(missing)} in its metadata, so its "
                          "training set cannot be rebuilt; pass a file written by run_generate.py")
    if int(sample_meta["train_size"]) != pair.k:
        raise MemgenError(f"sample file '{pair.samples}' records train_size = {sample_meta['train_size']} but is "
                          f"named {pair.k}.npz; rename it to {sample_meta['train_size']}.npz, together with its "
                          f"distance file '{pair.distances}'")
    if not distance_meta.get("metric"):
        raise MemgenError(f"distance file '{pair.distances}' records no metric in its metadata; "
                          "pass a file written by run_distances.py")
    for key in MATCHING_KEYS:
        if key in sample_meta and key in distance_meta and sample_meta[key] != distance_meta[key]:
            raise MemgenError(f"sample file '{pair.samples}' has {key} = {sample_meta[key]!r} but distance file "
                              f"'{pair.distances}' has {key} = {distance_meta[key]!r}; the distances belong to "
                              "other samples, so pass matching folders or rerun run_distances.py")
    return sample_meta, distance_meta


def _read_meta_only(path: Path) -> dict:
    """Read the JSON metadata of an `.npz` file without loading its other arrays."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = {"meta": archive["meta"]} if "meta" in archive.files else {}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise MemgenError(f"'{path}' contains a pickled object array, which memgen never loads; rewrite it "
                              "with plain numeric arrays and a JSON 'meta' string") from error
        raise MemgenError(f"'{path}' is not a readable .npz file ({error}); regenerate it") from error
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise MemgenError(f"'{path}' is not a readable .npz file ({error}); it may be truncated, "
                          "so regenerate it") from error
    return read_meta(meta, path)


def load_pair(pair: FilePair, k: int) -> PairData:
    """Load and cross-check the distance and sample files of one K; keep the first k neighbours."""
    sample_meta, distance_meta = read_metas(pair)
    arrays = load_npz(pair.distances, required=DISTANCE_KEYS)
    samples = load_npz(pair.samples, required=["samples"])["samples"]
    synth_samples = samples if pair.synth == pair.samples else load_npz(pair.synth, required=["samples"])["samples"]

    if pair.synth != pair.samples:
        synth_meta = _read_meta_only(pair.synth)
        for key in ("data_name", "train_size", "seed"):
            if synth_meta.get(key) != sample_meta.get(key):
                raise MemgenError(f"synthetic sample file '{pair.synth}' has {key} = {synth_meta.get(key)!r} but "
                                  f"sample file '{pair.samples}' has {key} = {sample_meta.get(key)!r}; pass "
                                  "samples of the same model")

    for path, images in ((pair.samples, samples), (pair.synth, synth_samples)):
        if images.ndim != 4 or images.shape[1:] != samples.shape[1:]:
            raise MemgenError(f"'samples' of '{path}' has shape {images.shape}; expected (N, C, H, W) images "
                              f"of shape {samples.shape[1:]}, as run_generate.py writes them")
    count = len(samples)
    for name in DISTANCE_KEYS:
        shape = arrays[name].shape
        if len(shape) != 2 or shape[0] != count:
            raise MemgenError(f"distance file '{pair.distances}' has '{name}' of shape {shape} but sample file "
                              f"'{pair.samples}' contains {count} samples; the distances belong to other samples, "
                              "so rerun run_distances.py on this sample file")
        reference_size = int(sample_meta.get("train_size", 0)) if name.startswith("data") else count - 1
        if shape[1] < k and shape[1] == min(k, reference_size):
            logger.warning("'%s' has %d neighbours in '%s' because its reference set has only %d images; "
                           "using %d instead of --k %d", pair.distances, shape[1], name, reference_size,
                           shape[1], k)
        elif shape[1] < k:
            raise MemgenError(f"distance file '{pair.distances}' has {shape[1]} neighbours per sample but "
                              f"--k is {k}; pass --k {shape[1]} or rerun run_distances.py with more neighbours")
    if count == 0:
        raise MemgenError(f"sample file '{pair.samples}' contains no samples; generate some first")

    data = PairData(pair, *(arrays[name][:, :k] for name in DISTANCE_KEYS), samples=samples,
                    synth_samples=synth_samples, sample_meta=sample_meta, distance_meta=distance_meta)
    _check_distances(data)
    return data


def _check_distances(data: PairData) -> None:
    """Raise MemgenError for non-finite distances or neighbour indices out of range."""
    pair = data.pair
    for name, values in (("data-dists", data.data_dists), ("synth-dists", data.synth_dists)):
        if not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
            raise MemgenError(f"distance file '{pair.distances}' has '{name}' of dtype {values.dtype} with "
                              "non-finite or non-float values; rerun run_distances.py")
    train_size = int(data.sample_meta["train_size"])
    for name, indices, limit, what in (("data-indices", data.data_indices, train_size, "training images"),
                                       ("synth-indices", data.synth_indices, len(data.synth_samples),
                                        f"samples in '{pair.synth}'")):
        if indices.size and (indices.min() < 0 or indices.max() >= limit):
            raise MemgenError(f"distance file '{pair.distances}' has '{name}' from {indices.min()} to "
                              f"{indices.max()}, outside the {limit} {what}; pass the matching files")


# --- thresholds ---------------------------------------------------------------------------


def resolve_thresholds(options: ClassifyOptions, metas: list[tuple[FilePair, dict, dict]],
                       device: torch.device | None = None) -> Thresholds:
    """Pick delta_m and delta_s: given values, calibration, or the paper's LPIPS defaults.

    `metas` contains (pair, sample meta, distance meta) of every processed K; they must share
    one metric (and, for calibration, one training set). Raises MemgenError for L2
    distances without thresholds or `--calibrate`.
    """
    metrics = sorted({str(distance_meta["metric"]) for _, _, distance_meta in metas})
    if len(metrics) > 1:
        files = ", ".join(f"'{pair.distances}' ({meta['metric']})" for pair, _, meta in metas)
        raise MemgenError(f"the distance files use different metrics: {files}; classify each metric "
                          "separately, with its own thresholds and --result-path")
    metric = metrics[0]
    given = {"delta_m": options.delta_m, "delta_s": options.delta_s}

    if options.calibrate:
        passed = [name for name, value in given.items() if value is not None]
        if passed:
            raise MemgenError(f"--calibrate derives both thresholds but --{passed[0].replace('_', '-')} was "
                              "also passed; drop one of them")
        return calibrate_thresholds(options, metas, device)

    for name, value in given.items():
        if value is not None and (not math.isfinite(value) or value < 0):
            raise MemgenError(f"--{name.replace('_', '-')} {value} is invalid; pass a non-negative distance")
    if metric == "lpips":
        delta_m = PAPER_DELTA_M if options.delta_m is None else options.delta_m
        delta_s = PAPER_DELTA_S if options.delta_s is None else options.delta_s
        defaults = [name for name, value in given.items() if value is None]
        source = "given" if not defaults else f"paper LPIPS default for {' and '.join(defaults)}"
        return Thresholds(float(delta_m), float(delta_s), source)

    missing = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is None]
    if missing:
        raise MemgenError(f"the distances in '{metas[0][0].distances}' use the {metric} metric, which has no "
                          f"default thresholds, and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"missing; pass --delta-m and --delta-s in {metric} units, or --calibrate")
    return Thresholds(float(options.delta_m), float(options.delta_s), "given")


def calibration_rule(quantile: float, scale: float, size: int, metric: str, seed: int) -> str:
    """Describe the calibration as one sentence, for the help text, the log and the summary."""
    return (f"delta_m = {scale:g} x the {quantile:g}-quantile (numpy method 'lower') of the {metric} distances "
            f"from each of the first {size} images of the seeded training permutation (seed {seed}) to its "
            f"nearest other image among them; delta_s = delta_m x {PAPER_DELTA_S:g} / {PAPER_DELTA_M:g}")


def nearest_neighbour_quantile(distances: np.ndarray, quantile: float) -> float:
    """Return the order statistic d_(j), j = floor(q (n - 1)) (0-based), of the distances (n,)."""
    return float(np.quantile(np.asarray(distances, dtype=np.float64), quantile, method="lower"))


def calibrate_thresholds(options: ClassifyOptions, metas: list[tuple[FilePair, dict, dict]],
                         device: torch.device | None = None) -> Thresholds:
    """Derive the thresholds from the spacing of the training set itself.

    A sample is called a copy when it is closer to a training image than distinct
    training images usually are to each other. The calibration set is the first
    `calibrate_size` images of the seeded training permutation. It contains every
    training set of the sweep up to that size, and the thresholds are the same for every
    K and every slice of a sharded run. For each of its n images, d_i is the distance
    to its nearest other image in the set (the metric of the distance files), and

        delta_m = calibrate_scale * d_(j),  j = floor(calibrate_quantile * (n - 1)),
        delta_s = delta_m * 0.02 / 0.03 (the ratio of the paper's LPIPS thresholds),

    with d_(0) <= ... <= d_(n-1) sorted ascending.
    """
    from memgen.data import training_images_from_meta

    if not 0 <= options.calibrate_quantile <= 1:
        raise MemgenError(f"--calibrate-quantile {options.calibrate_quantile} is invalid; use a value in [0, 1]")
    if not options.calibrate_scale > 0:
        raise MemgenError(f"--calibrate-scale {options.calibrate_scale} is invalid; use a positive factor")
    if options.calibrate_size < 2:
        raise MemgenError(f"--calibrate-size {options.calibrate_size} is too small; nearest-neighbour "
                          "distances need at least 2 images")

    reference = {key: metas[0][1].get(key) for key in ("data_name", "seed", "image_size", "centercrop")}
    for pair, sample_meta, _ in metas[1:]:
        for key, value in reference.items():
            if sample_meta.get(key) != value:
                raise MemgenError(f"--calibrate needs one training set, but sample file '{pair.samples}' has "
                                  f"{key} = {sample_meta.get(key)!r} and '{metas[0][0].samples}' has {value!r}; "
                                  "classify the two sweeps separately")
    metric, network = str(metas[0][2]["metric"]), str(metas[0][2].get("network") or "alex")
    meta = {**metas[0][1], "train_size": options.calibrate_size}
    images = training_images_from_meta(meta, options.data_path or None)
    if len(images) < 2:
        raise MemgenError(f"the dataset of '{metas[0][0].samples}' has {len(images)} image(s); "
                          "--calibrate needs at least 2")

    started = time.perf_counter()
    distances = training_nearest_distances(images, metric, network, options.lpips_weights or None, device,
                                           expected_weights_id=metas[0][2].get("lpips_weights_id"))
    base = nearest_neighbour_quantile(distances, options.calibrate_quantile)
    delta_m = options.calibrate_scale * base
    if delta_m <= 0:
        raise MemgenError(f"the calibration set has duplicate images, so the {options.calibrate_quantile:g}-"
                          f"quantile of its nearest-neighbour distances is 0 and delta_m would be 0; raise "
                          "--calibrate-quantile or pass --delta-m and --delta-s")
    delta_s = delta_m * PAPER_DELTA_S / PAPER_DELTA_M
    rule = calibration_rule(options.calibrate_quantile, options.calibrate_scale, len(images), metric,
                            int(reference["seed"]))
    logger.info("calibrated delta_m = %.6g and delta_s = %.6g in %.1f s: %s", delta_m, delta_s,
                time.perf_counter() - started, rule)
    return Thresholds(delta_m, delta_s, "calibrated", rule)


def training_nearest_distances(images: torch.Tensor, metric: str, network: str = "alex",
                               weights_path: str | None = None, device: torch.device | None = None,
                               expected_weights_id: str | None = None) -> np.ndarray:
    """Return each image's distance (n,) to its nearest other image of `images` (n, C, H, W).

    L2 is the Euclidean norm of the difference of the flattened [-1, 1] images. LPIPS is
    the squared distance of the LPIPS embeddings, as in run_distances.py. Raises
    MemgenError when the LPIPS weights differ from `expected_weights_id`, the weights
    that the distance files were computed with.
    """
    from memgen.neighbours import knn

    if metric == "l2":
        features = images.reshape(len(images), -1).float()
        squared, _ = knn(features, features, 1, exclude_self=True, device=device)
        return np.sqrt(squared[:, 0])
    if metric == "lpips":
        from memgen.lpips import LPIPSEmbedding

        embedding = LPIPSEmbedding.from_pretrained(network, weights_path).to(device or "cpu")
        if expected_weights_id and embedding.weights_id != expected_weights_id:
            raise MemgenError(f"the LPIPS {network} weights found for the calibration ({embedding.source}, id "
                              f"{embedding.weights_id}) differ from those of the distance files (id "
                              f"{expected_weights_id}); pass the same --lpips-weights as to run_distances.py")
        features = embedding.embed(images)
        distances, _ = knn(features, features, 1, exclude_self=True, device=device)
        return distances[:, 0]
    raise MemgenError(f"--calibrate does not know the metric {metric!r}; pass --delta-m and --delta-s")


# --- outputs ------------------------------------------------------------------------------


def class_arrays(data: PairData, train_images: np.ndarray, top: np.ndarray, least: np.ndarray,
                 size: int, meta: dict) -> dict[str, np.ndarray]:
    """Build the arrays of one class file.

    Each part P in (top, least) with n rows has these arrays:
    - `P` (n, C, H, W) float32 samples and `P-indices` (n,) their rows in the sample file;
    - `P-data-dists`, `P-data-indices`, `P-synth-dists`, `P-synth-indices` (n, k);
    - `P-data-images` (n, k, C, H, W), the k nearest training images;
    - `P-synth-images` (n, k, C, H, W), the k nearest samples.
    Also `size` (samples in the class), `top-size`, `least-size` and the JSON `meta`.
    """
    arrays: dict[str, np.ndarray] = {}
    for part, rows in (("top", top), ("least", least)):
        rows = np.asarray(rows, dtype=np.int64)
        data_indices = data.data_indices[rows]
        synth_indices = data.synth_indices[rows]
        arrays[part] = np.asarray(data.samples[rows], dtype=np.float32)
        arrays[f"{part}-indices"] = rows
        arrays[f"{part}-data-dists"] = data.data_dists[rows]
        arrays[f"{part}-data-indices"] = data_indices.astype(np.int64)
        arrays[f"{part}-synth-dists"] = data.synth_dists[rows]
        arrays[f"{part}-synth-indices"] = synth_indices.astype(np.int64)
        arrays[f"{part}-data-images"] = np.asarray(train_images[data_indices], dtype=np.float32)
        arrays[f"{part}-synth-images"] = np.asarray(data.synth_samples[synth_indices], dtype=np.float32)
    arrays["size"] = np.asarray(size, dtype=np.int64)
    arrays["top-size"] = np.asarray(len(top), dtype=np.int64)
    arrays["least-size"] = np.asarray(len(least), dtype=np.int64)
    arrays["meta"] = meta
    return arrays


def inputs_digest(data: PairData) -> str:
    """Return a SHA-256 digest of the samples and top-k distances, so a kept file from other inputs is caught."""
    digest = hashlib.sha256()
    for array in (data.samples, data.data_dists, data.data_indices, data.synth_dists, data.synth_indices):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def class_meta(name: str, data: PairData, thresholds: Thresholds, options: ClassifyOptions) -> dict:
    """Return the metadata of one class file: the class, the rule, the inputs and the data keys."""
    orders = {MEMORIZED: "ascending d_data", SPURIOUS: "ascending d_synth", GENERALIZED: "descending d_synth"}
    return {
        "class": name,
        "K": data.pair.k,
        "metric": data.metric,
        "network": data.network,
        "delta_m": thresholds.delta_m,
        "delta_s": thresholds.delta_s,
        "thresholds": thresholds.source,
        "calibration": thresholds.calibration,
        "order": orders[name],
        "k": options.k,
        "num_samples": len(data.samples),
        "sample_file": str(data.pair.samples.resolve()),
        "synth_file": str(data.pair.synth.resolve()),
        "distance_file": str(data.pair.distances.resolve()),
        "inputs_digest": inputs_digest(data),
        **data.data_meta(),
        "data_path": _data_path(data, options),
    }


def _data_path(data: PairData, options: ClassifyOptions) -> str | None:
    """Return the dataset location: --data-path (made absolute) or the one in the sample metadata."""
    if options.data_path:
        return str(Path(options.data_path).expanduser().resolve())
    return data.sample_meta.get("data_path")


def _check_kept_file(path: Path, meta: dict) -> None:
    """Raise MemgenError when a class file kept without --overwrite used other thresholds or inputs."""
    kept = _read_meta_only(path)
    for key in ("metric", "delta_m", "delta_s", "k", "num_samples", "sample_file", "distance_file", "inputs_digest"):
        if kept.get(key) != meta[key]:
            raise MemgenError(f"the existing '{path}' was made with {key} = {kept.get(key)!r}, but this run uses "
                              f"{meta[key]!r}; pass --overwrite to replace it, or another --result-path")


def classify_pair(data: PairData, thresholds: Thresholds, options: ClassifyOptions, result_path: Path) -> dict:
    """Label the samples of one K, write its class files and grids, and return its summary row."""
    from memgen.data import training_images_from_meta

    d_data, d_synth = data.data_dists[:, 0], data.synth_dists[:, 0]
    labels = label_samples(d_data, d_synth, thresholds.delta_m, thresholds.delta_s)
    counts = {name: int((labels == CLASSES.index(name)).sum()) for name in CLASSES}
    train_images = None

    for name in CLASSES:
        path = result_path / "identified" / name / f"{data.pair.k}.npz"
        grid_path = result_path / "grids" / f"{name}-{data.pair.k}.png"
        meta = class_meta(name, data, thresholds, options)
        if path.exists() and not options.overwrite:
            _check_kept_file(path, meta)
            logger.info("keeping existing '%s'; pass --overwrite to recompute it", path)
            if options.grid_rows and not grid_path.exists():
                draw_class_grid(load_npz(path), meta, options.grid_rows, grid_path)
            continue

        if train_images is None:
            train_images = training_images_from_meta(data.data_meta(), meta["data_path"]).numpy()
            _check_training_images(train_images, data)
        order = class_order(labels, d_data, d_synth, name)
        top, least = split_top_least(order, options.top_size, options.least_size)
        arrays = class_arrays(data, train_images, top, least, len(order), meta)
        save_npz(path, **arrays)
        if options.grid_rows:
            draw_class_grid(arrays, meta, options.grid_rows, grid_path)
        logger.info("wrote %d of %d %s samples of K = %d to '%s'", len(top), len(order), name, data.pair.k, path)

    count = len(labels)
    row = {"K": data.pair.k, "num_samples": count, **counts,
           **{f"{name}_fraction": counts[name] / count for name in CLASSES},
           "metric": data.metric, "network": data.network, "delta_m": thresholds.delta_m,
           "delta_s": thresholds.delta_s, "thresholds": thresholds.source, "calibration": thresholds.calibration,
           "sample_file": str(data.pair.samples.resolve()), "distance_file": str(data.pair.distances.resolve())}
    logger.info("K = %d: %d samples, %s", data.pair.k, count,
                ", ".join(f"{counts[name]} {name} ({row[name + '_fraction']:.1%})" for name in CLASSES))
    return row


def _check_training_images(train_images: np.ndarray, data: PairData) -> None:
    if train_images.shape[1:] != data.samples.shape[1:]:
        raise MemgenError(f"the training images rebuilt for '{data.pair.samples}' have shape "
                          f"{train_images.shape[1:]} but its samples have {data.samples.shape[1:]}; pass the "
                          "--data-path of the dataset the model was trained on")
    if data.data_indices.max() >= len(train_images):
        raise MemgenError(f"distance file '{data.pair.distances}' refers to training image "
                          f"{data.data_indices.max()}, but the dataset has only {len(train_images)}; pass the "
                          "--data-path of the dataset the model was trained on")


def draw_class_grid(arrays: dict, meta: dict, rows: int, path: Path) -> Path:
    """Draw the first `rows` samples of the `top` part of a class file beside their neighbours."""
    from memgen.plots import plot_neighbour_grid

    size = int(arrays["size"])
    shown = min(rows, len(arrays["top"]))
    title = f"{meta['class']} samples for K = {meta['K']}: the {shown} most typical of {size}"
    title += f"\n({meta['metric']}, δm = {meta['delta_m']:.4g}, δs = {meta['delta_s']:.4g})"
    return plot_neighbour_grid(arrays["top"][:shown], arrays["top-indices"][:shown],
                               arrays["top-data-images"][:shown], arrays["top-data-dists"][:shown],
                               arrays["top-synth-images"][:shown], arrays["top-synth-dists"][:shown], path, title)


# --- summary -------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed), so sharded runs merge one at a time."""
    # NOTE: flock serialises jobs on one machine and on NFS under Linux. On a parallel file
    # system without lock support two merges can race, and the later one wins.
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_summary(result_path: Path, reference: dict, run_ks: set[int], overwrite: bool) -> None:
    """Raise MemgenError before any work when `summary.json` has rows from other thresholds.

    `reference` contains the metric, delta_m and delta_s of this run. Rows of the K in
    `run_ks` are replaced anyway; other mismatching rows are an error unless `overwrite`,
    in which case `merge_summary` drops them.
    """
    json_path = result_path / "summary.json"
    for row in _read_summary(json_path):
        if row["K"] not in run_ks and _differs(row, reference) and not overwrite:
            raise MemgenError(f"{_describe_mismatch(json_path, row, reference)}; pass --overwrite to drop "
                              "those rows, or another --result-path")


def _differs(row: dict, reference: dict) -> bool:
    return any(row.get(key) != reference[key] for key in ("metric", "delta_m", "delta_s"))


def _describe_mismatch(json_path: Path, row: dict, reference: dict) -> str:
    return (f"'{json_path}' has a row for K = {row['K']} with {row.get('metric')} thresholds "
            f"delta_m = {row.get('delta_m')}, delta_s = {row.get('delta_s')}, but this run uses "
            f"{reference['metric']} with delta_m = {reference['delta_m']}, delta_s = {reference['delta_s']}")


def merge_summary(result_path: Path, rows: list[dict], overwrite: bool) -> list[dict]:
    """Merge this run's rows into `summary.json`, then rewrite it, `summary.csv` and `fractions.png`.

    Rows of K outside this run are kept, so the slices of a sharded run add up to one
    table, and a K of this run replaces its old row. An old row with other thresholds or
    another metric raises MemgenError, or is dropped with a warning under `overwrite`.
    An exclusive lock on `.summary.lock` serialises concurrent runs. Returns the merged
    rows sorted by K.
    """
    json_path = result_path / "summary.json"
    with _locked(result_path / ".summary.lock"):
        merged = {row["K"]: row for row in _read_summary(json_path)}
        merged.update({row["K"]: row for row in rows})
        for k, row in sorted(merged.items()):
            if _differs(row, rows[0]):
                if not overwrite:
                    raise MemgenError(f"{_describe_mismatch(json_path, row, rows[0])}; pass --overwrite to drop "
                                      "those rows, or another --result-path")
                logger.warning("%s; dropping it because of --overwrite", _describe_mismatch(json_path, row, rows[0]))
                del merged[k]
        table = [merged[k] for k in sorted(merged)]

        with atomic_path(json_path) as temporary:
            temporary.write_text(json.dumps({"columns": list(SUMMARY_COLUMNS), "rows": table}, indent=2) + "\n")
        with atomic_path(result_path / "summary.csv") as temporary:
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
                writer.writeheader()
                writer.writerows(table)
        _plot_fractions(table, result_path / "fractions.png")
    return table


def _read_summary(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        content = json.loads(path.read_text())
        rows = content["rows"]
        if not isinstance(rows, list) or not all(isinstance(row, dict) and "K" in row for row in rows):
            raise TypeError("rows is not a list of objects with a K")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise MemgenError(f"'{path}' is not a summary written by run_classify.py ({error}); "
                          "move it away or pass another --result-path") from error
    return rows


def _plot_fractions(table: list[dict], path: Path) -> None:
    from memgen.plots import plot_class_fractions

    first = table[0]
    metric = first["metric"] + (f" {first['network']}" if first.get("network") else "")
    title = f"Sample classes against K ({metric}, δm = {first['delta_m']:.4g}, δs = {first['delta_s']:.4g})"
    plot_class_fractions(table, path, title)


# --- the stage ---------------------------------------------------------------------------


def _check_options(options: ClassifyOptions) -> None:
    for flag, value in (("--dist-path", options.dist_path), ("--eval-path", options.eval_path)):
        if not value:
            raise MemgenError(f"{flag} is missing; pass the folder (or file) of <K>.npz files")
    if options.k < 1:
        raise MemgenError(f"--k {options.k} is invalid; use 1 or more neighbours")
    for flag, value in (("--top-size", options.top_size), ("--least-size", options.least_size),
                        ("--grid-rows", options.grid_rows)):
        if value < 0:
            raise MemgenError(f"{flag} {value} is negative; use 0 or more")


def classify(options: ClassifyOptions) -> list[dict]:
    """Run the classification stage over the selected K and return the merged summary rows."""
    from memgen.runtime import pick_device

    _check_options(options)
    started = time.perf_counter()
    pairs = select_slice(pair_files(options.dist_path, options.eval_path, options.synth_path or None),
                         options.start_idx, options.final_idx)
    if not pairs:
        logger.warning("--start-idx %d --final-idx %d selects no K; nothing to do", options.start_idx,
                       options.final_idx)
        return []
    logger.info("classifying K = %s from '%s'", ", ".join(str(pair.k) for pair in pairs), options.dist_path)

    metas = [(pair, *read_metas(pair)) for pair in pairs]
    device = pick_device(options.device) if options.calibrate else None
    thresholds = resolve_thresholds(options, metas, device)
    logger.info("thresholds (%s): delta_m = %.6g, delta_s = %.6g", thresholds.source, thresholds.delta_m,
                thresholds.delta_s)

    result_path = ensure_writable_dir(options.result_path)
    reference = {"metric": metas[0][2]["metric"], "delta_m": thresholds.delta_m, "delta_s": thresholds.delta_s}
    check_summary(result_path, reference, {pair.k for pair in pairs}, options.overwrite)
    rows = [classify_pair(load_pair(pair, options.k), thresholds, options, result_path) for pair in pairs]
    table = merge_summary(result_path, rows, options.overwrite)
    logger.info("classified %d K in %.1f s; the summary of %d K is in '%s'", len(rows),
                time.perf_counter() - started, len(table), result_path / "summary.csv")
    return table
