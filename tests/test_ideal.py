"""The ideal memorizer: posterior weights, its limits at small and large t, and its checkpoints."""

import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from memgen.checkpoint import load_model, read_checkpoint
from memgen.data import load_training_images
from memgen.diffusion import NoiseSchedule
from memgen.errors import MemgenError
from memgen.ideal import IdealCheckpointOptions, IdealDenoiser, write_ideal_checkpoints

from conftest import REPO, write_npz_dataset

TIMESTEPS = 1000


def random_images(count, shape=(1, 4, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, *shape, generator=generator) * 2 - 1


def reference_posterior_mean(x_t, abar, train):
    """E[x0 | x_t] for the empirical distribution, in float64 numpy, written from the formula."""
    flat_x = x_t.reshape(len(x_t), -1).double().numpy()
    flat_train = train.reshape(len(train), -1).double().numpy()
    squared = ((flat_x[:, None, :] - np.sqrt(abar) * flat_train[None, :, :]) ** 2).sum(axis=2)
    logits = -squared / (2 * (1 - abar))
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights, weights @ flat_train


@pytest.fixture
def denoiser():
    schedule = NoiseSchedule(timesteps=TIMESTEPS)
    train = random_images(6)
    return IdealDenoiser(train, schedule.alphas_cumprod), train, schedule


def test_weights_sum_to_one(denoiser):
    model, train, schedule = denoiser
    x_t = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for step in (0, 10, 500, TIMESTEPS - 1):
        weights = model.posterior_weights(x_t, torch.full((5,), step))
        assert weights.shape == (5, 6)
        assert torch.all(weights >= 0)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_matches_reference_formula(denoiser):
    model, train, schedule = denoiser
    x_t = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    for step in (5, 200, 700, TIMESTEPS - 1):
        abar = float(schedule.alphas_cumprod[step])
        expected_weights, expected_mean = reference_posterior_mean(x_t, abar, train)
        weights = model.posterior_weights(x_t, torch.full((4,), step)).numpy()
        np.testing.assert_allclose(weights, expected_weights, rtol=1e-9, atol=1e-12)
        output = model(x_t, torch.full((4,), step)).reshape(4, -1).numpy()
        np.testing.assert_allclose(output, expected_mean, rtol=0, atol=1e-6)


def test_small_t_returns_nearest_image_exactly(denoiser):
    model, train, schedule = denoiser
    abar = schedule.alphas_cumprod[0].float()
    noise = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    x_t = abar.sqrt() * train + (1 - abar).sqrt() * noise
    output = model(x_t, torch.zeros(6, dtype=torch.int64))
    assert output.dtype == torch.float32
    assert torch.equal(output, train)


def test_last_step_returns_nearly_the_mean(denoiser):
    """At t = T-1 the logits differ by at most s = (abar M^2 + 2 sqrt(abar) |x| M) / (1 - abar),
    M = max |x_i|, so K w_i lies in [exp(-s), exp(s)] and the output is the mean up to (e^s - 1) max|x_i|."""
    model, train, schedule = denoiser
    count = len(train)
    abar = float(schedule.alphas_cumprod[TIMESTEPS - 1])
    x_t = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    max_norm = float(train.reshape(count, -1).norm(dim=1).max())
    x_norms = x_t.reshape(8, -1).double().norm(dim=1).numpy()
    spread = (abar * max_norm ** 2 + 2 * np.sqrt(abar) * x_norms * max_norm) / (1 - abar)
    assert spread.max() < 0.2

    weights = model.posterior_weights(x_t, torch.full((8,), TIMESTEPS - 1)).numpy()
    assert np.all(count * weights >= np.exp(-spread)[:, None])
    assert np.all(count * weights <= np.exp(spread)[:, None])

    output = model(x_t, torch.full((8,), TIMESTEPS - 1)).double()
    deviation = (output - train.double().mean(dim=0)).abs().reshape(8, -1).max(dim=1).values.numpy()
    assert np.all(deviation <= (np.exp(spread) - 1) * float(train.abs().max()) + 1e-6)


# --- checkpoints --------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
    images = random_images(10, shape=(1, 8, 8), seed=5).numpy()
    return write_npz_dataset(tmp_path / "images.npz", images)


def ideal_options(dataset, tmp_path, **changes):
    values = dict(train_sizes=(1, 4), result_path=str(tmp_path / "ideal"), data_name="npz",
                  data_path=str(dataset), seed=11)
    values.update(changes)
    return IdealCheckpointOptions(**values)


def test_checkpoints_load_as_ideal_denoiser(dataset, tmp_path):
    paths = write_ideal_checkpoints(ideal_options(dataset, tmp_path, train_sizes=(4, 1)))
    assert [path.name for path in paths] == ["1.pt", "4.pt"]

    loaded = load_model(paths[1])
    assert isinstance(loaded.network, IdealDenoiser)
    assert loaded.kind == "memgen-ideal"
    assert loaded.prediction_type == "sample"
    assert loaded.train_size == 4
    assert loaded.seed == 11
    assert loaded.image_shape == (1, 8, 8)
    assert loaded.data_meta() == {"data_name": "npz", "train_size": 4, "seed": 11, "image_size": 8,
                                  "in_channels": 1, "centercrop": False}
    expected = load_training_images("npz", dataset, 4, 11).reshape(4, -1).double()
    assert torch.equal(loaded.network.train_flat, expected)


def test_checkpoint_records_absolute_data_path(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(dataset.parent)
    write_ideal_checkpoints(ideal_options(dataset.name, tmp_path, train_sizes=(2,)))
    config = read_checkpoint(tmp_path / "ideal" / "2.pt")["config"]
    assert config["data"]["data_path"] == str(dataset.resolve())
    assert config["train"]["prediction_type"] == "sample"


def test_existing_checkpoint_kept(dataset, tmp_path):
    write_ideal_checkpoints(ideal_options(dataset, tmp_path, train_sizes=(2,), seed=1))
    write_ideal_checkpoints(ideal_options(dataset, tmp_path, train_sizes=(2,), seed=2))
    assert read_checkpoint(tmp_path / "ideal" / "2.pt")["config"]["train"]["global_seed"] == 1
    write_ideal_checkpoints(ideal_options(dataset, tmp_path, train_sizes=(2,), seed=2, overwrite=True))
    assert read_checkpoint(tmp_path / "ideal" / "2.pt")["config"]["train"]["global_seed"] == 2


@pytest.mark.parametrize("changes, message", [
    ({"in_channels": 3}, "--in-channels 3 does not match npz"),
    ({"image_size": 16}, "--image-size 16 does not match npz"),
    ({"train_sizes": (4, 11)}, r"--train-sizes \[11\] exceed the 10 training images"),
    ({"train_sizes": ()}, "no --train-sizes given"),
    ({"train_sizes": (0, 2)}, r"contains \[0\]"),
    ({"beta_schedule": "quadratic"}, "beta_schedule 'quadratic' is not supported"),
])
def test_invalid_request_rejected(dataset, tmp_path, changes, message):
    with pytest.raises(MemgenError, match=message):
        write_ideal_checkpoints(ideal_options(dataset, tmp_path, **changes))
    assert not (tmp_path / "ideal").exists() or not any((tmp_path / "ideal").iterdir())


def test_missing_dataset_rejected(tmp_path):
    with pytest.raises(MemgenError, match="missing.npz"):
        write_ideal_checkpoints(ideal_options(tmp_path / "missing.npz", tmp_path))


def test_resize_allows_other_size(dataset, tmp_path):
    (path,) = write_ideal_checkpoints(ideal_options(dataset, tmp_path, train_sizes=(3,), image_size=4,
                                                    resize=True))
    loaded = load_model(path)
    assert loaded.image_shape == (1, 4, 4)
    assert loaded.network.train_flat.shape == (3, 16)


def test_command_line_writes_checkpoints(dataset, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "make_ideal_checkpoint.py"), "--train-sizes", "1", "3",
         "--data-name", "npz", "--data-path", str(dataset), "--result-path", str(tmp_path / "cli"),
         "--seed", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "cli").iterdir()) == ["1.pt", "3.pt"]


def test_command_line_rejection_exits_2(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["make_ideal_checkpoint.py", "--train-sizes", "1", "--data-name", "npz",
                                      "--data-path", str(dataset), "--in-channels", "3",
                                      "--result-path", str(tmp_path / "cli")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "make_ideal_checkpoint.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert "--in-channels 3 does not match" in capsys.readouterr().err
