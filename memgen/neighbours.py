"""Exact k nearest neighbours under squared Euclidean distance, and the on-disk embedding cache.

`knn` finds candidates with tiled matrix products, d(a, b) = ||a||^2 + ||b||^2 - 2 a.b in
float32. The expansion loses digits exactly where near-copies sit, so this pass only
shortlists k + margin candidates per query. Every candidate whose float32 distance is
within the rounding bound of the k-th one then gets sum((a - b)^2) in float64, and the
ranking uses those exact values. Memory stays within
`tile_bytes` per tile plus the candidate lists, and the references may be a numpy memory
map, so a training-set embedding larger than RAM is read block by block.

`cached_embedding` keeps the LPIPS embedding of a training subset on disk. Subsets are
the first K rows of one seeded permutation, so the file of the largest K computed so far
serves every smaller K and is extended when a larger K comes.
"""

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from memgen.errors import MemgenError
from memgen.files import atomic_path
from memgen.lpips import LPIPSEmbedding, cache_dir

logger = logging.getLogger(__name__)

# Memory for one tile of the search: a block of references, a block of queries and
# their distance matrix.
DEFAULT_TILE_BYTES = 1 << 30

# Extra candidates per query kept from the float32 pass for the float64 re-ranking.
DEFAULT_MARGIN = 16

# Float64 differences computed at once by the CPU re-ranking, sized to stay in cache.
CPU_CHUNK_BYTES = 4 << 20

Array = np.ndarray | torch.Tensor


def _check_matrix(name: str, array: Array) -> None:
    if array.ndim != 2:
        raise MemgenError(f"{name} must be a matrix (rows, features), got shape {tuple(array.shape)}")


def _rows(array: Array, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Return rows [start, stop) of a numpy array, memory map or tensor on `device` as `dtype`.

    The result shares memory with `array` when no conversion is needed, so callers must
    not write to it.
    """
    block = array[start:stop]
    if isinstance(block, np.ndarray):
        with warnings.catch_warnings():
            # A read-only memory map gives a read-only tensor, which torch warns about.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            block = torch.from_numpy(np.ascontiguousarray(block))
    return block.to(device=device, dtype=dtype)


def _gather(array: Array, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy the rows `indices` of a numpy array, memory map or tensor to `device` as float64."""
    if isinstance(array, np.ndarray):
        block = torch.from_numpy(np.ascontiguousarray(array[indices]))
    else:
        block = array[torch.from_numpy(indices).to(array.device)]
    return block.to(device=device, dtype=torch.float64)


def _block_sizes(dim: int, num_queries: int, num_references: int, width: int,
                 tile_bytes: int) -> tuple[int, int]:
    """Return (query rows, reference rows) per tile so that one tile fits in `tile_bytes`.

    Half the budget goes to the reference block (4 bytes per float32). The other half
    holds the query block and, per query row, the distance row plus the merge buffers
    of values and indices (4 + 4 + 8 bytes per entry).
    """
    half = max(tile_bytes // 2, 1)
    reference_rows = int(min(num_references, max(1, half // (4 * dim))))
    per_query = 4 * dim + 16 * (reference_rows + width)
    query_rows = int(min(num_queries, max(1, half // per_query)))
    return query_rows, reference_rows


# Unit roundoff of float32.
FLOAT32_ROUNDOFF = 2.0 ** -24


def rounding_error_factor(dim: int) -> float:
    """Return f with |expanded float32 distance - true distance| <= f (||q - c||^2 + ||r - c||^2).

    The three sums of `dim` products each err by at most gamma = dim u / (1 - dim u) of
    their absolute sum (u: float32 unit roundoff, any summation order), and |q.r| is at
    most half the two squared norms. The float32 shift by the centre c and the final
    additions add a few u; 16 u covers them. Infinite when dim u >= 1.
    """
    if dim * FLOAT32_ROUNDOFF >= 1:
        return float("inf")
    gamma = dim * FLOAT32_ROUNDOFF / (1 - dim * FLOAT32_ROUNDOFF)
    return 2 * gamma + 16 * FLOAT32_ROUNDOFF


def _shortlist(queries: Array, references: Array, width: int, exclude_self: bool, query_offset: int,
               tile_bytes: int, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find the `width` smallest float32 expanded distances of each query.

    Returns the distances (Q, width) ascending, their reference indices (Q, width) and a
    bound (Q,) on each query's rounding error. Both sides are shifted by the mean c of
    the first reference block: a common shift leaves distances unchanged and shrinks
    the norms whose difference the expansion takes.
    """
    num_queries, dim = queries.shape
    num_references = references.shape[0]
    query_rows, reference_rows = _block_sizes(dim, num_queries, num_references, width, tile_bytes)
    centre = _rows(references, 0, reference_rows, device, torch.float64).mean(dim=0).float()

    best_distances = torch.full((num_queries, width), float("inf"), device=device)
    best_indices = torch.full((num_queries, width), -1, dtype=torch.int64, device=device)
    query_norms = torch.zeros(num_queries, dtype=torch.float64, device=device)
    max_reference_norm = 0.0
    tiles = -(-num_references // reference_rows) * -(-num_queries // query_rows)
    progress = tqdm(total=tiles, desc="neighbour search", unit="tile", disable=tiles < 4)
    for reference_start in range(0, num_references, reference_rows):
        reference_stop = min(reference_start + reference_rows, num_references)
        block = _rows(references, reference_start, reference_stop, device, torch.float32) - centre
        block_norms = block.pow(2).sum(dim=1)
        max_reference_norm = max(max_reference_norm, float(block_norms.max()))
        block_indices = torch.arange(reference_start, reference_stop, device=device)
        for query_start in range(0, num_queries, query_rows):
            query_stop = min(query_start + query_rows, num_queries)
            query = _rows(queries, query_start, query_stop, device, torch.float32) - centre
            norms = query.pow(2).sum(dim=1, keepdim=True)
            query_norms[query_start:query_stop] = norms.flatten().double()
            distances = torch.addmm(norms + block_norms, query, block.T, alpha=-2.0)

            if exclude_self:
                own = torch.arange(query_start, query_stop, device=device) + query_offset
                inside = (own >= reference_start) & (own < reference_stop)
                rows = torch.nonzero(inside).flatten()
                distances[rows, own[rows] - reference_start] = float("inf")

            merged_distances = torch.cat([best_distances[query_start:query_stop], distances], dim=1)
            merged_indices = torch.cat([best_indices[query_start:query_stop],
                                        block_indices.expand(query_stop - query_start, -1)], dim=1)
            kept_distances, kept = torch.topk(merged_distances, width, dim=1, largest=False, sorted=False)
            best_distances[query_start:query_stop] = kept_distances
            best_indices[query_start:query_stop] = torch.gather(merged_indices, 1, kept)
            progress.update()
    progress.close()

    best_distances, order = torch.sort(best_distances, dim=1)
    best_indices = torch.gather(best_indices, 1, order)
    # The computed norms err by up to gamma themselves; 1.01 covers that factor.
    error = rounding_error_factor(dim) * 1.01 * (query_norms + max_reference_norm)
    return best_distances.double().cpu().numpy(), best_indices.cpu().numpy(), error.cpu().numpy()


def _as_numpy(array: Array) -> np.ndarray:
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else array


def _exact_distances(queries: Array, references: Array, candidates: np.ndarray, selected: np.ndarray,
                     tile_bytes: int, device: torch.device) -> np.ndarray:
    """Compute sum((q - r)^2) in float64 for each query q and its selected candidates r.

    candidates: reference indices (Q, width); selected: boolean (Q, width). Returns
    (Q, width) float64 with +inf where a candidate is not selected. Each difference is
    taken in float64, so it is exact for float32 inputs.
    """
    exact = np.full(candidates.shape, np.inf)
    query_index, column = np.nonzero(selected)
    reference_index = candidates[query_index, column]
    if device.type != "cpu":
        exact[query_index, column] = _exact_on_device(queries, references, query_index, reference_index,
                                                      tile_bytes, device)
        return exact

    # On the CPU, numpy in cache-sized chunks beats large torch operations, which are
    # bound by memory traffic. Pairs go in reference order, so a memory map is read forward.
    order = np.argsort(reference_index, kind="stable")
    query_index, column, reference_index = query_index[order], column[order], reference_index[order]
    queries, references = _as_numpy(queries), _as_numpy(references)
    pairs_per_chunk = max(1, min(tile_bytes, CPU_CHUNK_BYTES) // (8 * queries.shape[1]))
    for start in range(0, len(order), pairs_per_chunk):
        chunk = slice(start, start + pairs_per_chunk)
        difference = np.subtract(references[reference_index[chunk]], queries[query_index[chunk]],
                                 dtype=np.float64)
        exact[query_index[chunk], column[chunk]] = np.einsum("ij,ij->i", difference, difference)
    return exact


def _exact_on_device(queries: Array, references: Array, query_index: np.ndarray, reference_index: np.ndarray,
                     tile_bytes: int, device: torch.device) -> np.ndarray:
    """Compute sum((q - r)^2) in float64 for the pairs (query_index, reference_index) on `device`."""
    dim = queries.shape[1]
    exact = np.empty(len(query_index))
    pairs_per_chunk = max(1, tile_bytes // (2 * 8 * dim))
    for start in range(0, len(query_index), pairs_per_chunk):
        chunk = slice(start, start + pairs_per_chunk)
        reference_rows = _gather(references, reference_index[chunk], device)
        query_rows = _gather(queries, query_index[chunk], device)
        exact[chunk] = reference_rows.sub_(query_rows).square_().sum(dim=1).cpu().numpy()
    return exact


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Turn off TF32 matrix products while the search runs, then restore the setting."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def knn(queries: Array, references: Array, k: int, exclude_self: bool = False, query_offset: int = 0,
        tile_bytes: int = DEFAULT_TILE_BYTES, margin: int = DEFAULT_MARGIN,
        device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Find the k nearest references of each query under squared Euclidean distance.

    `queries` (Q, D) and `references` (R, D) are numpy arrays (memory maps included) or
    tensors. With `exclude_self`, the queries are rows [query_offset, query_offset + Q)
    of `references`, and query i never gets reference query_offset + i, while exact
    duplicates elsewhere are kept at distance 0.

    Returns the distances (Q, k) float64, ascending, and the reference indices (Q, k)
    int64. Ties go to the smaller index. When fewer than k references are available,
    k is clipped to that number with a warning, so a set of one image searched with
    `exclude_self` returns (Q, 0) arrays.
    """
    _check_matrix("queries", queries)
    _check_matrix("references", references)
    num_queries, dim = queries.shape
    num_references = references.shape[0]
    if references.shape[1] != dim:
        raise MemgenError(f"queries have {dim} features but references have {references.shape[1]}")
    if k < 1:
        raise MemgenError(f"k = {k} neighbours requested; use k >= 1")
    if exclude_self and not 0 <= query_offset <= num_references - num_queries:
        raise MemgenError(f"exclude_self needs the queries to be rows of the references, but rows "
                          f"[{query_offset}, {query_offset + num_queries}) exceed the {num_references} references")

    available = num_references - (1 if exclude_self else 0)
    if k > available:
        logger.warning("k = %d neighbours requested but only %d references are available; "
                       "returning %d", k, available, max(available, 0))
        k = max(available, 0)
    if k == 0 or num_queries == 0:
        return np.zeros((num_queries, k), np.float64), np.zeros((num_queries, k), np.int64)

    device = torch.device(device) if device is not None else torch.device("cpu")
    # NOTE: the result is exact unless more than `margin` candidates lie within the rounding
    # bound of the k-th distance (for example more than k + margin exact copies of a
    # query, or a huge D that makes the bound useless). Then the float32 pass decides
    # which of them reach the re-ranking.
    width = min(k + margin, available)
    with torch.no_grad(), _full_float32_matmul():
        approximate, candidates, error = _shortlist(queries, references, width, exclude_self, query_offset,
                                                    tile_bytes, device)
        # A true k-th neighbour has approximate distance <= the approximate k-th + 2 error.
        selected = approximate <= (approximate[:, k - 1] + 2 * error)[:, None]
        selected[:, :k] = True
        exact = _exact_distances(queries, references, candidates, selected, tile_bytes, device)

    if not np.isfinite(exact[selected]).all():
        raise MemgenError("the embeddings contain NaN or infinite values; check the input images")
    order = np.lexsort((candidates, exact), axis=-1)[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidates, order, axis=1)


# ---------------------------------------------------------------------------------------
# Cached embeddings of training subsets


def image_digests(images: Array) -> np.ndarray:
    """Return a 16-byte BLAKE2b digest of each image's float32 bytes, as uint8 (N, 16)."""
    digests = np.empty((len(images), 16), dtype=np.uint8)
    for index in range(len(images)):
        image = images[index]
        image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        data = np.ascontiguousarray(image, dtype=np.float32).tobytes()
        digests[index] = np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), dtype=np.uint8)
    return digests


def _matching_prefix(stored: np.ndarray, current: np.ndarray) -> int:
    """Return how many leading rows of two digest tables agree."""
    count = min(len(stored), len(current))
    differs = np.flatnonzero((stored[:count] != current[:count]).any(axis=1))
    return int(differs[0]) if len(differs) else count


def _open_cached(path: Path, digests_path: Path, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Open a cache entry read-only; None when it is absent, unreadable or inconsistent."""
    if not path.is_file() or not digests_path.is_file():
        return None
    try:
        embedding = np.load(path, mmap_mode="r")
        stored = np.load(digests_path)
    except (OSError, ValueError) as error:
        logger.warning("ignoring the unreadable embedding cache '%s': %s", path, error)
        return None
    if (embedding.ndim != 2 or embedding.shape[1] != dim or embedding.dtype != np.float32
            or stored.shape != (embedding.shape[0], 16)):
        logger.warning("ignoring the embedding cache '%s': its shape %s does not match", path, embedding.shape)
        return None
    return embedding, stored


def cached_embedding(model: LPIPSEmbedding, images: Array, name: str, batch_size: int = 256,
                     folder: str | os.PathLike | None = None) -> np.ndarray:
    """Return the LPIPS embedding (N, D) float32 of `images`, reusing and extending a disk cache.

    `images` (N, C, H, W) must be a prefix of one fixed image sequence (the seeded
    permutation of a training split), named by `name`. The cache file
    `<folder>/<name>-<weights_id>.npy` (folder: `cache_dir()/lpips/embeddings`) contains the
    longest prefix embedded so far, and a digest per image checks that the cached rows
    belong to these images; rows from the first differing image on are embedded again.
    The result is a read-only memory map when the cache is used.
    """
    folder = Path(folder) if folder is not None else cache_dir() / "lpips" / "embeddings"
    stem = f"{name}-{model.network}-{model.weights_id}"
    path, digests_path = folder / f"{stem}.npy", folder / f"{stem}.digests.npy"
    count = len(images)
    dim = model.dim_for(tuple(images.shape[-2:]), channels=images.shape[1])
    digests = image_digests(images)

    reusable, opened = 0, _open_cached(path, digests_path, dim)
    if opened is not None:
        embedding, stored = opened
        reusable = _matching_prefix(stored, digests)
        if reusable < min(len(stored), count):
            logger.warning("the embedding cache '%s' differs from the images from row %d on "
                           "(the dataset changed?); embedding them again", path, reusable)
        if reusable >= count:
            logger.info("read the embedding of %d images from '%s'", count, path)
            return embedding[:count]

    try:
        with atomic_path(digests_path) as temporary_digests, atomic_path(path) as temporary:
            # np.save adds '.npy' to names without it, so write through open handles.
            with open(temporary_digests, "wb") as handle:
                np.save(handle, digests)
            extended = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=(count, dim))
            step = max(1, (1 << 28) // (4 * dim))
            for start in range(0, reusable, step):
                extended[start:min(start + step, reusable)] = embedding[start:min(start + step, reusable)]
            model.embed(images[reusable:], batch_size=batch_size, out=extended[reusable:])
            extended.flush()
            del extended
    except (MemgenError, OSError) as error:
        logger.warning("cannot write the embedding cache '%s' (%s); embedding %d images in memory",
                       path, error, count)
        return model.embed(images, batch_size=batch_size).numpy()
    logger.info("embedded images %d to %d into '%s'", reusable, count, path)
    return np.load(path, mmap_mode="r")


def embedding_cache_name(parts: Sequence[object]) -> str:
    """Join the settings that fix an image sequence into a file-name stem."""
    text = "-".join(str(part) for part in parts)
    return "".join(character if character.isalnum() or character in "._-" else "_" for character in text)
