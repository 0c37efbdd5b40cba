"""Critical times against the ideal memorizer, whose basins are known.

With K = 1 the ideal memorizer predicts its one training image from any x_t, so that
image is recovered at every step and its critical time is the last scanned step, while an
image far from it is never recovered. With K = 4 close images the basins break part-way,
and the scan and the bisection must reproduce the critical times defined from a brute-force
table of every (image, trial, step) outcome. Steps are few (T = 100) so the tests run fast.
"""

import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from memgen.config import parse_sections
from memgen.critical_times import (CriticalTimesOptions, RecoveryProbe, find_critical_times, l2_distance,
                                   lpips_distance, run_critical_times, scan_grid, trial_seed)
from memgen.diffusion import NoiseSchedule
from memgen.errors import MemgenError
from memgen.files import load_npz, read_meta, save_npz
from memgen.ideal import IdealDenoiser
from memgen.pairing import pair_by_k

from conftest import REPO
from probe_inputs import (data_meta, training_images, write_class_file, write_dataset, write_ideal_sweep)

T = 100
STRIDE = 10
DDIM_STEPS = 20
DELTA = 0.1
# Scanned steps 1, 11, ..., 91: the last is 1 + stride * floor((T - 2) / stride).
LAST_STEP = 1 + STRIDE * ((T - 2) // STRIDE)



def random_images(count: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * (torch.rand(count, 1, 8, 8, generator=generator) * 2 - 1)


def ideal_model(train: torch.Tensor) -> tuple[IdealDenoiser, NoiseSchedule]:
    schedule = NoiseSchedule(timesteps=T, prediction_type="sample")
    return IdealDenoiser(train, schedule.alphas_cumprod), schedule


def measure(images, network, schedule, **settings):
    options = dict(p_trials=3, stride=STRIDE, ddim_steps=DDIM_STEPS, delta=DELTA, seed=5, batch_size=64)
    options.update(settings)
    return find_critical_times(network, schedule, images, l2_distance(images), **options)


def expected_radius(image: torch.Tensor, image_index: int, trial: int, t: int, schedule, seed: int) -> float:
    """||x_t - x0|| written from q_sample with the trial's noise drawn again from its seed."""
    noise = torch.randn((1, *image.shape), generator=torch.Generator().manual_seed(trial_seed(seed, image_index, trial)))
    abar = float(schedule.alphas_cumprod[t])
    x_t = math.sqrt(abar) * image + math.sqrt(1 - abar) * noise[0]
    return float((x_t - image).norm())


def test_scan_grid_ends_at_last_step():
    grid = scan_grid(T, STRIDE)
    assert grid[0] == 1
    assert grid[-1] == LAST_STEP == 91
    assert len(grid) == 10
    assert scan_grid(1000, 25)[-1] == 976


def test_one_image_memorizer_known_times():
    train = random_images(1)
    far = -train
    images = torch.cat([train, far])
    network, schedule = ideal_model(train)

    for search in ("scan", "bisect"):
        result = measure(images, network, schedule, search=search)
        assert result.time.dtype == np.int64
        assert result.time.shape == (2, 3)
        assert np.all(result.time[0] == LAST_STEP)
        assert np.all(result.time[1] == 0)
        assert np.all(result.radius[1] == 0)
        for trial in range(3):
            expected = expected_radius(train[0], 0, trial, LAST_STEP, schedule, seed=5)
            assert result.radius[0, trial] == pytest.approx(expected, rel=1e-5)


def test_scan_and_bisect_evaluation_counts():
    """Network evaluations per trial (DDIM takes max(1, min(20, t)) steps from t):

    scan, training image: steps 1, 11, 21, ..., 91 cost 1 + 11 + 8 * 20 = 172;
    scan, far image: fails at t = 1, cost 1;
    bisect, training image: grid indices 4, 7, 8, 9 (t = 41, 71, 81, 91), cost 4 * 20 = 80;
    bisect, far image: grid indices 4, 1, 0 (t = 41, 11, 1), cost 20 + 11 + 1 = 32.
    """
    train = random_images(1)
    images = torch.cat([train, -train])
    network, schedule = ideal_model(train)
    trials = 3

    scan = measure(images, network, schedule, search="scan", p_trials=trials)
    bisect = measure(images, network, schedule, search="bisect", p_trials=trials)

    assert scan.evaluations == trials * (172 + 1)
    assert bisect.evaluations == trials * (80 + 32)
    np.testing.assert_array_equal(scan.time, bisect.time)


def brute_force_outcomes(probe: RecoveryProbe, count: int, trials: int, grid: list[int]) -> np.ndarray:
    """Evaluate every (image, trial) at every grid step: bool (count, trials, len(grid))."""
    rows = np.argwhere(np.ones((count, trials), dtype=bool))
    table = np.zeros((count, trials, len(grid)), dtype=bool)
    for index, t in enumerate(grid):
        table[:, :, index] = probe.recovered(rows, t).reshape(count, trials)
    return table


def reference_critical_times(table: np.ndarray, grid: list[int], p: float) -> np.ndarray:
    """Critical times from the definition, one trial at a time.

    First failure f of a trial: the first grid index it is not recovered at. The scan
    stops at the first index m where every image has fewer than a fraction p of its trials
    with f > m. A trial's critical time is the grid step before min(f, stop + 1), or 0.
    """
    count, trials, length = table.shape
    first_failure = np.full((count, trials), length)
    for image in range(count):
        for trial in range(trials):
            failures = np.flatnonzero(~table[image, trial])
            if len(failures):
                first_failure[image, trial] = failures[0]
    stop = length - 1
    for index in range(length):
        if all((first_failure[image] > index).sum() < p * trials for image in range(count)):
            stop = index
            break
    times = np.zeros((count, trials), dtype=np.int64)
    for image in range(count):
        for trial in range(trials):
            last = min(first_failure[image, trial], stop + 1) - 1
            times[image, trial] = grid[last] if last >= 0 else 0
    return times


def test_four_image_memorizer_matches_brute_force():
    train = random_images(4, scale=0.3)
    stranger = random_images(1, seed=9)
    images = torch.cat([train, stranger])
    network, schedule = ideal_model(train)
    trials, p = 4, 0.9
    grid = scan_grid(T, STRIDE)

    probe = RecoveryProbe(network, schedule, images, l2_distance(images), seed=5, ddim_steps=DDIM_STEPS,
                          eta=0.0, delta=DELTA, batch_size=64)
    table = brute_force_outcomes(probe, len(images), trials, grid)
    expected = reference_critical_times(table, grid, p)
    # Recovery along each trial's ray is monotone here (recovered, then failed for good),
    # which is the condition under which bisection must agree with the scan.
    monotone = np.all(np.diff(table.astype(int), axis=2) <= 0)
    assert monotone

    scan = measure(images, network, schedule, search="scan", p_trials=trials, p=p)
    bisect = measure(images, network, schedule, search="bisect", p_trials=trials, p=p)
    np.testing.assert_array_equal(scan.time, expected)
    np.testing.assert_array_equal(bisect.time, expected)
    np.testing.assert_array_equal(scan.radius, bisect.radius)
    assert bisect.evaluations < scan.evaluations

    # Every training image is an attractor that holds for part of the grid; the stranger
    # (not a training image) is never recovered.
    assert np.all(expected[4] == 0)
    assert np.all(expected[:4].mean(axis=1) >= 41)
    assert np.any(expected[:4] < LAST_STEP)


class TableProbe:
    """Stand-in for RecoveryProbe that looks outcomes up in a (count, trials, grid) table."""

    def __init__(self, table: np.ndarray, grid: list[int]):
        self.table = table
        self.grid = grid
        self.evaluations = 0

    def recovered(self, rows: np.ndarray, t: int) -> np.ndarray:
        self.evaluations += len(rows)
        return self.table[rows[:, 0], rows[:, 1], self.grid.index(t)]


def test_scan_keeps_first_failure_of_nonmonotone_trial():
    from memgen.critical_times import bisect_first_failures, scan_first_failures

    grid = [1, 11, 21, 31, 41]
    # One image, two trials: trial 0 fails at t = 11 and recovers afterwards; trial 1 never fails.
    table = np.array([[[True, False, True, True, True], [True, True, True, True, True]]])
    scan = scan_first_failures(TableProbe(table, grid), 1, 2, grid, p=0.9)
    np.testing.assert_array_equal(scan, [[1, 5]])
    # Bisection probes index 2 first, finds a recovery and never looks below it.
    bisect = bisect_first_failures(TableProbe(table, grid), 1, 2, grid)
    np.testing.assert_array_equal(bisect, [[5, 5]])


def test_stop_rule_caps_unbroken_trials():
    from memgen.critical_times import critical_times_from_failures

    grid = [1, 11, 21, 31]
    first_failure = np.array([[1, 4], [0, 2]])
    times, stop = critical_times_from_failures(first_failure, grid, p=0.9)
    # After index 1 each image has one of its two trials unbroken (0.5 < 0.9), so the scan
    # stops there and the unbroken trials keep t = 11 instead of 21 and 31.
    assert stop == 1
    np.testing.assert_array_equal(times, [[1, 11], [0, 11]])


def test_results_do_not_depend_on_batch_size():
    train = random_images(2, scale=0.3)
    images = torch.cat([train, random_images(1, seed=9)])
    network, schedule = ideal_model(train)

    for eta in (0.0, 0.5):
        results = [measure(images, network, schedule, eta=eta, p_trials=2, batch_size=size) for size in (1, 5)]
        for other in results[1:]:
            np.testing.assert_array_equal(results[0].time, other.time)
            np.testing.assert_array_equal(results[0].radius, other.radius)


def test_lpips_metric_on_one_image_memorizer():
    from memgen.lpips import LPIPSEmbedding

    try:
        embedding = LPIPSEmbedding.from_pretrained("alex", allow_download=False)
    except MemgenError as error:
        pytest.skip(f"no LPIPS AlexNet weights on this machine: {error}")
    train = random_images(1)
    # LPIPS rates two noise images as close (0.03 between x and -x), so the far image is flat grey.
    images = torch.cat([train, torch.zeros_like(train)])
    network, schedule = ideal_model(train)
    result = find_critical_times(network, schedule, images, lpips_distance(embedding, images, 64), p_trials=2,
                                 stride=STRIDE, ddim_steps=DDIM_STEPS, delta=DELTA, seed=5)
    assert np.all(result.time[0] == LAST_STEP)
    assert np.all(result.time[1] == 0)


@pytest.mark.parametrize("setting, value", [("p_trials", 0), ("stride", 0), ("ddim_steps", 0), ("delta", -1.0),
                                            ("eta", -0.5), ("p", 0.0), ("p", 1.5), ("search", "golden"),
                                            ("batch_size", 0)])
def test_invalid_settings_rejected(setting, value):
    train = random_images(1)
    network, schedule = ideal_model(train)
    with pytest.raises(MemgenError, match=setting.replace("_", "-") if setting != "p" else "--p "):
        measure(train, network, schedule, **{setting: value})


# --- the stage over a sweep of K -----------------------------------------------------------


@pytest.fixture
def sweep(tmp_path):
    """Ideal checkpoints for K = 1, 2, 4 and class files for K = 1, 4 and 5 (5 has no checkpoint)."""
    dataset = write_dataset(tmp_path)
    checkpoints = write_ideal_sweep(tmp_path / "checkpoints", dataset, (1, 2, 4), timesteps=T)
    classes = tmp_path / "memorized"
    stranger = random_images(1, seed=9)
    for k in (1, 4, 5):
        train = training_images(dataset, min(k, 4))
        write_class_file(classes / f"{k}.npz", top=torch.cat([train[:2], stranger]), least=stranger,
                         meta=data_meta(k))
    return {"dataset": dataset, "checkpoints": checkpoints, "classes": classes, "root": tmp_path}


# Scanned steps of the stage tests: 1, 31, 61, 91, so the last step is LAST_STEP as well.
STAGE_STRIDE = 30


def stage_options(sweep, result, *extra) -> CriticalTimesOptions:
    argv = ["--ckpt-path", str(sweep["checkpoints"]), "--result-path", str(result), "--data-path",
            str(sweep["dataset"]), "--metric", "l2", "--stride", str(STAGE_STRIDE), "--p-trials", "2",
            "--device", "cpu", *extra]
    return parse_sections({"critical_times": CriticalTimesOptions}, argv)["critical_times"]


def test_stage_writes_results_per_k(sweep):
    result = sweep["root"] / "times"
    written = run_critical_times(stage_options(sweep, result, "--sample-path", str(sweep["classes"])))

    assert [path.name for path in written] == ["1.npz", "4.npz"]
    assert not (result / "2.npz").exists()
    assert not (result / "5.npz").exists()
    assert (result / "critical_times.png").stat().st_size > 0

    arrays = load_npz(result / "1.npz", required=["time", "radius", "delta", "sample-indices"])
    meta = read_meta(arrays)
    # K = 1: row 0 is the one training image, row 1 a stranger.
    np.testing.assert_array_equal(arrays["time"], [[LAST_STEP] * 2, [0, 0]])
    assert arrays["time"].dtype == np.int64
    assert arrays["radius"].dtype == np.float32
    assert float(arrays["delta"]) == DELTA
    np.testing.assert_array_equal(arrays["sample-indices"], [0, 1])
    assert meta["K"] == 1
    assert meta["class"] == "memorized"
    assert meta["part"] == "top"
    assert meta["metric"] == "l2"
    assert meta["search"] == "scan"
    assert meta["stride"] == STAGE_STRIDE
    assert meta["p_trials"] == 2
    assert meta["sample_file"].endswith("memorized/1.npz")
    assert meta["checkpoint"].endswith("checkpoints/1.pt")
    assert meta["evaluations"] > 0

    k4 = load_npz(result / "4.npz")
    assert np.all(k4["time"][:2] > 0)
    assert np.all(k4["time"][2] == 0)


def test_stage_resumes_and_overwrites(sweep):
    result = sweep["root"] / "times"
    options = stage_options(sweep, result, "--sample-path", str(sweep["classes"]), "--final-idx", "1")
    assert [path.name for path in run_critical_times(options)] == ["1.npz"]
    first_write = (result / "1.npz").stat().st_mtime_ns

    resumed = run_critical_times(stage_options(sweep, result, "--sample-path", str(sweep["classes"])))
    assert [path.name for path in resumed] == ["4.npz"]
    assert (result / "1.npz").stat().st_mtime_ns == first_write

    again = run_critical_times(stage_options(sweep, result, "--sample-path", str(sweep["classes"]),
                                             "--start-idx", "1", "--overwrite", "true"))
    assert [path.name for path in again] == ["4.npz"]


def test_stage_least_part_and_training_images(sweep):
    least = sweep["root"] / "least"
    run_critical_times(stage_options(sweep, least, "--sample-path", str(sweep["classes"]), "--use-least", "true"))
    arrays = load_npz(least / "1.npz")
    np.testing.assert_array_equal(arrays["time"], [[0, 0]])
    np.testing.assert_array_equal(arrays["sample-indices"], [100])
    assert read_meta(arrays)["part"] == "least"

    training = sweep["root"] / "training"
    run_critical_times(stage_options(sweep, training, "--sample-size", "2", "--search", "bisect"))
    assert sorted(path.name for path in training.glob("*.npz")) == ["1.npz", "2.npz", "4.npz"]
    np.testing.assert_array_equal(load_npz(training / "1.npz")["time"], [[LAST_STEP] * 2])
    assert load_npz(training / "4.npz")["time"].shape == (2, 2)
    assert read_meta(load_npz(training / "4.npz"))["class"] == "training"


def test_training_probe_matches_subset(sweep):
    from memgen.pairing import first_training_images

    meta = data_meta(4)
    images = first_training_images(meta, sweep["dataset"], 3)
    torch.testing.assert_close(images, training_images(sweep["dataset"], 4)[:3], rtol=0, atol=0)
    assert len(first_training_images(meta, sweep["dataset"], -1)) == 4


def test_stage_skips_k_on_one_side(sweep, caplog):
    with caplog.at_level(logging.WARNING):
        pairs = pair_by_k(sweep["checkpoints"], sweep["classes"])
    assert [pair.k for pair in pairs] == [1, 4]
    assert "skipping K = 2" in caplog.text
    assert "skipping K = 5" in caplog.text


def test_stage_rejects_mismatched_metadata(sweep):
    save_npz(sweep["classes"] / "4.npz", meta=data_meta(4, seed=1), top=np.zeros((1, 1, 8, 8), np.float32),
             least=np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(MemgenError, match="seed"):
        run_critical_times(stage_options(sweep, sweep["root"] / "times", "--sample-path", str(sweep["classes"])))

    save_npz(sweep["classes"] / "4.npz", meta=data_meta(2), top=np.zeros((1, 1, 8, 8), np.float32),
             least=np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(MemgenError, match="records K = 2"):
        run_critical_times(stage_options(sweep, sweep["root"] / "times", "--sample-path", str(sweep["classes"])))


def test_stage_records_empty_class(sweep):
    empty = np.zeros((0, 1, 8, 8), np.float32)
    save_npz(sweep["classes"] / "4.npz", meta=data_meta(4), top=empty, least=empty)
    result = sweep["root"] / "times"
    run_critical_times(stage_options(sweep, result, "--sample-path", str(sweep["classes"])))
    assert load_npz(result / "4.npz")["time"].shape == (0, 2)
    assert (result / "critical_times.png").exists()


def test_script_reports_missing_checkpoint_path(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO / "run_critical_times.py"), "--result-path",
                                str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 2
    assert "--ckpt-path is required" in completed.stderr
