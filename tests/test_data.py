"""Tests of memgen.data on tiny datasets written in each real on-disk format.

Pixel values are checked exactly: uint8 0 -> -1.0, 255 -> 1.0, 51 -> -0.6 (x / 127.5 - 1).
"""

import gzip
import hashlib
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from memgen import data
from memgen.errors import MemgenError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Point memgen's cache folder into tmp_path so no test writes into the home folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "memgen" / "data"


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """Hide Debian's Fashion-MNIST package so that the missing-data paths run."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


def unit(values) -> torch.Tensor:
    """Map uint8 values to [-1, 1] as float32, computed independently of memgen."""
    return torch.as_tensor(np.asarray(values, dtype=np.float32) / np.float32(127.5) - np.float32(1.0))


# --- IDX files ----------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array as an IDX file: magic 00 00 08 <ndim>, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def fake_mnist_images(count: int, offset: int) -> np.ndarray:
    """Images whose pixel (0, 0) is 0, (0, 1) is 255, (0, 2) is 51 and (1, 0) is offset + index."""
    images = np.full((count, 28, 28), 7, dtype=np.uint8)
    images[:, 0, 0] = 0
    images[:, 0, 1] = 255
    images[:, 0, 2] = 51
    images[:, 1, 0] = offset + np.arange(count)
    return images


def write_idx_set(folder: Path, train_count: int = 5, test_count: int = 3, compress: bool = False) -> None:
    """Write the four (Fashion-)MNIST IDX files into `folder`, gzipped with a `.gz` suffix if asked."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", fake_mnist_images(train_count, 100), compress)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.arange(train_count) % 10, compress)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", fake_mnist_images(test_count, 200), compress)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(test_count) % 10, compress)


@pytest.mark.parametrize("data_name, folder_name", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_idx_pixels_and_splits(tmp_path, data_name, folder_name):
    write_idx_set(tmp_path / folder_name / "raw")

    train = data.load_dataset(data_name, tmp_path)
    test = data.load_dataset(data_name, tmp_path, train=False)

    assert len(train) == 5
    assert len(test) == 3
    image = train[2]
    assert image.shape == (1, 28, 28)
    assert image.dtype == torch.float32
    assert image[0, 0, 0].item() == -1.0
    assert image[0, 0, 1].item() == 1.0
    assert image[0, 0, 2].item() == unit(51).item()
    assert abs(image[0, 0, 2].item() + 0.6) < 1e-6
    assert image[0, 1, 0].item() == unit(102).item()
    assert test[1][0, 1, 0].item() == unit(201).item()


def test_idx_resize_matches_torchvision(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw")

    resized = data.load_images(data.load_dataset("mnist", tmp_path, image_size=14))
    original = data.load_images(data.load_dataset("mnist", tmp_path))

    assert resized.shape == (5, 1, 14, 14)
    expected = TF.resize(original, [14, 14], antialias=True).clamp(-1, 1)
    torch.testing.assert_close(resized, expected, rtol=0, atol=0)


def test_mnist_missing_names_path_and_fix(tmp_path):
    with pytest.raises(MemgenError) as error:
        data.load_dataset("mnist", tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "download=True" in message


def test_fashion_missing_names_path_and_fix(tmp_path, no_debian):
    with pytest.raises(MemgenError) as error:
        data.load_dataset("fashionmnist", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "make data" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_idx_incomplete_raw_lists_missing(tmp_path, no_debian):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx_set(raw)
    (raw / "t10k-labels-idx1-ubyte").unlink()

    with pytest.raises(MemgenError) as error:
        data.load_dataset("fashionmnist", tmp_path)
    message = str(error.value)
    assert "t10k-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte" not in message
    assert str(raw) in message
    assert "make data" in message


def test_idx_truncated_file_rejected(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(raw)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])

    with pytest.raises(MemgenError, match="truncated") as error:
        data.load_dataset("mnist", tmp_path)
    assert str(images) in str(error.value)


def test_idx_gz_in_raw_decompressed(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(raw, compress=True)

    dataset = data.load_dataset("mnist", tmp_path)

    assert len(dataset) == 5
    assert (raw / "train-images-idx3-ubyte").is_file()


def test_debian_files_decompressed_into_data_path(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_idx_set(debian, train_count=4, compress=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)

    dataset = data.load_dataset("fashionmnist", tmp_path / "data")

    assert len(dataset) == 4
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(path.name for path in raw.iterdir()) == sorted(data.IDX_FILES)
    assert dataset[3][0, 1, 0].item() == unit(103).item()


def test_debian_files_fall_back_to_cache(tmp_path, monkeypatch, private_cache):
    debian = tmp_path / "debian"
    write_idx_set(debian, train_count=4, compress=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    dataset = data.load_dataset("fashionmnist", blocker / "data")

    assert len(dataset) == 4
    assert (private_cache / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_prepare_fashion_from_debian(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_idx_set(debian, compress=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)

    raw = data.prepare_fashion_mnist(tmp_path / "data")
    again = data.prepare_fashion_mnist(tmp_path / "data")

    assert raw == again == tmp_path / "data" / "FashionMNIST" / "raw"
    assert (raw / "t10k-images-idx3-ubyte").read_bytes() == gzip.decompress(
        (debian / "t10k-images-idx3-ubyte.gz").read_bytes())


def test_prepare_fashion_offline_error(tmp_path, monkeypatch, no_debian):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)

    with pytest.raises(MemgenError) as error:
        data.prepare_fashion_mnist(tmp_path / "data")
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message


# --- CIFAR-10 -----------------------------------------------------------------------------


def cifar_batch(count: int, offset: int) -> np.ndarray:
    """Rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major)."""
    rows = np.zeros((count, 3, 32, 32), dtype=np.uint8)
    rows[:, 0, 0, 0] = 255
    rows[:, 1, 0, 0] = 51
    rows[:, 2, 5, 7] = offset + np.arange(count)
    return rows.reshape(count, 3072)


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch) -> Path:
    """Write CIFAR-10 batches as torchvision expects them and register their MD5 sums.

    torchvision checks each file against the MD5 sums of the official release. The test
    replaces the class's lists of (file, md5) with the sums of the files it writes, so the
    check itself still runs.
    """
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        entry = {"batch_label": name, "labels": [number, number],
                 "data": cifar_batch(2, 10 * number), "filenames": ["a.png", "b.png"]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, md5(name)] for name in names[:5]])
    monkeypatch.setattr(cifar, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(cifar, "meta", {"filename": "batches.meta", "key": "label_names",
                                        "md5": md5("batches.meta")})
    return tmp_path


def test_cifar10_pixels_and_channels(fake_cifar):
    train = data.load_dataset("cifar10", fake_cifar)
    test = data.load_dataset("cifar10", fake_cifar, train=False)

    assert len(train) == 10
    assert len(test) == 2
    image = train[3]
    assert image.shape == (3, 32, 32)
    assert image[0, 0, 0].item() == 1.0
    assert image[1, 0, 0].item() == unit(51).item()
    assert image[2, 0, 0].item() == -1.0
    assert image[2, 5, 7].item() == unit(11).item()
    assert test[1][2, 5, 7].item() == unit(51).item()


def test_cifar10_checksum_mismatch(fake_cifar, monkeypatch):
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "test_list", [["test_batch", "0" * 32]])

    with pytest.raises(MemgenError, match="MD5") as error:
        data.load_dataset("cifar10", fake_cifar)
    assert "test_batch" in str(error.value)
    assert "data_batch_1" not in str(error.value)


def test_cifar10_missing_names_path_and_fix(tmp_path):
    with pytest.raises(MemgenError) as error:
        data.load_dataset("cifar10", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "CIFAR10(" in message
    assert "download=True" in message


def test_cifar10_incomplete_folder(fake_cifar):
    (fake_cifar / "cifar-10-batches-py" / "data_batch_4").unlink()

    with pytest.raises(MemgenError, match="data_batch_4"):
        data.load_dataset("cifar10", fake_cifar)


# --- image folders ------------------------------------------------------------------------


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_grey_sorted_recursive(tmp_path):
    save_png(tmp_path / "b" / "x.png", np.full((6, 5), 51, dtype=np.uint8))
    save_png(tmp_path / "a.png", np.full((6, 5), 0, dtype=np.uint8))
    save_png(tmp_path / "b" / "a" / "y.PNG", np.full((6, 5), 255, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")

    dataset = data.load_dataset("imagefolder", tmp_path)
    images = data.load_images(dataset)

    assert images.shape == (3, 1, 6, 5)
    assert images[0].unique().tolist() == [-1.0]
    assert images[1].unique().tolist() == [1.0]
    assert images[2].unique().tolist() == [unit(51).item()]


def test_imagefolder_colour_channels(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[..., 1] = 51
    save_png(tmp_path / "0.png", rgb)
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 9, dtype=np.uint8)], axis=2)
    save_png(tmp_path / "1.png", rgba)
    save_png(tmp_path / "2.png", np.full((4, 4), 51, dtype=np.uint8))

    images = data.load_images(data.load_dataset("imagefolder", tmp_path))

    assert images.shape == (3, 3, 4, 4)
    for index in (0, 1):
        assert images[index, 0].unique().tolist() == [1.0]
        assert images[index, 1].unique().tolist() == [unit(51).item()]
        assert images[index, 2].unique().tolist() == [-1.0]
    assert images[2].unique().tolist() == [unit(51).item()]


def test_imagefolder_centercrop_then_resize(tmp_path):
    # 30 wide, 20 high: the centred 20 x 20 square is all white, the side bands black.
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[:, 5:25] = 255
    save_png(tmp_path / "0.png", array)

    cropped = data.load_dataset("imagefolder", tmp_path, centercrop=True)[0]
    resized = data.load_dataset("imagefolder", tmp_path, image_size=8, centercrop=True)[0]
    squeezed = data.load_dataset("imagefolder", tmp_path, image_size=8)[0]

    assert cropped.shape == (3, 20, 20)
    assert cropped.unique().tolist() == [1.0]
    assert resized.shape == (3, 8, 8)
    torch.testing.assert_close(resized, torch.ones(3, 8, 8))
    assert squeezed.shape == (3, 8, 8)
    assert squeezed[:, :, 0].max().item() < 0.0


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    save_png(tmp_path / "0.png", np.zeros((8, 8), dtype=np.uint8))
    save_png(tmp_path / "1.png", np.zeros((6, 8), dtype=np.uint8))

    with pytest.raises(MemgenError, match="--image-size") as error:
        data.load_images(data.load_dataset("imagefolder", tmp_path))
    assert str(tmp_path / "1.png") in str(error.value)
    images = data.load_images(data.load_dataset("imagefolder", tmp_path, image_size=4))
    assert images.shape == (2, 1, 4, 4)


def test_imagefolder_unreadable_image(tmp_path):
    (tmp_path / "0.png").write_bytes(b"not a png")

    with pytest.raises(MemgenError, match="cannot read the image") as error:
        data.load_dataset("imagefolder", tmp_path)
    assert str(tmp_path / "0.png") in str(error.value)


def test_imagefolder_empty_and_missing(tmp_path):
    with pytest.raises(MemgenError, match="no image file") as error:
        data.load_dataset("imagefolder", tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(MemgenError, match="folder not found"):
        data.load_dataset("imagefolder", tmp_path / "missing")


def test_celeba_prefers_named_folder(tmp_path):
    save_png(tmp_path / "celeba" / "img_align_celeba" / "000002.png", np.full((5, 4, 3), 51, dtype=np.uint8))
    Image.fromarray(np.full((5, 4, 3), 200, dtype=np.uint8)).save(
        tmp_path / "celeba" / "img_align_celeba" / "000001.jpg", quality=95)
    save_png(tmp_path / "elsewhere.png", np.zeros((5, 4, 3), dtype=np.uint8))

    dataset = data.load_dataset("celeba", tmp_path)

    assert len(dataset) == 2
    assert dataset.paths[0].name == "000001.jpg"
    assert dataset[0].shape == (3, 5, 4)
    assert dataset[1].unique().tolist() == [unit(51).item()]


def test_folder_formats_have_no_test_split(tmp_path):
    save_png(tmp_path / "0.png", np.zeros((4, 4), dtype=np.uint8))

    with pytest.raises(MemgenError, match="only a training split"):
        data.load_dataset("imagefolder", tmp_path, train=False)


# --- CelebA-HQ .npy files -----------------------------------------------------------------


def test_celebahq_npy_layouts(tmp_path):
    hwc = np.zeros((6, 5, 3), dtype=np.uint8)
    hwc[..., 0] = 255
    hwc[2, 3, 1] = 51
    folder = tmp_path / "celebahq"
    folder.mkdir()
    np.save(folder / "imgHQ00000.npy", hwc)
    np.save(folder / "imgHQ00001.npy", hwc.transpose(2, 0, 1))
    np.save(folder / "imgHQ00002.npy", hwc.transpose(2, 0, 1)[None])

    images = data.load_images(data.load_dataset("celebahq", tmp_path))

    assert images.shape == (3, 3, 6, 5)
    for image in images:
        assert image[0].unique().tolist() == [1.0]
        assert image[1, 2, 3].item() == unit(51).item()
        assert image[1, 0, 0].item() == -1.0


def test_celebahq_rejects_bad_arrays(tmp_path):
    np.save(tmp_path / "0.npy", np.zeros((6, 5, 4), dtype=np.uint8))
    with pytest.raises(MemgenError, match="channels"):
        data.load_dataset("celebahq", tmp_path)

    np.save(tmp_path / "0.npy", np.zeros((3, 6, 5), dtype=np.int64))
    with pytest.raises(MemgenError, match="int64"):
        data.load_dataset("celebahq", tmp_path)


def test_celebahq_empty_folder(tmp_path):
    with pytest.raises(MemgenError, match="no .npy file") as error:
        data.load_dataset("celebahq", tmp_path)
    assert str(tmp_path) in str(error.value)


# --- .npz files ---------------------------------------------------------------------------


def test_npz_uint8_both_layouts(tmp_path):
    nchw = np.zeros((4, 3, 5, 6), dtype=np.uint8)
    nchw[:, 0] = 255
    nchw[1, 2, 4, 5] = 51
    np.savez(tmp_path / "nchw.npz", images=nchw)
    np.savez(tmp_path / "nhwc.npz", images=nchw.transpose(0, 2, 3, 1))

    first = data.load_images(data.load_dataset("npz", tmp_path / "nchw.npz"))
    second = data.load_images(data.load_dataset("npz", tmp_path / "nhwc.npz"))

    assert first.shape == (4, 3, 5, 6)
    assert torch.equal(first, second)
    assert first[:, 0].unique().tolist() == [1.0]
    assert first[1, 2, 4, 5].item() == unit(51).item()
    assert first[0, 2, 4, 5].item() == -1.0


def test_npz_float_kept_exactly(tmp_path):
    images = np.random.default_rng(1).uniform(-1, 1, size=(3, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "float.npz", images=images, test_images=images[:1])

    train = data.load_images(data.load_dataset("npz", tmp_path / "float.npz"))
    test = data.load_images(data.load_dataset("npz", tmp_path / "float.npz", train=False))

    assert torch.equal(train, torch.from_numpy(images))
    assert torch.equal(test, torch.from_numpy(images[:1]))


@pytest.mark.parametrize("images, expected", [
    (np.full((2, 1, 4, 4), 1.5, dtype=np.float32), r"\[-1, 1\]"),
    (np.full((2, 1, 4, 4), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((2, 1, 4, 4), dtype=np.int32), "int32"),
    (np.zeros((2, 5, 4, 4), dtype=np.uint8), "channels"),
    (np.zeros((2, 4), dtype=np.uint8), "shape"),
])
def test_npz_rejects_bad_images(tmp_path, images, expected):
    np.savez(tmp_path / "bad.npz", images=images)

    with pytest.raises(MemgenError, match=expected):
        data.load_dataset("npz", tmp_path / "bad.npz")


def test_npz_missing_key_and_file(tmp_path):
    np.savez(tmp_path / "other.npz", pictures=np.zeros((2, 1, 4, 4), dtype=np.uint8))

    with pytest.raises(MemgenError, match="'images'"):
        data.load_dataset("npz", tmp_path / "other.npz")
    with pytest.raises(MemgenError, match="test_images"):
        data.load_dataset("npz", tmp_path / "other.npz", train=False)
    with pytest.raises(MemgenError, match="not found") as error:
        data.load_dataset("npz", tmp_path / "missing.npz")
    assert str(tmp_path / "missing.npz") in str(error.value)


# --- LSUN-Church --------------------------------------------------------------------------


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_lsun_church_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    folder = tmp_path / "church_outdoor_train_lmdb"
    environment = lmdb.open(str(folder), map_size=1 << 24)
    with environment.begin(write=True) as transaction:
        # Keys in insertion order b, a, c; the dataset follows the database's key order.
        for key, value in ((b"b", 51), (b"a", 0), (b"c", 255)):
            array = np.zeros((20, 30, 3), dtype=np.uint8)
            array[:, 5:25] = value
            transaction.put(key, encode_png(array))
    environment.close()

    dataset = data.load_dataset("lsun-church", tmp_path, image_size=4, centercrop=True)
    images = data.load_images(dataset, num_workers=0)
    # Forked DataLoader workers inherit the parent's open database handle.
    from_workers = data.load_images(dataset, batch_size=1, num_workers=2)

    assert torch.equal(from_workers, images)
    assert dataset.keys == [b"a", b"b", b"c"]
    assert images.shape == (3, 3, 4, 4)
    torch.testing.assert_close(images[0], torch.full((3, 4, 4), -1.0))
    torch.testing.assert_close(images[1], torch.full((3, 4, 4), unit(51).item()))
    torch.testing.assert_close(images[2], torch.full((3, 4, 4), 1.0))


def test_lsun_church_image_folder(tmp_path):
    save_png(tmp_path / "lsun-church" / "0.png", np.full((10, 12, 3), 51, dtype=np.uint8))

    image = data.load_dataset("lsun-church", tmp_path, image_size=8, centercrop=True)[0]

    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image, torch.full((3, 8, 8), unit(51).item()))


def test_lsun_church_missing_names_both_layouts(tmp_path):
    with pytest.raises(MemgenError) as error:
        data.load_dataset("lsun-church", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "church_outdoor_train_lmdb") in message
    assert "lmdb" in message
    assert str(tmp_path / "lsun-church") in message


# --- names, subsets and stacking ----------------------------------------------------------


def test_unknown_data_name_lists_valid(tmp_path):
    with pytest.raises(MemgenError) as error:
        data.load_dataset("imagenet", tmp_path)
    for name in data.DATASET_NAMES:
        assert name in str(error.value)


def test_subset_equals_seeded_randperm():
    for k in (1, 7, 50, 100):
        expected = torch.randperm(100, generator=torch.Generator().manual_seed(3407))[:k]
        indices = data.subset_indices(100, k, 3407)
        assert indices.dtype == torch.int64
        assert torch.equal(indices, expected)


def test_subset_equals_random_split():
    generator = torch.Generator().manual_seed(12)
    first, _ = torch.utils.data.random_split(range(100), [30, 70], generator=generator)

    assert data.subset_indices(100, 30, 12).tolist() == list(first.indices)


def test_subsets_nested_across_k():
    small = data.subset_indices(1000, 16, 5)
    large = data.subset_indices(1000, 256, 5)
    other_seed = data.subset_indices(1000, 16, 6)

    assert torch.equal(large[:16], small)
    assert not torch.equal(other_seed, small)


def test_subset_larger_than_dataset_keeps_all(caplog):
    with caplog.at_level(logging.WARNING, logger="memgen.data"):
        indices = data.subset_indices(10, 25, 0)

    assert sorted(indices.tolist()) == list(range(10))
    assert "25" in caplog.text
    assert "using all 10" in caplog.text


@pytest.mark.parametrize("k", [0, -3])
def test_subset_rejects_nonpositive_size(k):
    with pytest.raises(MemgenError, match="--train-size"):
        data.subset_indices(10, k, 0)


def test_training_images_from_meta(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(20, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images)
    meta = {"data_name": "npz", "train_size": 6, "seed": 3407, "image_size": None,
            "centercrop": False, "data_path": "/elsewhere/set.npz"}

    loaded = data.training_images_from_meta(meta, tmp_path / "set.npz")
    direct = data.load_training_images("npz", tmp_path / "set.npz", 6, 3407)

    order = torch.randperm(20, generator=torch.Generator().manual_seed(3407))[:6].numpy()
    assert torch.equal(loaded, unit(images[order]))
    assert torch.equal(direct, loaded)


def test_training_meta_missing_keys():
    with pytest.raises(MemgenError, match="seed"):
        data.training_images_from_meta({"data_name": "npz", "train_size": 3}, "x.npz")


def test_load_images_subset_and_loader_paths(tmp_path):
    for index in range(6):
        save_png(tmp_path / f"{index}.png", np.full((3, 3), 10 * index, dtype=np.uint8))
    folder = data.load_dataset("imagefolder", tmp_path)
    array = data.ImageArrayDataset(torch.arange(6, dtype=torch.uint8).mul(10).reshape(6, 1, 1, 1).expand(6, 1, 3, 3))

    for dataset in (folder, array):
        nested = torch.utils.data.Subset(data.training_subset(dataset, 5, 1), [4, 0, 2])
        images = data.load_images(nested, batch_size=2)
        order = data.subset_indices(6, 5, 1)[[4, 0, 2]]
        assert images.shape == (3, 1, 3, 3)
        assert torch.equal(images[:, 0, 0, 0], unit(10 * order.numpy()))
        assert torch.equal(data.load_images(dataset, indices=[5, 1])[:, 0, 1, 1], unit([50, 10]))


# --- the real Fashion-MNIST from Debian's package -----------------------------------------


@pytest.mark.skipif(not (data.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path):
    packed = (data.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").read_bytes()
    raw = np.frombuffer(gzip.decompress(packed), dtype=np.uint8)
    count, height, width = (int.from_bytes(raw[i:i + 4].tobytes(), "big") for i in (4, 8, 12))
    first = raw[16:16 + height * width].astype(np.int64)

    train = data.load_dataset("fashionmnist", tmp_path)
    test = data.load_dataset("fashionmnist", tmp_path, train=False)
    subset = data.load_training_images("fashionmnist", tmp_path, 64, 3407)

    assert (count, height, width) == (60000, 28, 28)
    assert first.sum() == 76247
    assert len(train) == 60000
    assert len(test) == 10000
    assert train[0].shape == (1, 28, 28)
    pixels = torch.round((train[0] + 1) * 127.5).to(torch.int64)
    assert pixels.sum().item() == 76247
    assert subset.shape == (64, 1, 28, 28)
    order = torch.randperm(60000, generator=torch.Generator().manual_seed(3407))[:64]
    assert torch.equal(subset[5], train[int(order[5])])
