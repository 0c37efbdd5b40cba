"""Figures that several stages write, starting with image grids of samples."""

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from memgen.files import atomic_path

logger = logging.getLogger(__name__)

# Images smaller than this many pixels are enlarged by an integer factor (nearest neighbour)
# so that a 28x28 or 8x8 grid stays legible in an image viewer.
DEFAULT_MIN_SIZE = 64


def save_image_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int = 8,
                    min_size: int = DEFAULT_MIN_SIZE, padding: int = 2) -> Path:
    """Write `images` as one PNG grid of `nrow` columns, atomically.

    images: `(N, C, H, W)` in [-1, 1] with C = 1 or 3, as a tensor or array; values outside
    the range are clipped. Each image is enlarged by the integer factor ceil(min_size / H)
    with nearest-neighbour interpolation, so pixels stay sharp. Returns the path.
    """
    if not torch.is_tensor(images):
        images = torch.from_numpy(np.asarray(images))
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()

    scale = max(1, math.ceil(min_size / images.shape[-2]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=padding, pad_value=1.0)

    path = Path(path)
    with atomic_path(path) as temporary:
        save_image(grid, temporary, format="png")
    logger.info("wrote a grid of %d images to '%s'", images.shape[0], path)
    return path
