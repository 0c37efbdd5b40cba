"""The quick-start pipeline, reduced: real Fashion-MNIST, real LPIPS weights, every stage."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memgen.data import DEBIAN_FASHION_MNIST
from memgen.errors import MemgenError
from memgen.files import load_npz
from memgen.lpips import resolve_backbone_weights

from conftest import REPO

CLASSES = ("memorized", "spurious", "generalized")
KS = (2, 8)


def _real_inputs_missing() -> str | None:
    if not DEBIAN_FASHION_MNIST.is_dir() and not (REPO / "data" / "FashionMNIST" / "raw").is_dir():
        return "Fashion-MNIST is not installed; run `make data`"
    try:
        resolve_backbone_weights("alex", allow_download=False)
    except MemgenError as error:  # the message lists the places tried
        return f"LPIPS weights are not installed ({error}); run `make weights`"
    return None


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    reason = _real_inputs_missing()
    if reason:
        pytest.skip(reason)
    result = tmp_path_factory.mktemp("quickstart")
    command = [sys.executable, str(REPO / "run_pipeline.py"), "--config_path", str(REPO / "configs" / "quickstart.yaml"),
               "--data-path", str(REPO / "data"), "--result-path", str(result),
               "--train-sizes", *map(str, KS), "--iterations", "20", "--ckpt-every", "20", "--log-every", "10",
               "--grid-samples", "4", "--grid-ddim-steps", "2", "--num-samples", "12", "--sampler-steps", "5",
               "--critical-sample-size", "2", "--critical-p-trials", "2", "--critical-stride", "300",
               "--critical-ddim-steps", "2", "--energy-sample-size", "2", "--energy-references", "2",
               "--energy-num-points", "5"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return result, completed


def test_every_output_exists(pipeline_run):
    result, _ = pipeline_run
    for k in KS:
        assert (result / "checkpoints" / f"{k}.pt").is_file()
        assert (result / "samples" / f"{k}.npz").is_file()
        assert (result / "samples" / f"{k}.png").is_file()
        assert (result / "distances" / f"{k}.npz").is_file()
        for name in CLASSES:
            assert (result / "classify" / "identified" / name / f"{k}.npz").is_file()
    for name in ("summary.csv", "summary.json", "fractions.png"):
        assert (result / "classify" / name).is_file()
    assert (result / "report.md").is_file()


def _class_sizes(result: Path, k: int) -> dict[str, int]:
    return {name: int(load_npz(result / "classify" / "identified" / name / f"{k}.npz", required=["size"])["size"])
            for name in CLASSES}


def test_report_table_matches_class_files(pipeline_run):
    result, _ = pipeline_run
    report = (result / "report.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) % \| ([\d.]+) % \| ([\d.]+) % \|$", report, re.MULTILINE)
    assert [int(row[0]) for row in rows] == list(KS)
    for k, samples, *percentages in rows:
        sizes = _class_sizes(result, int(k))
        assert sum(sizes.values()) == int(samples) == 12
        for name, percentage in zip(CLASSES, percentages):
            assert float(percentage) == pytest.approx(100 * sizes[name] / 12, abs=0.05)


def test_report_figures_exist(pipeline_run):
    result, _ = pipeline_run
    report = (result / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "classify/fractions.png" in figures
    for figure in figures:
        assert (result / figure).is_file(), figure


def test_probing_stages_cover_present_classes(pipeline_run):
    result, _ = pipeline_run
    for name in CLASSES:
        present = [k for k in KS if _class_sizes(result, k)[name] > 0]
        for k in present:
            times = load_npz(result / "critical_times" / name / f"{k}.npz", required=["time", "radius"])["time"]
            assert times.shape == (min(2, _class_sizes(result, k)[name]), 2)
            potential = load_npz(result / "energy" / name / f"{k}.npz", required=["potential"])["potential"]
            assert potential.shape == (2, min(2, _class_sizes(result, k)[name]))
            assert np.isfinite(potential).all()


def test_rerun_skips_finished_work(pipeline_run):
    result, _ = pipeline_run
    before = {path: path.stat().st_mtime_ns for path in (result / "samples").glob("*.npz")}
    command = [sys.executable, str(REPO / "run_pipeline.py"), "--config_path", str(REPO / "configs" / "quickstart.yaml"),
               "--data-path", str(REPO / "data"), "--result-path", str(result),
               "--train-sizes", *map(str, KS), "--iterations", "20", "--ckpt-every", "20",
               "--num-samples", "12", "--sampler-steps", "5",
               "--critical-sample-size", "2", "--critical-p-trials", "2", "--critical-stride", "300",
               "--critical-ddim-steps", "2", "--energy-sample-size", "2", "--energy-references", "2",
               "--energy-num-points", "5"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "keeping the trained model" in completed.stderr
    after = {path: path.stat().st_mtime_ns for path in (result / "samples").glob("*.npz")}
    assert after == before
