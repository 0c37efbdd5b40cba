"""Stages run on a checkpoint in the paper's released format, passed as it is."""

import shutil
import subprocess
import sys

import numpy as np

from memgen.files import load_npz, read_meta

from conftest import DATA, REPO

FIXTURE = DATA / "paper-checkpoint" / "16.pt"


def run_script(*args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_generate_then_critical_times_on_release(tmp_path):
    ckpt_dir = tmp_path / "released"
    ckpt_dir.mkdir()
    shutil.copyfile(FIXTURE, ckpt_dir / "16.pt")

    run_script(REPO / "run_generate.py", "--ckpt-path", ckpt_dir / "16.pt", "--result-path", tmp_path / "samples",
               "--num-samples", "3", "--batch-size", "3", "--sampler", "ddim", "--steps", "4")
    samples = load_npz(tmp_path / "samples" / "16.npz", required=["samples"])
    assert samples["samples"].shape == (3, 1, 8, 8)
    assert read_meta(samples)["checkpoint_kind"] == "paper"

    run_script(REPO / "run_critical_times.py", "--ckpt-path", ckpt_dir, "--sample-path", tmp_path / "samples",
               "--result-path", tmp_path / "critical", "--metric", "l2", "--p-trials", "2", "--stride", "400",
               "--ddim-steps", "2", "--sample-size", "3")
    result = load_npz(tmp_path / "critical" / "16.npz", required=["time", "radius", "delta"])
    assert result["time"].shape == (3, 2)
    assert set(np.unique(result["time"])) <= {0, 1, 401, 801}
    assert read_meta(result)["K"] == 16
