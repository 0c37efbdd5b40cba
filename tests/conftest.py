"""Shared fixtures: tiny on-disk datasets, and one torch thread for the whole suite.

The networks in the tests are tiny, so a second thread gains little on the 2-core CI box
and makes steps many times slower whenever another process competes for the cores; the
subprocesses that tests start inherit OMP_NUM_THREADS=1 as well, so floats round alike.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


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


@pytest.fixture
def random_lpips(monkeypatch):
    """Make LPIPSEmbedding.from_pretrained build a seeded random AlexNet instead of ImageNet weights."""
    from memgen.lpips import LPIPSEmbedding, build_features

    torch.manual_seed(0)
    state = build_features("alex").state_dict()

    def from_random(network="alex", weights_path=None, allow_download=True):
        return LPIPSEmbedding.from_state_dict(network, state, source="random test weights")

    monkeypatch.setattr(LPIPSEmbedding, "from_pretrained", staticmethod(from_random))
    return from_random()
