"""Result files: atomic writes, JSON metadata without pickles, and <K>.<ext> folders."""

import logging
import os

import numpy as np
import pytest

from memgen.errors import MemgenError
from memgen.files import (atomic_path, list_k_files, load_npz, read_meta, resolve_k_path, save_npz,
                          select_slice, skip_existing)


def test_save_and_load_round_trip(tmp_path):
    path = save_npz(tmp_path / "16.npz", meta={"train_size": 16, "metric": "l2"},
                    samples=np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3))
    arrays = load_npz(path, required=["samples"])
    assert arrays["samples"].tolist() == [[[[0, 1, 2], [3, 4, 5]]]]
    assert read_meta(arrays, path) == {"metric": "l2", "train_size": 16}
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_leaves_old_file(tmp_path):
    path = save_npz(tmp_path / "4.npz", samples=np.zeros(2))
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert load_npz(path)["samples"].tolist() == [0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4.npz"]


def test_pickled_array_rejected(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, samples=np.array([{"a": 1}], dtype=object))
    with pytest.raises(MemgenError, match="pickled object array"):
        load_npz(path)


def test_missing_array_named(tmp_path):
    path = save_npz(tmp_path / "2.npz", images=np.zeros(3))
    with pytest.raises(MemgenError, match="has no array 'samples'"):
        load_npz(path, required=["samples"])


def test_truncated_npz_rejected(tmp_path):
    path = save_npz(tmp_path / "2.npz", samples=np.zeros(1000))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MemgenError, match="not a readable .npz"):
        load_npz(path)


def test_object_array_never_written(tmp_path):
    with pytest.raises(TypeError, match="dtype object"):
        save_npz(tmp_path / "x.npz", samples=np.array([None, 1], dtype=object))


def test_list_k_files_sorted_and_skips(tmp_path, caplog):
    for name in ("64.npz", "8.npz", "notes.npz", "16.pt", "128.npz"):
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        found = list_k_files(tmp_path, "npz")
    assert [k for k, _ in found] == [8, 64, 128]
    assert "notes.npz" in caplog.text


def test_list_k_files_duplicate_k(tmp_path):
    (tmp_path / "16.npz").write_bytes(b"")
    (tmp_path / "016.npz").write_bytes(b"")
    with pytest.raises(MemgenError, match="both have K = 16"):
        list_k_files(tmp_path, "npz")


def test_list_k_files_empty_folder(tmp_path):
    with pytest.raises(MemgenError, match="no <K>.npz file"):
        list_k_files(tmp_path, "npz")


def test_select_slice():
    assert select_slice([1, 2, 3, 4], 1, -1) == [2, 3, 4]
    assert select_slice([1, 2, 3, 4], 0, 2) == [1, 2]
    with pytest.raises(MemgenError, match="--final-idx 1 is below --start-idx 2"):
        select_slice([1, 2, 3], 2, 1)


def test_resolve_single_file(tmp_path):
    (tmp_path / "32.pt").write_bytes(b"")
    assert resolve_k_path(tmp_path / "32.pt", "pt") == [(32, tmp_path / "32.pt")]
    (tmp_path / "final.pt").write_bytes(b"")
    with pytest.raises(MemgenError, match="not named <integer>.pt"):
        resolve_k_path(tmp_path / "final.pt", "pt")


def test_skip_existing(tmp_path):
    path = tmp_path / "1.npz"
    assert skip_existing(path, overwrite=False) is False
    path.write_bytes(b"")
    assert skip_existing(path, overwrite=False) is True
    assert skip_existing(path, overwrite=True) is False
