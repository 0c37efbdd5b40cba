"""Speed options of training (bf16 autocast, channels-last, torch.compile) leave the loss unchanged.

Each option trains the same tiny UNet for 8 steps on the same data, noise and steps as a
float32 run, with dropout off so that only the arithmetic differs. The loss log has the
mean loss of steps 1-2, 3-4, 5-6 and 7-8, which vary by about 30 % from one interval to
the next, and every option must match float32 far inside that spread:

- bf16 autocast to a relative 1e-2 (bfloat16 keeps 8 significant bits, a relative
  rounding of 2^-9 = 0.2 % per product; the measured gap on a 2-core CPU is 0.07 %);
- channels-last and torch.compile to a relative 1e-4 (the same float32 arithmetic in
  another order; measured gaps are about 1e-6 and 0).
"""

from pathlib import Path

import numpy as np
import pytest

from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.errors import MemgenError
from memgen.train import train

TINY_MODEL = ModelOptions(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                          num_res_blocks=1, dropout=0.0)
BF16_RTOL = 1e-2
FP32_REORDER_RTOL = 1e-4


def logged_losses(dataset: Path, results: Path, **speed_options) -> np.ndarray:
    """Train the tiny UNet for 8 steps and return the mean loss of each 2-step log interval."""
    data = DataOptions(data_path=str(dataset), results_path=str(results), data_name="npz")
    training = TrainOptions(global_batch_size=4, iterations=8, log_every=2, ckpt_every=8, train_size=10,
                            lr=1e-3, grid_samples=0, timesteps=50, device="cpu", **speed_options)
    train(data, training, TINY_MODEL)
    rows = (results / "logs" / "loss.csv").read_text().splitlines()[1:]
    return np.array([float(row.split(",")[1]) for row in rows])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=rng.uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def fp32_losses(dataset, tmp_path_factory) -> np.ndarray:
    return logged_losses(dataset, tmp_path_factory.mktemp("fp32"))


def test_fp32_losses_logged(fp32_losses):
    assert fp32_losses.shape == (4,)
    assert np.all(np.isfinite(fp32_losses))


def test_bf16_autocast_matches_fp32(dataset, fp32_losses, tmp_path):
    losses = logged_losses(dataset, tmp_path, precision="bf16")
    np.testing.assert_allclose(losses, fp32_losses, rtol=BF16_RTOL)
    # bfloat16 rounding must show in the losses, otherwise autocast did not take effect.
    assert not np.array_equal(losses, fp32_losses)


def test_channels_last_matches_fp32(dataset, fp32_losses, tmp_path):
    losses = logged_losses(dataset, tmp_path, channels_last=True)
    np.testing.assert_allclose(losses, fp32_losses, rtol=FP32_REORDER_RTOL)


@pytest.mark.slow
def test_compile_matches_fp32(dataset, fp32_losses, tmp_path):
    # Compiling the tiny UNet's forward and backward took 270 s on a busy 2-core CPU; later
    # runs reuse inductor's on-disk cache and took 55 s.
    losses = logged_losses(dataset, tmp_path, compile=True)
    np.testing.assert_allclose(losses, fp32_losses, rtol=FP32_REORDER_RTOL)


def test_unknown_precision_rejected(dataset, tmp_path):
    with pytest.raises(MemgenError, match="--precision 'fp16' is not supported"):
        logged_losses(dataset, tmp_path / "run", precision="fp16")
    assert not (tmp_path / "run").exists()
