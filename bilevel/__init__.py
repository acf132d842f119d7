"""bilevel: hypergradients (implicit, unrolled, ES) built on :mod:`hvp`.

The public API is what this module exports; everything else may change.
"""

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
    "PROBLEMS",
    "AbstractMethod",
    "BilevelProblem",
    "ESInfo",
    "ESMethod",
    "HypergradInfo",
    "ImplicitMethod",
    "PESState",
    "TrainResult",
    "TrainerConfig",
    "UnrolledInfo",
    "UnrolledMethod",
    "data_reweighting",
    "digits_mlp",
    "distributed",
    "es_hypergrad",
    "hypergrad",
    "implicit",
    "imaml_regression",
    "logistic_l2",
    "make_problem",
    "pes_hypergrad",
    "pes_init",
    "ridge",
    "train",
    "train_problem",
    "unrolled_hypergrad",
]
