"""The DDPM UNet (Ho et al. 2020) in the layout of score_sde's PyTorch port.

The network computes the same function as the model behind the checkpoints released by
Pham et al. 2025 (arXiv:2505.21777), so loading one of those is a renaming of parameters (see
`memgen.paper_checkpoint`). Layout, from input to output:

- time embedding: sinusoidal features of the integer step t, Linear(dim, 4 dim), SiLU,
  Linear(4 dim, 4 dim);
- `in_conv`: 3x3 convolution from `in_channels` to `dim`;
- `down[i]` for each level i at resolution image_size / 2^i: `num_res_blocks` residual
  blocks to `dim * dim_mults[i]` channels, each followed by self-attention when the
  resolution is in `attn_resolutions`, then a downsample except at the last level;
- `mid`: residual block, self-attention, residual block (attention at every image size);
- `up[i]`, run from the last level to the first: `num_res_blocks + 1` residual blocks
  on the concatenation with the matching skip activation, each followed by attention
  when the resolution is listed, then an upsample except at level 0;
- `out_norm`, SiLU, `out_conv`: 3x3 convolution back to `in_channels`.
"""

import dataclasses
import logging
import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from memgen.errors import MemgenError

logger = logging.getLogger(__name__)

GROUP_NORM_EPS = 1e-6
MAX_GROUPS = 32


def num_groups_for(channels: int) -> int:
    """Return 32 when it divides `channels`, otherwise the largest divisor of `channels` below 32."""
    for groups in range(min(MAX_GROUPS, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(channels), channels, eps=GROUP_NORM_EPS)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Embed integer steps `t` (B,) as (B, dim) sinusoids, sines first, then cosines.

    Frequency j of the dim / 2 pairs is exp(-log(10000) j / (dim / 2 - 1)), as in the
    DDPM code. An odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    exponent = -math.log(10000.0) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * exponent)
    angles = t.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResidualBlock(nn.Module):
    """GN, SiLU, conv, plus a projection of the time embedding, GN, SiLU, dropout, conv, plus the input.

    The input goes through a 1x1 convolution (`skip`) when the channel count changes.
    The sum is not rescaled.
    """

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, dropout: float):
        super().__init__()
        self.norm_1 = group_norm(in_channels)
        self.conv_1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_channels, out_channels)
        self.norm_2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv_1(F.silu(self.norm_1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv_2(self.dropout(F.silu(self.norm_2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, softmax(q.k / sqrt(C)), plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        # (B, C, H, W) -> (B, 1, H*W, C): one head whose tokens are the pixels.
        q, k, v = (layer(h).flatten(2).transpose(1, 2)[:, None] for layer in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)

        h = h[:, 0].transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Pad right and bottom by one pixel, then a 3x3 convolution with stride 2 and no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by 2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks of one resolution, their attention blocks and the resampling layer.

    `attentions` is empty when the resolution has no attention, otherwise it has one
    block per residual block. `resample` is None at the level that has none.
    """

    def __init__(self, res_blocks: list[ResidualBlock], with_attention: bool, resample: nn.Module | None):
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        channels = [block.conv_2.out_channels for block in res_blocks]
        self.attentions = nn.ModuleList(AttentionBlock(c) for c in channels) if with_attention else nn.ModuleList()
        self.resample = resample

    def block(self, index: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Apply residual block `index` and, at an attention resolution, its attention block."""
        h = self.res_blocks[index](h, temb)
        if len(self.attentions) > 0:
            h = self.attentions[index](h)
        return h


class MiddleBlock(nn.Module):
    def __init__(self, channels: int, time_channels: int, dropout: float):
        super().__init__()
        self.res_1 = ResidualBlock(channels, channels, time_channels, dropout)
        self.attention = AttentionBlock(channels)
        self.res_2 = ResidualBlock(channels, channels, time_channels, dropout)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.res_1(h, temb)
        h = self.attention(h)
        return self.res_2(h, temb)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t, Linear(dim, 4 dim), SiLU, Linear(4 dim, 4 dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, 4 * dim)
        self.linear_2 = nn.Linear(4 * dim, 4 * dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class UNet(nn.Module):
    """DDPM UNet: `forward(x, t)` maps x (B, C, H, W) and integer steps t (B,) to (B, C, H, W).

    The output is whatever the model was trained to predict: the noise for "epsilon",
    the clean image for "sample".
    """

    def __init__(self, image_size: int, in_channels: int = 1, dim: int = 128,
                 dim_mults: tuple[int, ...] = (1, 2, 2), attn_resolutions: tuple[int, ...] = (16,),
                 num_res_blocks: int = 2, dropout: float = 0.1):
        super().__init__()
        dim_mults = tuple(int(m) for m in dim_mults)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        check_unet_options(image_size, in_channels, dim, dim_mults, attn_resolutions, num_res_blocks, dropout)
        self.image_size = image_size
        self.in_channels = in_channels
        time_channels = 4 * dim
        num_levels = len(dim_mults)
        resolutions = [image_size // 2 ** i for i in range(num_levels)]

        self.time_embed = TimeEmbedding(dim)
        self.in_conv = nn.Conv2d(in_channels, dim, 3, padding=1)

        # Channel counts of the skip activations, in the order the down path produces them.
        skip_channels = [dim]
        channels = dim
        down = []
        for level, mult in enumerate(dim_mults):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(channels, dim * mult, time_channels, dropout))
                channels = dim * mult
                skip_channels.append(channels)
            downsample = None
            if level != num_levels - 1:
                downsample = Downsample(channels)
                skip_channels.append(channels)
            down.append(Level(blocks, resolutions[level] in attn_resolutions, downsample))
        self.down = nn.ModuleList(down)

        self.mid = MiddleBlock(channels, time_channels, dropout)

        up = [None] * num_levels
        for level in reversed(range(num_levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                out_channels = dim * dim_mults[level]
                blocks.append(ResidualBlock(channels + skip_channels.pop(), out_channels, time_channels, dropout))
                channels = out_channels
            upsample = Upsample(channels) if level != 0 else None
            up[level] = Level(blocks, resolutions[level] in attn_resolutions, upsample)
        self.up = nn.ModuleList(up)

        self.out_norm = group_norm(channels)
        self.out_conv = nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict from x (B, C, H, W) float32 at integer steps t (B,) in [0, T-1]."""
        temb = self.time_embed(t)

        skips = [self.in_conv(x)]
        for level in self.down:
            for index in range(len(level.res_blocks)):
                skips.append(level.block(index, skips[-1], temb))
            if level.resample is not None:
                skips.append(level.resample(skips[-1]))

        h = self.mid(skips[-1], temb)

        for level in reversed(self.up):
            for index in range(len(level.res_blocks)):
                h = level.block(index, torch.cat([h, skips.pop()], dim=1), temb)
            if level.resample is not None:
                h = level.resample(h)

        return self.out_conv(F.silu(self.out_norm(h)))


def check_unet_options(image_size: int, in_channels: int, dim: int, dim_mults: tuple[int, ...],
                       attn_resolutions: tuple[int, ...], num_res_blocks: int, dropout: float) -> None:
    """Raise MemgenError for a configuration the UNet cannot be built with."""
    for name, value in (("image_size", image_size), ("in_channels", in_channels), ("dim", dim),
                        ("num_res_blocks", num_res_blocks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MemgenError(f"model option {name}={value!r} is invalid; it must be a positive integer")
    if dim < 4:
        # The sinusoidal embedding divides by dim / 2 - 1.
        raise MemgenError(f"model option dim={dim} is too small; use dim >= 4 (the published models use 128)")
    if len(dim_mults) == 0 or min(dim_mults) < 1:
        raise MemgenError(f"model option dim_mults={list(dim_mults)} is invalid; "
                          "give one positive multiplier per resolution level, e.g. 1,2,2")
    if any(r < 1 for r in attn_resolutions):
        raise MemgenError(f"model option attn_resolutions={list(attn_resolutions)} is invalid; "
                          "give positive image sizes such as 16")
    if not 0.0 <= dropout < 1.0:
        raise MemgenError(f"model option dropout={dropout} is invalid; it must lie in [0, 1)")
    factor = 2 ** (len(dim_mults) - 1)
    if image_size % factor != 0:
        raise MemgenError(
            f"image_size {image_size} is not divisible by {factor}, which {len(dim_mults)} levels "
            f"(dim_mults={list(dim_mults)}) need because each level but the last halves the size; "
            f"use fewer dim_mults or an image size that is a multiple of {factor}")


UNET_OPTION_NAMES = ("image_size", "in_channels", "dim", "dim_mults", "attn_resolutions", "num_res_blocks", "dropout")


def build_unet(model_options) -> UNet:
    """Build a UNet from a dataclass or mapping with the fields of the YAML `model` section.

    Missing fields take UNet's defaults except `image_size`, which is required. Other
    fields are ignored with a warning.
    """
    if dataclasses.is_dataclass(model_options) and not isinstance(model_options, type):
        options = dataclasses.asdict(model_options)
    elif isinstance(model_options, Mapping):
        options = dict(model_options)
    else:
        raise TypeError(f"model options must be a dataclass or a mapping, got {type(model_options).__name__}")

    if "image_size" not in options:
        raise MemgenError("the model options have no image_size; set model.image_size in the config "
                          "or pass --image-size")
    ignored = sorted(set(options) - set(UNET_OPTION_NAMES))
    if ignored:
        logger.warning("ignoring model options that the UNet does not use: %s", ", ".join(ignored))
    return UNet(**{name: options[name] for name in UNET_OPTION_NAMES if name in options})


def count_parameters(module: nn.Module) -> int:
    """Return the number of scalar parameters of `module`."""
    return sum(parameter.numel() for parameter in module.parameters())
