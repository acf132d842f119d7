"""Tiny files in the standard dataset formats, for tests of the loaders and of the CLIs that
take ``--data-dir`` (nothing is downloaded; the content is random)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Writes a uint8 array as an IDX file (the MNIST format)."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path = Path(str(path) + ".gz") if compress else Path(path)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def _images(rng, n, *shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_fake_mnist(folder: Path, n_train: int = 30, n_test: int = 10, seed: int = 0,
                     compress: bool = False) -> dict[str, np.ndarray]:
    """MNIST/Fashion-MNIST IDX files with random 28×28 images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": _images(rng, n_train, 28, 28),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
              "t10k-images-idx3-ubyte": _images(rng, n_test, 28, 28),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8)}
    for name, array in arrays.items():
        write_idx(folder / name, array, compress)
    return arrays


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR stores rows of CHW


def write_fake_cifar10(folder: Path, per_batch: int = 6, n_test: int = 6, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """``cifar-10-batches-py/`` with five training batches and a test batch of random images."""
    rng = np.random.default_rng(seed)
    folder = Path(folder) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images = _images(rng, 5 * per_batch + n_test, 32, 32, 3)
    labels = rng.integers(0, 10, len(images))
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        _pickle(folder / f"data_batch_{i + 1}",
                {b"data": _cifar_rows(images[part]), b"labels": labels[part].tolist()})
    _pickle(folder / "test_batch", {b"data": _cifar_rows(images[5 * per_batch:]),
                                    b"labels": labels[5 * per_batch:].tolist()})
    return {"images": images, "labels": labels}


def write_fake_cifar100(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0
                        ) -> dict[str, np.ndarray]:
    """``cifar-100-python/`` with ``train`` and ``test`` of random images and fine labels."""
    rng = np.random.default_rng(seed)
    folder = Path(folder) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    images = _images(rng, n_train + n_test, 32, 32, 3)
    labels = rng.integers(0, 100, len(images))
    for name, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        _pickle(folder / name, {b"data": _cifar_rows(images[part]),
                                b"fine_labels": labels[part].tolist(),
                                b"coarse_labels": (labels[part] // 5).tolist()})
    return {"images": images, "labels": labels}


def write_fake_svhn(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """``train_32x32.mat`` / ``test_32x32.mat`` (X as 32×32×3×N, labels 1..10 with 10 for 0)."""
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = _images(rng, n_train + n_test, 32, 32, 3)
    labels = rng.integers(1, 11, len(images))
    for name, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        savemat(folder / f"{name}_32x32.mat", {"X": images[part].transpose(1, 2, 3, 0),
                                               "y": labels[part].reshape(-1, 1)})
    return {"images": images, "labels": labels}
