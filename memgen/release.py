"""Optional helper that lists and fetches the released checkpoints of Pham et al. 2025 from a model hub.

memgen itself never needs the network: every stage reads local files. This helper only
saves typing when the machine is online and `huggingface_hub` is installed
(`pip install huggingface_hub`). The repository id is whatever the authors publish; memgen
does not hard-code one, so pass it with --repo-id.
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from memgen.checkpoint import copy_checkpoint
from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"(^|/)(\d+)\.pt$")


@dataclass
class FetchOptions:
    """Options of fetch_released_checkpoints.py."""

    repo_id: str = ""
    """Hub repository that holds the released <K>.pt files, as the authors publish it (owner/name)."""
    folder: str = ""
    """Folder inside the repository to list, for example one group of models; empty lists all."""
    train_sizes: tuple[int, ...] = ()
    """K values to fetch; empty with --list-only lists them, empty without it fetches every K."""
    result_path: str = "checkpoints/released"
    """Local folder for the fetched <K>.pt files."""
    list_only: bool = False
    """Only list the available K values and their paths."""
    revision: str = ""
    """Git revision of the repository; empty for its default branch."""


def released_checkpoints(paths: list[str], folder: str = "") -> dict[int, str]:
    """Pick the `<K>.pt` files from a repository listing, optionally inside one folder; map K to path.

    Raises MemgenError when two files have the same K, because then the folder must be named.
    """
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    found: dict[int, str] = {}
    for path in paths:
        if not path.startswith(prefix):
            continue
        match = _CHECKPOINT_NAME.search(path)
        if match is None:
            continue
        k = int(match.group(2))
        if k in found:
            raise MemgenError(f"'{found[k]}' and '{path}' both have K = {k}; pass --folder to choose one group")
        found[k] = path
    return dict(sorted(found.items()))


def _hub():
    try:
        import huggingface_hub
    except ImportError as error:
        raise MemgenError("fetching released checkpoints needs the optional package huggingface_hub; "
                          "run `pip install huggingface_hub`, or download the <K>.pt files by any other "
                          "means and pass their folder to --ckpt-path") from error
    return huggingface_hub


def fetch(options: FetchOptions) -> dict[int, Path]:
    """List the released `<K>.pt` files and download the requested ones; return K -> local path."""
    if not options.repo_id:
        raise MemgenError("--repo-id is missing; pass the hub repository that holds the released checkpoints")
    hub = _hub()
    revision = options.revision or None
    try:
        listing = hub.list_repo_files(options.repo_id, revision=revision)
    except Exception as error:  # the hub client raises many network and HTTP error types
        raise MemgenError(f"listing '{options.repo_id}' failed ({error}); check the repository id and the "
                          "network, or download the files by other means") from error
    available = released_checkpoints(listing, options.folder)
    if not available:
        raise MemgenError(f"no <K>.pt file found in '{options.repo_id}' under '{options.folder or '/'}'; "
                          "pass --folder with the folder that holds them")
    logger.info("%d released checkpoints: K = %s", len(available), ", ".join(map(str, available)))
    if options.list_only:
        return {k: Path(path) for k, path in available.items()}

    wanted = list(options.train_sizes) or list(available)
    missing = [k for k in wanted if k not in available]
    if missing:
        raise MemgenError(f"K = {missing} is not in '{options.repo_id}'; available: {list(available)}")
    destination = ensure_writable_dir(options.result_path)
    fetched = {}
    for k in wanted:
        local = destination / f"{k}.pt"
        if local.is_file():
            logger.info("keeping '%s'", local)
        else:
            cached = hub.hf_hub_download(options.repo_id, available[k], revision=revision)
            copy_checkpoint(cached, local)
            logger.info("fetched K = %d to '%s'", k, local)
        fetched[k] = local
    return fetched
