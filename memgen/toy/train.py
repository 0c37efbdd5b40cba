"""Denoising score matching of the toy score network, with EMA weights and resumable checkpoints.

A checkpoint is a plain dict saved with torch.save and read with torch.load(weights_only=True):
`model`, `ema` and `optimizer` state dicts, `iteration`, `config` and `sde` (plain data),
the training points, the loss of every iteration so far and the state of the training generator.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from memgen.errors import MemgenError
from memgen.files import atomic_path
from memgen.toy.model import ScoreNet, ScoreNetConfig
from memgen.toy.sde import VESDE

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training settings of one toy model.

    iterations: total optimizer steps; a rerun with more continues from the checkpoint.
    batch_size: training points per step, drawn with replacement from the K points.
    lr: Adam learning rate.
    ema_decay: decay of the exponential moving average of the weights, used for sampling.
    ckpt_every: steps between checkpoints (the last step is always saved).
    seed: seed of the generator that draws batches, times and noise.
    """

    iterations: int = 4000
    batch_size: int = 512
    lr: float = 1e-3
    ema_decay: float = 0.999
    ckpt_every: int = 1000
    seed: int = 0
    model: ScoreNetConfig = field(default_factory=ScoreNetConfig)


def dsm_loss(model: ScoreNet, sde: VESDE, x0: torch.Tensor, t: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score matching loss E ||sigma_t s(x_t, t) + z||^2 for x_t = x0 + sigma_t z.

    The weight lambda(t) = sigma_t^2 makes every noise level contribute on the same scale.
    x0: (B, 2) clean points; t: (B,) times. Returns a scalar.
    """
    x_t, z = sde.perturb(x0, t, generator=generator)
    score = model(x_t, t)
    return ((sde.marginal_std(t)[:, None] * score + z) ** 2).sum(dim=1).mean()


def sample_times(sde: VESDE, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Draw training times log-uniformly from [t_min, t_max], shape (batch_size,).

    A log-uniform draw gives each decade of t the same share of updates, so the small noise
    levels, which decide whether the model separates nearby points, are trained as often as
    the large ones.
    """
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    log_t = math.log(sde.t_min) + u * (math.log(sde.t_max) - math.log(sde.t_min))
    return torch.exp(log_t).float()


@torch.no_grad()
def update_ema(ema: ScoreNet, model: ScoreNet, decay: float, iteration: int) -> None:
    """ema <- d ema + (1 - d) model with the warm-up d = min(decay, (1 + i) / (10 + i))."""
    warmed_decay = min(decay, (1 + iteration) / (10 + iteration))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.mul_(warmed_decay).add_(param, alpha=1 - warmed_decay)


def save_checkpoint(path: Path, model: ScoreNet, ema: ScoreNet, optimizer: torch.optim.Optimizer,
                    iteration: int, config: TrainConfig, sde: VESDE, points: np.ndarray,
                    losses: list[float], generator: torch.Generator) -> None:
    """Write the training state atomically as a plain dict (see the module docstring)."""
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "config": asdict(config),
        "sde": asdict(sde),
        "points": torch.as_tensor(points, dtype=torch.float64),
        "losses": torch.tensor(losses, dtype=torch.float32),
        "generator_state": generator.get_state(),
    }
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    logger.info("saved checkpoint of iteration %d to '%s'", iteration, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`, without executing any pickle."""
    path = Path(path)
    if not path.is_file():
        raise MemgenError(f"checkpoint not found: '{path}'; run 'toy_example.py train' first "
                          "with the same --out and --k")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as error:
        raise MemgenError(f"'{path}' is not a readable toy checkpoint ({error}); delete it and "
                          "train again") from error
    missing = [key for key in ("model", "ema", "iteration", "config", "sde", "points") if key not in state]
    if missing:
        raise MemgenError(f"'{path}' lacks {missing}; it was not written by 'toy_example.py train'")
    return state


def config_from_checkpoint(state: dict) -> TrainConfig:
    """Rebuild the TrainConfig (with its ScoreNetConfig) stored in a checkpoint."""
    config = dict(state["config"])
    config["model"] = ScoreNetConfig(**config["model"])
    return TrainConfig(**config)


def sde_from_checkpoint(state: dict) -> VESDE:
    """Rebuild the VESDE that a checkpoint was trained with."""
    return VESDE(**state["sde"])


def load_ema_model(state: dict, device: torch.device | str = "cpu") -> ScoreNet:
    """Build the score network of a checkpoint with its EMA weights, in eval mode."""
    model = ScoreNet(config_from_checkpoint(state).model)
    model.load_state_dict(state["ema"])
    return model.to(device).eval()


def train_score_model(points: np.ndarray, sde: VESDE, config: TrainConfig, checkpoint_path: Path,
                      device: torch.device,
                      after_checkpoint: Callable[[int, ScoreNet], None] | None = None) -> dict:
    """Train (or resume training) a score network on `points` (K, 2); return the final state.

    When `checkpoint_path` exists, training continues from it up to `config.iterations`; its
    points, model size and SDE must match, or MemgenError is raised. `after_checkpoint` is
    called with the iteration and the EMA network after each checkpoint. Returns the
    checkpoint dict of the last iteration.
    """
    generator = torch.Generator().manual_seed(config.seed)
    # Initialise the weights from the seed without touching the global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ScoreNet(config.model).to(device)
    ema = ScoreNet(config.model).to(device).eval()
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    losses: list[float] = []
    start = 0

    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        _check_resumable(state, points, config, sde, checkpoint_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator_state"])
        losses = state["losses"].tolist()
        start = int(state["iteration"])
        if start >= config.iterations:
            logger.info("'%s' already has %d iterations (requested %d); not training", checkpoint_path,
                        start, config.iterations)
            return state
        logger.info("resuming from iteration %d of '%s'", start, checkpoint_path)

    train_points = torch.as_tensor(points, dtype=torch.float32)
    logger.info("training on K = %d points for iterations %d..%d (batch %d, lr %g, %d parameters)",
                len(points), start, config.iterations, config.batch_size, config.lr,
                sum(p.numel() for p in model.parameters()))
    started = time.perf_counter()
    model.train()
    progress = tqdm(range(start, config.iterations), desc=f"train K={len(points)}", unit="it")
    for iteration in progress:
        index = torch.randint(0, len(train_points), (config.batch_size,), generator=generator)
        x0 = train_points[index].to(device)
        t = sample_times(sde, config.batch_size, generator).to(device)
        loss = dsm_loss(model, sde, x0, t, generator=generator)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, config.ema_decay, iteration)
        losses.append(loss.item())

        step = iteration + 1
        if step % 100 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step % config.ckpt_every == 0 or step == config.iterations:
            save_checkpoint(checkpoint_path, model, ema, optimizer, step, config, sde, points, losses,
                            generator)
            if after_checkpoint is not None:
                after_checkpoint(step, ema)

    elapsed = time.perf_counter() - started
    logger.info("trained %d iterations in %.1f s; mean loss of the last 500: %.4f",
                config.iterations - start, elapsed, float(np.mean(losses[-500:])))
    return load_checkpoint(checkpoint_path)


def _check_resumable(state: dict, points: np.ndarray, config: TrainConfig, sde: VESDE, path: Path) -> None:
    """Raise MemgenError unless the checkpoint was trained on the same points, network and SDE."""
    stored_points = state["points"].numpy()
    if stored_points.shape != points.shape or not np.allclose(stored_points, points):
        raise MemgenError(f"'{path}' was trained on other points (K = {len(stored_points)}); "
                          "pass the same --k and --data-seed, another --out, or --overwrite")
    stored = config_from_checkpoint(state)
    if stored.model != config.model:
        raise MemgenError(f"'{path}' contains a network of size {stored.model.to_dict()}, not the "
                          f"requested {config.model.to_dict()}; pass another --out or --overwrite")
    if sde_from_checkpoint(state) != sde:
        raise MemgenError(f"'{path}' was trained with {sde_from_checkpoint(state)}, not the requested "
                          f"{sde}; pass another --out or --overwrite")
