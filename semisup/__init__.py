"""semisup: semi-supervised learning with meta-learned confidence weights.

FixMatch (Sohn et al. 2020) with per-image weights on its unlabelled loss, a confidence network
trained by implicit hypergradients (:func:`bilevel.hypergrad`), the baselines it is measured
against, on-device augmentation, and the class-mismatch protocol (Oliver et al. 2018).

Named ``semisup`` rather than ``ssl``: a top-level package called ``ssl`` shadows Python's
standard ``ssl`` module whenever the repository root is on ``sys.path`` (pytest, ``python -m``),
and ``import flax`` then fails inside asyncio.
"""

from semisup.augment import OPERATIONS, apply_operation, cutout, strong_augment, weak_augment
from semisup.checkpoint import load as load_checkpoint
from semisup.checkpoint import save as save_checkpoint
from semisup.fixmatch import (
    CONF_INPUTS,
    CURVATURES,
    META_DATA,
    METHODS,
    SOLVERS,
    USES_VALIDATION,
    Config,
    State,
    confidence_weights,
    cross_entropy,
    fixmatch_loss,
    init,
    init_seeds,
    make_solver,
    meta_gradient,
    meta_losses,
    meta_set,
    normalise,
    period,
    pseudo_labels,
    run_periods,
    run_seeds,
    unrolled_influence,
    unstack,
)
from semisup.metrics import auroc, evaluate, paired_difference
from semisup.protocol import Split, make_split, merge_validation, ood_count, stack_splits

__all__ = [
    "CONF_INPUTS",
    "CURVATURES",
    "META_DATA",
    "METHODS",
    "OPERATIONS",
    "SOLVERS",
    "USES_VALIDATION",
    "Config",
    "Split",
    "State",
    "apply_operation",
    "auroc",
    "confidence_weights",
    "cross_entropy",
    "cutout",
    "evaluate",
    "fixmatch_loss",
    "init",
    "init_seeds",
    "load_checkpoint",
    "make_solver",
    "make_split",
    "meta_gradient",
    "merge_validation",
    "meta_losses",
    "meta_set",
    "normalise",
    "ood_count",
    "paired_difference",
    "period",
    "pseudo_labels",
    "run_periods",
    "run_seeds",
    "save_checkpoint",
    "stack_splits",
    "strong_augment",
    "unrolled_influence",
    "unstack",
    "weak_augment",
]
