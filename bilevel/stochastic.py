"""Stochastic bilevel methods for :func:`bilevel.train` that draw their own minibatches.

Each is a frozen dataclass implementing :class:`bilevel.AbstractMethod`, beside
:class:`bilevel.ImplicitMethod`. They move θ themselves (plain SGD with their own step sizes), so
they are meant for ``TrainerConfig(inner_steps=0, ...)``; the trainer's outer optimizer applies the
returned direction to λ.

=========  ==========================================================  ==================
method     per outer step                                              HVPs per step
=========  ==========================================================  ==================
SOBA       one joint SGD step on θ and on v (Dagréou et al. 2022)      1
SABA       SOBA with SAGA memories per sample (Dagréou et al. 2022)    1
MASOBA     SOBA with a moving average of D_λ, v projected (Chen,       1
           Xiao, Balasubramanian 2023)
StocBiO    T SGD steps on θ, a Neumann series for v from Q             Q
           minibatch HVPs (Ji, Yang, Liang 2021)
AmIGO      T SGD steps on θ, M warm-started SGD steps on v (Arbel &    M
           Mairal 2022)
F2SA       first order: T steps on θ and on the penalised variable     0
           z, penalty σ_k growing (Kwon et al. 2023)
=========  ==========================================================  ==================

Conventions (one for all six):

* **Data.** ``inner_args`` / ``outer_args`` are tuples of arrays whose leading axis is the sample
  axis (the same size for every array of a tuple). The losses are means over that axis, plus any
  sample-independent terms (a regulariser), so that a loss on a minibatch of rows is an unbiased
  estimate of the loss on all of them; a loss on one row is that sample's loss (SABA). Minibatch
  indices are drawn on device, without replacement within a batch, from the ``key`` the trainer
  passes (``jax.random``; the same key gives the same batches), independently at every step,
  except SABA's, which come in epochs (every sample once an epoch; see :class:`SABA`). With
  ``sampling="blocks"`` a minibatch is instead one of the ``n // B`` blocks of consecutive rows
  (SABA: every block once an epoch), sliced out of the arrays rather than gathered, which is
  how benchopt's bilevel benchmark samples and what makes a step memory-bound rather than
  gather-bound; the rows must then be in random order already (shuffle them once).
  ``inner_batch_size`` / ``outer_batch_size`` ``None`` means the full batch.
  :func:`bilevel.train` also takes the data as ``bilevel.Minibatches(arrays, batch_size)``: it
  passes the method the arrays and sets its batch size from the stream (the method keeps
  drawing its own batches, several per outer step, from the trainer's key; the stream's epoch
  order is not used). A host iterator of batches (which has no per-sample indices for SABA's
  memories) and ``replace=True`` are refused.
* **Sign of v.** ``v ≈ v* = −H⁻¹ ∇_θ f`` with ``H = ∇²_θθ g``: v* minimises
  ``½ vᵀHv + ∇_θ fᵀ v``, its SGD direction is ``D_v = H v + ∇_θ f``, and the λ direction is
  ``D_λ = ∇_λ f + ∇²_λθ g · v``, the exact hypergradient at ``(θ*(λ), v*)``.
* **Products.** ``H v`` and ``∇²_λθ g · v`` come from one forward-over-reverse pass
  (``jax.jvp`` of ``θ ↦ (∇_θ g, ∇_λ g)`` along v); a cross product alone is one VJP of
  ``λ ↦ ∇_θ g``. ``hvp_count`` counts minibatch Hessian-vector products (a cross product computed
  in the same pass is not counted).
* **Step sizes.** Fields, constant by default (as benchopt's benchmark runs these methods);
  ``step_decay = a > 0`` multiplies every SGD step size (on θ, v, z) by ``(k+1)^(−a)`` at the
  method's k-th outer step (SOBA's analysis: a = 2/5 with the outer step decaying like
  k^(−3/5), which is the outer optimizer's schedule). With minibatches and constant steps the
  iterates end in a noise ball; SABA's variance reduction removes it.
* **Stats.** Every method reports ``outer_loss`` (f on this step's outer minibatch, at the θ the
  direction used), ``finite``, ``inner_grad_norm`` (the minibatch ∇_θ g at that θ), ``v_norm``
  (``nan`` for F2SA, which has no v) and ``hvp_count``. A step whose direction, new θ, new state
  or outer loss is not finite reports ``finite=False`` and hands back θ and its state unchanged,
  so the trainer's skip leaves nothing poisoned behind.
* **State that needs λ or the data's size.** SABA's memories and MASOBA's average are shaped like
  λ (and SABA's have one row per sample), which ``init(params)`` alone cannot know.
  :meth:`init_state` builds the state from an :class:`InnerProblem`, λ and θ, and
  :func:`bilevel.train` calls it. ``SABA(...).bind(hparams, inner_args, outer_args)`` records
  the shapes so that plain ``init(params)`` works too, for code that calls only ``init``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from bilevel import _common, streams
from bilevel.trainer import AbstractMethod, InnerProblem

PyTree = Any

__all__ = ["SOBA", "SABA", "MASOBA", "StocBiO", "AmIGO", "F2SA", "SOBAState", "SABAState",
           "MASOBAState", "StocBiOState", "AmIGOState", "F2SAState"]


# --------------------------------------------------------------------------------------------
# Field validation.


def _fail(owner: str, name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"bilevel.{owner}: {name} must be {expected}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _check_step_size(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_number(value) or not 0.0 < value < math.inf:
        raise _fail(owner, name, "a finite number > 0" + (" or None" if allow_none else ""), value)


def _check_count(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise _fail(owner, name, "an integer >= 1" + (" or None" if allow_none else ""), value)


#: The key of a field's check in ``dataclasses.Field.metadata``: ``check(owner, name, value)``.
_CHECK = "bilevel.stochastic.check"


def _checked(default: Any, check: Callable[[str, str, Any], None]) -> Any:
    """A field with ``default`` that ``_StochasticMethod.__post_init__`` checks with ``check``."""
    return dataclasses.field(default=default, metadata={_CHECK: check})


def _step_size(default: float | None) -> Any:
    """A step size (a finite number > 0); ``None`` allowed when it is the default."""
    return _checked(default, lambda owner, name, value: _check_step_size(
        owner, name, value, allow_none=default is None))


def _count(default: int) -> Any:
    """A number of steps (an integer >= 1)."""
    return _checked(default, _check_count)


def _check_memory_kind(owner: str, name: str, value: Any) -> None:
    if value not in ("sample", "batch"):
        raise _fail(owner, name, "'sample' or 'batch'", value)


def _check_averaging(owner: str, name: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise _fail(owner, name, "a number in (0, 1]", value)


# --------------------------------------------------------------------------------------------
# Data: sample counts and minibatches.


def _num_samples(where: str, name: str, args: tuple) -> int | None:
    """The common leading size of the arrays in ``args`` (``None`` when there are none)."""
    if not jax.tree_util.tree_leaves(args):
        return None
    return streams.num_samples(where, name, args)


def _checked_size(where: str, side: str, batch_size: int | None, args: tuple) -> int | None:
    """The number of samples in ``<side>_args``, after checking ``<side>_batch_size`` fits it."""
    size = _num_samples(where, f"{side}_args", args)
    if batch_size is not None and size is None:
        raise ValueError(f"{where}: {side}_batch_size={batch_size} needs per-sample data, but "
                         f"{side}_args holds no arrays")
    if batch_size is not None and batch_size > size:
        raise ValueError(f"{where}: {side}_batch_size={batch_size} is larger than the {size} "
                         f"samples of {side}_args (the leading axis of its arrays)")
    return size


class _Sampler(NamedTuple):
    """Draws minibatches of one side's data: ``batch`` rows without replacement (``blocks``:
    one of the ``size // batch`` blocks of consecutive rows), or all of it."""

    args: tuple
    size: int | None
    batch: int | None
    blocks: bool = False

    def indices(self, key: jax.Array) -> jax.Array:
        if self.batch is None:
            return jnp.arange(self.size)
        if self.blocks:
            return self.block_rows(jax.random.randint(key, (), 0, self.size // self.batch))
        return streams.distinct_indices(key, self.size, self.batch)

    def block_rows(self, block: jax.Array) -> jax.Array:
        """The rows of block ``block``: ``[block·batch, (block+1)·batch)``."""
        return block * self.batch + jnp.arange(self.batch, dtype=jnp.int32)

    def block(self, block: jax.Array) -> tuple:
        """Block ``block`` of the data, as slices (no gather)."""
        start = block * self.batch
        return jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, start, self.batch, axis=0), self.args)

    def draw(self, key: jax.Array) -> tuple:
        if self.batch is None:
            return self.args
        if self.blocks:
            return self.block(jax.random.randint(key, (), 0, self.size // self.batch))
        return _take(self.args, self.indices(key))


def _take(args: tuple, indices: jax.Array) -> tuple:
    return jax.tree_util.tree_map(lambda a: jnp.take(a, indices, axis=0), args)


def _samplers(where: str, method: Any, problem: InnerProblem) -> tuple[_Sampler, _Sampler]:
    inner_args, outer_args = tuple(problem.inner_args), tuple(problem.outer_args)
    inner_size = _checked_size(where, "inner", method.inner_batch_size, inner_args)
    outer_size = _checked_size(where, "outer", method.outer_batch_size, outer_args)
    blocks = method.sampling == "blocks"
    return (_Sampler(inner_args, inner_size, method.inner_batch_size, blocks),
            _Sampler(outer_args, outer_size, method.outer_batch_size, blocks))


# --------------------------------------------------------------------------------------------
# Derivatives on one minibatch.


def _inner_products(inner_loss: Callable, params, hparams, batch: tuple, v):
    """``(∇_θ g, ∇²_θθ g · v, ∇²_λθ g · v)`` from one forward-over-reverse pass."""
    def grads(p):
        return jax.grad(inner_loss, argnums=(0, 1))(p, hparams, *batch)

    (grad, _), (hv, cross) = jax.jvp(grads, (params,), (v,))
    return grad, hv, cross


def _inner_grad_and_cross(inner_loss: Callable, params, hparams, batch: tuple, v):
    """``(∇_θ g, ∇²_λθ g · v)``: one VJP of ``λ ↦ ∇_θ g`` (its value is the gradient)."""
    grad, vjp = jax.vjp(lambda h: jax.grad(inner_loss)(params, h, *batch), hparams)
    return grad, vjp(v)[0]


def _hvp(inner_loss: Callable, params, hparams, batch: tuple, v):
    """``∇²_θθ g · v``, forward over reverse."""
    return jax.jvp(lambda p: jax.grad(inner_loss)(p, hparams, *batch), (params,), (v,))[1]


def _outer_grads(outer_loss: Callable, params, hparams, batch: tuple):
    """``(f, ∇_θ f, ∇_λ f)``."""
    loss, (grad_params, grad_hparams) = jax.value_and_grad(outer_loss, argnums=(0, 1))(
        params, hparams, *batch)
    return loss, grad_params, grad_hparams


def _sgd(inner_loss: Callable, params, hparams, sampler: _Sampler, key: jax.Array, steps: int,
         step_size: float):
    """``steps`` minibatch SGD steps ``θ ← θ − ρ ∇_θ g(θ, λ; B_t)``."""
    def step(theta, step_key):
        grad = jax.grad(inner_loss)(theta, hparams, *sampler.draw(step_key))
        return otu.tree_add_scale(theta, -step_size, grad), None

    return jax.lax.scan(step, params, jax.random.split(key, steps))[0]


# --------------------------------------------------------------------------------------------
# The end of every step: the finiteness verdict, the guard, the stats.


def _where(condition: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda n, o: jnp.where(condition, n, o), new, old)


def _finish(direction, params, new_params, state, new_state, loss, inner_grad, v,
            hvp_count: int, **extra):
    """The protocol's ``(grad, new_params, new_state, stats)``; a non-finite step keeps θ and the
    state it started from (the trainer skips its λ update)."""
    finite = _common.tree_all_finite((direction, new_params, new_state, loss))
    v_norm = jnp.full((), jnp.nan, loss.dtype) if v is None else otu.tree_norm(v)
    stats = {"outer_loss": loss, "finite": finite, "inner_grad_norm": otu.tree_norm(inner_grad),
             "v_norm": v_norm, "hvp_count": jnp.asarray(hvp_count, jnp.int32), **extra}
    return (direction, _where(finite, new_params, params), _where(finite, new_state, state),
            stats)


# --------------------------------------------------------------------------------------------
# The shared base: state from (params, hparams, sample counts), and the bind() stopgap.


class _Bound(NamedTuple):
    """What :meth:`bind` records of a run, hashable so that the method stays a jit cache key."""

    hparams_structure: Any  # a PyTreeDef
    hparams_leaves: tuple  # jax.ShapeDtypeStruct per leaf
    inner_size: int | None
    outer_size: int | None


#: The ways a method draws its minibatches (the ``sampling`` field).
SAMPLINGS = ("rows", "blocks")

#: The fields every method ends with, after its own (so that the field order, which checkpoints
#: record, stays that of the methods' own declarations); checked by ``_check_common_fields``.
_COMMON_FIELDS = {"inner_batch_size": ("int | None", None),
                  "outer_batch_size": ("int | None", None),
                  "step_decay": ("float", 0.0),
                  "sampling": ("str", "rows")}


#: Their lines of the methods' ``Attributes:`` (the batch sizes' unless the method has its own).
_COMMON_DOC = {"inner_batch_size, outer_batch_size:": " minibatch rows; ``None``: all.\n",
               "step_decay:": " a >= 0; every SGD step size s becomes ``s / (k+1)^a`` at the "
                              "method's k-th\n        outer step (see the module docstring); 0: "
                              "constant.\n",
               "sampling:": (" how a minibatch of B rows is drawn from n. ``\"rows\"`` "
                             "(default): B distinct\n        rows at random (a gather). "
                             "``\"blocks\"``: one of the n // B blocks of consecutive\n        "
                             "rows ``[bB, (b+1)B)`` of the data as given (slices, no gather; "
                             "shuffle the rows\n        once beforehand, as the benchmark's "
                             "samplers assume). The last n mod B rows are\n        never drawn. "
                             "See the module docstring.\n")}


def _method(cls: type) -> type:
    """``cls`` as a frozen, keyword-only dataclass, with :data:`_COMMON_FIELDS` appended (and
    :data:`_COMMON_DOC` to its docstring)."""
    for name, (annotation, default) in _COMMON_FIELDS.items():
        cls.__annotations__[name] = annotation
        setattr(cls, name, default)
    doc = cls.__doc__.removesuffix("    ")
    cls.__doc__ = doc + "".join(f"      {key}{text}" for key, text in _COMMON_DOC.items()
                                if f"      {key}" not in doc) + "    "
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _StochasticMethod(AbstractMethod):
    """Shared by the six methods: the checks of the fields, ``init_state`` / ``bind`` /
    ``init``."""

    #: Set by :meth:`bind`; not a setting.
    bound: _Bound | None = dataclasses.field(default=None, repr=False)

    if TYPE_CHECKING:  # appended by _method
        inner_batch_size: int | None
        outer_batch_size: int | None
        step_decay: float
        sampling: str

    #: Whether the state needs λ's shapes or the sample counts (``init(params)`` needs ``bind``).
    _needs_problem = False

    #: The protocol's flag: given a :class:`bilevel.Minibatches`, :func:`bilevel.train` passes
    #: its arrays and sets the batch size from it.
    draws_own_batches = True

    def _state(self, params: PyTree, hparams: PyTree, inner_size: int | None,
               outer_size: int | None) -> PyTree:
        raise NotImplementedError

    @property
    def _name(self) -> str:
        return type(self).__name__

    def init_state(self, problem: InnerProblem, params: PyTree, hparams: PyTree) -> PyTree:
        """The state at the start of training, from the problem's data, θ₀ and λ₀.

        :class:`bilevel.AbstractMethod`'s hook, which :func:`bilevel.train` calls: SABA's
        memories need λ's shapes and the number of samples.
        """
        where = f"bilevel.{self._name}"
        inner_size = _checked_size(where, "inner", self.inner_batch_size,
                                   tuple(problem.inner_args))
        outer_size = _checked_size(where, "outer", self.outer_batch_size,
                                   tuple(problem.outer_args))
        return self._state(params, hparams, inner_size, outer_size)

    def bind(self, hparams: PyTree, inner_args: tuple = (), outer_args: tuple = ()):
        """This method with the shapes of λ and the sample counts of the data recorded, so that
        ``init(params)`` -- all that :func:`bilevel.train` calls today -- can build a state that
        needs them (SABA, MASOBA). The batch sizes are checked against the data here.

        Returns:
          a copy of the method; pass it as ``TrainerConfig(method=...)``.
        """
        where = f"bilevel.{self._name}.bind"
        _common.check_hparams(where, hparams)
        leaves, structure = jax.tree_util.tree_flatten(hparams)
        shapes = tuple(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves)
        bound = _Bound(structure, shapes,
                       _checked_size(where, "inner", self.inner_batch_size, tuple(inner_args)),
                       _checked_size(where, "outer", self.outer_batch_size, tuple(outer_args)))
        return dataclasses.replace(self, bound=bound)

    def init(self, params: PyTree) -> PyTree:
        if self.bound is None:
            if self._needs_problem:
                raise TypeError(
                    f"bilevel.{self._name}: the state is shaped like hparams and the data, which "
                    f"init(params) does not see; pass {self._name}(...).bind(hparams, inner_args, "
                    f"outer_args) to TrainerConfig, or build the state with init_state(problem, "
                    f"params, hparams)")
            return self._state(params, None, None, None)
        hparams = jax.tree_util.tree_unflatten(
            self.bound.hparams_structure,
            [jnp.zeros(s.shape, s.dtype) for s in self.bound.hparams_leaves])
        return self._state(params, hparams, self.bound.inner_size, self.bound.outer_size)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if _CHECK in f.metadata:
                f.metadata[_CHECK](self._name, f.name, getattr(self, f.name))
        self._check_relations()
        self._check_common_fields()

    def _check_relations(self) -> None:
        """Checks between a method's own fields, after each is checked alone."""

    def _check_common_fields(self) -> None:
        """The fields every method has: step_decay, the batch sizes, bound."""
        decay = self.step_decay
        if not _is_number(decay) or not 0.0 <= decay < math.inf:
            raise _fail(self._name, "step_decay", "a finite number >= 0", decay)
        _check_count(self._name, "inner_batch_size", self.inner_batch_size, allow_none=True)
        _check_count(self._name, "outer_batch_size", self.outer_batch_size, allow_none=True)
        if self.sampling not in SAMPLINGS:
            raise _fail(self._name, "sampling", f"one of {', '.join(map(repr, SAMPLINGS))}",
                        self.sampling)
        if self.bound is not None and not isinstance(self.bound, _Bound):
            raise _fail(self._name, "bound", "None (it is set by bind())", self.bound)

    def _decay(self, step: jax.Array) -> jax.Array | float:
        """``(k + 1)^(−a)``, the factor on every SGD step size at the method's k-th step."""
        if self.step_decay == 0.0:
            return 1.0
        return (step + 1.0) ** (-self.step_decay)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


# --------------------------------------------------------------------------------------------
# SOBA and MASOBA.


class SOBAState(NamedTuple):
    """SOBA's carried state: ``v ≈ −H⁻¹ ∇_θ f`` and the method's outer steps so far."""

    v: PyTree
    step: jax.Array  # int32


def _step0() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _soba_step(method: Any, problem: InnerProblem, params, hparams, v, step, key):
    """SOBA's update from one inner and one outer minibatch at ``(θ, v)``:
    ``θ − ρ D_θ``, ``v − ρ_v D_v`` and ``D_λ``, with the loss and ``∇_θ g`` for the stats."""
    inner, outer = _samplers(f"bilevel.{method._name}", method, problem)
    inner_key, outer_key = jax.random.split(key)
    grad, hv, cross = _inner_products(problem.inner_loss, params, hparams,
                                      inner.draw(inner_key), v)
    loss, f_params, f_hparams = _outer_grads(problem.outer_loss, params, hparams,
                                             outer.draw(outer_key))
    decay = method._decay(step)
    new_params = otu.tree_add_scale(params, -decay * method.inner_step_size, grad)
    v_step = decay * _or(method.v_step_size, method.inner_step_size)
    new_v = otu.tree_add_scale(v, -v_step, otu.tree_add(hv, f_params))
    return otu.tree_add(f_hparams, cross), new_params, new_v, loss, grad


@_method
class SOBA(_StochasticMethod):
    """SOBA, the StOchastic Bilevel Algorithm: one SGD step on θ, on v and on λ per outer step.

    From an inner minibatch B and an outer minibatch C, at the current ``(θ, v)``::

        θ ← θ − ρ ∇_θ g(θ, λ; B)
        v ← v − ρ_v (∇²_θθ g(θ, λ; B) v + ∇_θ f(θ, λ; C))        (v ≈ −H⁻¹ ∇_θ f)
        D_λ = ∇_λ f(θ, λ; C) + ∇²_λθ g(θ, λ; B) v                (returned; the trainer steps λ)

    all at the θ and v the step started from. One HVP and one cross product per step, from one
    forward-over-reverse pass. With full batches ``(θ*(λ), v*(λ))`` is a fixed point and D_λ is
    the exact hypergradient there; with minibatches and constant steps the iterates end in a
    noise ball that shrinks with the step sizes and grows with 1/batch (see ``step_decay``, or
    :class:`SABA`).

    Reference: Dagréou, Ablin, Vaiter, Moreau, "A framework for bilevel optimization that enables
    stochastic and global variance reduction algorithms", NeurIPS 2022.

    Attributes:
      inner_step_size: ρ > 0, the SGD step on θ (≲ 1/L of the inner loss).
      v_step_size: ρ_v > 0 for the step on v; ``None``: ρ, as in the paper.
      inner_batch_size, outer_batch_size: rows of ``inner_args`` / ``outer_args`` per minibatch;
        ``None``: all of them.
    """

    inner_step_size: float = _step_size(0.1)
    v_step_size: float | None = _step_size(None)

    def _state(self, params, hparams, inner_size, outer_size):
        return SOBAState(otu.tree_zeros_like(params), _step0())

    def hypergrad(self, problem, params, hparams, state, key):
        direction, new_params, new_v, loss, grad = _soba_step(self, problem, params, hparams,
                                                              state.v, state.step, key)
        return _finish(direction, params, new_params, state, SOBAState(new_v, state.step + 1),
                       loss, grad, state.v, hvp_count=1)


class MASOBAState(NamedTuple):
    """MASOBA's carried state: v, the moving average of the λ direction, the steps so far."""

    v: PyTree
    average: PyTree
    step: jax.Array  # int32


def _project(v: PyTree, radius: float | None) -> PyTree:
    """Π onto the ball ``||v|| <= radius`` (no-op for ``None``)."""
    if radius is None:
        return v
    norm = otu.tree_norm(v)
    return otu.tree_scale(jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-30)), v)


@_method
class MASOBA(_StochasticMethod):
    """MA-SOBA: SOBA with a moving average of the λ direction and v kept in a ball.

    From SOBA's minibatch directions at ``(θ, v)`` (see :class:`SOBA`)::

        θ ← θ − ρ D_θ
        v ← Π_{||v|| <= r}(v − ρ_v D_v)
        w ← (1 − β) w + β D_λ                  (returned; the trainer steps λ along it)

    The paper's λ step uses the average of the previous step (``x_{k+1} = x_k − α w_k``, then
    ``w_{k+1}``); here the average already includes this step's D_λ, the usual form of momentum
    (one step less delay, no idle first step from ``w_0 = 0``). The projection radius r must bound
    ``||v*|| = ||H⁻¹ ∇_θ f||`` (the paper's ρ ≥ L_f/μ_g); ``None`` leaves v unprojected. Its
    state is shaped like λ: see the module docstring (``bind``).

    Reference: Chen, Xiao, Balasubramanian, "Optimal algorithms for stochastic bilevel
    optimization under relaxed smoothness conditions", 2023 (arXiv 2306.12067).

    Attributes:
      inner_step_size: ρ > 0, the SGD step on θ.
      v_step_size: ρ_v > 0; ``None``: ρ.
      averaging: β in (0, 1], the weight of the new direction in the average (1: SOBA).
      v_radius: r > 0, the radius of the ball v is projected on; ``None``: no projection.
    """

    inner_step_size: float = _step_size(0.1)
    v_step_size: float | None = _step_size(None)
    averaging: float = _checked(0.1, _check_averaging)
    v_radius: float | None = _step_size(None)

    _needs_problem = True

    def _state(self, params, hparams, inner_size, outer_size):
        return MASOBAState(otu.tree_zeros_like(params), otu.tree_zeros_like(hparams), _step0())

    def hypergrad(self, problem, params, hparams, state, key):
        direction, new_params, new_v, loss, grad = _soba_step(self, problem, params, hparams,
                                                              state.v, state.step, key)
        average = otu.tree_add_scale(otu.tree_scale(1.0 - self.averaging, state.average),
                                     self.averaging, direction)
        new_state = MASOBAState(_project(new_v, self.v_radius), average, state.step + 1)
        return _finish(average, params, new_params, state, new_state, loss, grad, state.v,
                       hvp_count=1)


# --------------------------------------------------------------------------------------------
# SABA.


class SABAState(NamedTuple):
    """SABA's carried state: v, SAGA memories with their running means, the steps so far.

    ``inner_memory`` = ``(∇_θ g_i, ∇²_θθ g_i v, ∇²_λθ g_i v)`` as last evaluated for each inner
    sample i (leading axis: the inner samples); ``outer_memory`` = ``(∇_θ f_j, ∇_λ f_j)`` for each
    outer sample j; ``*_mean`` their means over the samples. ``order`` and ``draws`` place the
    next minibatches in the epochs (see :class:`SABA`).
    """

    v: PyTree
    inner_memory: tuple
    inner_mean: tuple
    outer_memory: tuple
    outer_mean: tuple
    step: jax.Array  # int32
    order: jax.Array  # uint32: the seed of the run's epoch orders, drawn at the first step
    draws: jax.Array  # int32: minibatches drawn per side so far (skipped steps included)


def _per_sample(fun: Callable, args: tuple, indices: jax.Array):
    """``fun(args restricted to row i)`` for each i in ``indices``, stacked (the losses are means
    over rows, so on one row they are that sample's loss)."""
    def one(i):
        return fun(jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1, axis=0), args))

    return jax.vmap(one)(indices)


def _saga(new: PyTree, memory: PyTree, mean: PyTree, indices: jax.Array, size: int):
    """SAGA's estimate ``mean_B(q_i − m_i) + m̄`` from the batch's new values q_i (leading axis:
    the batch), the memory rows they replace and the mean once they have replaced them:
    ``m̄ + Σ_B (q_i − m_i) / n`` (``indices`` are distinct, so no row counts twice)."""
    old = jax.tree_util.tree_map(lambda m: m[indices], memory)
    diff = otu.tree_sub(new, old)
    estimate = jax.tree_util.tree_map(lambda d, m: jnp.mean(d, axis=0) + m, diff, mean)
    mean = jax.tree_util.tree_map(lambda m, d: m + jnp.sum(d, axis=0) / size, mean, diff)
    return estimate, old, mean


def _epoch_rows(sampler: _Sampler, order: jax.Array, side: int, draw: jax.Array) -> jax.Array:
    """The rows of ``draw`` in SABA's epochs: every sample once per epoch (random reshuffling,
    as a shuffled data loader), in orders keyed by the run's ``order`` seed and the side."""
    if sampler.batch is None:
        return jnp.arange(sampler.size)
    key = jax.random.fold_in(jax.random.key(order), side)
    if sampler.blocks:  # every block once an epoch, in memory="batch"'s order of blocks
        order_key = jax.random.split(key)[1]
        return sampler.block_rows(
            streams.epoch_indices(order_key, sampler.size // sampler.batch, 1, draw)[0])
    return streams.epoch_indices(key, sampler.size, sampler.batch, draw)


def _partition_batch(sampler: _Sampler, order: jax.Array, side: int, draw: jax.Array
                     ) -> tuple[jax.Array, tuple]:
    """``([slot], batch)`` of ``draw`` for SABA's ``memory="batch"``: the samples are cut once
    for the run into ``n // batch`` batches (a permutation keyed by ``order`` and the side), and
    every epoch visits each batch once, in an order of its own."""
    if sampler.batch is None:
        return jnp.zeros((1,), jnp.int32), sampler.args
    slots = sampler.size // sampler.batch
    partition_key, order_key = jax.random.split(jax.random.fold_in(jax.random.key(order), side))
    slot = streams.epoch_indices(order_key, slots, 1, draw)  # shape (1,)
    if sampler.blocks:  # the partition: the blocks of consecutive rows
        return slot, sampler.block(slot[0])
    rows = streams._permute(partition_key, slot[0] * sampler.batch
                            + jnp.arange(sampler.batch, dtype=jnp.int32), sampler.size)
    return slot, _take(sampler.args, rows)


def _leading(tree: PyTree) -> PyTree:
    """``tree`` with a leading axis of size 1 (a batch's quantities as one memory row)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)


def _write_rows(memory: PyTree, indices: jax.Array, rows: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda m, x: m.at[indices].set(x), memory, rows)


def _rows(tree: PyTree, size: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.zeros((size, *jnp.shape(x)), x.dtype), tree)


@_method
class SABA(_StochasticMethod):
    """SABA, the Stochastic Average Bilevel Algorithm: SOBA with SAGA variance reduction.

    The five stochastic quantities of a SOBA step -- ``∇_θ g``, ``∇²_θθ g v``, ``∇²_λθ g v`` (per
    inner sample) and ``∇_θ f``, ``∇_λ f`` (per outer sample) -- are each replaced by their SAGA
    estimate: for a minibatch B, ``(1/|B|) Σ_{i∈B} (q_i − m_i) + (1/n) Σ_i m_i``, after which
    ``m_i ← q_i`` for i ∈ B. Then θ, v and D_λ as in :class:`SOBA`. With constant step sizes it
    converges to the exact bilevel solution, not to a noise ball.

    The per-sample quantities come from one forward-over-reverse pass per sample (``vmap`` over
    the minibatch). The memories start at zero and hold one row per sample for each quantity:
    ``(2 n + m)·|θ| + (n + m)·|λ|`` numbers for n inner and m outer samples. The state needs
    λ's shapes and the sample counts: see the module docstring (``bind``).

    Unlike the other methods, SABA draws its minibatches in **epochs** (random reshuffling):
    each side's samples in a pseudo-random order, new every epoch, cut into ``n // batch``
    batches (as :class:`bilevel.Minibatches` with ``replace=False``), so every memory row is
    refreshed once an epoch. Independent draws leave a fraction ``e^(−t)`` of the rows unvisited
    after t epochs' worth of steps, stale (zero at first) memories that slow SAGA down: on the
    benchmark's quadratics (32768 samples, batch 64) it was 8e-7 from the optimum after 4096
    steps with independent draws, 6e-10 with epochs. The orders are keyed by a seed drawn from
    the first step's key and kept in the state (``order``, with the count of draws), so the same
    key gives the same batches and a resumed run continues them.

    Reference: Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022 (as :class:`SOBA`).

    Attributes:
      inner_step_size: ρ > 0, the SGD step on θ.
      v_step_size: ρ_v > 0; ``None``: ρ.
      memory: ``"sample"`` (default): a memory row per sample, as above. ``"batch"``: a row per
        minibatch of a partition of each side's samples into ``n // batch`` batches, fixed for
        the run (keyed by the run's order seed) and visited once an epoch in a reshuffled order:
        SAGA on the batches as the summands, as the benchmark's SABA runs. A step then costs one
        minibatch pass, as SOBA's, instead of per-sample derivatives (a ``vmap``; on the
        benchmark's quadratics 1484 steps/s against 678, ``bilevel bench-bilevel``'s ``saba``
        and ``saba-sample``), and the memories are ``batch`` times smaller. The ``n mod
        batch`` samples the partition puts last are never drawn: use batch sizes that divide n.
    """

    inner_step_size: float = _step_size(0.1)
    v_step_size: float | None = _step_size(None)
    memory: str = _checked("sample", _check_memory_kind)

    _needs_problem = True

    def _slots(self, size: int, batch: int | None) -> int:
        """Memory rows for ``size`` samples drawn ``batch`` at a time."""
        if self.memory == "sample":
            return size
        return 1 if batch is None else size // batch

    def _state(self, params, hparams, inner_size, outer_size):
        for side, size in (("inner", inner_size), ("outer", outer_size)):
            if size is None:
                raise ValueError(f"bilevel.SABA: keeps a memory per sample and needs per-sample "
                                 f"data, but {side}_args holds no arrays")
        zeros_params, zeros_hparams = otu.tree_zeros_like(params), otu.tree_zeros_like(hparams)
        inner = (zeros_params, zeros_params, zeros_hparams)
        outer = (zeros_params, zeros_hparams)
        return SABAState(zeros_params,
                         _rows(inner, self._slots(inner_size, self.inner_batch_size)), inner,
                         _rows(outer, self._slots(outer_size, self.outer_batch_size)), outer,
                         _step0(), jnp.zeros((), jnp.uint32), _step0())

    def _check_memory(self, state: SABAState, inner: _Sampler, outer: _Sampler) -> None:
        for side, memory, sampler in (("inner", state.inner_memory, inner),
                                      ("outer", state.outer_memory, outer)):
            rows = jax.tree_util.tree_leaves(memory)[0].shape[0]
            if rows != self._slots(sampler.size, sampler.batch):
                what = (f"{sampler.size} samples" if self.memory == "sample" else
                        f"{self._slots(sampler.size, sampler.batch)} batches")
                raise ValueError(f"bilevel.SABA: the state's {side} memory has {rows} rows but "
                                 f"{side}_args has {what}; bind() the method to this run's data")

    def hypergrad(self, problem, params, hparams, state, key):
        inner, outer = _samplers("bilevel.SABA", self, problem)
        self._check_memory(state, inner, outer)
        order = jnp.where(state.draws == 0, jax.random.bits(key, (), jnp.uint32), state.order)

        def inner_quantities(batch):
            return _inner_products(problem.inner_loss, params, hparams, batch, state.v)

        def outer_quantities(batch):
            return _outer_grads(problem.outer_loss, params, hparams, batch)

        if self.memory == "sample":  # memory rows: the samples
            inner_rows, outer_rows = (_epoch_rows(sampler, order, side, state.draws)
                                      for side, sampler in enumerate((inner, outer)))
            inner_new = _per_sample(inner_quantities, inner.args, inner_rows)
            losses, *outer_new = _per_sample(outer_quantities, outer.args, outer_rows)
        else:  # memory rows: the batches of the run's partition (one row updated per step)
            (inner_rows, inner_batch), (outer_rows, outer_batch) = (
                _partition_batch(sampler, order, side, state.draws)
                for side, sampler in enumerate((inner, outer)))
            inner_new = _leading(inner_quantities(inner_batch))
            losses, *outer_new = _leading(outer_quantities(outer_batch))
        inner_slots = self._slots(inner.size, inner.batch)
        outer_slots = self._slots(outer.size, outer.batch)
        (grad, hv, cross), inner_old, inner_mean = _saga(
            inner_new, state.inner_memory, state.inner_mean, inner_rows, inner_slots)
        (f_params, f_hparams), outer_old, outer_mean = _saga(
            tuple(outer_new), state.outer_memory, state.outer_mean, outer_rows, outer_slots)
        decay = self._decay(state.step)
        new_params = otu.tree_add_scale(params, -decay * self.inner_step_size, grad)
        v_step = decay * _or(self.v_step_size, self.inner_step_size)
        new_v = otu.tree_add_scale(state.v, -v_step, otu.tree_add(hv, f_params))
        # Checked and guarded: the state without its tables, and the batch's rows of them (so a
        # step costs O(batch), not O(samples), beyond the scatter).
        old = (state.v, state.inner_mean, state.outer_mean, state.step, inner_old, outer_old)
        new = (new_v, inner_mean, outer_mean, state.step + 1, inner_new, tuple(outer_new))
        direction, new_params, kept, stats = _finish(
            otu.tree_add(f_hparams, cross), params, new_params, old, new, jnp.mean(losses), grad,
            state.v, hvp_count=1)
        v, inner_mean, outer_mean, step, inner_rows_kept, outer_rows_kept = kept
        # The order and the draw count move on even when the step is skipped: a skipped step's
        # batch is not drawn again (as with a fresh key per step).
        new_state = SABAState(v, _write_rows(state.inner_memory, inner_rows, inner_rows_kept),
                              inner_mean, _write_rows(state.outer_memory, outer_rows,
                                                      outer_rows_kept), outer_mean, step,
                              order, state.draws + 1)
        return direction, new_params, new_state, stats


# --------------------------------------------------------------------------------------------
# StocBiO and AmIGO: inner SGD steps, then v.


def _neumann(inner_loss: Callable, params, hparams, sampler: _Sampler, key: jax.Array,
             f_params, steps: int, step_size: float):
    """``v = −η Σ_{q=0}^{Q} p_q``, ``p_0 = ∇_θ f``, ``p_q = (I − η H_{B_q}) p_{q−1}``: the
    truncated Neumann series of ``−H⁻¹ ∇_θ f`` with a fresh minibatch Hessian per factor."""
    def term(carry, step_key):
        p, total = carry
        hp = _hvp(inner_loss, params, hparams, sampler.draw(step_key), p)
        p = otu.tree_add_scale(p, -step_size, hp)
        return (p, otu.tree_add(total, p)), None

    (_, total), _ = jax.lax.scan(term, (f_params, f_params), jax.random.split(key, steps))
    return otu.tree_scale(-step_size, total)


class StocBiOState(NamedTuple):
    """StocBiO carries nothing but θ (the trainer's) and its step count (for ``step_decay``)."""

    step: jax.Array  # int32


@_method
class StocBiO(_StochasticMethod):
    """StocBiO: T minibatch SGD steps on θ, then a Neumann-series estimate of v from Q minibatch
    HVPs, then the λ direction.

    ::

        θ ← θ − ρ ∇_θ g(θ, λ; B_t),  t = 1..T               (warm-started from the last θ)
        v = −η Σ_{q=0}^{Q} Π_{j=1}^{q} (I − η ∇²_θθ g(θ, λ; B'_j)) ∇_θ f(θ, λ; C)
        D_λ = ∇_λ f(θ, λ; C) + ∇²_λθ g(θ, λ; B'') v          (returned)

    v approximates ``−H⁻¹ ∇_θ f`` for ``0 < η < 2/L``, with bias ``(1 − ημ)^(Q+1)`` relative to
    it; the series starts afresh at every outer step.

    Reference: Ji, Yang, Liang, "Bilevel optimization: convergence analysis and enhanced design",
    ICML 2021.

    Attributes:
      inner_steps: T >= 1 SGD steps on θ per outer step.
      inner_step_size: ρ > 0.
      neumann_steps: Q >= 1 (the HVPs per outer step).
      neumann_step_size: η > 0 (the series' scale, not decayed); ``None``: ρ.
    """

    inner_steps: int = _count(10)
    inner_step_size: float = _step_size(0.1)
    neumann_steps: int = _count(10)
    neumann_step_size: float | None = _step_size(None)

    def _state(self, params, hparams, inner_size, outer_size):
        return StocBiOState(_step0())

    def hypergrad(self, problem, params, hparams, state, key):
        inner, outer = _samplers("bilevel.StocBiO", self, problem)
        sgd_key, outer_key, neumann_key, cross_key = jax.random.split(key, 4)
        theta = _sgd(problem.inner_loss, params, hparams, inner, sgd_key, self.inner_steps,
                     self._decay(state.step) * self.inner_step_size)
        loss, f_params, f_hparams = _outer_grads(problem.outer_loss, theta, hparams,
                                                 outer.draw(outer_key))
        v = _neumann(problem.inner_loss, theta, hparams, inner, neumann_key, f_params,
                     self.neumann_steps, _or(self.neumann_step_size, self.inner_step_size))
        grad, cross = _inner_grad_and_cross(problem.inner_loss, theta, hparams,
                                            inner.draw(cross_key), v)
        return _finish(otu.tree_add(f_hparams, cross), params, theta, state,
                       StocBiOState(state.step + 1), loss, grad, v,
                       hvp_count=self.neumann_steps)


class AmIGOState(NamedTuple):
    """AmIGO's carried state: v, warm-starting the next outer step's SGD on the quadratic, and
    the steps so far."""

    v: PyTree
    step: jax.Array  # int32


@_method
class AmIGO(_StochasticMethod):
    """AmIGO (amortized implicit gradient optimization): T SGD steps on θ, then M warm-started
    SGD steps on v's quadratic, then the λ direction.

    ::

        θ ← θ − ρ ∇_θ g(θ, λ; B_t),  t = 1..T                  (warm-started)
        v ← v − ρ_v (∇²_θθ g(θ, λ; B'_s) v + ∇_θ f(θ, λ; C)),  s = 1..M   (warm-started)
        D_λ = ∇_λ f(θ, λ; C) + ∇²_λθ g(θ, λ; B'') v             (returned)

    v minimises ``½ vᵀHv + ∇_θ fᵀ v``, so ``v → −H⁻¹ ∇_θ f``; warm starts amortise the solve over
    outer steps. With full batches ``(θ*(λ), v*(λ))`` is a fixed point and D_λ is exact there.

    Reference: Arbel, Mairal, "Amortized implicit differentiation for stochastic bilevel
    optimization", ICLR 2022.

    Attributes:
      inner_steps: T >= 1 SGD steps on θ per outer step.
      inner_step_size: ρ > 0.
      v_steps: M >= 1 SGD steps on v per outer step (the HVPs per outer step).
      v_step_size: ρ_v > 0; ``None``: ρ.
    """

    inner_steps: int = _count(10)
    inner_step_size: float = _step_size(0.1)
    v_steps: int = _count(10)
    v_step_size: float | None = _step_size(None)

    def _state(self, params, hparams, inner_size, outer_size):
        return AmIGOState(otu.tree_zeros_like(params), _step0())

    def hypergrad(self, problem, params, hparams, state, key):
        inner, outer = _samplers("bilevel.AmIGO", self, problem)
        sgd_key, outer_key, v_key, cross_key = jax.random.split(key, 4)
        decay = self._decay(state.step)
        theta = _sgd(problem.inner_loss, params, hparams, inner, sgd_key, self.inner_steps,
                     decay * self.inner_step_size)
        loss, f_params, f_hparams = _outer_grads(problem.outer_loss, theta, hparams,
                                                 outer.draw(outer_key))
        v_step = decay * _or(self.v_step_size, self.inner_step_size)

        def v_sgd(v, step_key):
            hv = _hvp(problem.inner_loss, theta, hparams, inner.draw(step_key), v)
            return otu.tree_add_scale(v, -v_step, otu.tree_add(hv, f_params)), None

        v, _ = jax.lax.scan(v_sgd, state.v, jax.random.split(v_key, self.v_steps))
        grad, cross = _inner_grad_and_cross(problem.inner_loss, theta, hparams,
                                            inner.draw(cross_key), v)
        return _finish(otu.tree_add(f_hparams, cross), params, theta, state,
                       AmIGOState(v, state.step + 1), loss, grad, v, hvp_count=self.v_steps)


# --------------------------------------------------------------------------------------------
# F2SA.


class F2SAState(NamedTuple):
    """F2SA's carried state: z, the minimiser of the penalised inner problem, and the number of
    outer steps taken (the clock of the penalty schedule and of ``step_decay``)."""

    z: PyTree
    step: jax.Array  # int32


@_method
class F2SA(_StochasticMethod):
    """F2SA, the fully first-order stochastic approximation: no HVP, no v.

    The penalty reformulation ``min_λ min_z f(z, λ) + σ (g(z, λ) − min_θ g(θ, λ))`` has gradient
    ``∇_λ f(z_σ, λ) + σ (∇_λ g(z_σ, λ) − ∇_λ g(θ*, λ))``, within ``O(1/σ)`` of the hypergradient.
    Per outer step k, with penalty ``σ_k = min(σ_0 + δ k, σ_max)``::

        θ ← θ − ρ ∇_θ g(θ, λ; B_t)                                   t = 1..T (warm-started)
        z ← z − ρ_z (∇_θ g(z, λ; B_t) + ∇_θ f(z, λ; C_t) / σ_k)      (the same T steps)
        D_λ = ∇_λ f(z, λ; C) + σ_k (∇_λ g(z, λ; B'') − ∇_λ g(θ, λ; B''))   (returned)

    z's step is the paper's ``z ← z − γ (∇f + σ ∇g)`` with ``γ = ρ_z / σ``, so ρ_z ≲ 1/L of the
    inner loss stays stable as σ grows. θ's and z's steps share each inner minibatch, and both
    ∇_λ g terms of D_λ share one (common random numbers): every estimate stays unbiased, and the
    σ-amplified difference of θ and z no longer carries their independent sampling noise (with
    independent batches, as in the paper, λ's error on this module's minibatch test was 0.2-0.5
    instead of 0.08). The history gets
    ``penalty`` (σ_k); ``v_norm`` is ``nan`` and ``hvp_count`` 0. The bias shrinks like 1/σ, so a
    run must end at a large σ to be accurate, and the noise of θ and z is amplified by σ: with
    minibatches cap it (``max_penalty``) or decay the steps.

    Reference: Kwon, Kwon, Wright, Nowak, "A fully first-order method for stochastic bilevel
    optimization", ICML 2023.

    Attributes:
      inner_steps: T >= 1 steps on θ and z per outer step.
      inner_step_size: ρ > 0, the step on θ.
      z_step_size: ρ_z > 0, the step on z (see above); ``None``: ρ.
      penalty: σ_0 > 0, the first outer step's penalty.
      penalty_increment: δ > 0, added to σ after each outer step.
      max_penalty: σ_max >= σ_0 caps the schedule; ``None``: no cap.
    """

    inner_steps: int = _count(10)
    inner_step_size: float = _step_size(0.1)
    z_step_size: float | None = _step_size(None)
    penalty: float = _step_size(1.0)
    penalty_increment: float = _step_size(0.1)
    max_penalty: float | None = _step_size(None)

    def _check_relations(self) -> None:
        if self.max_penalty is not None and self.max_penalty < self.penalty:
            raise _fail("F2SA", "max_penalty", f"None or >= penalty={self.penalty}",
                        self.max_penalty)

    def _state(self, params, hparams, inner_size, outer_size):
        return F2SAState(jax.tree_util.tree_map(jnp.copy, params), _step0())

    def _penalty(self, step: jax.Array) -> jax.Array:
        sigma = self.penalty + self.penalty_increment * step
        return sigma if self.max_penalty is None else jnp.minimum(sigma, self.max_penalty)

    def hypergrad(self, problem, params, hparams, state, key):
        inner, outer = _samplers("bilevel.F2SA", self, problem)
        inner_loss, outer_loss = problem.inner_loss, problem.outer_loss
        sigma = self._penalty(state.step)
        decay = self._decay(state.step)
        theta_step = decay * self.inner_step_size
        z_step = decay * _or(self.z_step_size, self.inner_step_size)
        loop_key, outer_key, inner_key = jax.random.split(key, 3)

        def step(carry, step_key):
            theta, z = carry
            inner_key, f_key = jax.random.split(step_key)
            batch = inner.draw(inner_key)
            grad = jax.grad(inner_loss)(theta, hparams, *batch)
            z_grad = otu.tree_add_scale(
                jax.grad(inner_loss)(z, hparams, *batch), 1.0 / sigma,
                jax.grad(outer_loss)(z, hparams, *outer.draw(f_key)))
            return (otu.tree_add_scale(theta, -theta_step, grad),
                    otu.tree_add_scale(z, -z_step, z_grad)), None

        (theta, z), _ = jax.lax.scan(step, (params, state.z),
                                     jax.random.split(loop_key, self.inner_steps))
        outer_batch, inner_batch = outer.draw(outer_key), inner.draw(inner_key)
        loss = outer_loss(theta, hparams, *outer_batch)
        f_hparams = jax.grad(outer_loss, argnums=1)(z, hparams, *outer_batch)
        grad, g_hparams_theta = jax.grad(inner_loss, argnums=(0, 1))(theta, hparams,
                                                                     *inner_batch)
        g_hparams_z = jax.grad(inner_loss, argnums=1)(z, hparams, *inner_batch)
        direction = otu.tree_add_scale(f_hparams, sigma,
                                       otu.tree_sub(g_hparams_z, g_hparams_theta))
        return _finish(direction, params, theta, state, F2SAState(z, state.step + 1), loss,
                       grad, None, hvp_count=0, penalty=sigma)
