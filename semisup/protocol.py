"""The class-mismatch protocol: labelled, validation, unlabelled (in- and out-of-distribution)
and test sets with exact counts and no overlap.

Oliver et al. 2018 ("Realistic evaluation of deep semi-supervised learning") *swap* in-
distribution (ID) unlabelled images for out-of-distribution (OOD) ones at a fixed pool size; He et
al. 2025 point out that this confounds "more OOD" with "less ID", so the default design here *adds*
OOD images to a fixed ID pool: ``ood_ratio = 0.5`` means half as many OOD images as ID ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bilevel import datasets
from semisup.options import DESIGNS

#: ID classes per dataset; the rest of the dataset's classes are the "near" OOD.
#: CIFAR-10: the six animal classes (bird, cat, deer, dog, frog, horse), as in Oliver et al.
DEFAULT_IN_CLASSES = {"cifar10": (2, 3, 4, 5, 6, 7)}
OOD_KINDS = ("near", "far", "other")


class Split(NamedTuple):
    """One seed's data. ID labels are renumbered ``0..K−1`` in the order of ``in_classes``.

    Attributes:
      x_labelled, y_labelled: the labelled training set.
      x_validation, y_validation: the held-out labelled set of the outer (meta) loss; every
        method gets it, so label budgets are equal.
      x_unlabelled: ID and OOD unlabelled images, shuffled.
      unlabelled_ood: bool, true for OOD unlabelled images (used only by the oracle and metrics).
      unlabelled_label: the ID label of each unlabelled image, −1 for OOD (metrics only).
      x_test, y_test: the ID test images.
    """

    x_labelled: np.ndarray
    y_labelled: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_unlabelled: np.ndarray
    unlabelled_ood: np.ndarray
    unlabelled_label: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def ood_count(num_unlabelled: int, ood_ratio: float, design: str) -> tuple[int, int]:
    """``(ID count, OOD count)`` of the unlabelled set.

    ``design="add"``: ``num_unlabelled`` ID images plus ``round(ood_ratio · num_unlabelled)`` OOD.
    ``design="swap"``: ``num_unlabelled`` images in all, ``round(ood_ratio · num_unlabelled)`` OOD.
    """
    if design not in DESIGNS:
        raise ValueError(f"semisup.make_split: design must be one of {DESIGNS}, got {design!r}")
    if ood_ratio < 0 or (design == "swap" and ood_ratio > 1):
        limit = "[0, 1]" if design == "swap" else ">= 0"
        raise ValueError(f"semisup.make_split: ood_ratio must be {limit} with design={design!r}, "
                         f"got {ood_ratio}")
    num_ood = int(round(ood_ratio * num_unlabelled))
    return (num_unlabelled - num_ood, num_ood) if design == "swap" else (num_unlabelled, num_ood)


def _take(where: str, rng, pool: np.ndarray, count: int, what: str) -> np.ndarray:
    if count > len(pool):
        raise ValueError(f"{where}: asked for {count} {what} but only {len(pool)} are available")
    return rng.permutation(pool)[:count]


def make_split(dataset: datasets.Dataset, *, labelled_per_class: int, validation_per_class: int,
               num_unlabelled: int, ood_ratio: float, ood: str = "near", design: str = "add",
               in_classes: tuple[int, ...] | None = None,
               ood_dataset: datasets.Dataset | None = None, seed: int = 0) -> Split:
    """Build one seed's class-mismatch split of ``dataset``.

    Args:
      dataset: from :func:`bilevel.datasets.load`.
      labelled_per_class, validation_per_class: labelled images per ID class in the training
        and the validation set (drawn from the training images, disjoint).
      num_unlabelled: ID unlabelled images (``design="add"``) or the whole unlabelled pool
        (``design="swap"``), drawn from the remaining ID training images.
      ood_ratio: OOD images per ID unlabelled image (``add``) or OOD share (``swap``).
      ood: ``"near"`` (the dataset's other classes), ``"far"`` (patches of scikit-learn's sample
        photos) or ``"other"`` (training images of ``ood_dataset``, e.g. CIFAR-100 or SVHN).
      design: ``"add"`` or ``"swap"`` (see :func:`ood_count`).
      in_classes: ID classes; default classes 2–7 for CIFAR-10, else the first 60 % (0–5 of 10).
      ood_dataset: the OOD source for ``ood="other"``.
      seed: seed of every draw; the same seed gives the same split.

    Returns:
      A :class:`Split`.
    """
    where = "semisup.make_split"
    if ood not in OOD_KINDS:
        raise ValueError(f"{where}: ood must be one of {OOD_KINDS}, got {ood!r}")
    for name, value in (("labelled_per_class", labelled_per_class),
                        ("validation_per_class", validation_per_class),
                        ("num_unlabelled", num_unlabelled)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    num_id, num_ood = ood_count(num_unlabelled, ood_ratio, design)
    if in_classes is None:
        in_classes = DEFAULT_IN_CLASSES.get(dataset.name,
                                            tuple(range(int(0.6 * dataset.num_classes))))
    in_classes = tuple(int(c) for c in in_classes)
    if not in_classes or any(not 0 <= c < dataset.num_classes for c in in_classes):
        raise ValueError(f"{where}: in_classes must be classes of {dataset.name} "
                         f"(0..{dataset.num_classes - 1}), got {in_classes}")
    rng = np.random.default_rng(seed)
    relabel = np.full(dataset.num_classes, -1, np.int32)
    relabel[list(in_classes)] = np.arange(len(in_classes))
    labelled, validation, rest = [], [], []
    for c in in_classes:
        index = rng.permutation(np.flatnonzero(dataset.y_train == c))
        need = labelled_per_class + validation_per_class
        if need > len(index):
            raise ValueError(f"{where}: class {c} has {len(index)} training images, fewer than "
                             f"labelled_per_class + validation_per_class = {need}")
        labelled.append(index[:labelled_per_class])
        validation.append(index[labelled_per_class:need])
        rest.append(index[need:])
    labelled, validation = np.concatenate(labelled), np.concatenate(validation)
    id_unlabelled = _take(where, rng, np.concatenate(rest), num_id, "ID unlabelled images")
    x_ood = _ood_images(where, rng, dataset, ood, num_ood, in_classes, ood_dataset, seed)
    x_unlabelled = np.concatenate([dataset.x_train[id_unlabelled], x_ood])
    is_ood = np.concatenate([np.zeros(num_id, bool), np.ones(num_ood, bool)])
    label = np.concatenate([relabel[dataset.y_train[id_unlabelled]],
                            np.full(num_ood, -1, np.int32)])
    order = rng.permutation(num_id + num_ood)
    test = np.isin(dataset.y_test, in_classes)
    return Split(dataset.x_train[labelled], relabel[dataset.y_train[labelled]],
                 dataset.x_train[validation], relabel[dataset.y_train[validation]],
                 x_unlabelled[order].astype(np.float32), is_ood[order], label[order],
                 dataset.x_test[test], relabel[dataset.y_test[test]])


def _ood_images(where, rng, dataset, ood, count, in_classes, ood_dataset, seed) -> np.ndarray:
    shape = dataset.x_train.shape[1:]
    if ood == "near":
        pool = np.flatnonzero(~np.isin(dataset.y_train, in_classes))
        return dataset.x_train[_take(where, rng, pool, count, "near-OOD images")]
    if ood == "far":
        return datasets.far_ood_patches(count, *shape, seed=seed) if count else \
            np.zeros((0, *shape), np.float32)
    if ood_dataset is None:
        raise ValueError(f"{where}: ood='other' needs ood_dataset (e.g. CIFAR-100 or SVHN)")
    if ood_dataset.x_train.shape[1:] != shape:
        raise ValueError(f"{where}: ood_dataset {ood_dataset.name} has images of shape "
                         f"{ood_dataset.x_train.shape[1:]}, {dataset.name} has {shape}")
    pool = np.arange(len(ood_dataset.x_train))
    return ood_dataset.x_train[_take(where, rng, pool, count, f"{ood_dataset.name} images")]


def merge_validation(split: Split) -> Split:
    """The split with the validation images added to the labelled set.

    For methods that have no use for a held-out set (supervised, FixMatch, the oracle,
    max-softmax): they train on the validation labels too, so every method spends the same
    label budget. The validation set stays in place for evaluation only.
    """
    return split._replace(x_labelled=np.concatenate([split.x_labelled, split.x_validation]),
                          y_labelled=np.concatenate([split.y_labelled, split.y_validation]))


def stack_splits(splits: list[Split]) -> Split:
    """Stack equally shaped splits along a new leading (seed) axis, for ``vmap``."""
    return Split(*(np.stack(parts) for parts in zip(*splits, strict=True)))
