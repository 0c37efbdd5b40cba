"""The distance stage end to end on a tiny npz dataset: results, shards, merge and input checks."""

import dataclasses
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memgen import distances as distances_module
from memgen.data import load_training_images
from memgen.distances import DistanceOptions, compute_distances, shard_path
from memgen.errors import MemgenError
from memgen.files import load_npz, read_meta, save_npz

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZE, SUBSET_SEED, NUM_SAMPLES = 9, 3, 10


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """A 14-image 8x8 grey npz dataset and a sample file 9.npz with planted copies.

    Sample 0 copies training-subset row 4, sample 1 copies row 0, and samples 5 and 6
    are equal, so their nearest neighbours are known at distance 0.
    """
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    dataset = tmp_path / "tiny.npz"
    np.savez(dataset, images=rng.uniform(-1, 1, size=(14, 1, 8, 8)).astype(np.float32))
    train = load_training_images("npz", dataset, TRAIN_SIZE, SUBSET_SEED, image_size=8).numpy()

    samples = rng.uniform(-1, 1, size=(NUM_SAMPLES, 1, 8, 8)).astype(np.float32)
    samples[0] = train[4]
    samples[1] = train[0]
    samples[6] = samples[5]
    samples[7] = np.clip(train[2] + 1e-3, -1, 1)
    meta = {"data_name": "npz", "train_size": TRAIN_SIZE, "seed": SUBSET_SEED, "image_size": 8,
            "in_channels": 1, "centercrop": False, "num_samples": NUM_SAMPLES}
    synth = tmp_path / "samples"
    save_npz(synth / "9.npz", meta=meta, samples=samples)
    return {"root": tmp_path, "dataset": dataset, "synth": synth, "samples": samples, "train": train, "meta": meta}


def options_for(run, result: str, **changes) -> DistanceOptions:
    options = DistanceOptions(synth_path=str(run["synth"]), data_path=str(run["dataset"]),
                              result_path=str(run["root"] / result), metric="l2", k=3, batch_size=4,
                              device="cpu")
    return dataclasses.replace(options, **changes)


def brute_force(queries: np.ndarray, references: np.ndarray, k: int, exclude_self: bool = False):
    """Squared float64 distances of every pair, ranked by (distance, index)."""
    queries = queries.reshape(len(queries), -1).astype(np.float64)
    references = references.reshape(len(references), -1).astype(np.float64)
    squared = ((queries[:, None] - references[None]) ** 2).sum(axis=2)
    if exclude_self:
        squared[np.arange(len(queries)), np.arange(len(queries))] = np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(references)), squared.shape), squared), axis=-1)[:, :k]
    return np.take_along_axis(squared, order, axis=1), order


def read_result(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays = load_npz(path, required=["data-dists", "data-indices", "synth-dists", "synth-indices"])
    return arrays, read_meta(arrays, path)


def test_l2_distances_match_brute_force(tiny_run):
    compute_distances(options_for(tiny_run, "l2"))
    arrays, meta = read_result(tiny_run["root"] / "l2" / "9.npz")

    data_squared, data_indices = brute_force(tiny_run["samples"], tiny_run["train"], 3)
    synth_squared, synth_indices = brute_force(tiny_run["samples"], tiny_run["samples"], 3, exclude_self=True)
    np.testing.assert_array_equal(arrays["data-indices"], data_indices)
    np.testing.assert_array_equal(arrays["synth-indices"], synth_indices)
    np.testing.assert_array_equal(arrays["data-dists"], np.sqrt(data_squared).astype(np.float32))
    np.testing.assert_array_equal(arrays["synth-dists"], np.sqrt(synth_squared).astype(np.float32))
    assert arrays["data-dists"].dtype == np.float32
    assert arrays["data-indices"].dtype == np.int64

    assert arrays["data-indices"][0, 0] == 4
    assert arrays["data-dists"][0, 0] == 0
    assert arrays["data-indices"][1, 0] == 0
    assert arrays["data-indices"][7, 0] == 2
    assert arrays["synth-indices"][5, 0] == 6
    assert arrays["synth-indices"][6, 0] == 5
    assert arrays["synth-dists"][5, 0] == 0

    assert meta["metric"] == "l2"
    assert meta["k"] == 3
    assert meta["num_samples"] == NUM_SAMPLES
    assert meta["train_size"] == TRAIN_SIZE
    assert meta["seed"] == SUBSET_SEED
    assert meta["data_name"] == "npz"
    assert meta["image_size"] == 8
    assert meta["sample_file"] == str((tiny_run["synth"] / "9.npz").resolve())


def test_lpips_distances_match_embedding(tiny_run, random_lpips):
    compute_distances(options_for(tiny_run, "lpips", metric="lpips"))
    arrays, meta = read_result(tiny_run["root"] / "lpips" / "9.npz")

    samples = random_lpips.embed(torch.from_numpy(tiny_run["samples"])).numpy()
    train = random_lpips.embed(torch.from_numpy(tiny_run["train"])).numpy()
    data_squared, data_indices = brute_force(samples, train, 3)
    synth_squared, synth_indices = brute_force(samples, samples, 3, exclude_self=True)
    np.testing.assert_array_equal(arrays["data-indices"], data_indices)
    np.testing.assert_array_equal(arrays["synth-indices"], synth_indices)
    np.testing.assert_allclose(arrays["data-dists"], data_squared, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(arrays["synth-dists"], synth_squared, rtol=1e-5, atol=1e-7)
    assert arrays["data-indices"][0, 0] == 4
    assert arrays["data-dists"][0, 0] == 0

    assert meta["metric"] == "lpips"
    assert meta["network"] == "alex"
    assert meta["lpips_weights"] == "random test weights"
    assert meta["lpips_weights_id"] == random_lpips.weights_id
    cached = list((tiny_run["root"] / "cache" / "lpips" / "embeddings").glob("*.npy"))
    assert len(cached) == 2


@pytest.mark.parametrize("metric", ["l2", "lpips"])
def test_merged_shards_equal_single_run(tiny_run, random_lpips, metric):
    compute_distances(options_for(tiny_run, "single", metric=metric))
    for index in range(3):
        compute_distances(options_for(tiny_run, "sharded", metric=metric, num_shards=3, shard_index=index))
    compute_distances(options_for(tiny_run, "sharded", metric=metric, num_shards=3, merge=True))

    single, single_meta = read_result(tiny_run["root"] / "single" / "9.npz")
    merged, merged_meta = read_result(tiny_run["root"] / "sharded" / "9.npz")
    for name in ("data-dists", "data-indices", "synth-dists", "synth-indices"):
        assert np.array_equal(merged[name], single[name]), name
        assert merged[name].dtype == single[name].dtype, name
    assert merged_meta == single_meta
    first_shard, _ = read_result(shard_path(tiny_run["root"] / "sharded", 9, 0, 3))
    assert first_shard["synth-indices"].shape == (3, 3)


def test_merge_rejects_missing_shard(tiny_run):
    for index in (0, 2):
        compute_distances(options_for(tiny_run, "sharded", num_shards=3, shard_index=index))

    with pytest.raises(MemgenError, match="--shard-index 1"):
        compute_distances(options_for(tiny_run, "sharded", num_shards=3, merge=True))
    assert not (tiny_run["root"] / "sharded" / "9.npz").exists()


def test_merge_rejects_mixed_settings(tiny_run):
    compute_distances(options_for(tiny_run, "sharded", num_shards=2, shard_index=0, k=3))
    compute_distances(options_for(tiny_run, "sharded", num_shards=2, shard_index=1, k=2))

    with pytest.raises(MemgenError, match="k = 2"):
        compute_distances(options_for(tiny_run, "sharded", num_shards=2, merge=True))


def test_merge_rejects_changed_samples(tiny_run):
    for index in range(2):
        compute_distances(options_for(tiny_run, "sharded", num_shards=2, shard_index=index))
    changed = tiny_run["samples"].copy()
    changed[3] = 0
    save_npz(tiny_run["synth"] / "9.npz", meta=tiny_run["meta"], samples=changed)

    with pytest.raises(MemgenError, match="changed after its shards"):
        compute_distances(options_for(tiny_run, "sharded", num_shards=2, merge=True))


def test_existing_result_kept_without_overwrite(tiny_run):
    options = options_for(tiny_run, "l2")
    compute_distances(options)
    result = tiny_run["root"] / "l2" / "9.npz"
    arrays, meta = read_result(result)
    save_npz(result, meta={**meta, "marker": 1}, **{name: arrays[name] for name in arrays if name != "meta"})

    compute_distances(options)
    assert read_result(result)[1].get("marker") == 1

    compute_distances(dataclasses.replace(options, overwrite=True))
    assert "marker" not in read_result(result)[1]


def test_single_sample_has_no_synth_neighbours(tiny_run):
    save_npz(tiny_run["synth"] / "9.npz", meta={**tiny_run["meta"], "num_samples": 1},
             samples=tiny_run["samples"][:1])

    compute_distances(options_for(tiny_run, "l2"))
    arrays, _ = read_result(tiny_run["root"] / "l2" / "9.npz")

    assert arrays["synth-dists"].shape == (1, 0)
    assert arrays["synth-indices"].shape == (1, 0)
    assert arrays["data-indices"][0, 0] == 4


@pytest.mark.parametrize("change, message", [
    ({"k": 0}, "--k 0"),
    ({"metric": "cosine"}, "--metric"),
    ({"metric": "lpips", "network": "resnet"}, "--network"),
    ({"num_shards": 2, "shard_index": 2}, "--shard-index 2"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"memory_gb": 0.0}, "--memory-gb"),
    ({"merge": True}, "--num-shards is 1"),
])
def test_invalid_options_rejected(tiny_run, change, message):
    with pytest.raises(MemgenError, match=message):
        compute_distances(options_for(tiny_run, "bad", **change))


@pytest.mark.parametrize("samples, message", [
    (np.zeros((4, 8, 8), np.float32), "expected \\(N, C, H, W\\)"),
    (np.zeros((4, 3, 8, 8), np.float32), "training images"),
    (np.zeros((4, 1, 16, 16), np.float32), "training images"),
    (np.full((4, 1, 8, 8), np.nan, np.float32), "NaN"),
    (np.full((4, 1, 8, 8), 255.0, np.float32), "outside \\[-1, 1\\]"),
    (np.zeros((0, 1, 8, 8), np.float32), "no samples"),
])
def test_invalid_samples_rejected(tiny_run, samples, message):
    save_npz(tiny_run["synth"] / "9.npz", meta=tiny_run["meta"], samples=samples)

    with pytest.raises(MemgenError, match=message):
        compute_distances(options_for(tiny_run, "bad"))


def test_samples_slightly_outside_range_clipped(tiny_run):
    samples = tiny_run["samples"].copy()
    samples[2, 0, 0, 0] = 1.0005
    save_npz(tiny_run["synth"] / "9.npz", meta=tiny_run["meta"], samples=samples)

    compute_distances(options_for(tiny_run, "l2"))
    arrays, _ = read_result(tiny_run["root"] / "l2" / "9.npz")

    clipped = np.clip(samples, -1, 1)
    data_squared, _ = brute_force(clipped, tiny_run["train"], 3)
    np.testing.assert_array_equal(arrays["data-dists"], np.sqrt(data_squared).astype(np.float32))


def test_data_path_from_sample_metadata(tiny_run):
    save_npz(tiny_run["synth"] / "9.npz", meta={**tiny_run["meta"], "data_path": str(tiny_run["dataset"])},
             samples=tiny_run["samples"])

    compute_distances(options_for(tiny_run, "l2", data_path=""))
    arrays, meta = read_result(tiny_run["root"] / "l2" / "9.npz")

    assert arrays["data-indices"][0, 0] == 4
    assert meta["data_path"] == str(tiny_run["dataset"])


def test_missing_data_path_rejected(tiny_run):
    with pytest.raises(MemgenError, match="--data-path"):
        compute_distances(options_for(tiny_run, "bad", data_path=""))


def test_missing_metadata_rejected(tiny_run):
    save_npz(tiny_run["synth"] / "9.npz", meta={"data_name": "npz"}, samples=tiny_run["samples"])

    with pytest.raises(MemgenError, match="train_size"):
        compute_distances(options_for(tiny_run, "bad"))


def test_large_sample_embedding_goes_to_disk(tiny_run, monkeypatch):
    files_seen = []
    original = distances_module._SampleFeatures.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        files_seen.append(self.path)

    monkeypatch.setattr(distances_module._SampleFeatures, "__init__", record)
    compute_distances(options_for(tiny_run, "small", memory_gb=1e-6))
    compute_distances(options_for(tiny_run, "large"))

    assert files_seen[0] is not None
    assert not files_seen[0].exists()
    assert files_seen[1] is None
    small, _ = read_result(tiny_run["root"] / "small" / "9.npz")
    large, _ = read_result(tiny_run["root"] / "large" / "9.npz")
    for name in ("data-dists", "data-indices", "synth-dists", "synth-indices"):
        assert np.array_equal(small[name], large[name]), name


def test_command_line_runs_and_rejects(tiny_run, monkeypatch, capsys):
    arguments = ["run_distances.py", "--synth-path", str(tiny_run["synth"]), "--data-path", str(tiny_run["dataset"]),
                 "--result-path", str(tiny_run["root"] / "cli"), "--metric", "l2", "--device", "cpu"]

    monkeypatch.setattr(sys, "argv", arguments + ["--k", "2"])
    runpy.run_path(str(REPO / "run_distances.py"), run_name="__main__")
    arrays, meta = read_result(tiny_run["root"] / "cli" / "9.npz")
    assert arrays["data-indices"].shape == (NUM_SAMPLES, 2)
    assert meta["k"] == 2

    monkeypatch.setattr(sys, "argv", arguments + ["--k", "0"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "run_distances.py"), run_name="__main__")
    assert exited.value.code == 2
    assert "--k 0" in capsys.readouterr().err


def test_sample_file_named_for_other_k(tiny_run):
    (tiny_run["synth"] / "9.npz").rename(tiny_run["synth"] / "12.npz")
    with pytest.raises(MemgenError, match=r"records K = 9 but is named 12.npz"):
        compute_distances(options_for(tiny_run, "renamed"))
    assert not (tiny_run["root"] / "renamed" / "12.npz").exists()
