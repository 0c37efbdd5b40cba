"""Result files shared by all stages: atomic writes, `.npz` with JSON metadata, `<K>.<ext>` folders.

Every result goes to a temporary file in the destination folder and is renamed into place,
so a reader never sees a partial file under a final name. `.npz` files carry their
metadata as a JSON string in the array `meta`; nothing is ever pickled.
"""

import contextlib
import json
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from memgen.errors import MemgenError

logger = logging.getLogger(__name__)

_K_NAME = re.compile(r"^(\d+)$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` when the block succeeds.

    The temporary file is removed when the block raises, so an interrupted write leaves
    the old file (or no file) under the final name.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def cache_root() -> Path:
    """Return memgen's cache root: $MEMGEN_CACHE, else $XDG_CACHE_HOME/memgen, else ~/.cache/memgen."""
    root = os.environ.get("MEMGEN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memgen"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and check that files can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MemgenError(f"cannot create the result folder '{folder}': {error.strerror}; "
                          "choose a writable path") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MemgenError(f"the result folder '{folder}' is not writable; "
                          "choose another path or fix its permissions")
    return folder


def save_npz(path: str | os.PathLike, meta: Mapping | None = None, **arrays: np.ndarray) -> Path:
    """Write `arrays` and the JSON-encoded `meta` to `path` atomically, uncompressed."""
    path = Path(path)
    payload = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in payload.items():
        if value.dtype == object:
            raise TypeError(f"array '{name}' has dtype object, which would need a pickle")
    if meta is not None:
        payload["meta"] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **payload)
    return path


def load_npz(path: str | os.PathLike, required: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` file without ever unpickling.

    Raises MemgenError when the file is missing, not an `.npz` archive, contains a pickled
    object array, or lacks one of `required`.
    """
    path = Path(path)
    if not path.is_file():
        raise MemgenError(f"file not found: '{path}'")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise MemgenError(f"'{path}' contains a pickled object array, which memgen never loads; "
                              "rewrite it with plain numeric arrays and a JSON 'meta' string") from error
        raise MemgenError(f"'{path}' is not a readable .npz file: {error}") from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise MemgenError(f"'{path}' is not a readable .npz file ({error}); "
                          "it may be truncated, so regenerate it") from error
    missing = [name for name in required if name not in arrays]
    if missing:
        raise MemgenError(f"'{path}' has no array {', '.join(repr(m) for m in missing)} "
                          f"(it has {sorted(arrays)}); pass a file written by the matching memgen stage")
    return arrays


def read_meta(arrays: Mapping[str, np.ndarray], path: str | os.PathLike = "<arrays>") -> dict:
    """Decode the JSON metadata string stored under `meta`; an empty dict when absent."""
    if "meta" not in arrays:
        return {}
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as error:
        raise MemgenError(f"'{path}' has a 'meta' entry that is not valid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise MemgenError(f"'{path}' has a 'meta' entry that is not a JSON object")
    return meta


def list_k_files(folder: str | os.PathLike, extension: str) -> list[tuple[int, Path]]:
    """List the files `<K>.<extension>` in `folder`, sorted by the integer K.

    Files with other names are skipped with a warning that names them. Raises MemgenError
    when the folder is missing, when no file matches, or when two files share one K
    (`016.npz` and `16.npz`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MemgenError(f"folder not found: '{folder}'")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix != f".{extension}":
            continue
        match = _K_NAME.match(path.stem)
        if match is None:
            logger.warning("skipping '%s': its name is not <integer>.%s", path, extension)
            continue
        k = int(match.group(1))
        if k in found:
            raise MemgenError(f"'{found[k]}' and '{path}' both have K = {k}; keep one of them")
        found[k] = path
    if not found:
        raise MemgenError(f"no <K>.{extension} file in '{folder}'; "
                          f"pass the folder that the previous stage wrote")
    return sorted(found.items())


def select_slice(items: Sequence, start_idx: int, final_idx: int) -> list:
    """Return `items[start_idx:final_idx]`, with `final_idx = -1` meaning to the end."""
    if start_idx < 0:
        raise MemgenError(f"--start-idx {start_idx} is negative; use 0 or more")
    if final_idx != -1 and final_idx < start_idx:
        raise MemgenError(f"--final-idx {final_idx} is below --start-idx {start_idx}; "
                          "use -1 for 'to the end'")
    end = None if final_idx == -1 else final_idx
    return list(items[start_idx:end])


def resolve_k_path(path: str | os.PathLike, extension: str) -> list[tuple[int, Path]]:
    """Accept either one `<K>.<ext>` file or a folder of them; return `(K, path)` pairs."""
    path = Path(path)
    if path.is_dir():
        return list_k_files(path, extension)
    if not path.is_file():
        raise MemgenError(f"not found: '{path}'; pass a <K>.{extension} file or a folder of them")
    match = _K_NAME.match(path.stem)
    if match is None:
        raise MemgenError(f"'{path}' is not named <integer>.{extension}; rename it to its K")
    return [(int(match.group(1)), path)]


def skip_existing(path: str | os.PathLike, overwrite: bool) -> bool:
    """Return True (and log it) when `path` exists and must be kept because overwrite is off."""
    path = Path(path)
    if path.exists() and not overwrite:
        logger.info("keeping existing '%s'; pass --overwrite to recompute it", path)
        return True
    return False
