"""Generation stage: the <K>.npz file and its metadata, resume, --overwrite and two processes."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memgen import __version__
from memgen.checkpoint import load_model, save_checkpoint
from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.errors import MemgenError
from memgen.figures import save_image_grid
from memgen.files import load_npz, read_meta, save_npz
from memgen.generate import GenerateOptions, generate, plan_batches
from memgen.sampling import sample_images
from memgen.unet import build_unet

from conftest import REPO

K = 16
TINY_MODEL = ModelOptions(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                          num_res_blocks=1, dropout=0.0)
# Subprocesses run on one thread each, like this test process, so that every batch rounds alike.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A native checkpoint of a random 8x8 UNet, K = 16, T = 50, EMA weights unlike the raw ones."""
    torch.manual_seed(0)
    network = build_unet(TINY_MODEL)
    raw_state = {name: value.clone() for name, value in network.state_dict().items()}
    ema_state = {name: value * 0.5 for name, value in network.state_dict().items()}
    options = {"data": DataOptions(data_path="/nonexistent", data_name="fashionmnist"),
               "train": TrainOptions(train_size=K, timesteps=50, global_seed=11, centercrop=False),
               "model": TINY_MODEL}
    path = tmp_path_factory.mktemp("ckpt") / f"{K}.pt"
    return save_checkpoint(path, options, raw_state, ema_state, None, 7, None)


def make_options(checkpoint: Path, result: Path, **changes) -> GenerateOptions:
    options = GenerateOptions(ckpt_path=str(checkpoint), result_path=str(result), num_samples=6, batch_size=4,
                              sampler="ddim", steps=5, eta=1.0, seed=5, device="cpu")
    return replace(options, **changes)


def expected_samples(checkpoint: Path, indices, seed=5, sampler="ddim", steps=5, eta=1.0, use_ema=True):
    loaded = load_model(checkpoint, "cpu", use_ema=use_ema)
    return sample_images(loaded.network, loaded.schedule, loaded.image_shape, indices, seed, sampler,
                         steps=steps, eta=eta).numpy()


def run_script(*arguments, env=ONE_THREAD, **kwargs):
    return subprocess.run([sys.executable, str(REPO / "run_generate.py"), *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)


def test_generate_writes_samples_and_meta(checkpoint, tmp_path):
    result = tmp_path / "samples"
    path = generate(make_options(checkpoint, result))

    assert path == result / f"{K}.npz"
    arrays = load_npz(path, required=["samples", "meta"])
    samples = arrays["samples"]
    assert samples.dtype == np.float32
    assert samples.shape == (6, 1, 8, 8)
    assert samples.min() >= -1
    assert samples.max() <= 1
    # Batches [0, 4) and [4, 6), drawn exactly as sample_images draws them.
    assert np.array_equal(samples[:4], expected_samples(checkpoint, range(0, 4)))
    assert np.array_equal(samples[4:], expected_samples(checkpoint, range(4, 6)))

    assert read_meta(arrays) == {
        "data_name": "fashionmnist", "data_path": "/nonexistent", "train_size": K, "seed": 11, "image_size": 8,
        "in_channels": 1,
        "centercrop": False, "sampler": "ddim", "steps": 5, "eta": 1.0, "sample_seed": 5, "num_samples": 6,
        "ckpt_path": str(checkpoint.resolve()), "iteration": 7, "checkpoint_kind": "memgen-unet",
        "use_ema": True, "memgen_version": __version__,
    }
    assert sorted(p.name for p in result.iterdir()) == [f"{K}.npz", f"{K}.png"]


def test_generate_grid_png(checkpoint, tmp_path):
    result = tmp_path / "samples"
    generate(make_options(checkpoint, result, num_samples=3))

    with Image.open(result / f"{K}.png") as image:
        # Three 8x8 images enlarged 8 times to 64x64, in one row with 2-pixel padding.
        assert image.size == (3 * 64 + 4 * 2, 64 + 2 * 2)


def test_generate_ddpm_raw_weights(checkpoint, tmp_path):
    path = generate(make_options(checkpoint, tmp_path, num_samples=2, sampler="ddpm", steps=None,
                                 use_ema=False))
    arrays = load_npz(path)
    meta = read_meta(arrays)

    assert meta["sampler"] == "ddpm"
    assert meta["steps"] == 50
    assert meta["eta"] is None
    assert meta["use_ema"] is False
    expected = expected_samples(checkpoint, range(2), sampler="ddpm", steps=None, use_ema=False)
    assert np.array_equal(arrays["samples"], expected)


def test_generate_from_released_checkpoint(tmp_path):
    """The checkpoint in the released format of Pham et al. 2025 samples like a native one."""
    checkpoint = REPO / "tests" / "data" / "paper-checkpoint" / f"{K}.pt"
    path = generate(make_options(checkpoint, tmp_path, num_samples=2, steps=3))
    arrays = load_npz(path)
    meta = read_meta(arrays)

    assert meta["checkpoint_kind"] == "paper"
    assert meta["train_size"] == K
    assert meta["seed"] == 3407
    assert meta["iteration"] == 3
    assert np.array_equal(arrays["samples"], expected_samples(checkpoint, range(2), steps=3))


def test_batch_size_does_not_change_samples(checkpoint, tmp_path):
    four = load_npz(generate(make_options(checkpoint, tmp_path / "four")))["samples"]
    one = load_npz(generate(make_options(checkpoint, tmp_path / "one", batch_size=1)))["samples"]

    # Matrix products round differently per batch size, about 1e-6 per network call.
    assert np.abs(four - one).max() < 1e-5


def test_existing_file_kept_without_overwrite(checkpoint, tmp_path):
    path = generate(make_options(checkpoint, tmp_path))
    written = path.stat().st_mtime_ns

    generate(make_options(checkpoint, tmp_path))
    assert path.stat().st_mtime_ns == written

    generate(make_options(checkpoint, tmp_path, overwrite=True))
    assert read_meta(load_npz(path))["num_samples"] == 6
    assert path.stat().st_mtime_ns != written


def test_existing_file_with_other_settings_rejected(checkpoint, tmp_path):
    path = generate(make_options(checkpoint, tmp_path))
    written = path.stat().st_mtime_ns
    with pytest.raises(MemgenError, match="drawn with num_samples = 6, but this run asks for 9; pass --overwrite"):
        generate(make_options(checkpoint, tmp_path, num_samples=9))
    assert path.stat().st_mtime_ns == written


def test_resume_from_parts(checkpoint, tmp_path):
    reference = load_npz(generate(make_options(checkpoint, tmp_path / "reference")))

    # Leave the first batch of an interrupted run, with a marker value that shows it is reused,
    # and a temporary file that a killed writer would leave behind.
    result = tmp_path / "resumed"
    parts = result / f".{K}.parts"
    settings = {key: value for key, value in read_meta(reference).items() if key != "num_samples"}
    marker = np.full((4, 1, 8, 8), 0.25, np.float32)
    save_npz(parts / "batch-00000000-00000004.npz", meta={**settings, "start": 0, "end": 4}, samples=marker)
    (parts / ".batch-00000004-00000006.npz.abc.tmp").write_bytes(b"partial")

    samples = load_npz(generate(make_options(checkpoint, result)))["samples"]

    assert np.array_equal(samples[:4], marker)
    assert np.array_equal(samples[4:], reference["samples"][4:])
    assert not parts.exists()


def test_resume_with_other_batch_size(checkpoint, tmp_path):
    """Parts of batch size 4 finish under batch size 3: batches [4, 6) only, no overlap."""
    reference = load_npz(generate(make_options(checkpoint, tmp_path / "reference", num_samples=10)))
    settings = {key: value for key, value in read_meta(reference).items() if key != "num_samples"}
    result = tmp_path / "resumed"
    parts = result / f".{K}.parts"
    for start, end in ((0, 4), (8, 10)):
        save_npz(parts / f"batch-{start:08d}-{end:08d}.npz", meta={**settings, "start": start, "end": end},
                 samples=reference["samples"][start:end])

    assert plan_batches(np.array([False] * 4 + [True] * 4 + [False] * 2), 3) == [(4, 7), (7, 8)]
    samples = load_npz(generate(make_options(checkpoint, result, num_samples=10, batch_size=3)))["samples"]
    assert np.abs(samples - reference["samples"]).max() < 1e-5


def test_resume_rejects_other_settings(checkpoint, tmp_path):
    result = tmp_path / "samples"
    parts = result / f".{K}.parts"
    reference = load_npz(generate(make_options(checkpoint, tmp_path / "reference")))
    settings = {key: value for key, value in read_meta(reference).items() if key != "num_samples"}
    save_npz(parts / "batch-00000000-00000004.npz", meta={**settings, "sample_seed": 6, "start": 0, "end": 4},
             samples=reference["samples"][:4])

    with pytest.raises(MemgenError, match="sample_seed = 6 but this run has 5; pass --overwrite"):
        generate(make_options(checkpoint, result))

    samples = load_npz(generate(make_options(checkpoint, result, overwrite=True)))["samples"]
    assert np.array_equal(samples, reference["samples"])


def test_plan_batches():
    assert plan_batches(np.ones(10, bool), 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_batches(np.zeros(3, bool), 4) == []
    assert plan_batches(np.array([True, False, True, True, True]), 2) == [(0, 1), (2, 4), (4, 5)]


@pytest.mark.parametrize("changes, message", [
    ({"num_samples": 0}, "--num-samples 0 is invalid"),
    ({"batch_size": 0}, "--batch-size 0 is invalid"),
    ({"seed": -1}, "--seed -1 is invalid"),
    ({"sampler": "ddpm", "steps": 5}, "--steps 5 does not apply to the DDPM sampler"),
    ({"steps": 51}, "--steps 51 is invalid for a schedule of 50 steps"),
])
def test_generate_rejects_bad_options(checkpoint, tmp_path, changes, message):
    with pytest.raises(MemgenError, match=message):
        generate(make_options(checkpoint, tmp_path, **changes))


def test_cli_missing_checkpoint(tmp_path):
    completed = run_script("--ckpt-path", str(tmp_path / "missing.pt"), "--result-path", str(tmp_path))

    assert completed.returncode == 2
    assert "checkpoint not found" in completed.stderr


def test_killed_run_resumes(checkpoint, tmp_path):
    """SIGKILL a run part-way, then rerun it: the finished batches are kept and the result is the same."""
    result = tmp_path / "samples"
    arguments = ["--ckpt-path", str(checkpoint), "--result-path", str(result), "--num-samples", "24",
                 "--batch-size", "2", "--sampler", "ddpm", "--seed", "5", "--device", "cpu"]
    parts = result / f".{K}.parts"
    process = subprocess.Popen([sys.executable, str(REPO / "run_generate.py"), *arguments], cwd=REPO,
                               env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(parts.glob("batch-*.npz"))) < 2 and process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("the generation subprocess wrote no part file within 120 s")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = sorted(path.name for path in parts.glob("batch-*.npz"))
    assert 2 <= len(finished) < 12
    assert not (result / f"{K}.npz").exists()

    generate(make_options(checkpoint, result, num_samples=24, batch_size=2, sampler="ddpm", steps=None))

    samples = load_npz(result / f"{K}.npz")["samples"]
    for index in (0, 1, 22, 23):
        expected = expected_samples(checkpoint, [index - index % 2, index - index % 2 + 1], sampler="ddpm",
                                    steps=None, eta=0.0)
        assert np.array_equal(samples[index], expected[index % 2]), f"sample {index} differs"
    assert not parts.exists()


def test_two_processes_match_one(checkpoint, tmp_path):
    """torchrun with two Gloo processes on CPU writes the same file as one process."""
    arguments = ["--ckpt-path", str(checkpoint), "--num-samples", "7", "--batch-size", "2",
                 "--sampler", "ddim", "--steps", "5", "--eta", "1.0", "--seed", "5", "--device", "cpu"]
    generate(make_options(checkpoint, tmp_path / "one", num_samples=7, batch_size=2))

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(REPO / "run_generate.py"), *arguments, "--result-path", str(tmp_path / "two")]
    double = subprocess.run(torchrun, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    assert "2 process" in double.stderr

    one = load_npz(tmp_path / "one" / f"{K}.npz")
    two = load_npz(tmp_path / "two" / f"{K}.npz")
    assert np.array_equal(one["samples"], two["samples"])
    meta_one, meta_two = read_meta(one), read_meta(two)
    assert meta_one == meta_two


def test_save_image_grid_scales_and_pads(tmp_path):
    images = np.linspace(-1, 1, 5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    images[0] = -1
    images[1] = 2
    path = save_image_grid(images, tmp_path / "grid.png", nrow=2, min_size=10)

    with Image.open(path) as image:
        # Scale ceil(10 / 4) = 3: 12x12 tiles, 2 columns and 3 rows with 2-pixel padding.
        assert image.size == (2 * 12 + 3 * 2, 3 * 12 + 4 * 2)
        pixels = np.asarray(image.convert("RGB"))
    # Image 0 is -1 (black), image 1 is clipped to 1 (white), the padding is white.
    assert pixels[2:14, 2:14].max() == 0
    assert pixels[2:14, 16:28].min() == 255
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[14:16, :].min() == 255
    assert list(tmp_path.iterdir()) == [path]
