"""Training stage: a DDPM UNet on the first K images of a seeded permutation of a dataset.

The loop reads top to bottom: set up processes, build the data, the model and its EMA,
resume from the newest checkpoint, then step, log and checkpoint. Every random draw of
step s (data order, diffusion times, noise, dropout) is a function of (seed, s, rank), so
a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

import copy
import logging
import math
import os
import re
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from memgen.checkpoint import copy_checkpoint, read_checkpoint, save_checkpoint
from memgen.config import DataOptions, ModelOptions, TrainOptions, to_plain
from memgen.errors import MemgenError
from memgen.files import atomic_path, ensure_writable_dir
from memgen.runtime import Distributed, init_distributed, setup_logging, shutdown_distributed

logger = logging.getLogger(__name__)

# Above this many bytes the training images are read through a DataLoader instead of
# being held in memory as one tensor.
PRELOAD_LIMIT_BYTES = 4 * 1024 ** 3

# Images per network call when the validation loss is computed.
VALID_BATCH = 256

PRECISIONS = ("fp32", "bf16")


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (a fixed polynomial hash; the same on every machine)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2 ** 63 - 1)
    return value


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move every EMA parameter towards the model's: ema = decay * ema + (1 - decay) * model."""
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA: min(decay, (1 + step) / (10 + step)), so short runs leave the initial weights."""
    return min(decay, (1 + step) / (10 + step))


def batch_indices(step: int, train_size: int, global_batch: int, seed: int) -> torch.Tensor:
    """Return the global batch of step `step`: consecutive slices of per-epoch permutations of K."""
    start = step * global_batch
    indices = []
    while len(indices) < global_batch:
        epoch, offset = divmod(start + len(indices), train_size)
        order = torch.randperm(train_size, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        indices.extend(order[offset:offset + global_batch - len(indices)].tolist())
    return torch.tensor(indices, dtype=torch.int64)


def check_train_options(train: TrainOptions) -> None:
    """Raise MemgenError for step counts, intervals, rates or a --precision that no run can use."""
    for flag, value in (("--global-batch-size", train.global_batch_size), ("--log-every", train.log_every),
                        ("--ckpt-every", train.ckpt_every)):
        if value < 1:
            raise MemgenError(f"{flag} {value} is invalid; use 1 or more")
    if train.iterations < 0:
        raise MemgenError(f"--iterations {train.iterations} is invalid; use 0 or more optimiser steps")
    if not train.lr > 0:
        raise MemgenError(f"--lr {train.lr} is invalid; use a positive learning rate")
    if not 0 <= train.ema_decay < 1:
        raise MemgenError(f"--ema-decay {train.ema_decay} is invalid; use a value in [0, 1)")
    if train.precision not in PRECISIONS:
        raise MemgenError(f"--precision {train.precision!r} is not supported; use one of {', '.join(PRECISIONS)}")


def newest_checkpoint(folder: Path) -> Path | None:
    """Return `<folder>/<iteration>.pt` with the largest iteration, or None."""
    if not folder.is_dir():
        return None
    found = [(int(path.stem), path) for path in folder.glob("*.pt") if re.fullmatch(r"\d+", path.stem)]
    return max(found)[1] if found else None


class TrainingImages:
    """The K training images, held in memory when they fit, else read from the dataset per batch."""

    def __init__(self, data: DataOptions, train: TrainOptions, model: ModelOptions):
        from memgen.data import load_dataset, load_images, subset_indices

        if train.train_size < 1:
            raise MemgenError(f"--train-size {train.train_size} is invalid; pass the number of training "
                              "images K, 1 or more (a K above the dataset size uses all images)")
        dataset = load_dataset(data.data_name, data.data_path, image_size=model.image_size,
                               centercrop=train.centercrop)
        self.indices = subset_indices(len(dataset), train.train_size, train.global_seed)
        self.dataset = dataset
        first = dataset[0]
        if tuple(first.shape) != (model.in_channels, model.image_size, model.image_size):
            raise MemgenError(f"dataset '{data.data_name}' gives images of shape {tuple(first.shape)} but "
                              f"the model expects ({model.in_channels}, {model.image_size}, {model.image_size}); "
                              "set --in-channels and --image-size to match the data")
        size_bytes = len(self.indices) * first.numel() * 4
        self.images = load_images(dataset, self.indices) if size_bytes <= PRELOAD_LIMIT_BYTES else None

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, positions: torch.Tensor) -> torch.Tensor:
        """Return the images at positions 0..K-1 of the subset, as (B, C, H, W) in [-1, 1]."""
        if self.images is not None:
            return self.images[positions]
        return torch.stack([self.dataset[int(self.indices[p])] for p in positions])


def _check_resume_config(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint whose data, K, seed or architecture differ from the options."""
    checks = [("model", key) for key in current["model"]] + [
        ("data", "data_name"), ("train", "train_size"), ("train", "global_seed"),
        ("train", "prediction_type"), ("train", "timesteps"), ("train", "beta_schedule")]
    for section, key in checks:
        old, new = saved.get(section, {}).get(key), current[section][key]
        if old != new:
            raise MemgenError(f"cannot resume from '{path}': it has {section}.{key} = {old!r} but the "
                              f"options give {new!r}; use another --results-path or the same options")


def _sample_grid(ema: nn.Module, schedule, train: TrainOptions, model: ModelOptions,
                 device: torch.device, path: Path) -> None:
    """Save a DDIM sample grid of the EMA model (a quick visual check, not the evaluation protocol)."""
    from memgen.figures import save_image_grid
    from memgen.sampling import sample_images

    samples = sample_images(ema, schedule, (model.in_channels, model.image_size, model.image_size),
                            indices=range(train.grid_samples), seed=train.global_seed, sampler="ddim",
                            steps=train.grid_ddim_steps, eta=0.0, device=device)
    save_image_grid(samples, path)


def train(data: DataOptions, train: TrainOptions, model: ModelOptions) -> Path:
    """Train one UNet and return the path of its final checkpoint (written by rank 0)."""
    from memgen.diffusion import NoiseSchedule
    from memgen.unet import build_unet

    check_train_options(train)
    results = Path(data.results_path)
    ckpt_dir, sample_dir, log_dir = results / "checkpoints", results / "samples", results / "logs"
    setup_logging(rank=int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))))
    distributed = init_distributed(train.device)

    # The data, K and the batch are checked before any folder or log file is created.
    images = TrainingImages(data, train, model)
    global_batch = min(train.global_batch_size, len(images))
    if global_batch % distributed.world_size != 0:
        raise MemgenError(f"the global batch {global_batch} does not split evenly over "
                          f"{distributed.world_size} processes; choose --global-batch-size divisible by it")
    local_batch = global_batch // distributed.world_size

    if distributed.is_main:
        for folder in (ckpt_dir, sample_dir, log_dir):
            ensure_writable_dir(folder)
    setup_logging(log_dir / "train.log", distributed.rank)
    logger.info("running as %s", distributed.describe())
    options = {"data": data, "train": train, "model": model}
    plain = to_plain(options)
    logger.info("training K = %d (%d images used) on %s from '%s' into '%s'", train.train_size, len(images),
                data.data_name, data.data_path, results)
    device = distributed.device

    torch.manual_seed(train.global_seed)
    network = build_unet(model).to(device)
    if train.channels_last:
        network = network.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(network).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(network.parameters(), lr=train.lr)
    schedule = NoiseSchedule.from_config(plain["train"])
    logger.info("UNet with %.2fM parameters, batch %d (%d per process), %d iterations",
                sum(p.numel() for p in network.parameters()) / 1e6, global_batch, local_batch,
                train.iterations)

    step = 0
    resume_path = newest_checkpoint(ckpt_dir)
    if resume_path is not None:
        state = read_checkpoint(resume_path)
        _check_resume_config(resume_path, state["config"], plain)
        network.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["opt"])
        step = int(state["iteration"])
        logger.info("resumed from '%s' at iteration %d", resume_path, step)
        grid_path = sample_dir / f"{step}.png"
        if distributed.is_main and train.grid_samples > 0 and not grid_path.exists():
            # A run killed between writing a checkpoint and its sample grid left no grid.
            rng_state = torch.get_rng_state()
            _sample_grid(ema, schedule, train, model, device, grid_path)
            torch.set_rng_state(rng_state)

    trained = DistributedDataParallel(network) if distributed.enabled else network
    if train.compile:
        trained = torch.compile(trained)
    logger.info("precision %s, torch.compile %s, channels-last %s", train.precision,
                "on" if train.compile else "off", "on" if train.channels_last else "off")
    final_path = ckpt_dir / f"{train.iterations}.pt"
    if step >= train.iterations:
        logger.info("training already finished at iteration %d", step)
    else:
        _train_loop(trained, network, ema, optimizer, schedule, images, options, distributed,
                    step, global_batch, local_batch)
    if distributed.is_main and train.final_ckpt_dir:
        if not final_path.is_file():
            final_path = newest_checkpoint(ckpt_dir)
        target = Path(train.final_ckpt_dir) / f"{train.train_size}.pt"
        copy_checkpoint(final_path, target)
        logger.info("copied the final checkpoint to '%s'", target)
    distributed.barrier()
    shutdown_distributed()
    return final_path


def _train_loop(trained: nn.Module, network: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                schedule, images: TrainingImages, options: dict, distributed: Distributed,
                step: int, global_batch: int, local_batch: int) -> None:
    """Run optimiser steps from `step` to the last iteration, logging and checkpointing on the way."""
    from tqdm import tqdm

    train, data = options["train"], options["data"]
    device = distributed.device
    results = Path(data.results_path)
    loss_log = results / "logs" / "loss.csv"
    if distributed.is_main:
        _start_loss_log(loss_log, step)

    network.train()
    running_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
    progress = tqdm(total=train.iterations, initial=step, desc=f"train K={train.train_size}",
                    disable=not distributed.is_main, dynamic_ncols=True)
    while step < train.iterations:
        positions = batch_indices(step, len(images), global_batch, train.global_seed)
        positions = positions[distributed.rank * local_batch:(distributed.rank + 1) * local_batch]
        x0 = images.batch(positions).to(device, non_blocking=True)
        generator = torch.Generator().manual_seed(mix_seed(train.global_seed, step, distributed.rank))
        t = torch.randint(0, schedule.timesteps, (len(x0),), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        torch.manual_seed(mix_seed(train.global_seed, step, distributed.rank, 1))  # dropout
        if train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)

        # Under bf16 autocast, convolutions and matrix products run in bfloat16 while the
        # loss, the weights and the gradients stay float32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16"):
            loss = schedule.training_loss(trained, x0, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(network.parameters(), train.clip_grad)
        optimizer.step()
        update_ema(ema, network, ema_decay_at(step, train.ema_decay))
        step += 1
        progress.update(1)

        running_loss += loss.item()
        interval_steps += 1
        if step % train.log_every == 0 or step == train.iterations:
            mean_loss = _mean_over_processes(running_loss / interval_steps, distributed, device)
            rate = interval_steps / (time.perf_counter() - interval_start)
            if not math.isfinite(mean_loss):
                raise MemgenError(f"the training loss became {mean_loss} at iteration {step}; "
                                  "lower --lr or --clip-grad and resume from the last checkpoint")
            logger.info("step %d loss %.5f %.2f steps/s", step, mean_loss, rate)
            if distributed.is_main:
                with open(loss_log, "a") as handle:
                    handle.write(f"{step},{mean_loss:.6f},{rate:.3f}\n")
            running_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()

        if step % train.ckpt_every == 0 or step == train.iterations:
            _write_checkpoint(network, ema, optimizer, schedule, options, distributed, step)
    progress.close()


def _start_loss_log(path: Path, step: int) -> None:
    """Create loss.csv, or drop its rows after `step`, which a killed run logged past its last checkpoint."""
    header = "iteration,loss,steps_per_second\n"
    lines = path.read_text().splitlines(keepends=True)[1:] if path.exists() else []
    kept = [line for line in lines if line.split(",")[0].isdigit() and int(line.split(",")[0]) <= step]
    if path.exists() and len(kept) == len(lines):
        return
    with atomic_path(path) as temporary:
        temporary.write_text(header + "".join(kept))


def _mean_over_processes(value: float, distributed: Distributed, device: torch.device) -> float:
    if not distributed.enabled:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / distributed.world_size


def _write_checkpoint(network: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, schedule,
                      options: dict, distributed: Distributed, step: int) -> None:
    """Write `<results>/checkpoints/<step>.pt` and the EMA sample grid (rank 0 only)."""
    if distributed.is_main:
        results = Path(options["data"].results_path)
        path = save_checkpoint(results / "checkpoints" / f"{step}.pt", options, network.state_dict(),
                               ema.state_dict(), optimizer.state_dict(), step,
                               {"torch": torch.get_rng_state()})
        logger.info("saved checkpoint '%s'", path)
        if options["train"].grid_samples > 0:
            rng_state = torch.get_rng_state()
            _sample_grid(ema, schedule, options["train"], options["model"], distributed.device,
                         results / "samples" / f"{step}.png")
            torch.set_rng_state(rng_state)
        if options["train"].valid_size > 0:
            loss = validation_loss(ema, schedule, options, distributed.device)
            logger.info("step %d validation loss of the EMA model %.5f", step, loss)
            with open(results / "logs" / "valid.csv", "a") as handle:
                handle.write(f"{step},{loss:.6f}\n")
    distributed.barrier()


@torch.no_grad()
def validation_loss(ema: nn.Module, schedule, options: dict, device: torch.device) -> float:
    """Return the EMA model's loss on the first `valid_size` test-split images.

    The diffusion times and noise are drawn from a generator seeded with the run's seed,
    so every checkpoint of a run is scored on the same (image, t, noise) triples.
    """
    from memgen.data import load_dataset, load_images

    data, train, model = options["data"], options["train"], options["model"]
    test_set = load_dataset(data.data_name, data.data_path, image_size=model.image_size,
                            centercrop=train.centercrop, train=False)
    x0 = load_images(test_set, torch.arange(min(train.valid_size, len(test_set))))
    generator = torch.Generator().manual_seed(train.global_seed)
    t = torch.randint(0, schedule.timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    ema.eval()
    total = 0.0
    for start in range(0, len(x0), VALID_BATCH):
        batch = slice(start, start + VALID_BATCH)
        loss = schedule.training_loss(ema, x0[batch].to(device), t[batch].to(device), noise[batch].to(device))
        total += float(loss) * len(x0[batch])
    return total / len(x0)
