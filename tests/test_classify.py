"""Classification stage: the labelling rule, class files, thresholds, summary and figures."""

import json
import runpy
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from memgen.classify import (CLASSES, ClassifyOptions, PAPER_DELTA_M, PAPER_DELTA_S, class_order, classify,
                             label_samples, nearest_neighbour_quantile, split_top_least)
from memgen.data import load_training_images
from memgen.errors import MemgenError
from memgen.files import load_npz, read_meta, save_npz

from conftest import REPO, write_npz_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEMORIZED, SPURIOUS, GENERALIZED = range(3)
SEED = 0
SHAPE = (1, 4, 4)


# --- helpers: stand-ins for the generation and distance stages -------------------------


def brute_force_neighbours(queries, references, k, exclude_self=False):
    """Return (distances, indices) of the k nearest references by float64 L2, ties by index."""
    flat_queries = queries.reshape(len(queries), -1).astype(np.float64)
    flat_references = references.reshape(len(references), -1).astype(np.float64)
    distances = np.sqrt(((flat_queries[:, None] - flat_references[None]) ** 2).sum(axis=2))
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def write_samples(folder, k, samples, **meta_changes):
    meta = {"data_name": "npz", "train_size": k, "seed": SEED, "image_size": samples.shape[-1],
            "in_channels": samples.shape[1], "centercrop": False, "sampler": "ddim", "steps": 10,
            "num_samples": len(samples)}
    meta.update(meta_changes)
    return save_npz(folder / f"{k}.npz", meta=meta, samples=samples.astype(np.float32))


def write_distances(folder, k, data_dists, data_indices, synth_dists, synth_indices, metric="l2", **meta_changes):
    meta = {"metric": metric, "network": "alex" if metric == "lpips" else None, "k": data_dists.shape[1],
            "data_name": "npz", "train_size": k, "seed": SEED, "image_size": SHAPE[-1],
            "num_samples": len(data_dists)}
    meta.update(meta_changes)
    return save_npz(folder / f"{k}.npz", meta=meta, **{
        "data-dists": data_dists.astype(np.float32), "data-indices": data_indices.astype(np.int64),
        "synth-dists": synth_dists.astype(np.float32), "synth-indices": synth_indices.astype(np.int64)})


def write_brute_force_distances(folder, k, samples, train, neighbours=3, **meta_changes):
    data_dists, data_indices = brute_force_neighbours(samples, train, neighbours)
    synth_dists, synth_indices = brute_force_neighbours(samples, samples, neighbours, exclude_self=True)
    return write_distances(folder, k, data_dists, data_indices, synth_dists, synth_indices, **meta_changes)


@pytest.fixture
def dataset(tmp_path):
    images = np.random.default_rng(1).uniform(-1, 1, size=(8, *SHAPE)).astype(np.float32)
    return write_npz_dataset(tmp_path / "train.npz", images)


@pytest.fixture
def folders(tmp_path):
    paths = {name: tmp_path / name for name in ("samples", "dists", "classify")}
    for name in ("samples", "dists"):
        paths[name].mkdir()
    return paths


def planted_samples(train):
    """Two copies of training images, a near-identical pair and two distinct samples, far from the rest.

    Training images lie in [-1, 1]; the pair and the distinct samples are constant images
    at +/- 3 and 6 (outside the data range), so they are far from every training image.
    """
    copies = train[[2, 5]]
    pair = np.stack([np.full(SHAPE, 3.0), np.full(SHAPE, 3.0) + 0.01 * np.eye(4)[None]])
    distinct = np.stack([np.full(SHAPE, -3.0), np.full(SHAPE, 6.0)])
    return np.concatenate([copies, pair, distinct]).astype(np.float32)


def options_for(folders, dataset, **changes):
    values = dict(dist_path=str(folders["dists"]), eval_path=str(folders["samples"]), data_path=str(dataset),
                  result_path=str(folders["classify"]), delta_m=0.5, delta_s=0.5, k=3, grid_rows=0)
    values.update(changes)
    return ClassifyOptions(**values)


def read_class(folders, name, k):
    arrays = load_npz(folders["classify"] / "identified" / name / f"{k}.npz")
    return arrays, read_meta(arrays)


# --- the rule --------------------------------------------------------------------------


def test_boundary_included_in_float32():
    """float32(0.03) read from a file counts as exactly 0.03; the next float32 above does not."""
    at_m = np.float32(PAPER_DELTA_M)
    above_m = np.nextafter(at_m, np.float32(1))
    at_s = np.float32(PAPER_DELTA_S)
    above_s = np.nextafter(at_s, np.float32(1))
    far = np.float32(1)
    d_data = np.array([at_m, above_m, above_m, above_m], dtype=np.float32)
    d_synth = np.array([far, at_s, above_s, far], dtype=np.float32)
    labels = label_samples(d_data, d_synth, PAPER_DELTA_M, PAPER_DELTA_S)
    assert labels.tolist() == [MEMORIZED, SPURIOUS, GENERALIZED, GENERALIZED]


def test_boundary_included_in_float64():
    d_data = np.array([0.03, np.nextafter(0.03, 1), np.nextafter(0.03, 1)])
    d_synth = np.array([1.0, 0.02, np.nextafter(0.02, 1)])
    labels = label_samples(d_data, d_synth, 0.03, 0.02)
    assert labels.tolist() == [MEMORIZED, SPURIOUS, GENERALIZED]


def test_memorized_wins_over_spurious():
    labels = label_samples(np.array([0.0], np.float32), np.array([0.0], np.float32), 0.03, 0.02)
    assert labels.tolist() == [MEMORIZED]


def test_class_order_and_ties():
    d_data = np.array([0.3, 0.1, 0.9, 0.1, 0.5, 0.8, 0.7, 0.6], dtype=np.float32)
    d_synth = np.array([0.5, 0.9, 0.2, 0.4, 0.2, 0.6, 0.6, 0.9], dtype=np.float32)
    labels = np.array([MEMORIZED, MEMORIZED, SPURIOUS, MEMORIZED, SPURIOUS, GENERALIZED, GENERALIZED,
                       GENERALIZED])
    assert class_order(labels, d_data, d_synth, "memorized").tolist() == [1, 3, 0]
    assert class_order(labels, d_data, d_synth, "spurious").tolist() == [2, 4]
    assert class_order(labels, d_data, d_synth, "generalized").tolist() == [7, 5, 6]


def test_split_top_least():
    order = np.array([9, 4, 7, 1, 3, 0])
    top, least = split_top_least(order, 4, 3)
    assert top.tolist() == [9, 4, 7, 1]
    assert least.tolist() == [1, 3, 0]
    top, least = split_top_least(order, 10, 0)
    assert top.tolist() == [9, 4, 7, 1, 3, 0]
    assert least.tolist() == []
    top, least = split_top_least(order[:0], 4, 3)
    assert len(top) == 0
    assert len(least) == 0


# --- the stage on planted samples --------------------------------------------------------


def test_planted_samples_classified(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train)

    table = classify(options_for(folders, dataset))

    assert [row["K"] for row in table] == [8]
    assert (table[0]["memorized"], table[0]["spurious"], table[0]["generalized"]) == (2, 2, 2)
    memorized, meta = read_class(folders, "memorized", 8)
    assert memorized["top-indices"].tolist() == [0, 1]
    assert memorized["top-data-indices"][:, 0].tolist() == [2, 5]
    assert memorized["top-data-dists"][:, 0].tolist() == [0.0, 0.0]
    assert read_class(folders, "spurious", 8)[0]["top-indices"].tolist() == [2, 3]
    generalized = read_class(folders, "generalized", 8)[0]
    # Sample 5 (value 6) is farther from its nearest sample (value 3) than sample 4 (value -3) is.
    assert generalized["top-indices"].tolist() == [5, 4]
    assert meta["class"] == "memorized"
    assert meta["K"] == 8
    assert meta["metric"] == "l2"
    assert (meta["delta_m"], meta["delta_s"]) == (0.5, 0.5)
    assert {key: meta[key] for key in ("data_name", "train_size", "seed", "image_size", "in_channels",
                                       "centercrop")} == {"data_name": "npz", "train_size": 8, "seed": SEED,
                                                          "image_size": 4, "in_channels": 1, "centercrop": False}


def make_ordered_run(folders, dataset, count=12):
    """Write samples whose top-1 distances are set directly; return (train, samples, distances)."""
    rng = np.random.default_rng(2)
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = rng.uniform(-1, 1, size=(count, *SHAPE)).astype(np.float32)
    d_data = np.sort(rng.uniform(0.0, 0.04, size=(count, 3)), axis=1)
    d_synth = np.sort(rng.uniform(0.0, 0.1, size=(count, 3)), axis=1)
    data_indices = rng.integers(0, 8, size=(count, 3))
    synth_indices = (np.arange(count)[:, None] + rng.integers(1, count, size=(count, 3))) % count
    write_samples(folders["samples"], 8, samples)
    write_distances(folders["dists"], 8, d_data, data_indices, d_synth, synth_indices, metric="lpips")
    return train, samples, load_npz(folders["dists"] / "8.npz")


def test_class_file_order_and_parts(folders, dataset):
    train, samples, distances = make_ordered_run(folders, dataset)
    classify(options_for(folders, dataset, delta_m=None, delta_s=None, top_size=3, least_size=2))

    d_data = distances["data-dists"][:, 0]
    d_synth = distances["synth-dists"][:, 0]
    expected_labels = np.where(d_data <= np.float32(0.03), MEMORIZED,
                               np.where(d_synth <= np.float32(0.02), SPURIOUS, GENERALIZED))
    keys = {"memorized": d_data, "spurious": d_synth, "generalized": -d_synth.astype(np.float64)}
    for code, name in enumerate(CLASSES):
        members = np.flatnonzero(expected_labels == code)
        order = members[np.argsort(keys[name][members], kind="stable")]
        arrays, meta = read_class(folders, name, 8)
        assert int(arrays["size"]) == len(members)
        assert arrays["top-indices"].tolist() == order[:3].tolist()
        assert arrays["least-indices"].tolist() == order[max(len(order) - 2, 0):].tolist()
        assert int(arrays["top-size"]) == min(3, len(members))
        assert int(arrays["least-size"]) == min(2, len(members))
        for part in ("top", "least"):
            rows = arrays[f"{part}-indices"]
            assert arrays[part].dtype == np.float32
            np.testing.assert_array_equal(arrays[part], samples[rows])
            np.testing.assert_array_equal(arrays[f"{part}-data-dists"], distances["data-dists"][rows])
            np.testing.assert_array_equal(arrays[f"{part}-data-indices"], distances["data-indices"][rows])
            np.testing.assert_array_equal(arrays[f"{part}-synth-dists"], distances["synth-dists"][rows])
            np.testing.assert_array_equal(arrays[f"{part}-synth-indices"], distances["synth-indices"][rows])
            assert arrays[f"{part}-data-images"].shape == (len(rows), 3, *SHAPE)
            np.testing.assert_array_equal(arrays[f"{part}-data-images"], train[distances["data-indices"][rows]])
            np.testing.assert_array_equal(arrays[f"{part}-synth-images"], samples[distances["synth-indices"][rows]])
        assert (meta["delta_m"], meta["delta_s"]) == (PAPER_DELTA_M, PAPER_DELTA_S)
        assert meta["thresholds"] == "paper LPIPS default for delta_m and delta_s"
    assert sum(int(read_class(folders, name, 8)[0]["size"]) for name in CLASSES) == 12


def test_boundary_distance_in_file_is_memorized(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = train[:3] + 0.001
    at_m, above_m = np.float32(0.03), np.nextafter(np.float32(0.03), np.float32(1))
    d_data = np.array([[at_m], [above_m], [above_m]], dtype=np.float32)
    d_synth = np.array([[1.0], [np.float32(0.02)], [np.nextafter(np.float32(0.02), np.float32(1))]], np.float32)
    write_samples(folders["samples"], 8, samples)
    write_distances(folders["dists"], 8, d_data, np.array([[0], [1], [2]]), d_synth, np.array([[1], [2], [0]]),
                    metric="lpips")
    (row,) = classify(options_for(folders, dataset, delta_m=None, delta_s=None, k=1))
    assert (row["memorized"], row["spurious"], row["generalized"]) == (1, 1, 1)


def test_separate_synth_samples(folders, dataset, tmp_path):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)[:2]
    others = np.random.default_rng(3).uniform(-1, 1, size=(5, *SHAPE)).astype(np.float32)
    synth_folder = tmp_path / "synth"
    synth_folder.mkdir()
    write_samples(folders["samples"], 8, samples)
    write_samples(synth_folder, 8, others)
    data_dists, data_indices = brute_force_neighbours(samples, train, 2)
    synth_dists, synth_indices = brute_force_neighbours(samples, others, 2)
    write_distances(folders["dists"], 8, data_dists, data_indices, synth_dists, synth_indices)

    classify(options_for(folders, dataset, synth_path=str(synth_folder), k=2))
    arrays, meta = read_class(folders, "memorized", 8)
    np.testing.assert_array_equal(arrays["top-synth-images"], others[synth_indices])
    assert meta["synth_file"] == str((synth_folder / "8.npz").resolve())


# --- errors ----------------------------------------------------------------------------


def test_metadata_mismatch_names_both_files(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train, seed=SEED + 1)
    with pytest.raises(MemgenError) as error:
        classify(options_for(folders, dataset))
    message = str(error.value)
    assert str(folders["samples"] / "8.npz") in message
    assert str(folders["dists"] / "8.npz") in message
    assert "seed" in message


def test_sample_count_mismatch_names_both_files(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples[:5], num_samples=6)
    write_brute_force_distances(folders["dists"], 8, samples, train)
    with pytest.raises(MemgenError) as error:
        classify(options_for(folders, dataset))
    assert str(folders["samples"] / "8.npz") in str(error.value)
    assert str(folders["dists"] / "8.npz") in str(error.value)


def test_renamed_sample_file_rejected(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples, train_size=4)
    write_brute_force_distances(folders["dists"], 8, samples, train, train_size=4)
    with pytest.raises(MemgenError, match="records train_size = 4 but is named 8.npz"):
        classify(options_for(folders, dataset))


def test_one_sided_k_rejected(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples)
    write_samples(folders["samples"], 16, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train)
    with pytest.raises(MemgenError) as error:
        classify(options_for(folders, dataset))
    assert str(folders["samples"] / "16.npz") in str(error.value)
    assert str(folders["dists"] / "16.npz") in str(error.value)


def test_l2_without_thresholds_rejected(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train)
    with pytest.raises(MemgenError, match="l2 metric, which has no default thresholds.*--calibrate"):
        classify(options_for(folders, dataset, delta_m=None, delta_s=None))
    with pytest.raises(MemgenError, match="--delta-s is missing"):
        classify(options_for(folders, dataset, delta_s=None))
    assert not (folders["classify"] / "identified").exists()


def test_too_few_neighbours_rejected(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train, neighbours=2)
    with pytest.raises(MemgenError, match="has 2 neighbours per sample but --k is 3"):
        classify(options_for(folders, dataset))


# --- calibration -----------------------------------------------------------------------


# Constant 2x2 images: the L2 distance between values a and b is 2 |a - b|, so the
# nearest-neighbour distances are 2 x [0.125, 0.125, 0.375, 0.25, 0.25, 0.75].
PLANTED_VALUES = [-1.0, -0.875, -0.5, 0.0, 0.25, 1.0]


@pytest.fixture
def planted_dataset(tmp_path):
    images = np.stack([np.full((1, 2, 2), value) for value in PLANTED_VALUES]).astype(np.float32)
    return write_npz_dataset(tmp_path / "planted.npz", images)


def test_quantile_is_lower_order_statistic():
    distances = np.array([0.25, 0.25, 0.75, 0.5, 0.5, 1.5])
    assert nearest_neighbour_quantile(distances, 0.0) == 0.25
    assert nearest_neighbour_quantile(distances, 0.5) == 0.5
    assert nearest_neighbour_quantile(distances, 0.99) == 0.75
    assert nearest_neighbour_quantile(distances, 1.0) == 1.5


@pytest.mark.parametrize("quantile, scale, expected_m", [(0.5, 0.5, 0.25), (0.0, 1.0, 0.25), (1.0, 0.5, 0.75)])
def test_calibration_planted_training_set(folders, planted_dataset, quantile, scale, expected_m):
    train = load_training_images("npz", planted_dataset, 6, SEED).numpy()
    samples = np.concatenate([train[:2], np.full((2, 1, 2, 2), 3.0, np.float32)])
    write_samples(folders["samples"], 6, samples)
    write_brute_force_distances(folders["dists"], 6, samples, train, neighbours=1, train_size=6,
                                image_size=2)

    (row,) = classify(options_for(folders, planted_dataset, delta_m=None, delta_s=None, k=1, calibrate=True,
                                  calibrate_quantile=quantile, calibrate_scale=scale, device="cpu"))
    assert row["delta_m"] == expected_m
    assert row["delta_s"] == pytest.approx(expected_m * 2 / 3, rel=1e-15)
    assert row["thresholds"] == "calibrated"
    assert f"{quantile:g}-quantile" in row["calibration"]
    assert "first 6 images" in row["calibration"]
    summary = json.loads((folders["classify"] / "summary.json").read_text())
    assert summary["rows"][0]["calibration"] == row["calibration"]
    assert read_class(folders, "memorized", 6)[1]["calibration"] == row["calibration"]


def test_calibration_lpips_matches_brute_force(folders, dataset, random_lpips):
    train = load_training_images("npz", dataset, 8, SEED)
    embedding = random_lpips.embed(train).numpy().astype(np.float64)
    squared = ((embedding[:, None] - embedding[None]) ** 2).sum(axis=2)
    np.fill_diagonal(squared, np.inf)
    expected_m = 0.5 * np.sort(squared.min(axis=1))[int(np.floor(0.25 * 7))]

    samples = planted_samples(train.numpy())
    write_samples(folders["samples"], 8, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train.numpy(), metric="lpips",
                                lpips_weights_id=random_lpips.weights_id)
    (row,) = classify(options_for(folders, dataset, delta_m=None, delta_s=None, calibrate=True,
                                  calibrate_quantile=0.25, calibrate_scale=0.5, device="cpu"))
    assert row["delta_m"] == pytest.approx(expected_m, rel=1e-9)
    assert row["delta_s"] == pytest.approx(expected_m * 2 / 3, rel=1e-9)
    assert "lpips distances" in row["calibration"]


def test_calibration_lpips_other_weights_rejected(folders, dataset, random_lpips):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train, metric="lpips", lpips_weights_id="0123abcd")
    with pytest.raises(MemgenError, match="differ from those of the distance files"):
        classify(options_for(folders, dataset, delta_m=None, delta_s=None, calibrate=True, device="cpu"))


def test_calibration_with_thresholds_rejected(folders, dataset):
    train = load_training_images("npz", dataset, 8, SEED).numpy()
    samples = planted_samples(train)
    write_samples(folders["samples"], 8, samples)
    write_brute_force_distances(folders["dists"], 8, samples, train)
    with pytest.raises(MemgenError, match="--calibrate derives both thresholds but --delta-m"):
        classify(options_for(folders, dataset, delta_s=None, calibrate=True))


def test_calibration_duplicates_rejected(folders, tmp_path):
    images = np.stack([np.full((1, 2, 2), value) for value in [0.0, 0.0, 0.5, 0.5, 1.0]]).astype(np.float32)
    dataset = write_npz_dataset(tmp_path / "duplicates.npz", images)
    train = load_training_images("npz", dataset, 5, SEED).numpy()
    write_samples(folders["samples"], 5, train)
    write_brute_force_distances(folders["dists"], 5, train, train, neighbours=1, train_size=5, image_size=2)
    with pytest.raises(MemgenError, match="duplicate images"):
        classify(options_for(folders, dataset, delta_m=None, delta_s=None, k=1, calibrate=True,
                             calibrate_quantile=0.0, device="cpu"))


# --- summary, figures, slices ------------------------------------------------------------


def write_sweep(folders, dataset, sizes=(2, 4, 8)):
    for k in sizes:
        train = load_training_images("npz", dataset, k, SEED).numpy()
        samples = planted_samples(load_training_images("npz", dataset, 8, SEED).numpy())
        samples[:2] = train[[0, k - 1]]
        write_samples(folders["samples"], k, samples)
        write_brute_force_distances(folders["dists"], k, samples, train, neighbours=2)


def check_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 200
    assert height >= 80


def test_summary_figures_and_grids(folders, dataset):
    write_sweep(folders, dataset)
    table = classify(options_for(folders, dataset, k=2, grid_rows=2))

    assert [row["K"] for row in table] == [2, 4, 8]
    for row in table:
        assert row["memorized"] + row["spurious"] + row["generalized"] == row["num_samples"] == 6
        assert row["memorized_fraction"] + row["spurious_fraction"] + row["generalized_fraction"] == 1.0
    csv_lines = (folders["classify"] / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("K,num_samples,memorized,spurious,generalized,")
    assert len(csv_lines) == 4
    summary = json.loads((folders["classify"] / "summary.json").read_text())
    assert summary["rows"] == table
    check_png(folders["classify"] / "fractions.png")
    for name in CLASSES:
        for k in (2, 4, 8):
            check_png(folders["classify"] / "grids" / f"{name}-{k}.png")


def test_slices_merge_into_one_summary(folders, dataset):
    write_sweep(folders, dataset)
    classify(options_for(folders, dataset, k=2, start_idx=1, final_idx=2))
    table = classify(options_for(folders, dataset, k=2, start_idx=2))
    assert [row["K"] for row in table] == [4, 8]
    table = classify(options_for(folders, dataset, k=2, final_idx=1))
    assert [row["K"] for row in table] == [2, 4, 8]
    assert sorted(path.name for path in (folders["classify"] / "identified" / "spurious").iterdir()) == [
        "2.npz", "4.npz", "8.npz"]


def test_other_thresholds_need_overwrite(folders, dataset):
    write_sweep(folders, dataset, sizes=(2, 4))
    classify(options_for(folders, dataset, k=2))
    with pytest.raises(MemgenError, match="made with delta_m = 0.5.*pass --overwrite"):
        classify(options_for(folders, dataset, k=2, delta_m=0.25))
    shutil.rmtree(folders["classify"] / "identified")
    with pytest.raises(MemgenError, match="row for K = 2 with l2 thresholds.*pass --overwrite"):
        classify(options_for(folders, dataset, k=2, delta_m=0.25, start_idx=1))
    assert not (folders["classify"] / "identified").exists()
    table = classify(options_for(folders, dataset, k=2, delta_m=0.25, overwrite=True))
    assert [row["delta_m"] for row in table] == [0.25, 0.25]


def test_existing_class_file_kept(folders, dataset):
    write_sweep(folders, dataset, sizes=(2,))
    options = options_for(folders, dataset, k=2, grid_rows=2)
    classify(options)
    path = folders["classify"] / "identified" / "memorized" / "2.npz"
    grid = folders["classify"] / "grids" / "memorized-2.png"
    written = path.stat().st_mtime_ns
    grid.unlink()
    classify(options)
    assert path.stat().st_mtime_ns == written
    check_png(grid)
    classify(replace(options, overwrite=True))
    assert path.stat().st_mtime_ns != written


def test_kept_class_file_from_other_samples(folders, dataset):
    write_sweep(folders, dataset, sizes=(2,))
    options = options_for(folders, dataset, k=2)
    classify(options)
    samples_path = folders["samples"] / "2.npz"
    arrays = load_npz(samples_path)
    save_npz(samples_path, meta=read_meta(arrays), samples=-arrays["samples"])
    with pytest.raises(MemgenError, match="made with inputs_digest = .*pass --overwrite"):
        classify(options)


def test_command_line_rejection_exits_2(folders, dataset, monkeypatch, capsys):
    write_sweep(folders, dataset, sizes=(2,))
    monkeypatch.setattr(sys, "argv", ["run_classify.py", "--dist-path", str(folders["dists"]), "--eval-path",
                                      str(folders["samples"]), "--result-path", str(folders["classify"])])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "run_classify.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert "pass --delta-m and --delta-s in l2 units, or --calibrate" in capsys.readouterr().err


# --- the whole chain on the ideal memorizer ----------------------------------------------


def test_ideal_memorizer_chain_all_memorized(tmp_path, monkeypatch):
    """Ideal-memorizer checkpoints -> run_generate -> run_distances (L2) -> run_classify: all memorized.

    The last DDIM step (abar = 1 after it) returns the predicted x0, which the ideal
    memorizer makes a training image, so every sample is a copy within float rounding.
    """
    from memgen.distances import DistanceOptions, compute_distances
    from memgen.generate import GenerateOptions, generate_samples
    from memgen.ideal import IdealCheckpointOptions, write_ideal_checkpoints
    from memgen.runtime import Distributed

    images = np.random.default_rng(4).uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32)
    dataset = write_npz_dataset(tmp_path / "tiny.npz", images)
    checkpoints = write_ideal_checkpoints(IdealCheckpointOptions(
        train_sizes=(2, 5), result_path=str(tmp_path / "ideal"), data_name="npz", data_path=str(dataset), seed=7))
    for checkpoint in checkpoints:
        generate_samples(GenerateOptions(ckpt_path=str(checkpoint), result_path=str(tmp_path / "samples"),
                                         num_samples=6, batch_size=6, sampler="ddim", steps=10, seed=0,
                                         device="cpu"), Distributed())
    compute_distances(DistanceOptions(synth_path=str(tmp_path / "samples"), data_path=str(dataset),
                                      result_path=str(tmp_path / "dists"), metric="l2", k=2, device="cpu"))

    monkeypatch.setattr(sys, "argv", [
        "run_classify.py", "--dist-path", str(tmp_path / "dists"), "--eval-path", str(tmp_path / "samples"),
        "--data-path", str(dataset), "--result-path", str(tmp_path / "classify"), "--delta-m", "1e-4",
        "--delta-s", "1e-4", "--k", "2", "--grid-rows", "3"])
    runpy.run_path(str(REPO / "run_classify.py"), run_name="__main__")

    summary = json.loads((tmp_path / "classify" / "summary.json").read_text())
    assert [row["K"] for row in summary["rows"]] == [2, 5]
    for row in summary["rows"]:
        assert (row["memorized"], row["spurious"], row["generalized"]) == (6, 0, 0)
        assert row["memorized_fraction"] == 1.0
    for k in (2, 5):
        memorized, meta = read_class({"classify": tmp_path / "classify"}, "memorized", k)
        train = load_training_images("npz", dataset, k, 7).numpy()
        np.testing.assert_allclose(memorized["top"], train[memorized["top-data-indices"][:, 0]], rtol=0, atol=1e-5)
        assert meta["seed"] == 7
        assert meta["train_size"] == k
        check_png(tmp_path / "classify" / "grids" / f"memorized-{k}.png")
    check_png(tmp_path / "classify" / "fractions.png")
