"""Exact k nearest neighbours against brute force, and the training-embedding cache."""

import logging
import warnings

import lpips
import numpy as np
import pytest
import torch

from memgen.errors import MemgenError
from memgen.lpips import LPIPSEmbedding, build_features
from memgen.neighbours import _exact_distances, _exact_on_device, _shortlist, cached_embedding, image_digests, knn, rounding_error_factor


def brute_force(queries, references, k, exclude_self=False, query_offset=0):
    """Every pair's float64 squared distance, ranked by (distance, index)."""
    queries = np.asarray(queries, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    distances = ((queries[:, None, :] - references[None, :, :]) ** 2).sum(axis=2)
    if exclude_self:
        rows = np.arange(len(queries))
        distances[rows, rows + query_offset] = np.inf
    indices = np.broadcast_to(np.arange(len(references)), distances.shape)
    order = np.lexsort((indices, distances), axis=-1)[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def assert_same_neighbours(found, expected):
    found_distances, found_indices = found
    expected_distances, expected_indices = expected
    assert found_indices.dtype == np.int64
    assert found_distances.dtype == np.float64
    np.testing.assert_array_equal(found_indices, expected_indices)
    np.testing.assert_allclose(found_distances, expected_distances, rtol=1e-12, atol=0)


def random_points(rows, dim, seed):
    return np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)


def test_knn_matches_brute_force():
    queries, references = random_points(37, 20, 0), random_points(53, 20, 1)

    assert_same_neighbours(knn(queries, references, 5), brute_force(queries, references, 5))


def test_knn_many_small_tiles():
    queries, references = random_points(11, 6, 2), random_points(29, 6, 3)

    found = knn(queries, references, 4, tile_bytes=1)

    assert_same_neighbours(found, brute_force(queries, references, 4))


def test_knn_orders_near_duplicates():
    """Copies a few float32 ulps apart, far from the origin: only the float64 re-rank orders them."""
    rng = np.random.default_rng(4)
    groups, copies, dim = 12, 6, 64
    base = (100 + rng.normal(size=(groups, dim))).astype(np.float32)
    references = np.repeat(base, copies, axis=0)
    for row in range(len(references)):
        for coordinate in rng.choice(dim, size=3, replace=False):
            for _ in range(rng.integers(1, 4)):
                references[row, coordinate] = np.nextafter(references[row, coordinate], np.float32(np.inf))
    order = rng.permutation(len(references))
    references = references[order]
    queries = base.copy()

    expected = brute_force(queries, references, copies)
    found = knn(queries, references, copies, tile_bytes=4096)

    assert_same_neighbours(found, expected)
    assert np.all(expected[0][:, -1] < 1e-8)
    expansion = ((queries.astype(np.float32) ** 2).sum(1)[:, None] + (references ** 2).sum(1)[None, :]
                 - 2 * queries @ references.T)
    float32_order = np.argsort(expansion, axis=1, kind="stable")[:, :copies]
    assert not np.array_equal(float32_order, expected[1])


def test_shortlist_error_bound_holds():
    """The float32 expansion stays within the stated rounding bound of the float64 distance."""
    rng = np.random.default_rng(17)
    references = (50 + 10 * rng.normal(size=(60, 300))).astype(np.float32)
    queries = np.concatenate([references[:5] + 1e-4, (50 + 10 * rng.normal(size=(20, 300))).astype(np.float32)])
    queries = queries.astype(np.float32)

    approximate, indices, error = _shortlist(queries, references, 60, False, 0, 1 << 20, torch.device("cpu"))

    exact = ((queries[:, None].astype(np.float64) - references[indices].astype(np.float64)) ** 2).sum(axis=2)
    assert np.all(np.abs(approximate - exact) <= error[:, None])
    assert np.all(np.diff(approximate, axis=1) >= 0)
    assert np.all(error > 0)


def test_device_rerank_matches_cpu_rerank():
    """The torch re-ranking used on accelerators, run here on the CPU, agrees with the numpy one."""
    queries, references = random_points(7, 33, 18), random_points(25, 33, 19)
    candidates = np.random.default_rng(20).integers(0, 25, size=(7, 6))
    selected = np.random.default_rng(21).random((7, 6)) < 0.7

    on_cpu = _exact_distances(queries, references, candidates, selected, 1 << 20, torch.device("cpu"))
    rows, columns = np.nonzero(selected)
    on_device = _exact_on_device(queries, references, rows, candidates[rows, columns], 2000, torch.device("cpu"))

    expected = ((queries[rows].astype(np.float64) - references[candidates[rows, columns]]) ** 2).sum(axis=1)
    np.testing.assert_allclose(on_cpu[rows, columns], expected, rtol=1e-13)
    np.testing.assert_allclose(on_device, expected, rtol=1e-13)
    assert np.all(np.isinf(on_cpu[~selected]))


def test_rounding_error_factor_values():
    unit = 2.0 ** -24

    assert rounding_error_factor(1) == pytest.approx(2 * unit / (1 - unit) + 16 * unit)
    assert rounding_error_factor(5760) == pytest.approx(2 * 5760 * unit / (1 - 5760 * unit) + 16 * unit)
    assert rounding_error_factor(2 ** 24) == float("inf")


def test_knn_ties_go_to_smaller_index():
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=np.float32)
    references = np.concatenate([corners, corners[::-1]])
    queries = np.array([[0.5, 0.5, 0.5], [0, 0, 0], [1, 0, 0]], dtype=np.float32)

    distances, indices = knn(queries, references, 6)

    assert_same_neighbours((distances, indices), brute_force(queries, references, 6))
    np.testing.assert_array_equal(indices[0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(indices[1, :2], [0, 15])
    np.testing.assert_array_equal(distances[0], np.full(6, 0.75))


def test_knn_exclude_self_keeps_duplicates():
    points = random_points(20, 5, 5)
    points[7] = points[3]
    points[12] = points[3]

    distances, indices = knn(points, points, 3, exclude_self=True)

    assert_same_neighbours((distances, indices), brute_force(points, points, 3, exclude_self=True))
    np.testing.assert_array_equal(indices[3, :2], [7, 12])
    np.testing.assert_array_equal(indices[7, :2], [3, 12])
    np.testing.assert_array_equal(distances[3, :2], [0.0, 0.0])
    assert not np.any(indices == np.arange(20)[:, None])


def test_knn_exclude_self_with_offset():
    points = random_points(30, 4, 6)
    points[25] = points[12]
    whole = knn(points, points, 4, exclude_self=True)

    part = knn(points[10:20], points, 4, exclude_self=True, query_offset=10, tile_bytes=300)

    np.testing.assert_array_equal(part[1], whole[1][10:20])
    np.testing.assert_array_equal(part[0], whole[0][10:20])
    assert part[1][2, 0] == 25


def test_knn_k_above_set_size(caplog):
    queries, references = random_points(4, 3, 7), random_points(3, 3, 8)

    with caplog.at_level(logging.WARNING):
        distances, indices = knn(queries, references, 5)
        self_distances, self_indices = knn(references, references, 5, exclude_self=True)

    assert indices.shape == (4, 3)
    assert_same_neighbours((distances, indices), brute_force(queries, references, 3))
    assert self_indices.shape == (3, 2)
    assert_same_neighbours((self_distances, self_indices), brute_force(references, references, 2, True))
    assert "only 3 references" in caplog.text
    assert "only 2 references" in caplog.text


def test_knn_single_point_excluding_self(caplog):
    point = random_points(1, 3, 9)

    with caplog.at_level(logging.WARNING):
        distances, indices = knn(point, point, 5, exclude_self=True)

    assert distances.shape == (1, 0)
    assert indices.shape == (1, 0)
    assert indices.dtype == np.int64
    assert "only 0 references" in caplog.text


def test_knn_memory_mapped_references(tmp_path):
    queries, references = random_points(9, 16, 10), random_points(40, 16, 11)
    np.save(tmp_path / "references.npy", references)
    mapped = np.load(tmp_path / "references.npy", mmap_mode="r")

    found = knn(queries, mapped, 3, tile_bytes=2048)

    assert_same_neighbours(found, brute_force(queries, references, 3))


def test_knn_accepts_tensors():
    queries, references = random_points(5, 8, 12), random_points(12, 8, 13)

    found = knn(torch.from_numpy(queries), torch.from_numpy(references), 2)

    assert_same_neighbours(found, brute_force(queries, references, 2))


def test_knn_rejects_bad_input():
    points = random_points(3, 2, 14)

    with pytest.raises(MemgenError, match="k = 0"):
        knn(points, points, 0)
    with pytest.raises(MemgenError, match="features"):
        knn(points, random_points(3, 4, 15), 1)
    with pytest.raises(MemgenError, match="NaN"):
        knn(np.full((2, 2), np.nan, np.float32), points, 1)


@pytest.fixture(scope="module")
def random_alex():
    """lpips.LPIPS with a seeded random AlexNet, and memgen's embedding with the same weights."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = {key.split(".", 1)[1]: value.clone() for key, value in reference.net.state_dict().items()}
    return reference, LPIPSEmbedding.from_state_dict("alex", state)


def test_knn_matches_pairwise_lpips(random_alex):
    reference, embedding = random_alex
    generator = torch.Generator().manual_seed(16)
    images = torch.rand(8, 3, 32, 32, generator=generator) * 2 - 1
    images[5] = (images[2] + 0.01 * torch.randn(3, 32, 32, generator=generator)).clamp(-1, 1)

    rows, columns = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    with torch.no_grad():
        pairwise = reference(images[rows.flatten()], images[columns.flatten()]).reshape(8, 8).double().numpy()
    pairwise[np.arange(8), np.arange(8)] = np.inf
    expected_indices = np.lexsort((np.broadcast_to(np.arange(8), (8, 8)), pairwise), axis=-1)[:, :3]

    phi = embedding.embed(images).numpy()
    distances, indices = knn(phi, phi, 3, exclude_self=True)

    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, np.take_along_axis(pairwise, expected_indices, 1), rtol=0, atol=1e-6)
    assert indices[2, 0] == 5


def test_cached_embedding_extends_prefix(tmp_path, monkeypatch):
    torch.manual_seed(1)
    embedding = LPIPSEmbedding.from_state_dict("alex", build_features("alex").state_dict())
    images = torch.rand(7, 1, 28, 28) * 2 - 1
    full = embedding.embed(images).numpy()

    first = cached_embedding(embedding, images[:4], "toy-seed1", batch_size=3, folder=tmp_path)
    first = np.array(first)
    extended = cached_embedding(embedding, images, "toy-seed1", batch_size=3, folder=tmp_path)

    assert isinstance(extended, np.memmap)
    assert extended.shape == (7, embedding.dim_for(28))
    np.testing.assert_array_equal(extended[:4], first)
    np.testing.assert_allclose(extended, full, rtol=1e-5, atol=1e-7)

    def must_not_embed(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(embedding, "embed", must_not_embed)
    smaller = cached_embedding(embedding, images[:5], "toy-seed1", folder=tmp_path)
    np.testing.assert_array_equal(smaller, extended[:5])


def test_cached_embedding_detects_changed_images(tmp_path, caplog):
    torch.manual_seed(2)
    embedding = LPIPSEmbedding.from_state_dict("alex", build_features("alex").state_dict())
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    cached_embedding(embedding, images, "toy", folder=tmp_path)
    changed = images.clone()
    changed[3] = -changed[3]

    with caplog.at_level(logging.WARNING):
        result = cached_embedding(embedding, changed, "toy", folder=tmp_path)

    assert "from row 3 on" in caplog.text
    np.testing.assert_allclose(result, embedding.embed(changed).numpy(), rtol=1e-5, atol=1e-7)
    stored = np.load(next(tmp_path.glob("toy-alex-*.digests.npy")))
    np.testing.assert_array_equal(stored, image_digests(changed))


def test_cached_embedding_separates_weights(tmp_path):
    torch.manual_seed(3)
    first = LPIPSEmbedding.from_state_dict("alex", build_features("alex").state_dict())
    second = LPIPSEmbedding.from_state_dict("alex", build_features("alex").state_dict())
    images = torch.rand(3, 3, 32, 32) * 2 - 1

    from_first = cached_embedding(first, images, "toy", folder=tmp_path)
    from_second = cached_embedding(second, images, "toy", folder=tmp_path)

    assert len(list(tmp_path.glob("toy-alex-*.digests.npy"))) == 2
    assert not np.allclose(from_first, from_second)
