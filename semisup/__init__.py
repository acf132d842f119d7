"""semisup: semi-supervised learning with meta-learned confidence weights.

FixMatch (Sohn et al. 2020) with per-image weights on its unlabelled loss, a confidence network
trained by implicit hypergradients (:func:`bilevel.hypergrad`), the baselines it is measured
against, on-device augmentation, and the class-mismatch protocol (Oliver et al. 2018).

Named ``semisup`` rather than ``ssl``: a top-level package called ``ssl`` shadows Python's
standard ``ssl`` module whenever the repository root is on ``sys.path`` (pytest, ``python -m``),
and ``import flax`` then fails inside asyncio.

How the unlabelled images are weighted is a :class:`Weighting` registered in :data:`WEIGHTINGS`
(:func:`register_weighting`); ``Config(method=name)`` picks one.

Submodules are imported on first use (PEP 562), so that ``bilevel ssl --help`` (which reads
:mod:`semisup.cli`, :mod:`semisup.options` and :mod:`semisup.weighting`) does not pay for
importing JAX and flax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bilevel.lazy import attach

#: Public name -> (the module that defines it, its name there).
_EXPORTS = {
    "OPERATIONS": ("semisup.augment", "OPERATIONS"),
    "apply_operation": ("semisup.augment", "apply_operation"),
    "cutout": ("semisup.augment", "cutout"),
    "strong_augment": ("semisup.augment", "strong_augment"),
    "weak_augment": ("semisup.augment", "weak_augment"),
    "Batch": ("semisup.batch", "Batch"),
    "Config": ("semisup.options", "Config"),
    "State": ("semisup.config", "State"),
    "init": ("semisup.fixmatch", "init"),
    "init_seeds": ("semisup.fixmatch", "init_seeds"),
    "period": ("semisup.fixmatch", "period"),
    "run_periods": ("semisup.fixmatch", "run_periods"),
    "run_seeds": ("semisup.fixmatch", "run_seeds"),
    "unstack": ("semisup.fixmatch", "unstack"),
    "unrolled_influence": ("semisup.influence", "unrolled_influence"),
    "confidence_weights": ("semisup.losses", "confidence_weights"),
    "cross_entropy": ("semisup.losses", "cross_entropy"),
    "fixmatch_loss": ("semisup.losses", "fixmatch_loss"),
    "normalise": ("semisup.losses", "normalise"),
    "pseudo_labels": ("semisup.losses", "pseudo_labels"),
    "ParametricWeighting": ("semisup.meta", "ParametricWeighting"),
    "implicit_meta_step": ("semisup.meta", "implicit_meta_step"),
    "meta_gradient": ("semisup.meta", "meta_gradient"),
    "meta_losses": ("semisup.meta", "meta_losses"),
    "meta_set": ("semisup.meta", "meta_set"),
    "auroc": ("semisup.metrics", "auroc"),
    "evaluate": ("semisup.metrics", "evaluate"),
    "paired_difference": ("semisup.metrics", "paired_difference"),
    "CONF_INPUTS": ("semisup.options", "CONF_INPUTS"),
    "WEIGHT_NORMS": ("semisup.options", "WEIGHT_NORMS"),
    "CURVATURES": ("semisup.options", "CURVATURES"),
    "META_DATA": ("semisup.options", "META_DATA"),
    "Split": ("semisup.protocol", "Split"),
    "make_split": ("semisup.protocol", "make_split"),
    "merge_validation": ("semisup.protocol", "merge_validation"),
    "ood_count": ("semisup.protocol", "ood_count"),
    "stack_splits": ("semisup.protocol", "stack_splits"),
    "SOLVERS": ("semisup.solvers", "SOLVERS"),
    "make_solver": ("semisup.solvers", "make_solver"),
    "METHODS": ("semisup.weighting", "METHODS"),
    "USES_VALIDATION": ("semisup.weighting", "USES_VALIDATION"),
    "WEIGHTINGS": ("semisup.weighting", "WEIGHTINGS"),
    "Weighting": ("semisup.weighting", "Weighting"),
    "register_weighting": ("semisup.weighting", "register_weighting"),
    "load_checkpoint": ("semisup.checkpoint", "load"),
    "save_checkpoint": ("semisup.checkpoint", "save"),
}

#: Submodules reachable as attributes of the package (``semisup.fixmatch``), as when this
#: module imported them eagerly.
_SUBMODULES = ("augment", "batch", "checkpoint", "config", "fixmatch", "influence", "losses",
               "meta", "metrics", "models", "options", "protocol", "solvers", "strategies",
               "weighting")

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = attach(__name__, _EXPORTS, _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover
    from semisup.augment import (  # noqa: F401
        OPERATIONS,
        apply_operation,
        cutout,
        strong_augment,
        weak_augment,
    )
    from semisup.batch import Batch  # noqa: F401
    from semisup.checkpoint import load as load_checkpoint  # noqa: F401
    from semisup.checkpoint import save as save_checkpoint  # noqa: F401
    from semisup.config import Config, State  # noqa: F401
    from semisup.fixmatch import (  # noqa: F401
        init,
        init_seeds,
        period,
        run_periods,
        run_seeds,
        unstack,
    )
    from semisup.influence import unrolled_influence  # noqa: F401
    from semisup.losses import (  # noqa: F401
        confidence_weights,
        cross_entropy,
        fixmatch_loss,
        normalise,
        pseudo_labels,
    )
    from semisup.meta import (  # noqa: F401
        ParametricWeighting,
        implicit_meta_step,
        meta_gradient,
        meta_losses,
        meta_set,
    )
    from semisup.metrics import (  # noqa: F401
        auroc,
        evaluate,
        paired_difference,
    )
    from semisup.options import CONF_INPUTS, CURVATURES, META_DATA, WEIGHT_NORMS  # noqa: F401
    from semisup.protocol import (  # noqa: F401
        Split,
        make_split,
        merge_validation,
        ood_count,
        stack_splits,
    )
    from semisup.solvers import SOLVERS, make_solver  # noqa: F401
    from semisup.weighting import (  # noqa: F401
        METHODS,
        USES_VALIDATION,
        WEIGHTINGS,
        Weighting,
        register_weighting,
    )
