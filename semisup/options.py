"""The settings of a run (:class:`Config`) and the names it and :func:`semisup.make_split`
choose from, declared once, importable without JAX (``bilevel ssl --help`` reads them; the
modules that train import JAX and flax).

Each :class:`Config` field carries its default, rule (type and range) and help
(:mod:`bilevel.config`); ``bilevel ssl train`` derives its options from them. The methods are
the names of :data:`semisup.WEIGHTINGS` (:mod:`semisup.weighting`, also JAX-free), read live, so
a registered weighting is accepted. The solvers are :data:`semisup.solvers.SOLVERS`' (names of
:data:`hvp.SOLVERS`), which need JAX: read only when a ``Config`` is checked, so ``--solver``
is checked after parsing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import TYPE_CHECKING

from bilevel.argtypes import DefaultsHelpFormatter
from bilevel.config import Bool, Choice, Float, Int, Tuple, field, validate
from semisup.weighting import METHODS, WEIGHTINGS

if TYPE_CHECKING:  # pragma: no cover
    from semisup.weighting import Weighting

#: ``Config.curvature``: the Hessian of the head (``"last"``) or of the whole classifier.
CURVATURES = ("last", "all")
#: ``Config.conf_inputs``: what the confidence network reads.
CONF_INPUTS = ("image", "image+softmax")
#: ``Config.meta_optimizer``.
META_OPTIMIZERS = ("adam", "sgd")
#: ``Config.weight_norm``: the unlabelled weights scaled to mean 1 over the images that pass the
#: mask (the total unlabelled weight stays FixMatch's), or used as they are.
WEIGHT_NORMS = ("mask", "none")
#: ``Config.meta_data``: the meta loss's labelled images.
META_DATA = ("validation", "labelled")
#: ``make_split(design=...)``: OOD images added to a fixed ID pool, or swapped in.
DESIGNS = ("add", "swap")
#: ``--dataset``: the in-distribution sets ``bilevel ssl train`` accepts.
DATASETS = ("digits", "mnist5k", "mnist", "fashion_mnist", "cifar10")
#: ``--model`` -> (convolution widths, hidden width) of :class:`semisup.models.Body`.
MODELS = {"mlp": ((), 64), "cnn": ((16, 32), 64)}
#: What ``--solver`` accepts, said without loading the registry (which needs JAX).
SOLVER_NAMES = ("a name in hvp.SOLVERS but dense, the exact reference, and those that need a "
                "minibatch Hessian, such as lissa")

HelpFormatter = DefaultsHelpFormatter


def _solvers():
    """:data:`semisup.solvers.SOLVERS` (imported when a solver name is checked: it needs JAX)."""
    return importlib.import_module("semisup.solvers").SOLVERS


_COUNT = Int(min=1)
_NONNEGATIVE = Float(ge=0)
_UNIT = Float(ge=0, lt=1)


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one training run (defaults: the FixMatch paper's, where it has them),
    checked when constructed. Each field's help says what it means (and is its ``bilevel ssl
    train`` option's help, where it has one).

    ``solver_iters=``, the old name of ``maxiter``, still works with a ``DeprecationWarning``
    (and wins over ``maxiter``, so that ``dataclasses.replace(config, solver_iters=...)``
    changes it). On ``meta_optimizer``: Adam normalises the small, noisy meta-gradient per
    parameter; SGD follows its mean at its own scale, so its ``meta_lr`` must suit that scale
    (digits MLP: 1 moved the logits by about 0.6 over 200 meta-steps, 10 by about 7, and 100
    diverged).
    """

    method: str = field("fixmatch", rule=Choice(METHODS),
                        help="how the unlabelled images are weighted (semisup.WEIGHTINGS)")
    steps: int = field(1000, rule=_COUNT, help="classifier steps (a multiple of --meta-every)")
    batch_size: int = field(64, rule=_COUNT, help="labelled images per step")
    mu: int = field(7, rule=_COUNT, help="unlabelled images per labelled one in a step")
    lambda_u: float = field(1.0, rule=Float(ge=0, le=1e3), help="weight of the unlabelled loss")
    threshold: float = field(0.95, rule=Float(gt=0, lt=1),
                             help="FixMatch's confidence threshold")
    lr: float = field(0.03, rule=Float(gt=0, le=10), help="SGD learning rate (cosine-decayed: "
                                                          "lr · cos(7πk / 16K))")
    momentum: float = field(0.9, rule=_UNIT, cli=False, help="SGD's Nesterov momentum")
    weight_decay: float = field(5e-4, rule=_NONNEGATIVE, cli=False,
                                help="the classifier's weight decay")
    ema: float = field(0.999, rule=_UNIT,
                       help="decay of the weight average used for evaluation")
    flip: bool = field(True, rule=Bool(), cli=False,
                       help="flip images in the augmentations (off for digits)")
    widths: tuple[int, ...] = field((16, 32), rule=Tuple(_COUNT), cli=False,
                                    help="the classifier's convolution widths "
                                         "(semisup.models.Body); () is an MLP with one hidden "
                                         "layer")
    hidden: int = field(64, rule=_COUNT, cli=False, help="the classifier's hidden width")
    solver: str = field("cg", rule=Choice(_solvers, summary=SOLVER_NAMES), metavar="NAME",
                        help="inverse-HVP approximation of the meta-gradient: {choices}")
    maxiter: int = field(10, rule=_COUNT, aliases=("--solver-iters",),
                         help="its iteration budget (Neumann terms, CG iterations, Nystrom "
                              "rank; any other solver gets the products of that many CG "
                              "iterations; see semisup.make_solver); --solver-iters "
                              "(solver_iters) is its old name")
    curvature: str = field("last", rule=Choice(CURVATURES),
                           help="Hessian of the head (last: the body's features held fixed) or "
                                "of the whole classifier (all)")
    damping: float = field(0.0, rule=Float(ge=0, le=1e3), help="added to the Hessian in the "
                                                               "solve")
    meta_every: int = field(5, rule=_COUNT, help="classifier steps per meta-step")
    meta_start: int = field(0, rule=Int(min=0),
                            help="classifier steps before the first meta-step (the weighting "
                                 "keeps its initial parameters until then: the confidence "
                                 "network weighs like FixMatch while its pseudo-labels form)")
    meta_lr: float = field(1e-3, rule=Float(gt=0), help="the confidence network's learning rate")
    meta_optimizer: str = field("adam", rule=Choice(META_OPTIMIZERS),
                                help="the confidence network's optimizer (sgd steps by the raw "
                                     "meta-gradient times --meta-lr)")
    meta_weight_decay: float = field(0.0, rule=Float(ge=0, le=1e6),
                                     help="decoupled weight decay on the confidence network "
                                          "(AdamW's with adam, φ ← φ − meta_lr · "
                                          "meta_weight_decay · φ with sgd; pulls the weights "
                                          "towards 1)")
    conf_widths: tuple[int, ...] = field((8, 16), rule=Tuple(_COUNT, nonempty=True), cli=False,
                                         help="the confidence network's widths")
    conf_inputs: str = field("image", rule=Choice(CONF_INPUTS),
                             help="what the confidence network reads: the weak view, or also "
                                  "the classifier's class probabilities of it (stop-gradient)")
    meta_data: str = field("validation", rule=Choice(META_DATA),
                           help="the meta loss's data (for the methods that read one, l2rw and "
                                "confnet): the held-out validation set, or the labelled "
                                "training set (DS3L; the validation labels then join training)")
    weight_norm: str = field("mask", rule=Choice(WEIGHT_NORMS),
                             help="mask: weights scaled to mean 1 over the images that pass the "
                                  "mask, so a weighting only moves FixMatch's total unlabelled "
                                  "weight between images (a filter raises the weight of what it "
                                  "keeps); none: the raw weights as they are (the oracle is then "
                                  "FixMatch without the OOD images)")

    def __post_init__(self):
        where = "semisup.Config"
        validate(self, where)
        if self.steps % self.meta_every:
            raise ValueError(f"{where}: steps ({self.steps}) must be a multiple of meta_every "
                             f"({self.meta_every})")

    @property
    def weighting(self) -> Weighting:
        """The :class:`semisup.Weighting` of ``method``."""
        return WEIGHTINGS[self.method]()

    @property
    def uses_validation(self) -> bool:
        """Whether the run reads the held-out validation set (else it should train on it:
        :func:`semisup.protocol.merge_validation`, so that label budgets are equal)."""
        return self.weighting.uses_validation and self.meta_data == "validation"

    @property
    def periods(self) -> int:
        """Training is run in periods of ``meta_every`` inner steps (plus a meta-step)."""
        return self.steps // self.meta_every

    @property
    def solver_iters(self) -> int:
        """Deprecated: :attr:`maxiter`."""
        warnings.warn("semisup.Config.solver_iters is deprecated; use maxiter",
                      DeprecationWarning, stacklevel=2)
        return self.maxiter


def _accept_solver_iters(init):
    """``Config(solver_iters=n)``, the old name of ``maxiter``, with a DeprecationWarning."""

    @functools.wraps(init)
    def __init__(self, *args, solver_iters=None, **kwargs):
        if solver_iters is not None:
            warnings.warn("semisup.Config: solver_iters is deprecated; use maxiter",
                          DeprecationWarning, stacklevel=2)
            kwargs["maxiter"] = solver_iters
        init(self, *args, **kwargs)

    return __init__


Config.__init__ = _accept_solver_iters(Config.__init__)
