"""semisup: semi-supervised learning with meta-learned confidence weights.

FixMatch (Sohn et al. 2020) with per-image weights on its unlabelled loss, a confidence network
trained by implicit hypergradients (:func:`bilevel.hypergrad`), the baselines it is measured
against, on-device augmentation, and the class-mismatch protocol (Oliver et al. 2018).

Named ``semisup`` rather than ``ssl``: a top-level package called ``ssl`` shadows Python's
standard ``ssl`` module whenever the repository root is on ``sys.path`` (pytest, ``python -m``),
and ``import flax`` then fails inside asyncio.

Submodules are imported on first use (PEP 562), so that ``bilevel ssl --help`` (which reads
:mod:`semisup.cli` and :mod:`semisup.options`) does not pay for importing JAX and flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> (the module that defines it, its name there).
_EXPORTS = {
    "OPERATIONS": ("semisup.augment", "OPERATIONS"),
    "apply_operation": ("semisup.augment", "apply_operation"),
    "cutout": ("semisup.augment", "cutout"),
    "strong_augment": ("semisup.augment", "strong_augment"),
    "weak_augment": ("semisup.augment", "weak_augment"),
    "CONF_INPUTS": ("semisup.fixmatch", "CONF_INPUTS"),
    "CURVATURES": ("semisup.fixmatch", "CURVATURES"),
    "META_DATA": ("semisup.fixmatch", "META_DATA"),
    "METHODS": ("semisup.fixmatch", "METHODS"),
    "SOLVERS": ("semisup.fixmatch", "SOLVERS"),
    "USES_VALIDATION": ("semisup.fixmatch", "USES_VALIDATION"),
    "Config": ("semisup.fixmatch", "Config"),
    "State": ("semisup.fixmatch", "State"),
    "confidence_weights": ("semisup.fixmatch", "confidence_weights"),
    "cross_entropy": ("semisup.fixmatch", "cross_entropy"),
    "fixmatch_loss": ("semisup.fixmatch", "fixmatch_loss"),
    "init": ("semisup.fixmatch", "init"),
    "init_seeds": ("semisup.fixmatch", "init_seeds"),
    "make_solver": ("semisup.fixmatch", "make_solver"),
    "meta_gradient": ("semisup.fixmatch", "meta_gradient"),
    "meta_losses": ("semisup.fixmatch", "meta_losses"),
    "meta_set": ("semisup.fixmatch", "meta_set"),
    "normalise": ("semisup.fixmatch", "normalise"),
    "period": ("semisup.fixmatch", "period"),
    "pseudo_labels": ("semisup.fixmatch", "pseudo_labels"),
    "run_periods": ("semisup.fixmatch", "run_periods"),
    "run_seeds": ("semisup.fixmatch", "run_seeds"),
    "unrolled_influence": ("semisup.fixmatch", "unrolled_influence"),
    "unstack": ("semisup.fixmatch", "unstack"),
    "auroc": ("semisup.metrics", "auroc"),
    "evaluate": ("semisup.metrics", "evaluate"),
    "paired_difference": ("semisup.metrics", "paired_difference"),
    "Split": ("semisup.protocol", "Split"),
    "make_split": ("semisup.protocol", "make_split"),
    "merge_validation": ("semisup.protocol", "merge_validation"),
    "ood_count": ("semisup.protocol", "ood_count"),
    "stack_splits": ("semisup.protocol", "stack_splits"),
    "load_checkpoint": ("semisup.checkpoint", "load"),
    "save_checkpoint": ("semisup.checkpoint", "save"),
}

#: Submodules reachable as attributes of the package (``semisup.fixmatch``), as when this
#: module imported them eagerly.
_SUBMODULES = ("augment", "checkpoint", "fixmatch", "metrics", "models", "protocol")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"semisup.{name}")
    else:
        raise AttributeError(f"module 'semisup' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from semisup.augment import (  # noqa: F401
        OPERATIONS,
        apply_operation,
        cutout,
        strong_augment,
        weak_augment,
    )
    from semisup.checkpoint import load as load_checkpoint  # noqa: F401
    from semisup.checkpoint import save as save_checkpoint  # noqa: F401
    from semisup.fixmatch import (  # noqa: F401
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
    from semisup.metrics import (  # noqa: F401
        auroc,
        evaluate,
        paired_difference,
    )
    from semisup.protocol import (  # noqa: F401
        Split,
        make_split,
        merge_validation,
        ood_count,
        stack_splits,
    )
