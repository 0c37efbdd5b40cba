"""Shared fixtures: tiny on-disk datasets and a small CPU thread count for the 2-core CI box."""

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

torch.set_num_threads(2)


def write_npz_dataset(path: Path, images: np.ndarray) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as a dataset of the generic `npz` kind."""
    np.savez(path, images=images.astype(np.float32))
    return path


@pytest.fixture
def tiny_npz_dataset(tmp_path) -> Path:
    """Twelve 8x8 grey images with distinct random content, as an `npz` dataset."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32)
    return write_npz_dataset(tmp_path / "tiny.npz", images)
