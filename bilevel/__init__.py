"""bilevel: hypergradients (implicit, unrolled, ES) built on :mod:`hvp`.

The public API is what this module exports; everything else may change.
"""

from bilevel.es import ESInfo, PESState, es_hypergrad, pes_hypergrad, pes_init
from bilevel.implicit import HypergradInfo, hypergrad, implicit
from bilevel.trainer import (
    AbstractMethod,
    ESMethod,
    ImplicitMethod,
    TrainerConfig,
    TrainResult,
    UnrolledMethod,
    train,
    train_problem,
)
from bilevel.unrolled import UnrolledInfo, unrolled_hypergrad

__all__ = [
    "AbstractMethod",
    "ESInfo",
    "ESMethod",
    "HypergradInfo",
    "ImplicitMethod",
    "PESState",
    "TrainResult",
    "TrainerConfig",
    "UnrolledInfo",
    "UnrolledMethod",
    "es_hypergrad",
    "hypergrad",
    "implicit",
    "pes_hypergrad",
    "pes_init",
    "train",
    "train_problem",
    "unrolled_hypergrad",
]
