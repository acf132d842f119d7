"""bilevel: hypergradients (implicit, unrolled, ES) built on :mod:`hvp`.

The public API is what this module exports; everything else may change.

Submodules are imported on first use (PEP 562), so that ``import bilevel.cli`` -- and with it
``bilevel --help`` -- does not pay for importing JAX.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports name the lazily loaded public API)
from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from bilevel.lazy import attach

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "ESInfo": "bilevel.es",
    "PESState": "bilevel.es",
    "es_hypergrad": "bilevel.es",
    "pes_hypergrad": "bilevel.es",
    "pes_init": "bilevel.es",
    "HypergradInfo": "bilevel.implicit",
    "hypergrad": "bilevel.implicit",
    "implicit": "bilevel.implicit",
    "PROBLEMS": "bilevel.problems",
    "BilevelProblem": "bilevel.problems",
    "data_reweighting": "bilevel.problems",
    "digits_mlp": "bilevel.problems",
    "imaml_regression": "bilevel.problems",
    "logistic_l2": "bilevel.problems",
    "make_problem": "bilevel.problems",
    "ridge": "bilevel.problems",
    "AbstractMethod": "bilevel.trainer",
    "InnerProblem": "bilevel.trainer",
    "ESMethod": "bilevel.trainer",
    "ImplicitMethod": "bilevel.trainer",
    "TrainerConfig": "bilevel.trainer",
    "TrainResult": "bilevel.trainer",
    "UnrolledMethod": "bilevel.trainer",
    "train": "bilevel.trainer",
    "train_problem": "bilevel.trainer",
    "AmIGO": "bilevel.stochastic",
    "F2SA": "bilevel.stochastic",
    "MASOBA": "bilevel.stochastic",
    "SABA": "bilevel.stochastic",
    "SOBA": "bilevel.stochastic",
    "StocBiO": "bilevel.stochastic",
    "Minibatches": "bilevel.streams",
    "UnrolledInfo": "bilevel.unrolled",
    "unrolled_hypergrad": "bilevel.unrolled",
    "SolveError": "hvp.checks",
    "SolveWarning": "hvp.checks",
}
_SUBMODULES = ("checkpoint", "config", "distributed", "lazy", "stochastic", "streams")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


__getattr__, __dir__ = attach(__name__, _EXPORTS, _SUBMODULES)


class _Package(types.ModuleType):
    """Keeps ``bilevel.implicit`` the decorator when its submodule of the same name loads.

    The import system sets a submodule as an attribute of its package on first load; the
    eager imports this module used to make re-bound the public name afterwards.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover
    from bilevel import distributed
    from bilevel.es import ESInfo, PESState, es_hypergrad, pes_hypergrad, pes_init
    from bilevel.implicit import HypergradInfo, hypergrad, implicit
    from bilevel.problems import (
        PROBLEMS,
        BilevelProblem,
        data_reweighting,
        digits_mlp,
        imaml_regression,
        logistic_l2,
        make_problem,
        ridge,
    )
    from bilevel.stochastic import F2SA, MASOBA, SABA, SOBA, AmIGO, StocBiO
    from bilevel.streams import Minibatches
    from bilevel.trainer import (
        AbstractMethod,
        ESMethod,
        ImplicitMethod,
        InnerProblem,
        TrainerConfig,
        TrainResult,
        UnrolledMethod,
        train,
        train_problem,
    )
    from bilevel.unrolled import UnrolledInfo, unrolled_hypergrad
    from hvp.checks import SolveError, SolveWarning
