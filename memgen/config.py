"""Options of every stage as dataclasses, read from a YAML file and overridden by flags.

`--config_path file.yaml` sets the defaults and any flag overrides them, for example
`train_unet.py --config_path configs/fashionmnist.yaml --train-size 16000 --dim 128`.
A YAML file has one section per option group (`data`, `train`, `model` for training);
unknown sections, unknown keys and values of the wrong type are errors that name the key.
"""

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import simple_parsing
import yaml

from memgen.errors import MemgenError

# Seed of the runs of Pham et al. 2025, used for the training subset and for initialisation.
PAPER_SEED = 3407


@dataclass
class DataOptions:
    """Locations of the dataset and of the results."""

    data_path: str = "data"
    """Dataset root: the folder holding FashionMNIST/raw, cifar-10-batches-py, an image folder or an .npz file."""
    results_path: str = "results/train"
    """Folder for checkpoints/, samples/ and logs/ of this training run."""
    data_name: str = "fashionmnist"
    """Dataset: fashionmnist, mnist, cifar10, lsun-church, celeba, celebahq, imagefolder or npz."""


@dataclass
class TrainOptions:
    """Optimisation, noise schedule and bookkeeping of one training run."""

    global_batch_size: int = 128
    """Images per step summed over all processes; the batch is min(global_batch_size, train_size)."""
    iterations: int = 400_000
    """Number of optimiser steps."""
    num_workers: int = 0
    """Data-loader worker processes per training process."""
    log_every: int = 100
    """Steps between log lines (loss, steps per second)."""
    ckpt_every: int = 50_000
    """Steps between checkpoints; one is also written at the end."""
    train_size: int = 60_000
    """K, the number of training images: the first K of a seeded permutation of the training split."""
    valid_size: int = 0
    """Held-out images (from the test split) whose loss is logged at each checkpoint; 0 turns it off."""
    global_seed: int = PAPER_SEED
    """Seed of the training subset, the initial weights and the data order."""
    lr: float = 2e-4
    """Adam learning rate."""
    ema_decay: float = 0.9999
    """Decay of the weight EMA; step t uses min(ema_decay, (1 + t) / (10 + t)) as warm-up."""
    clip_grad: float = 1.0
    """Maximum global gradient norm; 0 turns clipping off."""
    prediction_type: str = "epsilon"
    """Network output: epsilon (the noise) or sample (x0, the image)."""
    beta_schedule: str = "linear"
    """Noise schedule: linear betas from 1e-4 to 0.02."""
    timesteps: int = 1000
    """Number of diffusion steps T."""
    centercrop: bool = False
    """Centre-crop images to a square before resizing (Pham et al. 2025 do this for LSUN-Church)."""
    grid_samples: int = 64
    """Images in the sample grid written from the EMA model at each checkpoint; 0 turns it off."""
    grid_ddim_steps: int = 50
    """DDIM steps used for the checkpoint sample grid (a quick look, not the evaluation protocol)."""
    final_ckpt_dir: str = ""
    """When set, the final checkpoint is also copied to <final_ckpt_dir>/<train_size>.pt for later stages."""
    device: str = "auto"
    """Device: auto (CUDA when present, else CPU), cpu or cuda."""
    precision: str = "fp32"
    """Arithmetic of the forward and backward pass: fp32, or bf16 for bfloat16 autocast (weights, Adam state and EMA stay float32)."""
    compile: bool = False
    """Compile the network with torch.compile (the first steps are slower while it compiles)."""
    channels_last: bool = False
    """Keep the network and its input batches in channels-last memory format, which often speeds up convolutions on GPUs with tensor cores."""


@dataclass
class ModelOptions:
    """Architecture of the DDPM UNet."""

    image_size: int = 28
    """Height and width of the images in pixels; the data are resized to it."""
    in_channels: int = 1
    """Image channels: 1 for grey, 3 for colour."""
    dim: int = 128
    """Base channel count; level i has dim * dim_mults[i] channels."""
    dim_mults: tuple[int, ...] = (1, 2, 2)
    """Channel multiplier per resolution level; each level after the first halves the resolution."""
    attn_resolutions: tuple[int, ...] = (16,)
    """Resolutions (in pixels) with self-attention; the middle block always has it."""
    num_res_blocks: int = 2
    """Residual blocks per level."""
    dropout: float = 0.1
    """Dropout probability inside residual blocks."""


TRAINING_SECTIONS = {"data": DataOptions, "train": TrainOptions, "model": ModelOptions}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _matches(value: Any, annotation: Any) -> bool:
    """Tell whether a YAML value fits a field annotation (int, float, bool, str, tuples, optionals)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        (member, *_) = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_matches(item, member) for item in value)
    return True


def _section_from_yaml(section: str, cls: type, values: Any, path: Path) -> Any:
    """Check one YAML section against its dataclass and build an instance from it."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise MemgenError(f"'{path}': section '{section}' must be a mapping of key: value, "
                          f"got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise MemgenError(f"'{path}': unknown key '{section}.{key}'; valid keys of '{section}' "
                              f"are {', '.join(sorted(known))}")
        if not _matches(value, hints[key]):
            raise MemgenError(f"'{path}': '{section}.{key}' must be {_type_name(hints[key])}, "
                              f"got {value!r}")
    converted = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    return cls(**converted)


def load_yaml_sections(path: str | Path, sections: dict[str, type]) -> dict[str, Any]:
    """Read a YAML config file into one dataclass instance per section (defaults where absent)."""
    path = Path(path)
    if not path.is_file():
        raise MemgenError(f"config file not found: '{path}'; pass an existing YAML file to --config_path")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise MemgenError(f"'{path}' is not valid YAML{where}: {problem}; fix the file or pass another "
                          "--config_path") from error
    if not isinstance(content, dict):
        raise MemgenError(f"'{path}' must hold a mapping of sections ({', '.join(sections)})")
    if len(sections) == 1 and not set(content) & set(sections):
        content = {next(iter(sections)): content}
    for section in content:
        if section not in sections:
            raise MemgenError(f"'{path}': unknown section '{section}'; valid sections are "
                              f"{', '.join(sections)}")
    return {name: _section_from_yaml(name, cls, content.get(name), path) for name, cls in sections.items()}


def parse_sections(sections: dict[str, type], argv: Sequence[str] | None = None,
                   description: str | None = None) -> dict[str, Any]:
    """Parse `--config_path` and the flags of every section; flags win over the YAML file.

    Options accept both `--train-size` and `--train_size`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre_parser = simple_parsing.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config_path", "--config-path", default=None)
    known, _ = pre_parser.parse_known_args(argv)
    if known.config_path is not None:
        defaults = load_yaml_sections(known.config_path, sections)
    else:
        defaults = {name: cls() for name, cls in sections.items()}

    parser = simple_parsing.ArgumentParser(
        description=description,
        add_option_string_dash_variants=simple_parsing.DashVariant.UNDERSCORE_AND_DASH,
    )
    parser.add_argument("--config_path", "--config-path", default=None, metavar="FILE.yaml",
                        help="YAML file whose sections set the defaults; flags override it")
    for name, cls in sections.items():
        parser.add_arguments(cls, dest=name, default=defaults[name])
    parsed = parser.parse_args(argv)
    return {name: getattr(parsed, name) for name in sections}


def to_plain(options: dict[str, Any]) -> dict[str, dict]:
    """Turn section dataclasses into plain dicts (tuples become lists) for JSON or checkpoints."""
    plain = {}
    for name, value in options.items():
        section = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
        plain[name] = {key: list(item) if isinstance(item, tuple) else item for key, item in section.items()}
    return plain


def from_plain(plain: dict[str, dict], sections: dict[str, type] = TRAINING_SECTIONS) -> dict[str, Any]:
    """Rebuild section dataclasses from plain dicts, ignoring keys this version does not know."""
    options = {}
    for name, cls in sections.items():
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in plain.get(name, {}).items() if key in known}
        options[name] = cls(**values)
    return options


def write_yaml(options: dict[str, Any], path: str | Path) -> None:
    """Write the options as a YAML config that `--config_path` reads back."""
    Path(path).write_text(yaml.safe_dump(to_plain(options), sort_keys=False))

