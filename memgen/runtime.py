"""Process set-up shared by all stages: logging, device choice and `torchrun` / SLURM ranks."""

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir

logger = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | os.PathLike | None = None, rank: int = 0) -> None:
    """Log INFO to the console (rank 0 only) and, when given, to `log_file` as well.

    Calling it again replaces the handlers it added before and leaves other handlers
    (such as pytest's log capture) in place.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "memgen_handler", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    console.memgen_handler = True
    root.addHandler(console)
    if log_file is not None and rank == 0:
        ensure_writable_dir(Path(log_file).parent)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        file_handler.memgen_handler = True
        root.addHandler(file_handler)


def pick_device(requested: str = "auto") -> torch.device:
    """Return CUDA when available (or `requested` when not 'auto'), and log the choice."""
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MemgenError(f"--device {requested} was requested but CUDA is not available; "
                              "use --device auto or cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        logger.info("using device %s (%s)", device, torch.cuda.get_device_name(index))
    else:
        logger.info("using device cpu (%d threads); no CUDA device found", torch.get_num_threads())
    return device


@dataclass(frozen=True)
class Distributed:
    """Rank layout of this process: one process is rank 0 of world size 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if not self.enabled:
            return f"single process on {self.device}"
        backend = dist.get_backend() if dist.is_initialized() else "none"
        return f"{self.world_size} processes, backend {backend}, device {self.device.type}"

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _rank_variables() -> tuple[int, int, int] | None:
    """Read rank, world size and local rank from torchrun's or SLURM's variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        if "MASTER_ADDR" not in env:
            raise MemgenError("SLURM runs several tasks but MASTER_ADDR is not set; export "
                              "MASTER_ADDR (the first node's host name) and MASTER_PORT")
        env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def init_distributed(requested_device: str = "auto") -> Distributed:
    """Join the process group when launched by `torchrun` or SLURM; else a single process.

    NCCL is used on GPUs and Gloo on CPUs. Each process uses the GPU of its local rank.
    """
    ranks = _rank_variables()
    if ranks is None:
        return Distributed(device=pick_device(requested_device))
    rank, world_size, local_rank = ranks
    use_cuda = torch.cuda.is_available() and requested_device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30))
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
