"""Inputs for the stages that probe checkpoints per K: a tiny dataset, ideal-memorizer
checkpoints for a sweep of K, and class files in the layout of run_classify.py."""

from pathlib import Path

import numpy as np
import torch

from memgen.data import load_training_images
from memgen.files import save_npz
from memgen.ideal import IdealCheckpointOptions, write_ideal_checkpoints

IMAGE_SHAPE = (1, 8, 8)
DATASET_SIZE = 6
SEED = 0


def write_dataset(folder: Path) -> Path:
    """Write six random 8x8 grey images in [-1, 1] as an `npz` dataset."""
    generator = np.random.default_rng(0)
    images = generator.uniform(-1, 1, size=(DATASET_SIZE, *IMAGE_SHAPE)).astype(np.float32)
    path = folder / "dataset.npz"
    np.savez(path, images=images)
    return path


def write_ideal_sweep(folder: Path, dataset: Path, train_sizes: tuple[int, ...], timesteps: int) -> Path:
    """Write `<folder>/<K>.pt` ideal-memorizer checkpoints of the dataset for each K."""
    options = IdealCheckpointOptions(train_sizes=train_sizes, result_path=str(folder), data_name="npz",
                                     data_path=str(dataset), seed=SEED, timesteps=timesteps)
    write_ideal_checkpoints(options)
    return folder


def training_images(dataset: Path, k: int) -> torch.Tensor:
    return load_training_images("npz", dataset, k, SEED)


def data_meta(k: int, **changes) -> dict:
    """Return the metadata keys a class file of K carries for the test dataset."""
    meta = {"class": "memorized", "K": k, "data_name": "npz", "train_size": k, "seed": SEED,
            "image_size": IMAGE_SHAPE[-1], "in_channels": IMAGE_SHAPE[0], "centercrop": False}
    meta.update(changes)
    return meta


def write_class_file(path: Path, top: torch.Tensor, least: torch.Tensor, meta: dict) -> Path:
    """Write the arrays of a class file that the probing stages read."""
    return save_npz(path, meta=meta, top=top.numpy().astype(np.float32), least=least.numpy().astype(np.float32),
                    **{"top-indices": np.arange(len(top), dtype=np.int64),
                       "least-indices": np.arange(100, 100 + len(least), dtype=np.int64)})
