"""Training stage: EMA warm-up, data order, exact resume, two processes and real Fashion-MNIST."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memgen.checkpoint import load_model, read_checkpoint
from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.train import batch_indices, ema_decay_at, mix_seed, train

from conftest import REPO

TINY_MODEL = ModelOptions(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                          num_res_blocks=1, dropout=0.1)


def tiny_options(dataset: Path, results: Path, iterations: int, ckpt_every: int):
    data = DataOptions(data_path=str(dataset), results_path=str(results), data_name="npz")
    training = TrainOptions(global_batch_size=4, iterations=iterations, log_every=2, ckpt_every=ckpt_every,
                            train_size=10, lr=1e-3, grid_samples=4, grid_ddim_steps=2, timesteps=50,
                            device="cpu")
    return data, training, TINY_MODEL


def test_ema_warm_up_values():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert ema_decay_at(10 ** 6, 0.9999) == 0.9999


def test_batch_indices_cover_each_epoch_once():
    first_epoch = torch.cat([batch_indices(step, 10, 5, seed=1) for step in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, 10, 5, seed=1), batch_indices(3, 10, 5, seed=1))


def test_batch_indices_span_epochs():
    epoch0 = torch.randperm(7, generator=torch.Generator().manual_seed(mix_seed(0, 0)))
    epoch1 = torch.randperm(7, generator=torch.Generator().manual_seed(mix_seed(0, 1)))
    crossing = batch_indices(1, 7, 4, seed=0)
    assert crossing.tolist() == epoch0[4:].tolist() + epoch1[:1].tolist()


def test_resume_is_exact(tiny_npz_dataset, tmp_path):
    straight = tmp_path / "straight"
    train(*tiny_options(tiny_npz_dataset, straight, iterations=6, ckpt_every=3))
    resumed = tmp_path / "resumed"
    train(*tiny_options(tiny_npz_dataset, resumed, iterations=3, ckpt_every=3))
    train(*tiny_options(tiny_npz_dataset, resumed, iterations=6, ckpt_every=3))

    expected = read_checkpoint(straight / "checkpoints" / "6.pt")
    actual = read_checkpoint(resumed / "checkpoints" / "6.pt")
    for key in ("model", "ema"):
        for name, tensor in expected[key].items():
            assert torch.equal(tensor, actual[key][name]), f"{key}.{name} differs after resume"
    assert actual["iteration"] == 6


def test_outputs_written(tiny_npz_dataset, tmp_path):
    results = tmp_path / "run"
    data, training, model = tiny_options(tiny_npz_dataset, results, iterations=4, ckpt_every=2)
    training.final_ckpt_dir = str(tmp_path / "final")
    train(data, training, model)
    assert sorted(p.name for p in (results / "checkpoints").iterdir()) == ["2.pt", "4.pt"]
    assert sorted(p.name for p in (results / "samples").iterdir()) == ["2.png", "4.png"]
    assert (results / "logs" / "train.log").stat().st_size > 0
    assert (results / "logs" / "loss.csv").read_text().count("\n") == 3
    loaded = load_model(tmp_path / "final" / "10.pt")
    assert loaded.train_size == 10
    assert loaded.iteration == 4


def test_resume_rejects_other_architecture(tiny_npz_dataset, tmp_path):
    from memgen.errors import MemgenError

    data, training, model = tiny_options(tiny_npz_dataset, tmp_path / "run", iterations=2, ckpt_every=2)
    train(data, training, model)
    training.iterations = 4
    wider = ModelOptions(**{**TINY_MODEL.__dict__, "dim": 32})
    with pytest.raises(MemgenError, match="model.dim = 16"):
        train(data, training, wider)


def test_two_process_gloo_run(tiny_npz_dataset, tmp_path):
    results = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
               str(REPO / "train_unet.py"), "--data-name", "npz", "--data-path", str(tiny_npz_dataset),
               "--results-path", str(results), "--train-size", "10", "--global-batch-size", "4",
               "--iterations", "2", "--ckpt-every", "2", "--log-every", "1", "--image-size", "8", "--dim", "16",
               "--dim-mults", "1", "2", "--attn-resolutions", "4", "--num-res-blocks", "1",
               "--timesteps", "50", "--grid-samples", "2", "--grid-ddim-steps", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "2 processes, backend gloo" in completed.stderr
    loaded = load_model(results / "checkpoints" / "2.pt")
    assert loaded.iteration == 2


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir() and
                    not (REPO / "data" / "FashionMNIST" / "raw").is_dir(),
                    reason="Fashion-MNIST is not installed; run `make data`")
def test_real_fashion_mnist_cpu_config(tmp_path):
    command = [sys.executable, str(REPO / "train_unet.py"), "--config_path",
               str(REPO / "configs" / "fashionmnist-cpu.yaml"), "--data-path", str(REPO / "data"),
               "--results-path", str(tmp_path), "--iterations", "4", "--ckpt-every", "2",
               "--log-every", "2", "--grid-samples", "4", "--grid-ddim-steps", "2"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "4.pt").is_file()
    assert (tmp_path / "samples" / "4.png").is_file()
    assert "using device cpu" in completed.stderr


def test_validation_loss_logged(tmp_path):
    rng = np.random.default_rng(1)
    dataset = tmp_path / "split.npz"
    np.savez(dataset, images=rng.uniform(-1, 1, (10, 1, 8, 8)).astype(np.float32),
             test_images=rng.uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32))
    data, training, model = tiny_options(dataset, tmp_path / "run", iterations=2, ckpt_every=1)
    training.valid_size = 3
    train(data, training, model)
    rows = (tmp_path / "run" / "logs" / "valid.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["1", "2"]

    loaded = load_model(tmp_path / "run" / "checkpoints" / "2.pt")
    images = torch.from_numpy(np.load(dataset)["test_images"][:3])
    generator = torch.Generator().manual_seed(training.global_seed)
    t = torch.randint(0, 50, (3,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    with torch.no_grad():
        expected = loaded.schedule.training_loss(loaded.network, images, t, noise).item()
    assert float(rows[1].split(",")[1]) == pytest.approx(expected, abs=1e-6)
