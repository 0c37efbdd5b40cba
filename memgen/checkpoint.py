"""Checkpoints: memgen's own format, the paper's released files and the ideal memorizer.

Native checkpoints are `torch.save` dicts of plain data and tensors:
`{"format": "memgen-unet", "memgen_version", "config": {"data", "train", "model"},
"model", "ema", "opt", "iteration", "rng"}`. An ideal-memorizer checkpoint is
`{"format": "memgen-ideal", "memgen_version", "config"}`: it records the dataset, K and seed,
and the training images are loaded again when it is used. Every file is read with
`torch.load(weights_only=True)`, so no pickled code runs.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memgen import __version__
from memgen.config import TRAINING_SECTIONS, from_plain, to_plain
from memgen.errors import MemgenError
from memgen.files import atomic_path

logger = logging.getLogger(__name__)

NATIVE_FORMAT = "memgen-unet"
IDEAL_FORMAT = "memgen-ideal"


@dataclass
class LoadedModel:
    """A network ready for sampling, with the configuration it was trained under."""

    network: nn.Module
    config: dict
    iteration: int
    kind: str
    path: Path
    schedule: "object"

    @property
    def data_name(self) -> str:
        return self.config["data"]["data_name"]

    @property
    def train_size(self) -> int:
        return int(self.config["train"]["train_size"])

    @property
    def seed(self) -> int:
        return int(self.config["train"]["global_seed"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        model = self.config["model"]
        return (int(model["in_channels"]), int(model["image_size"]), int(model["image_size"]))

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def data_meta(self) -> dict:
        """Return the keys that later stages need to rebuild the training subset."""
        return {
            "data_name": self.data_name,
            "train_size": self.train_size,
            "seed": self.seed,
            "image_size": self.image_shape[1],
            "in_channels": self.image_shape[0],
            "centercrop": bool(self.config["train"].get("centercrop", False)),
        }


def save_checkpoint(path: str | Path, options: dict, model_state: dict, ema_state: dict,
                    opt_state: dict | None, iteration: int, rng: dict | None) -> Path:
    """Write a native checkpoint atomically; `options` are section dataclasses or plain dicts."""
    payload = {
        "format": NATIVE_FORMAT,
        "memgen_version": __version__,
        "config": to_plain(options),
        "model": model_state,
        "ema": ema_state,
        "opt": opt_state,
        "iteration": int(iteration),
        "rng": rng,
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def save_ideal_checkpoint(path: str | Path, options: dict) -> Path:
    """Write an ideal-memorizer checkpoint: the configuration of the K training images only."""
    payload = {"format": IDEAL_FORMAT, "memgen_version": __version__, "config": to_plain(options)}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def copy_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Copy a checkpoint file atomically (used for `<dir>/<K>.pt`)."""
    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)
    return Path(destination)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict without running any pickled code.

    Native and ideal files load directly; a file in the paper's released format is read
    through memgen.paper_checkpoint and returned as `{"format": "paper", "config", "model",
    "ema", "iteration"}`.
    """
    path = Path(path)
    if not path.is_file():
        raise MemgenError(f"checkpoint not found: '{path}'; pass a <K>.pt file written by "
                          "train_unet.py, convert_checkpoint.py or the paper's release")
    from memgen import paper_checkpoint

    payload = paper_checkpoint.read_checkpoint_file(path)
    if paper_checkpoint.is_paper_checkpoint(payload):
        return {"format": "paper", **paper_checkpoint.paper_checkpoint_from_dict(payload, path)}
    if not isinstance(payload, dict) or payload.get("format") not in (NATIVE_FORMAT, IDEAL_FORMAT):
        raise MemgenError(f"'{path}' is not a memgen checkpoint (no 'format' entry "
                          f"'{NATIVE_FORMAT}' or '{IDEAL_FORMAT}'); pass a file written by train_unet.py")
    return payload


def build_network(config: dict, state: dict, path: Path) -> nn.Module:
    """Build the UNet of `config["model"]` and load `state` into it, strictly."""
    from memgen.unet import build_unet

    network = build_unet(config["model"])
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise MemgenError(f"the weights in '{path}' do not fit the architecture in its own "
                          f"configuration ({_describe_mismatch(network.state_dict(), state)}); the file "
                          "is from another architecture or was edited, so use the checkpoint that "
                          "matches it") from error
    return network


def _describe_mismatch(expected: dict, state: dict) -> str:
    """Name the first missing, unexpected and differently shaped weight of `state`."""
    parts = []
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing:
        parts.append(f"{len(missing)} weights missing (first '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights (first '{unexpected[0]}')")
    for name, tensor in expected.items():
        found = state.get(name)
        if torch.is_tensor(found) and found.shape != tensor.shape:
            parts.append(f"'{name}' has shape {tuple(found.shape)} in the file but {tuple(tensor.shape)} "
                         "in the architecture")
            break
    return ", ".join(parts) or "the state dict does not load"


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True,
               data_path: str | Path | None = None) -> LoadedModel:
    """Load any supported checkpoint as a network in eval mode on `device`.

    `data_path` is needed for the ideal memorizer only, because it rebuilds its K training
    images from the dataset. It defaults to the data path in the checkpoint's configuration.
    """
    from memgen.diffusion import NoiseSchedule

    path = Path(path)
    payload = read_checkpoint(path)
    config = to_plain(from_plain(payload["config"], TRAINING_SECTIONS))
    schedule = NoiseSchedule.from_config(config["train"])
    kind = payload["format"]

    if kind == IDEAL_FORMAT:
        from memgen.data import load_training_images
        from memgen.ideal import IdealDenoiser

        data = config["data"]
        images = load_training_images(data["data_name"], data_path or data["data_path"],
                                      config["train"]["train_size"], config["train"]["global_seed"],
                                      image_size=config["model"]["image_size"],
                                      centercrop=config["train"]["centercrop"])
        network = IdealDenoiser(images, schedule.alphas_cumprod)
        config["train"]["prediction_type"] = IdealDenoiser.prediction_type
        config["train"]["train_size"] = len(images)
        schedule = NoiseSchedule.from_config(config["train"])
        iteration = 0
    else:
        state = payload["ema"] if use_ema else payload["model"]
        network = build_network(config, state, path)
        iteration = int(payload.get("iteration", 0))

    network = network.to(device).eval()
    logger.info("loaded %s checkpoint '%s' (K = %s, iteration %d, %s weights)", kind, path,
                config["train"]["train_size"], iteration, "EMA" if use_ema else "raw")
    return LoadedModel(network=network, config=config, iteration=iteration, kind=kind,
                       path=path, schedule=schedule)
