"""The ideal memorizer: the exact optimal denoiser of the empirical training distribution.

For the K training images x_i, the minimiser of the denoising loss is

    E[x0 | x_t] = sum_i w_i(x_t) x_i,   w = softmax_i( -||x_t - sqrt(abar_t) x_i||^2 / (2 (1 - abar_t)) ),

so a sampler driven by it returns training images. It stands in for a trained network in
every stage (checkpoint format "memgen-ideal") and gives the classifier a known answer.
`write_ideal_checkpoints` writes such checkpoints for a sweep of K (make_ideal_checkpoint.py).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from memgen.config import PAPER_SEED
from memgen.diffusion import NoiseSchedule
from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir, skip_existing

logger = logging.getLogger(__name__)


class IdealDenoiser(nn.Module):
    """Predict x0 as the softmax-weighted mean of the training images (prediction_type "sample")."""

    prediction_type = "sample"

    def __init__(self, train_images: torch.Tensor, alphas_cumprod: torch.Tensor):
        """`train_images`: (K, C, H, W) in [-1, 1]; `alphas_cumprod`: (T,) of the noise schedule."""
        super().__init__()
        flat = train_images.reshape(len(train_images), -1).to(torch.float64)
        self.register_buffer("train_flat", flat)
        self.register_buffer("train_sq_norms", (flat ** 2).sum(dim=1))
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self.image_shape = tuple(train_images.shape[1:])

    def posterior_weights(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the softmax weights (B, K) of the training images given x_t (B, C, H, W)."""
        abar = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].unsqueeze(1)
        flat = x_t.reshape(len(x_t), -1).to(torch.float64)
        squared_distances = ((flat ** 2).sum(dim=1, keepdim=True) + abar * self.train_sq_norms
                             - 2 * abar.sqrt() * flat @ self.train_flat.T).clamp_min(0)
        return torch.softmax(-squared_distances / (2 * (1 - abar)), dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.posterior_weights(x_t, t) @ self.train_flat
        return x0.reshape(x_t.shape).to(x_t.dtype)


# --- checkpoints of the ideal memorizer for a sweep of K ---------------------------------


@dataclass
class IdealCheckpointOptions:
    """Options of make_ideal_checkpoint.py: which training sets get an ideal-memorizer checkpoint."""

    train_sizes: tuple[int, ...] = ()
    """K values: one checkpoint <result-path>/<K>.pt per K (for example --train-sizes 1 4 16)."""
    result_path: str = "results/checkpoints-ideal"
    """Folder for the <K>.pt files; later stages take it wherever they take trained checkpoints."""
    data_name: str = "fashionmnist"
    """Dataset: fashionmnist, mnist, cifar10, lsun-church, celeba, celebahq, imagefolder or npz."""
    data_path: str = "data"
    """Dataset root (or the .npz file for --data-name npz); stored as an absolute path in the checkpoint."""
    image_size: int | None = None
    """Side of the images in pixels; default: the dataset's own size. Another size needs --resize."""
    resize: bool = False
    """Allow an --image-size that differs from the dataset's own size (the images are resized to it)."""
    in_channels: int | None = None
    """Image channels (1 grey, 3 colour); default: the dataset's own. A different value is an error."""
    centercrop: bool = False
    """Centre-crop images to a square before resizing, as Pham et al. 2025 do for LSUN-Church."""
    seed: int = PAPER_SEED
    """Seed of the permutation whose first K images form the training set (as in training)."""
    timesteps: int = 1000
    """Number of diffusion steps T of the noise schedule the checkpoint is used with."""
    beta_schedule: str = "linear"
    """Noise schedule: linear (betas from 1e-4 to 0.02) or cosine."""
    overwrite: bool = False
    """Replace existing <K>.pt files instead of keeping them."""


def _check_train_sizes(train_sizes: Sequence[int]) -> list[int]:
    if not train_sizes:
        raise MemgenError("no --train-sizes given; pass one or more K values, e.g. --train-sizes 1 4 16")
    invalid = [k for k in train_sizes if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if invalid:
        raise MemgenError(f"--train-sizes {list(train_sizes)} contains {invalid}; every K must be a "
                          "positive integer")
    return sorted(set(train_sizes))


def check_image_format(data_name: str, data_path: str | Path, image_size: int | None, in_channels: int | None,
                       resize: bool, centercrop: bool) -> tuple[int, int, int]:
    """Open the dataset and check the requested image format against its first image.

    Returns `(number of training images N, image_size, in_channels)`, where a None request
    takes the dataset's own value. Raises MemgenError when the dataset is missing, when
    `in_channels` differs from the dataset's, or when `image_size` differs from its size
    without `resize` (a non-square dataset needs `image_size` and `centercrop` or `resize`).
    """
    from memgen.data import load_dataset

    dataset = load_dataset(data_name, data_path, image_size=None, centercrop=centercrop, train=True)
    channels, height, width = dataset[0].shape
    if in_channels is not None and in_channels != channels:
        raise MemgenError(f"--in-channels {in_channels} does not match {data_name} in '{data_path}', whose "
                          f"images have {channels} channel(s); pass --in-channels {channels} or omit it")
    if image_size is None:
        if height != width:
            raise MemgenError(f"{data_name} in '{data_path}' has non-square {height}x{width} images; pass "
                              "--image-size with --centercrop (or --resize) to make them square")
        image_size = height
    elif (height, width) != (image_size, image_size) and not resize:
        raise MemgenError(f"--image-size {image_size} does not match {data_name} in '{data_path}', whose "
                          f"images are {height}x{width}" + (" after the centre crop" if centercrop else "")
                          + f"; omit --image-size to keep them, or pass --resize to resize them to {image_size}")
    return len(dataset), int(image_size), int(channels)


def write_ideal_checkpoints(options: IdealCheckpointOptions) -> list[Path]:
    """Write `<result_path>/<K>.pt` ideal-memorizer checkpoints, one per K of `options.train_sizes`.

    Each file records the dataset, K, the seed and the noise schedule; `memgen.checkpoint.
    load_model` rebuilds the K training images from them and returns an `IdealDenoiser`.
    Existing files are kept unless `options.overwrite`. Raises MemgenError when the dataset
    is missing, a K exceeds its N images, or the image format does not match it.
    """
    from memgen.checkpoint import save_ideal_checkpoint
    from memgen.config import DataOptions, ModelOptions, TrainOptions

    train_sizes = _check_train_sizes(options.train_sizes)
    data_path = Path(options.data_path).expanduser().resolve()
    count, image_size, in_channels = check_image_format(options.data_name, data_path, options.image_size,
                                                        options.in_channels, options.resize, options.centercrop)
    too_large = [k for k in train_sizes if k > count]
    if too_large:
        raise MemgenError(f"--train-sizes {too_large} exceed the {count} training images of "
                          f"{options.data_name} in '{data_path}'; use K <= {count}")
    # Building the schedule checks --timesteps and --beta-schedule before any file is written.
    NoiseSchedule(timesteps=options.timesteps, beta_schedule=options.beta_schedule)

    result_path = ensure_writable_dir(options.result_path)
    written = []
    for k in train_sizes:
        path = result_path / f"{k}.pt"
        if skip_existing(path, options.overwrite):
            written.append(path)
            continue
        sections = {
            "data": DataOptions(data_path=str(data_path), results_path=str(result_path),
                                data_name=options.data_name),
            "train": TrainOptions(train_size=k, global_seed=options.seed, centercrop=options.centercrop,
                                  prediction_type=IdealDenoiser.prediction_type, timesteps=options.timesteps,
                                  beta_schedule=options.beta_schedule, iterations=0),
            "model": ModelOptions(image_size=image_size, in_channels=in_channels),
        }
        save_ideal_checkpoint(path, sections)
        logger.info("wrote the ideal-memorizer checkpoint '%s' (%s, K = %d, seed %d, %dx%d, %d channel(s))",
                    path, options.data_name, k, options.seed, image_size, image_size, in_channels)
        written.append(path)
    return written
