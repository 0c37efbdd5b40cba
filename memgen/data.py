"""Datasets by name, the seeded training subset of size K, and stacking images into tensors.

Every dataset yields float32 images `(C, H, W)` in `[-1, 1]` without labels: uint8 pixels
map by `x / 127.5 - 1`, grey images keep one channel and colour images have three.
Accepted layouts under `data_path`:

| name | layout |
| --- | --- |
| `fashionmnist`, `mnist` | `FashionMNIST/raw/` or `MNIST/raw/` with the four uncompressed IDX files |
| `cifar10` | `cifar-10-batches-py/` as torchvision's download leaves it (MD5-checked) |
| `lsun-church` | `church_outdoor_{train,val}_lmdb/` (needs the `lmdb` package), or images under `lsun-church/` or `data_path` |
| `celeba` | `.jpg` / `.png` files under `celeba/` or `data_path`, searched recursively |
| `celebahq` | `.npy` files under `celebahq/` or `data_path`, one image each |
| `imagefolder` | `data_path` is a folder of images, searched recursively |
| `npz` | `data_path` is an `.npz` file with an `images` array (`test_images` for the test split) |

Files in folders are sorted by path, so index i is the same image on every machine.
"""

import gzip
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from memgen.errors import MemgenError
from memgen.files import atomic_path, cache_root, ensure_writable_dir, load_npz

logger = logging.getLogger(__name__)

DATASET_NAMES = ("fashionmnist", "mnist", "cifar10", "lsun-church", "celeba", "celebahq",
                 "imagefolder", "npz")

# Debian's package dataset-fashion-mnist installs the four gzipped IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CELEBA_EXTENSIONS = (".png", ".jpg", ".jpeg")

GREY_MODES = ("1", "L", "LA")
UNSUPPORTED_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")

LSUN_CHURCH_SPLITS = {True: "church_outdoor_train", False: "church_outdoor_val"}


# --- pixel conversion and resizing -------------------------------------------------------


# Pixel values this far outside [-1, 1] are accepted as rounding error and clipped.
RANGE_TOLERANCE = 1e-3


def check_image_values(images: np.ndarray | torch.Tensor, source: str) -> None:
    """Raise MemgenError unless every pixel of `images` is finite and within [-1, 1] (up to RANGE_TOLERANCE)."""
    finite = torch.isfinite(images) if torch.is_tensor(images) else np.isfinite(images)
    bad = int((~finite).sum())
    if bad:
        raise MemgenError(f"{source} has {bad} NaN or infinite pixel values; memgen images are finite values "
                          "in [-1, 1], so regenerate or repair the file")
    low, high = float(images.min()), float(images.max())
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise MemgenError(f"{source} has pixel values from {low:.4g} to {high:.4g}, outside [-1, 1]; rescale "
                          "them (x / 127.5 - 1 for uint8 pixels, 2 x - 1 for values in [0, 1])")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels in [0, 255] to float32 in [-1, 1] by x / 127.5 - 1. Float input passes unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(127.5).sub_(1.0)
    return images.to(torch.float32)


def resize_images(images: torch.Tensor, image_size: int | None, centercrop: bool) -> torch.Tensor:
    """Centre-crop `(..., C, H, W)` images to a square of the short side, then resize them.

    With `centercrop` the largest centred square is kept before resizing, as for
    LSUN-Church. Without it a non-square image is resized to `image_size` squared, which
    changes its aspect ratio. Resizing is bilinear with antialiasing on float values.
    Images already at the requested size pass through unchanged.
    """
    height, width = images.shape[-2:]
    if centercrop and height != width:
        side = min(height, width)
        images = TF.center_crop(images, [side, side])
        height = width = side
    if image_size is not None and (height, width) != (image_size, image_size):
        images = TF.resize(images, [image_size, image_size], antialias=True)
        images = images.clamp(-1.0, 1.0)
    return images


def _array_to_chw(array: np.ndarray, source: str, batched: bool) -> np.ndarray:
    """Reorder an image array to `(C, H, W)` (or `(N, C, H, W)` when `batched`).

    Accepted per image: `(H, W)` grey, `(C, H, W)` or `(H, W, C)` with C of 1 or 3.
    Channels-first wins when both ends could be channels.
    """
    image_dims = array.ndim - 1 if batched else array.ndim
    expected = "(N, C, H, W), (N, H, W, C) or (N, H, W)" if batched else "(C, H, W), (H, W, C) or (H, W)"
    if image_dims == 2:
        return np.expand_dims(array, axis=1 if batched else 0)
    if image_dims != 3:
        raise MemgenError(f"{source} has shape {array.shape}; expected {expected}")
    first, last = array.shape[-3], array.shape[-1]
    if first in (1, 3):
        return array
    if last in (1, 3):
        return np.moveaxis(array, -1, -3)
    raise MemgenError(f"{source} has shape {array.shape}, with neither {first} nor {last} "
                      f"channels; expected {expected} with 1 (grey) or 3 (RGB) channels")


def _check_pixel_values(array: np.ndarray, source: str) -> None:
    """Accept uint8 pixels, or floats that are finite and within [-1, 1]."""
    if array.dtype == np.uint8:
        return
    if not np.issubdtype(array.dtype, np.floating):
        raise MemgenError(f"{source} has dtype {array.dtype}; expected uint8 in [0, 255] "
                          "or float in [-1, 1]")
    if array.size == 0:
        return
    if not np.isfinite(array).all():
        raise MemgenError(f"{source} contains NaN or infinite values; expected float in [-1, 1]")
    low, high = float(array.min()), float(array.max())
    if low < -1.0 or high > 1.0:
        raise MemgenError(f"{source} has float values in [{low:.4g}, {high:.4g}]; expected "
                          "[-1, 1] (map [0, 1] data with 2 * x - 1, or store uint8 in [0, 255])")


# --- dataset classes ----------------------------------------------------------------------


class ImageArrayDataset(Dataset):
    """Images held in memory as one `(N, C, H, W)` tensor, uint8 or float in [-1, 1]."""

    def __init__(self, data: torch.Tensor, image_size: int | None = None, centercrop: bool = False):
        self.data = data
        self.image_size = image_size
        self.centercrop = centercrop

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.load_batch(torch.tensor([index]))[0]

    def load_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Return images `indices` as float32 `(B, C, H, W)` in [-1, 1]."""
        images = to_unit_range(self.data[indices])
        return resize_images(images, self.image_size, self.centercrop)


class DecodedImageDataset(Dataset):
    """Images decoded one at a time from files or database records.

    Subclasses implement `_decode(index)` (a `(C, H, W)` uint8 or float tensor) and
    `_describe(index)` (the file or key, for error messages). Without `image_size` all
    images must come out at the size of image 0, which is checked on every access.
    """

    def __init__(self, count: int, image_size: int | None, centercrop: bool):
        self.count = count
        self.image_size = image_size
        self.centercrop = centercrop
        self.shape: tuple[int, ...] | None = None
        self.shape = tuple(self[0].shape) if count > 0 else None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"image index {index} out of range for {self.count} images")
        image = resize_images(to_unit_range(self._decode(index)), self.image_size, self.centercrop)
        if self.shape is not None and tuple(image.shape) != self.shape:
            raise MemgenError(f"image {self._describe(index)} has shape {tuple(image.shape)} but "
                              f"{self._describe(0)} has {self.shape}; pass --image-size (and "
                              "--centercrop for non-square images) so that all images get one size")
        return image

    def _decode(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError


def _pil_to_tensor(image: Image.Image, mode: str, source: str) -> torch.Tensor:
    """Convert a PIL image to a uint8 `(C, H, W)` tensor in `mode` ('L' or 'RGB')."""
    if image.mode in UNSUPPORTED_MODES:
        raise MemgenError(f"{source} has 16-bit or float pixels (PIL mode {image.mode}); "
                          "convert the images to 8-bit PNG or JPEG")
    return TF.pil_to_tensor(image.convert(mode))


def _pil_mode(image: Image.Image) -> str:
    """Return 'L' for grey images and 'RGB' for every other 8-bit image."""
    return "L" if image.mode in GREY_MODES else "RGB"


class ImageFileDataset(DecodedImageDataset):
    """Image files decoded with PIL, all converted to the mode ('L' or 'RGB') of the first one."""

    def __init__(self, paths: Sequence[Path], image_size: int | None = None, centercrop: bool = False):
        self.paths = list(paths)
        try:
            with Image.open(self.paths[0]) as first:
                self.mode = _pil_mode(first)
        except OSError as error:
            raise MemgenError(f"cannot read the image '{self.paths[0]}': {error}; "
                              "remove or replace it") from error
        self._warned_mode = False
        super().__init__(len(self.paths), image_size, centercrop)

    def _decode(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                if _pil_mode(image) != self.mode and not self._warned_mode:
                    self._warned_mode = True
                    logger.warning("'%s' is %s but '%s' is %s; converting every image to %s",
                                   path, image.mode, self.paths[0], self.mode, self.mode)
                return _pil_to_tensor(image, self.mode, f"'{path}'")
        except (OSError, Image.DecompressionBombError) as error:
            raise MemgenError(f"cannot read the image '{path}': {error}; remove or replace it") from error

    def _describe(self, index: int) -> str:
        return f"'{self.paths[index]}'"


class NpyFileDataset(DecodedImageDataset):
    """`.npy` files of one image each: `(H, W, C)`, `(C, H, W)`, `(H, W)` or with a leading 1.

    Pixels are uint8 in [0, 255] or float in [-1, 1], and C is 1 or 3. The leading axis
    of length 1 admits the `(1, 3, 1024, 1024)` files of the original CelebA-HQ release.
    """

    def __init__(self, paths: Sequence[Path], image_size: int | None = None, centercrop: bool = False):
        self.paths = list(paths)
        super().__init__(len(self.paths), image_size, centercrop)

    def _decode(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        source = f"'{path}'"
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise MemgenError(f"cannot read {source} as a plain .npy array: {error}") from error
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        _check_pixel_values(array, source)
        return torch.from_numpy(np.ascontiguousarray(_array_to_chw(array, source, batched=False)))

    def _describe(self, index: int) -> str:
        return f"'{self.paths[index]}'"


class LmdbImageDataset(DecodedImageDataset):
    """Encoded images stored as the values of an LMDB database, in key order, as RGB.

    This reads the layout of LSUN's `<category>_lmdb` folders in the order of
    torchvision's `LSUN` class (database key order), without that class's pickled key
    cache in the working directory. The database opens lazily in each process, so the
    dataset works in DataLoader workers.
    """

    def __init__(self, folder: Path, image_size: int | None = None, centercrop: bool = False):
        import lmdb

        self.folder = folder
        self._environment = None
        self._environment_pid = None
        environment = lmdb.open(str(folder), readonly=True, lock=False, readahead=False, meminit=False)
        with environment.begin(write=False) as transaction:
            self.keys = list(transaction.cursor().iternext(keys=True, values=False))
        environment.close()
        super().__init__(len(self.keys), image_size, centercrop)

    def _open(self):
        import lmdb

        if self._environment is not None and self._environment_pid != os.getpid():
            # py-lmdb rejects a second open of one path in a process, and a forked
            # DataLoader worker inherits the parent's handle, so release that copy first.
            self._environment.close()
            self._environment = None
        if self._environment is None:
            self._environment = lmdb.open(str(self.folder), readonly=True, lock=False,
                                          readahead=False, meminit=False)
            self._environment_pid = os.getpid()
        return self._environment

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_environment"] = None
        state["_environment_pid"] = None
        return state

    def _decode(self, index: int) -> torch.Tensor:
        with self._open().begin(write=False) as transaction:
            value = transaction.get(self.keys[index])
        try:
            with Image.open(io.BytesIO(value)) as image:
                return _pil_to_tensor(image, "RGB", self._describe(index))
        except OSError as error:
            raise MemgenError(f"cannot decode {self._describe(index)}: {error}") from error

    def _describe(self, index: int) -> str:
        return f"record {self.keys[index]!r} of '{self.folder}'"


# --- IDX files: MNIST and Fashion-MNIST --------------------------------------------------


def _check_idx_file(path: Path) -> None:
    """Check the IDX header of an uint8 file (magic 0x0000080D, D dimensions) and its length."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or not 1 <= magic[3] <= 4:
            raise MemgenError(f"'{path}' is not an uncompressed uint8 IDX file (it starts with "
                              f"{magic.hex() or 'nothing'}, expected 0000080d); replace it with the "
                              "original file, e.g. with 'make data'")
        dims = handle.read(4 * magic[3])
    shape = [int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4)]
    expected = 4 + 4 * magic[3] + int(np.prod(shape))
    size = path.stat().st_size
    if len(shape) != magic[3] or size != expected:
        raise MemgenError(f"'{path}' has {size} bytes but its IDX header {shape} needs {expected}; "
                          "the file is truncated or damaged, so replace it (e.g. with 'make data')")


def _missing_idx_files(raw: Path) -> list[str]:
    return [name for name in IDX_FILES if not (raw / name).is_file()]


def _decompress(source: Path, target: Path) -> None:
    """Decompress a gzip file to `target` atomically and check the result as IDX."""
    with atomic_path(target) as temporary:
        try:
            with gzip.open(source, "rb") as packed, open(temporary, "wb") as unpacked:
                shutil.copyfileobj(packed, unpacked, length=1 << 20)
        except (OSError, EOFError) as error:
            raise MemgenError(f"cannot decompress '{source}': {error}") from error
        _check_idx_file(temporary)
        os.chmod(temporary, 0o644)


def _decompress_gz_siblings(raw: Path) -> None:
    """Fill missing IDX files in `raw` from `<name>.gz` files next to them."""
    for name in _missing_idx_files(raw):
        packed = raw / f"{name}.gz"
        if packed.is_file():
            _decompress(packed, raw / name)
            logger.info("decompressed '%s' into '%s'", packed, raw / name)


def _debian_fashion_mnist_files() -> dict[str, Path] | None:
    """Return the gzipped IDX files of the Debian package when all four are installed."""
    files = {name: DEBIAN_FASHION_MNIST / f"{name}.gz" for name in IDX_FILES}
    if all(path.is_file() for path in files.values()):
        return files
    return None


def _install_debian_fashion_mnist(raw: Path) -> None:
    """Decompress the Debian package's Fashion-MNIST files that `raw` is missing."""
    files = _debian_fashion_mnist_files()
    missing = _missing_idx_files(raw)
    if not missing:
        return
    for name in missing:
        _decompress(files[name], raw / name)
    logger.info("decompressed Debian's Fashion-MNIST from '%s' into '%s'", DEBIAN_FASHION_MNIST, raw)


def memgen_cache_dir() -> Path:
    """Return memgen's data cache, `<cache root>/data` (see memgen.files.cache_root)."""
    return cache_root() / "data"


def fashion_mnist_install_hint() -> str:
    """Return the commands that put Fashion-MNIST where memgen finds it."""
    return ("run 'make data' (which uses Debian's package when installed and otherwise "
            "downloads with torchvision), or 'apt-get install dataset-fashion-mnist'")


def _mnist_install_hint(folder_name: str, data_path: Path) -> str:
    if folder_name == "FashionMNIST":
        return fashion_mnist_install_hint()
    return (f"download it on a machine with network access with python -c \"import torchvision; "
            f"torchvision.datasets.MNIST('{data_path}', download=True)\" and copy "
            f"'{data_path / folder_name}' here")


def _find_idx_root(folder_name: str, data_path: Path) -> Path:
    """Return a root whose `<folder_name>/raw/` contains all four IDX files.

    For Fashion-MNIST a missing raw folder is filled from Debian's package, in
    `data_path` when it is writable and in memgen's cache folder otherwise.
    """
    raw = data_path / folder_name / "raw"
    if raw.is_dir():
        _decompress_gz_siblings(raw)
        missing = _missing_idx_files(raw)
        if missing:
            raise MemgenError(f"'{raw}' is missing the IDX files {', '.join(missing)}; "
                              f"{_mnist_install_hint(folder_name, data_path)}")
        return data_path

    cached_root = memgen_cache_dir()
    if folder_name == "FashionMNIST" and _debian_fashion_mnist_files() is not None:
        try:
            ensure_writable_dir(raw)
            root = data_path
        except MemgenError:
            logger.info("'%s' is not writable; using the cache folder '%s'", data_path, cached_root)
            ensure_writable_dir(cached_root / folder_name / "raw")
            root = cached_root
        _install_debian_fashion_mnist(root / folder_name / "raw")
        return root

    if not _missing_idx_files(cached_root / folder_name / "raw"):
        logger.info("using %s from the cache folder '%s'", folder_name, cached_root)
        return cached_root

    misplaced = [folder for folder in (data_path, data_path / folder_name) if not _missing_idx_files(folder)]
    if misplaced:
        raise MemgenError(f"{folder_name} not found in the expected layout: the IDX files are in "
                          f"'{misplaced[0]}' but must be in '{raw}'; move them there")
    raise MemgenError(f"{folder_name} not found: no folder '{raw}' with the four IDX files "
                      f"{', '.join(IDX_FILES)}; {_mnist_install_hint(folder_name, data_path)}, "
                      "or pass --data-path to the folder that contains "
                      f"{folder_name}/raw")


def prepare_fashion_mnist(data_path: str | os.PathLike) -> Path:
    """Put the four uncompressed Fashion-MNIST IDX files into `<data_path>/FashionMNIST/raw`.

    Uses Debian's `dataset-fashion-mnist` files when installed and otherwise torchvision's
    download. Files already present are kept. Returns the raw folder.
    """
    data_path = Path(data_path)
    raw = data_path / "FashionMNIST" / "raw"
    if raw.is_dir():
        _decompress_gz_siblings(raw)
    if not _missing_idx_files(raw):
        for name in IDX_FILES:
            _check_idx_file(raw / name)
        logger.info("Fashion-MNIST is already complete in '%s'", raw)
        return raw

    ensure_writable_dir(raw)
    if _debian_fashion_mnist_files() is not None:
        _install_debian_fashion_mnist(raw)
        return raw

    logger.info("Debian's dataset-fashion-mnist is not installed in '%s'; downloading with torchvision",
                DEBIAN_FASHION_MNIST)
    try:
        torchvision.datasets.FashionMNIST(data_path, train=True, download=True)
    except (RuntimeError, OSError) as error:
        raise MemgenError(f"cannot download Fashion-MNIST into '{raw}' ({error}); without network "
                          "access run 'apt-get install dataset-fashion-mnist' and then 'make data' "
                          f"again, or copy the four IDX files {', '.join(IDX_FILES)} into '{raw}'") from error
    logger.info("downloaded Fashion-MNIST into '%s'", raw)
    return raw


def _load_mnist_family(folder_name: str, data_path: Path, train: bool) -> torch.Tensor:
    """Read MNIST or Fashion-MNIST with torchvision; return uint8 `(N, 1, 28, 28)`."""
    root = _find_idx_root(folder_name, data_path)
    prefix = "train" if train else "t10k"
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        _check_idx_file(root / folder_name / "raw" / name)
    dataset_class = torchvision.datasets.FashionMNIST if folder_name == "FashionMNIST" else torchvision.datasets.MNIST
    dataset = dataset_class(root, train=train, download=False)
    return dataset.data.unsqueeze(1)


# --- CIFAR-10 -----------------------------------------------------------------------------


def _cifar10_hint(data_path: Path) -> str:
    return (f"download it on a machine with network access with python -c \"import torchvision; "
            f"torchvision.datasets.CIFAR10('{data_path}', download=True)\" and copy the folder "
            "cifar-10-batches-py here, or pass --data-path to the folder that contains it")


def _load_cifar10(data_path: Path, train: bool) -> torch.Tensor:
    """Read CIFAR-10 with torchvision; return uint8 `(N, 3, 32, 32)`.

    The batch files are Python pickles. torchvision loads them only after their MD5 sums
    match the official release, so no other bytes ever reach the unpickler.
    """
    cifar = torchvision.datasets.CIFAR10
    folder = data_path / cifar.base_folder
    files = cifar.train_list + cifar.test_list + [[cifar.meta["filename"], cifar.meta["md5"]]]
    if not folder.is_dir():
        raise MemgenError(f"CIFAR-10 not found: no folder '{folder}'; {_cifar10_hint(data_path)}")
    missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        raise MemgenError(f"'{folder}' is missing the CIFAR-10 files {', '.join(missing)}; {_cifar10_hint(data_path)}")
    damaged = [name for name, md5 in files
               if not torchvision.datasets.utils.check_integrity(str(folder / name), md5)]
    if damaged:
        raise MemgenError(f"the CIFAR-10 files {', '.join(damaged)} in '{folder}' do not match the MD5 "
                          f"sums of the official release; {_cifar10_hint(data_path)}")
    dataset = cifar(data_path, train=train, download=False)
    return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()


# --- folders and files --------------------------------------------------------------------


def find_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """List the files under `folder` (recursively) whose suffix is in `extensions`, sorted.

    Hidden files and folders are skipped. The suffix comparison ignores case.
    """
    found = []
    for root, folders, names in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(root) / name)
    return sorted(found)


def _named_or_root(data_path: Path, name: str) -> Path:
    """Return `data_path / name` when that folder exists, else `data_path` itself."""
    named = data_path / name
    return named if named.is_dir() else data_path


def _require_train_split(data_name: str, folder: Path, train: bool) -> None:
    if not train:
        raise MemgenError(f"--data-name {data_name} ('{folder}') has only a training split; "
                          "use the training split or split the images into a separate folder")


def _image_folder(data_name: str, folder: Path, extensions: Sequence[str], image_size: int | None,
                  centercrop: bool, layout: str) -> ImageFileDataset:
    if not folder.is_dir():
        raise MemgenError(f"--data-name {data_name}: folder not found: '{folder}'; expected {layout}")
    paths = find_files(folder, extensions)
    if not paths:
        raise MemgenError(f"--data-name {data_name}: no image file ({', '.join(extensions)}) under "
                          f"'{folder}'; expected {layout}")
    logger.info("found %d image files under '%s'", len(paths), folder)
    return ImageFileDataset(paths, image_size, centercrop)


def _load_lsun_church(data_path: Path, image_size: int | None, centercrop: bool, train: bool) -> Dataset:
    split = LSUN_CHURCH_SPLITS[train]
    lmdb_folder = data_path / f"{split}_lmdb"
    if (data_path / "data.mdb").is_file():
        lmdb_folder = data_path
    layout = (f"LSUN's LMDB folder '{data_path / (split + '_lmdb')}' (read with the lmdb package) "
              f"or image files under '{data_path / 'lsun-church'}' or '{data_path}'")
    if lmdb_folder.is_dir():
        try:
            import lmdb  # noqa: F401
        except ImportError as error:
            raise MemgenError(f"'{lmdb_folder}' is an LMDB database, which needs the lmdb package; "
                              "run 'pip install lmdb' or convert the database to an image folder") from error
        dataset = LmdbImageDataset(lmdb_folder, image_size, centercrop)
        if len(dataset) == 0:
            raise MemgenError(f"the LMDB database '{lmdb_folder}' contains no record; expected {layout}")
        logger.info("found %d LSUN records in '%s'", len(dataset), lmdb_folder)
        return dataset

    folder = _named_or_root(data_path, "lsun-church")
    if not folder.is_dir():
        raise MemgenError(f"LSUN-Church not found under '{data_path}'; expected {layout}")
    _require_train_split("lsun-church", folder, train)
    return _image_folder("lsun-church", folder, IMAGE_EXTENSIONS, image_size, centercrop, layout)


def _load_celebahq(data_path: Path, image_size: int | None, centercrop: bool, train: bool) -> Dataset:
    folder = _named_or_root(data_path, "celebahq")
    layout = (f".npy files of one image each, (H, W, C) or (C, H, W) uint8, under "
              f"'{data_path / 'celebahq'}' or '{data_path}'")
    if not folder.is_dir():
        raise MemgenError(f"--data-name celebahq: folder not found: '{folder}'; expected {layout}")
    _require_train_split("celebahq", folder, train)
    paths = find_files(folder, (".npy",))
    if not paths:
        raise MemgenError(f"--data-name celebahq: no .npy file under '{folder}'; expected {layout}")
    logger.info("found %d .npy files under '%s'", len(paths), folder)
    return NpyFileDataset(paths, image_size, centercrop)


def _load_npz(path: Path, image_size: int | None, centercrop: bool, train: bool) -> Dataset:
    key = "images" if train else "test_images"
    if path.is_dir():
        raise MemgenError(f"--data-name npz expects an .npz file but '{path}' is a folder; "
                          "pass the file, or use --data-name imagefolder for a folder of images")
    if not path.is_file():
        raise MemgenError(f"--data-name npz: file not found: '{path}'; pass --data-path to an .npz file "
                          f"with the images (N, C, H, W) under '{key}'")
    arrays = load_npz(path)
    if key not in arrays:
        raise MemgenError(f"--data-name npz: '{path}' has no array '{key}' (it has {sorted(arrays)}); store "
                          "the images (N, C, H, W) under 'images', and test images under 'test_images'")
    array = arrays[key]
    source = f"array '{key}' of '{path}'"
    images = _array_to_chw(array, source, batched=True)
    _check_pixel_values(images, source)
    if images.shape[0] == 0:
        raise MemgenError(f"{source} contains no image")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    return ImageArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), image_size, centercrop)


def _check_image_size(image_size: int | None) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise MemgenError(f"--image-size {image_size!r} is not a positive number of pixels")


def load_dataset(data_name: str, data_path: str | os.PathLike, image_size: int | None = None,
                 centercrop: bool = False, train: bool = True) -> Dataset:
    """Open one split of a dataset by name; items are float32 `(C, H, W)` images in [-1, 1].

    `image_size` resizes every image to a square of that side, after a centre crop to the
    short side when `centercrop` is set. `len()` is the number of images N of the split.
    Raises MemgenError naming the path tried and the fix when the data are missing.
    """
    if data_name not in DATASET_NAMES:
        raise MemgenError(f"unknown --data-name {data_name!r}; use one of {', '.join(DATASET_NAMES)}")
    _check_image_size(image_size)
    data_path = Path(data_path).expanduser()

    if data_name in ("fashionmnist", "mnist"):
        folder_name = "FashionMNIST" if data_name == "fashionmnist" else "MNIST"
        dataset = ImageArrayDataset(_load_mnist_family(folder_name, data_path, train), image_size, centercrop)
    elif data_name == "cifar10":
        dataset = ImageArrayDataset(_load_cifar10(data_path, train), image_size, centercrop)
    elif data_name == "lsun-church":
        dataset = _load_lsun_church(data_path, image_size, centercrop, train)
    elif data_name == "celeba":
        folder = _named_or_root(data_path, "celeba")
        _require_train_split(data_name, folder, train)
        layout = f".jpg or .png files under '{data_path / 'celeba'}' or '{data_path}'"
        dataset = _image_folder(data_name, folder, CELEBA_EXTENSIONS, image_size, centercrop, layout)
    elif data_name == "celebahq":
        dataset = _load_celebahq(data_path, image_size, centercrop, train)
    elif data_name == "imagefolder":
        _require_train_split(data_name, data_path, train)
        layout = f"a folder of image files ({', '.join(IMAGE_EXTENSIONS)})"
        dataset = _image_folder(data_name, data_path, IMAGE_EXTENSIONS, image_size, centercrop, layout)
    else:
        dataset = _load_npz(data_path, image_size, centercrop, train)

    logger.info("loaded %s (%s split) from '%s': %d images of shape %s", data_name,
                "train" if train else "test", data_path, len(dataset), tuple(dataset[0].shape))
    return dataset


# --- the training subset of size K --------------------------------------------------------


def subset_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """Return the first min(K, N) entries of the seeded permutation of range(N), int64.

    This equals the first part of `torch.utils.data.random_split` with the same seeded
    generator, so subsets are nested across K. K above N keeps all N with a warning.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MemgenError(f"--train-size {k!r} is not a positive number of training images; pass K >= 1")
    if k > n:
        logger.warning("--train-size %d exceeds the %d images of the dataset; using all %d", k, n, n)
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return permutation[:min(int(k), n)]


def training_subset(dataset: Dataset, k: int, seed: int) -> Subset:
    """Return the training subset of size K (all N when K >= N) drawn with `seed`."""
    return Subset(dataset, subset_indices(len(dataset), k, seed).tolist())


def _unwrap_subsets(dataset: Dataset, indices: torch.Tensor) -> tuple[Dataset, torch.Tensor]:
    """Follow nested `Subset`s down to the base dataset, mapping `indices` along."""
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices, dtype=torch.int64)[indices]
        dataset = dataset.dataset
    return dataset, indices


def load_images(dataset: Dataset, indices: Sequence[int] | torch.Tensor | None = None,
                batch_size: int = 1024, num_workers: int = 0) -> torch.Tensor:
    """Stack images `indices` (all when None) of `dataset` into float32 `(N, C, H, W)`.

    In-memory datasets are indexed in batches directly; others go through a DataLoader
    with `num_workers` processes. A progress bar shows when there is more than one batch.
    """
    if indices is None:
        indices = torch.arange(len(dataset))
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    base, base_indices = _unwrap_subsets(dataset, indices)
    count = len(base_indices)
    if count == 0:
        return torch.empty((0, *dataset[0].shape)) if len(dataset) else torch.empty((0,))

    images = None
    with tqdm(total=count, desc="loading images", unit="img", disable=count <= batch_size) as progress:
        for start, batch in _iterate_batches(base, base_indices, batch_size, num_workers):
            if images is None:
                images = torch.empty((count, *batch.shape[1:]), dtype=torch.float32)
            images[start:start + len(batch)] = batch
            progress.update(len(batch))
    return images


def _iterate_batches(base: Dataset, indices: torch.Tensor, batch_size: int, num_workers: int):
    """Yield `(start, images)` batches of `base[indices]` in order."""
    if isinstance(base, ImageArrayDataset):
        for start in range(0, len(indices), batch_size):
            yield start, base.load_batch(indices[start:start + batch_size])
        return
    loader = DataLoader(Subset(base, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    start = 0
    for batch in loader:
        yield start, batch
        start += len(batch)


def load_training_images(data_name: str, data_path: str | os.PathLike, train_size: int, seed: int,
                         image_size: int | None = None, centercrop: bool = False) -> torch.Tensor:
    """Return the K training images of a run as float32 `(K, C, H, W)` in [-1, 1].

    K is min(train_size, N); the subset is `subset_indices(N, train_size, seed)`, in that order.
    """
    dataset = load_dataset(data_name, data_path, image_size=image_size, centercrop=centercrop, train=True)
    subset = training_subset(dataset, train_size, seed)
    images = load_images(subset)
    logger.info("loaded the %d training images of %s (train_size %d, seed %d)",
                len(images), data_name, train_size, seed)
    return images


TRAINING_META_KEYS = ("data_name", "train_size", "seed")


def training_images_from_meta(meta: dict, data_path: str | os.PathLike | None = None) -> torch.Tensor:
    """Rebuild the training images recorded in a result's metadata.

    `meta` needs `data_name`, `train_size` and `seed` (of the subset); `image_size`
    (default None) and `centercrop` (default False) are optional. `data_path` overrides
    `meta["data_path"]`, because the data often sit elsewhere on another machine.
    """
    missing = [key for key in TRAINING_META_KEYS if meta.get(key) is None]
    if missing:
        raise MemgenError(f"the metadata is missing {', '.join(missing)} (it has {sorted(meta)}), so the "
                          "training images cannot be rebuilt; pass a file written by a memgen stage")
    if data_path is None:
        data_path = meta.get("data_path")
        if data_path is None:
            raise MemgenError("the metadata records no data_path; pass --data-path")
    return load_training_images(meta["data_name"], data_path, int(meta["train_size"]), int(meta["seed"]),
                                image_size=meta.get("image_size"), centercrop=bool(meta.get("centercrop", False)))

