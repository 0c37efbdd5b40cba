"""Killed runs: training, generation and distances resume to the result of an uninterrupted run.

Each test starts a stage script in a subprocess, kills it with SIGKILL in the middle of
writing a result file, reruns the stage and compares every result with an uninterrupted
run, array for array. While the killed run works, the test reads every file that appears
under a final name and checks that it loads completely. To kill inside a write at a
known moment, the subprocess runs the real script through `runpy` with
`memgen.files.atomic_path` slowed down: the temporary file is complete, and the script
waits WRITE_DELAY seconds before renaming it.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.distances import DistanceOptions, compute_distances
from memgen.energy import EnergyOptions, run_energy
from memgen.files import load_npz, read_meta
from memgen.generate import GenerateOptions, generate
from memgen.ideal import IdealCheckpointOptions, write_ideal_checkpoints
from memgen.train import train

from conftest import REPO

WRITE_DELAY = 0.4
RUN_TIMEOUT = 240

# Runs a stage script with every atomic write held open for a while before its rename.
SLOW_WRITES = """
import contextlib, runpy, sys, time
import memgen.files

original_atomic_path = memgen.files.atomic_path
delay = float(sys.argv[1])

@contextlib.contextmanager
def slow_atomic_path(path):
    with original_atomic_path(path) as temporary:
        yield temporary
        time.sleep(delay)

memgen.files.atomic_path = slow_atomic_path
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""

TINY_MODEL = ModelOptions(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                          num_res_blocks=1, dropout=0.1)



@pytest.fixture
def dataset(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32))
    return path


def child_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "MEMGEN_CACHE": str(tmp_path / "cache"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


# --- watching a run ------------------------------------------------------------------------


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def final_files(folder: Path) -> list[Path]:
    """Files under a final name: everything except temporary files and logs, which grow in place."""
    if not folder.exists():
        return []
    return [path for path in folder.rglob("*")
            if path.is_file() and not is_temporary(path) and path.suffix not in (".log", ".csv", ".lock")]


def load_completely(path: Path) -> None:
    """Read every byte that a stage would read from `path`; raise if the file is partial."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                archive[name]
    elif path.suffix == ".pt":
        torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".png":
        with Image.open(path) as image:
            image.load()
    elif path.suffix == ".json":
        import json

        json.loads(path.read_text())
    else:
        raise AssertionError(f"no loader for '{path}'")


class Watcher:
    """Checks every version of every final-named file under `folder` once, while a run goes on."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.checked: set[tuple[str, int, int]] = set()
        self.partial: list[str] = []

    def check(self) -> None:
        for path in final_files(self.folder):
            try:
                status = path.stat()
            except FileNotFoundError:  # removed since the listing (a part folder after assembly)
                continue
            version = (str(path), status.st_size, status.st_mtime_ns)
            if version in self.checked:
                continue
            try:
                load_completely(path)
            except FileNotFoundError:
                continue
            except Exception as error:  # noqa: BLE001 - any failure to load is the finding
                self.partial.append(f"{path}: {error!r}")
            self.checked.add(version)


def kill_while_writing(script: str, args: list[str], folder: Path, target: str, tmp_path: Path) -> Watcher:
    """Run `script` with slow writes and SIGKILL it while the temporary file of `target` exists.

    `target` is the final file name (for example '6.pt'); the temporary file next to it is
    `.<target>.<random>.tmp`. Returns the watcher, whose `partial` list must stay empty.
    """
    command = [sys.executable, "-c", SLOW_WRITES, str(WRITE_DELAY), str(REPO / script), *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=child_env(tmp_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    watcher = Watcher(folder)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while process.poll() is None:
            watcher.check()
            if any(path.name.startswith(f".{target}.") for path in folder.rglob("*.tmp")):
                process.send_signal(signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{script} wrote no temporary file for '{target}' within {RUN_TIMEOUT} s")
            time.sleep(0.01)
        stderr = process.communicate()[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, f"{script} ended before the kill:\n{stderr}"
    watcher.check()
    return watcher


def assert_same_arrays(path: Path, expected_path: Path) -> None:
    arrays, expected = load_npz(path), load_npz(expected_path)
    assert sorted(arrays) == sorted(expected), path
    for name in expected:
        if name == "meta":
            assert read_meta(arrays, path) == read_meta(expected, expected_path), path
        else:
            assert np.array_equal(arrays[name], expected[name]), f"{path}: array '{name}' differs"


# --- training ----------------------------------------------------------------------------------


def training_options(dataset: Path, results: Path) -> dict:
    return {"data": DataOptions(data_name="npz", data_path=str(dataset), results_path=str(results)),
            "train": TrainOptions(train_size=8, iterations=12, global_batch_size=4, ckpt_every=3, log_every=1,
                                  grid_samples=4, grid_ddim_steps=2, timesteps=50, global_seed=5, device="cpu"),
            "model": TINY_MODEL}


def training_flags(dataset: Path, results: Path) -> list[str]:
    return ["--data-name", "npz", "--data-path", str(dataset), "--results-path", str(results),
            "--train-size", "8", "--iterations", "12", "--global-batch-size", "4", "--ckpt-every", "3",
            "--log-every", "1", "--grid-samples", "4", "--grid-ddim-steps", "2", "--timesteps", "50",
            "--global-seed", "5", "--device", "cpu", "--image-size", "8", "--in-channels", "1", "--dim", "16",
            "--dim-mults", "1", "2", "--attn-resolutions", "4", "--num-res-blocks", "1", "--dropout", "0.1"]


def loss_rows(path: Path) -> list[tuple[str, str]]:
    """Return (iteration, loss) of every row of loss.csv; the speed column differs between runs."""
    lines = path.read_text().splitlines()
    return [tuple(line.split(",")[:2]) for line in lines]


def test_killed_training_resumes_exactly(dataset, tmp_path):
    reference = tmp_path / "reference"
    train(**training_options(dataset, reference))

    results = tmp_path / "killed"
    flags = training_flags(dataset, results)
    watcher = kill_while_writing("train_unet.py", flags, results, "6.pt", tmp_path)
    checkpoints = results / "checkpoints"
    assert watcher.partial == []
    assert (checkpoints / "3.pt").is_file()
    assert not (checkpoints / "6.pt").exists()
    assert len(list(checkpoints.glob(".6.pt.*.tmp"))) == 1

    # The second run resumes at 3 and is killed after writing 9.pt, before its sample grid.
    watcher = kill_while_writing("train_unet.py", flags, results, "9.png", tmp_path)
    assert watcher.partial == []
    assert (checkpoints / "9.pt").is_file()
    assert not (results / "samples" / "9.png").exists()

    train(**training_options(dataset, results))

    for iteration in (3, 6, 9, 12):
        state = torch.load(checkpoints / f"{iteration}.pt", weights_only=True)
        expected = torch.load(reference / "checkpoints" / f"{iteration}.pt", weights_only=True)
        assert state["iteration"] == expected["iteration"] == iteration
        for part in ("model", "ema"):
            for name, tensor in expected[part].items():
                assert torch.equal(state[part][name], tensor), f"{iteration}.pt: {part} '{name}' differs"
        assert str(state["opt"]) == str(expected["opt"]), f"{iteration}.pt: optimizer state differs"
        assert torch.equal(state["rng"]["torch"], expected["rng"]["torch"])
    assert loss_rows(results / "logs" / "loss.csv") == loss_rows(reference / "logs" / "loss.csv")
    for grid in ("3.png", "6.png", "9.png", "12.png"):
        assert (results / "samples" / grid).read_bytes() == (reference / "samples" / grid).read_bytes(), grid


# --- generation --------------------------------------------------------------------------------


@pytest.fixture
def ideal_checkpoints(dataset, tmp_path) -> Path:
    folder = tmp_path / "checkpoints"
    write_ideal_checkpoints(IdealCheckpointOptions(train_sizes=(2, 4, 6, 8), result_path=str(folder),
                                                   data_name="npz", data_path=str(dataset), seed=0,
                                                   timesteps=50))
    return folder


def generate_options(checkpoint: Path, result: Path) -> GenerateOptions:
    return GenerateOptions(ckpt_path=str(checkpoint), result_path=str(result), num_samples=12, batch_size=2,
                           sampler="ddpm", seed=7, device="cpu")


def test_killed_generation_resumes_exactly(ideal_checkpoints, tmp_path):
    checkpoint = ideal_checkpoints / "4.pt"
    reference = tmp_path / "reference"
    generate(generate_options(checkpoint, reference))

    result = tmp_path / "samples"
    flags = ["--ckpt-path", str(checkpoint), "--result-path", str(result), "--num-samples", "12",
             "--batch-size", "2", "--sampler", "ddpm", "--seed", "7", "--device", "cpu"]
    watcher = kill_while_writing("run_generate.py", flags, result, "batch-00000004-00000006.npz", tmp_path)
    parts = sorted(path.name for path in (result / ".4.parts").glob("batch-*.npz"))
    assert watcher.partial == []
    assert parts == ["batch-00000000-00000002.npz", "batch-00000002-00000004.npz"]
    assert not (result / "4.npz").exists()

    # The second run draws the missing batches and is killed after writing 4.npz, before its grid.
    watcher = kill_while_writing("run_generate.py", flags, result, "4.png", tmp_path)
    assert watcher.partial == []
    assert (result / "4.npz").is_file()
    assert not (result / "4.png").exists()

    generate(generate_options(checkpoint, result))

    assert_same_arrays(result / "4.npz", reference / "4.npz")
    assert (result / "4.png").read_bytes() == (reference / "4.png").read_bytes()
    assert not (result / ".4.parts").exists()


# --- distances ---------------------------------------------------------------------------------


def test_killed_distances_resume_exactly(dataset, ideal_checkpoints, tmp_path):
    samples = tmp_path / "samples"
    for k in (2, 4, 6, 8):
        generate(GenerateOptions(ckpt_path=str(ideal_checkpoints / f"{k}.pt"), result_path=str(samples),
                                 num_samples=6, batch_size=6, sampler="ddim", steps=5, seed=7, device="cpu"))
    options = {"synth_path": str(samples), "data_path": str(dataset), "metric": "l2", "k": 3, "device": "cpu"}
    reference = tmp_path / "reference"
    compute_distances(DistanceOptions(result_path=str(reference), **options))

    result = tmp_path / "distances"
    flags = ["--synth-path", str(samples), "--data-path", str(dataset), "--result-path", str(result),
             "--metric", "l2", "--k", "3", "--device", "cpu"]
    watcher = kill_while_writing("run_distances.py", flags, result, "6.npz", tmp_path)
    assert watcher.partial == []
    assert sorted(path.name for path in result.glob("*.npz")) == ["2.npz", "4.npz"]

    compute_distances(DistanceOptions(result_path=str(result), **options))

    for k in (2, 4, 6, 8):
        assert_same_arrays(result / f"{k}.npz", reference / f"{k}.npz")


# --- relative energy ---------------------------------------------------------------------------


def test_energy_rerun_draws_missing_figure(dataset, ideal_checkpoints, tmp_path):
    """A run killed between `<K>.npz` and `energy_<K>.png` gets its figure from the rerun."""
    references = tmp_path / "references.npz"
    np.savez(references, images=np.load(dataset)["images"][:2])
    options = EnergyOptions(ref_path=str(references), ckpt_path=str(ideal_checkpoints / "4.pt"),
                            result_path=str(tmp_path / "energy"), sample_size=2, num_points=3, device="cpu")
    run_energy(options)
    figure = tmp_path / "energy" / "energy_4.png"
    expected = figure.read_bytes()
    figure.unlink()

    assert run_energy(options) == []
    assert figure.read_bytes() == expected
