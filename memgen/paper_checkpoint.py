"""Read the checkpoints released with Pham et al. 2025 safely and convert them for memgen.

A released `<K>.pt` is a `torch.save` dict with `model` (state dict with a `module.`
prefix), `ema` (the same weights without it), `opt` (Adam state), `iterations` and
`args`: an `argparse.Namespace` whose `data`, `train` and `model` attributes are
instances of the dataclasses `parse_utils.DataOptions`, `TrainOptions` and
`ModelOptions`. Its network is score_sde's DDPM UNet with every layer in one flat list
`all_modules`, whose entries map one to one onto the layers of `memgen.unet.UNet`.

The file is read with `torch.load(weights_only=True)`, which never executes the pickle.
Only the three option classes and `argparse.Namespace` are allowed on top of torch's
own tensor globals, and the option classes are replaced by inert stand-ins, so a file
that names any other global (for example a planted `os.system`) raises MemgenError.
"""

import argparse
import collections
import dataclasses
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from memgen.checkpoint import save_checkpoint
from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.errors import MemgenError
from memgen.files import skip_existing
from memgen.unet import AttentionBlock, Downsample, ResidualBlock, UNet, Upsample, build_unet

logger = logging.getLogger(__name__)

class _PickledOptions:
    """Inert stand-in for an option dataclass of the paper's `parse_utils` module.

    The unpickler creates it with `__new__` and fills its `__dict__` from the pickled
    state, so it runs no code of the original class.
    """


class PaperDataOptions(_PickledOptions):
    """Stand-in for `parse_utils.DataOptions`."""


class PaperTrainOptions(_PickledOptions):
    """Stand-in for `parse_utils.TrainOptions`."""


class PaperModelOptions(_PickledOptions):
    """Stand-in for `parse_utils.ModelOptions`."""


# The globals of a released file besides torch's tensor rebuild functions and storages,
# which `weights_only=True` allows already. A tuple maps a stand-in to the pickled name.
PAPER_SAFE_GLOBALS = [
    argparse.Namespace,
    collections.OrderedDict,
    (PaperDataOptions, "parse_utils.DataOptions"),
    (PaperTrainOptions, "parse_utils.TrainOptions"),
    (PaperModelOptions, "parse_utils.ModelOptions"),
]

# Values of the paper's extra model options that `memgen.unet.UNet` implements.
SUPPORTED_PAPER_MODEL_OPTIONS = {
    "conditional": (True,),
    "resamp_with_conv": (True,),
    "nonlinearity": ("swish", "silu"),
    "scale_by_sigma": (False,),
}

# Sub-layer names of score_sde's blocks and the matching memgen names.
_RESIDUAL_NAMES = {"GroupNorm_0": "norm_1", "Conv_0": "conv_1", "Dense_0": "time_proj",
                   "GroupNorm_1": "norm_2", "Conv_1": "conv_2", "NIN_0": "skip"}
_ATTENTION_NAMES = {"GroupNorm_0": "norm", "NIN_0": "q", "NIN_1": "k", "NIN_2": "v", "NIN_3": "proj_out"}
_RESAMPLE_NAMES = {"Conv_0": "conv"}

_PAPER_KEY = re.compile(r"^all_modules\.(\d+)\.(.+)$")
_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")

# What the weights-only unpickler raises for bytes that are no valid pickle, besides
# UnpicklingError: torch.load reads a file that is not a zip archive as a legacy pickle.
_DAMAGED_PICKLE_ERRORS = (KeyError, IndexError, ValueError, TypeError, struct.error)


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """Load a `torch.save` file without executing code, allowing the paper's option classes.

    Tensors are loaded onto the CPU. Raises MemgenError when the file is missing, is not
    a torch file, or names a global outside torch's tensor globals and PAPER_SAFE_GLOBALS.
    """
    path = Path(path)
    if not path.is_file():
        raise MemgenError(f"checkpoint not found: '{path}'")
    try:
        with torch.serialization.safe_globals(PAPER_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        match = _GLOBAL_NAME.search(str(error))
        if match is None:
            raise _unreadable(path, "its pickle data are damaged") from None
        raise MemgenError(f"'{path}' was rejected because its pickle refers to {match.group(1)}, which is not "
                          "a tensor, plain data or one of the paper's option classes; memgen never "
                          "executes code from a checkpoint, so check where this file came from") from None
    except (RuntimeError, OSError, zipfile.BadZipFile) as error:
        raise _unreadable(path, _first_sentence(error)) from error
    except EOFError as error:
        raise _unreadable(path, "the file ends early") from error
    except _DAMAGED_PICKLE_ERRORS as error:
        raise _unreadable(path, "its pickle data are damaged") from error


def _unreadable(path: Path, reason: str) -> MemgenError:
    return MemgenError(f"'{path}' is not a readable torch checkpoint ({reason}); it may be truncated or "
                       "not a checkpoint at all, so copy or download it again")


def _first_sentence(error: Exception) -> str:
    """Return the first sentence of an exception message (torch adds paragraphs of advice)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0]


def is_paper_checkpoint(checkpoint: Any) -> bool:
    """Tell whether a loaded checkpoint dict, or the file at a path, is in the released format."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint_file(checkpoint)
    if not isinstance(checkpoint, Mapping):
        return False
    if not {"ema", "model", "args"} <= set(checkpoint):
        return False
    ema = checkpoint["ema"]
    return isinstance(ema, Mapping) and any(_PAPER_KEY.match(str(key)) for key in ema)


def load_paper_checkpoint(path: str | os.PathLike) -> dict:
    """Read a released checkpoint and return its configuration and weights in memgen's terms.

    Returns `{"config": {"data": {...}, "train": {...}, "model": {...}}, "ema": state_dict,
    "model": state_dict, "opt": optimizer state dict or None, "iteration": int}`. The
    configuration uses the keys of memgen's option dataclasses (tuples become lists), the
    state dicts load into `memgen.unet.build_unet(config["model"])`, and `opt` loads into
    an optimizer over that UNet's `parameters()`.
    """
    path = Path(path)
    checkpoint = read_checkpoint_file(path)
    if isinstance(checkpoint, Mapping) and str(checkpoint.get("format", "")).startswith("memgen-"):
        raise MemgenError(f"'{path}' is not in the format of the paper's released checkpoints but a native "
                          f"memgen checkpoint (format '{checkpoint['format']}'), which every stage reads "
                          "directly; pass it without converting it")
    if not is_paper_checkpoint(checkpoint):
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise MemgenError(f"'{path}' is not in the format of the paper's released checkpoints (it has {keys}, "
                          "expected 'model', 'ema' and 'args' with score_sde parameter names)")
    return paper_checkpoint_from_dict(checkpoint, path)


def paper_checkpoint_from_dict(checkpoint: Mapping, path: str | os.PathLike = "<checkpoint>") -> dict:
    """Convert an already loaded released checkpoint; `path` only names it in messages."""
    config = paper_config(checkpoint["args"], path)
    with torch.device("meta"):
        reference = build_unet(config["model"])
    names = paper_parameter_names(reference)
    expected_shapes = {name: tensor.shape for name, tensor in reference.state_dict().items()}

    model_state = {_strip_prefix(key, "module."): value for key, value in checkpoint["model"].items()}
    model_source = f"{path} (model)"
    model = rename_paper_state_dict(model_state, names, expected_shapes, model_source)
    opt = None
    if checkpoint.get("opt") is not None:
        memgen_order = [name for name, _ in reference.named_parameters()]
        opt = rename_paper_optimizer_state(checkpoint["opt"], list(model_state), names, memgen_order,
                                           f"{path} (opt)")
    iteration = checkpoint.get("iterations", checkpoint.get("iteration", 0))
    return {
        "config": config,
        "ema": rename_paper_state_dict(checkpoint["ema"], names, expected_shapes, f"{path} (ema)"),
        "model": model,
        "opt": opt,
        "iteration": int(iteration),
    }


def paper_config(args: Any, path: str | os.PathLike = "<checkpoint>") -> dict:
    """Turn the pickled `args` namespace into memgen's config sections as plain data.

    Fields missing from the file take memgen's defaults. The paper's `clip_grad` flag
    becomes the maximum norm 1.0 (on) or 0.0 (off). Fields memgen has no use for are
    dropped after checking that the paper's model options match what the UNet implements.
    """
    sections = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(sections, Mapping):
        raise MemgenError(f"'{path}': 'args' is a {type(args).__name__}, expected the paper's option namespace")

    config = {}
    for name, options_class in (("data", DataOptions), ("train", TrainOptions), ("model", ModelOptions)):
        values = _plain_fields(sections.get(name))
        if name == "model":
            if not values:
                raise MemgenError(f"'{path}' has no model options, so its architecture is unknown")
            _check_paper_model_options(values, path)
        if name == "train" and isinstance(values.get("clip_grad"), bool):
            values["clip_grad"] = 1.0 if values["clip_grad"] else 0.0
        config[name] = _fill_defaults(options_class, values, name, path)
    return config


def _plain_fields(options: Any) -> dict:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        fields = dict(options)
    else:
        fields = dict(vars(options))
    return {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}


def _check_paper_model_options(values: Mapping, path: str | os.PathLike) -> None:
    for name, supported in SUPPORTED_PAPER_MODEL_OPTIONS.items():
        if name in values and values[name] not in supported:
            raise MemgenError(f"'{path}' has model option {name}={values[name]!r}, but memgen's UNet only "
                              f"implements {name} in {list(supported)}; this checkpoint cannot be loaded")


def _fill_defaults(options_class: type, values: dict, section: str, path: str | os.PathLike) -> dict:
    default_options = options_class()
    defaults = {field.name: getattr(default_options, field.name) for field in dataclasses.fields(options_class)}
    dropped = sorted(set(values) - set(defaults))
    if dropped:
        logger.debug("'%s': dropping %s options that memgen does not use: %s", path, section, ", ".join(dropped))
    filled = {}
    for name, default in defaults.items():
        value = values.get(name, default)
        filled[name] = list(value) if isinstance(value, tuple) else value
    return filled


def paper_parameter_names(unet: UNet) -> dict[int, tuple[str, dict[str, str] | None]]:
    """Map each index of score_sde's `all_modules` list to the memgen module at that place.

    Returns `{index: (memgen module path, sub-layer names or None)}`. The sub-layer
    names map score_sde names (`GroupNorm_0`, `NIN_1`, ...) to memgen attribute names.
    None marks a plain layer whose parameters sit directly under the index.
    """
    paths = ["time_embed.linear_1", "time_embed.linear_2", "in_conv"]
    for part, levels in (("down", list(enumerate(unet.down))), ("up", list(enumerate(unet.up))[::-1])):
        if part == "up":
            paths += ["mid.res_1", "mid.attention", "mid.res_2"]
        for index, level in levels:
            for block in range(len(level.res_blocks)):
                paths.append(f"{part}.{index}.res_blocks.{block}")
                if len(level.attentions) > 0:
                    paths.append(f"{part}.{index}.attentions.{block}")
            if level.resample is not None:
                paths.append(f"{part}.{index}.resample")
    paths += ["out_norm", "out_conv"]

    names = {}
    for index, module_path in enumerate(paths):
        module = unet.get_submodule(module_path)
        if isinstance(module, ResidualBlock):
            names[index] = (module_path, _RESIDUAL_NAMES)
        elif isinstance(module, AttentionBlock):
            names[index] = (module_path, _ATTENTION_NAMES)
        elif isinstance(module, (Downsample, Upsample)):
            names[index] = (module_path, _RESAMPLE_NAMES)
        else:
            names[index] = (module_path, None)
    return names


def rename_paper_state_dict(state: Mapping[str, torch.Tensor], names: Mapping[int, tuple[str, dict | None]],
                            expected_shapes: Mapping[str, torch.Size], source: str) -> dict[str, torch.Tensor]:
    """Rename score_sde parameters (`all_modules.5.NIN_0.W`) to memgen ones (`down.1.res_blocks.0.skip.weight`).

    NIN layers store W as (in, out), so W is transposed into a (out, in, 1, 1) kernel.
    Raises MemgenError when a parameter is unknown, missing or of the wrong shape,
    which means the weights do not belong to the model options stored with them.
    """
    renamed = {}
    for key, tensor in state.items():
        memgen_key, is_nin_weight = _memgen_key(key, names)
        if memgen_key is None:
            raise MemgenError(f"{source}: parameter '{key}' has no counterpart in memgen's UNet for the "
                              "model options stored in the file; the file does not match its own options")
        if is_nin_weight:
            tensor = tensor.t()[:, :, None, None]
        if memgen_key not in expected_shapes or tuple(tensor.shape) != tuple(expected_shapes[memgen_key]):
            expected = tuple(expected_shapes.get(memgen_key, ()))
            raise MemgenError(f"{source}: parameter '{key}' has shape {tuple(tensor.shape)} after conversion, "
                              f"but memgen's '{memgen_key}' needs {expected}; the file does not match its own options")
        renamed[memgen_key] = tensor.detach().clone().contiguous()

    missing = sorted(set(expected_shapes) - set(renamed))
    if missing:
        raise MemgenError(f"{source}: {len(missing)} parameters of the UNet are missing from the file, "
                          f"for example '{missing[0]}'; the file does not match its own options")
    return renamed


def _memgen_key(key: str, names: Mapping[int, tuple[str, dict | None]]) -> tuple[str | None, bool]:
    match = _PAPER_KEY.match(key)
    if match is None or int(match.group(1)) not in names:
        return None, False
    module_path, sublayers = names[int(match.group(1))]
    rest = match.group(2)
    if sublayers is None:
        return f"{module_path}.{rest}", False

    sublayer, _, parameter = rest.partition(".")
    if sublayer not in sublayers:
        return None, False
    if sublayer.startswith("NIN_"):
        parameter = {"W": "weight", "b": "bias"}.get(parameter)
        if parameter is None:
            return None, False
        return f"{module_path}.{sublayers[sublayer]}.{parameter}", parameter == "weight"
    return f"{module_path}.{sublayers[sublayer]}.{parameter}", False


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def rename_paper_optimizer_state(opt: Mapping, paper_order: list[str], names: Mapping[int, tuple[str, dict | None]],
                                 memgen_order: list[str], source: str) -> dict:
    """Re-index an optimizer state dict from the paper's parameter order to memgen's.

    A torch optimizer refers to parameters by their position in `model.parameters()`.
    `paper_order` lists the paper's parameter names in that order (the keys of its
    state dict, which has no buffers), and `memgen_order` lists memgen's. Per-parameter
    tensors such as Adam's `exp_avg` of a NIN weight are transposed like the weight.
    """
    if not isinstance(opt, Mapping) or not {"state", "param_groups"} <= set(opt):
        raise MemgenError(f"{source}: the optimizer state is not a torch optimizer state dict")
    grouped = sorted(index for group in opt["param_groups"] for index in group["params"])
    if grouped != list(range(len(paper_order))):
        raise MemgenError(f"{source}: the optimizer's parameter groups list {len(grouped)} parameters, "
                          f"but the model has {len(paper_order)}; the file does not match its own options")
    memgen_index = {name: index for index, name in enumerate(memgen_order)}
    new_index = {}
    for paper_index, paper_key in enumerate(paper_order):
        memgen_key, _ = _memgen_key(paper_key, names)
        if memgen_key not in memgen_index:
            raise MemgenError(f"{source}: parameter '{paper_key}' has no counterpart in memgen's UNet")
        new_index[paper_index] = memgen_index[memgen_key]

    state = {}
    for paper_index, values in opt["state"].items():
        if paper_index not in new_index:
            raise MemgenError(f"{source}: optimizer state refers to parameter {paper_index}, but the model "
                              f"has only {len(paper_order)} parameters")
        _, is_nin_weight = _memgen_key(paper_order[paper_index], names)
        state[new_index[paper_index]] = {
            name: _as_memgen_layout(value, is_nin_weight) for name, value in values.items()
        }

    param_groups = []
    for group in opt["param_groups"]:
        renamed_group = dict(group)
        renamed_group["params"] = sorted(new_index[index] for index in group["params"])
        param_groups.append(renamed_group)
    return {"state": dict(sorted(state.items())), "param_groups": param_groups}


def _as_memgen_layout(value: Any, is_nin_weight: bool) -> Any:
    """Transpose a per-parameter tensor of a NIN weight (in, out) into a 1x1 kernel (out, in, 1, 1)."""
    if is_nin_weight and isinstance(value, torch.Tensor) and value.dim() == 2:
        return value.t()[:, :, None, None].contiguous()
    return value


def convert_paper_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the released checkpoint `src` as a native memgen checkpoint at `dst`, atomically.

    The native file is a plain dict (format, memgen_version, config, model, ema, opt,
    iteration, rng) that loads with `torch.load(weights_only=True)`. An existing `dst`
    is kept unless `overwrite` is set.
    """
    src, dst = Path(src), Path(dst)
    if skip_existing(dst, overwrite):
        return dst
    logger.info("converting released checkpoint '%s'", src)
    converted = load_paper_checkpoint(src)

    save_checkpoint(dst, converted["config"], converted["model"], converted["ema"],
                    opt_state=converted["opt"], iteration=converted["iteration"], rng=None)
    logger.info("wrote memgen checkpoint '%s' (iteration %d)", dst, converted["iteration"])
    return dst

