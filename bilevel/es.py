"""Zeroth-order hypergradients: antithetic Gaussian ES and truncated persistent ES (PES).

Both estimators need only evaluations of the meta-loss, so they work through unrolls that are
too long to differentiate or not differentiable at all. The population is one ``jax.vmap``,
randomness comes from explicit PRNG keys, and there is no Python control flow on traced values,
so everything runs under ``jit`` and ``vmap`` (over keys, for instance).

* :func:`es_hypergrad` -- Gaussian-smoothing ES on a whole meta-loss ``L(λ)``: it estimates
  ``∇_λ E_ε[L(λ + σε)]``, ``ε ~ N(0, I)``, with antithetic pairs by default.
* :func:`pes_init` / :func:`pes_hypergrad` -- truncated PES: the unroll is cut into truncations,
  each particle keeps its own inner state and the sum ``ξ`` of every perturbation it has seen, and
  the estimate ``mean_i ξ_i L_i / σ²`` is unbiased for the gradient through the *whole* unroll,
  where truncated backpropagation and truncated ES are not.

Every estimate comes with an :class:`ESInfo`; a non-finite loss anywhere in the population makes
``info.finite`` False and the gradient NaN, never a plausible-looking number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel import _common
from hvp import checks as _checks

PyTree = Any


class ESInfo(NamedTuple):
    """Diagnostics of a zeroth-order estimate, all arrays, so they survive ``jit`` and ``vmap``.

    Attributes:
      outer_loss: the mean of the population's perturbed outer losses (an estimate of the
        Gaussian-smoothed loss ``E_ε L(λ + σε)``; for PES, of this truncation's loss). The
        unperturbed ``L(λ)`` that non-antithetic ES evaluates as its baseline is not included.
        Its old name ``loss`` still reads it, with a ``DeprecationWarning``.
      outer_loss_std: the standard deviation of the perturbed losses across the population
        (old name ``loss_std``, deprecated likewise).
      finite: True when every loss evaluated (the baseline ``L(λ)`` included) is finite; when
        False the gradient is NaN in every entry.
      population: the number of perturbed evaluations (int32).
    """

    outer_loss: jax.Array
    outer_loss_std: jax.Array
    finite: jax.Array
    population: jax.Array

    loss = _checks.renamed_attribute("bilevel.ESInfo", "loss", "outer_loss")
    loss_std = _checks.renamed_attribute("bilevel.ESInfo", "loss_std", "outer_loss_std")


class PESState(NamedTuple):
    """The persistent state of truncated PES; particle ``i`` and ``i + population/2`` are a pair.

    Attributes:
      inner_state: a pytree whose leaves have a leading population axis: each particle's inner
        problem (parameters, optimizer state, step counter, ...).
      perturbation_sum: ``ξ``, shaped like ``hparams`` with a leading population axis: the sum of
        the perturbations each particle has run under since :func:`pes_init`, in units of
        ``hparams`` (so ``ξ ~ N(0, tσ²I)`` after ``t`` truncations). Pairs hold ``ξ`` and ``−ξ``.
      truncations: the number of truncations run since :func:`pes_init` (int32).
    """

    inner_state: PyTree
    perturbation_sum: PyTree
    truncations: jax.Array


# --------------------------------------------------------------------------------------------
# Trace-time validation.


def _check_callable(where: str, name: str, fun: Any) -> None:
    if not callable(fun):
        raise TypeError(f"{where}: {name} must be callable, got {type(fun).__name__}")


def _check_args(where: str, args: Any) -> None:
    if not isinstance(args, tuple):
        raise TypeError(f"{where}: args must be a tuple of extra arguments, "
                        f"got {type(args).__name__}")


def _check_population(where: str, population: Any, even: bool) -> None:
    parity = "an even integer" if even else "an integer"
    if not isinstance(population, int | np.integer) or isinstance(population, bool):
        raise TypeError(f"{where}: population must be a Python int (static under jit), "
                        f"got {population!r}")
    if population < 2 or (even and population % 2):
        why = " (antithetic pairs)" if even else ""
        raise ValueError(f"{where}: population must be {parity} >= 2{why}, got {population}")


def _check_sigma(where: str, sigma: Any) -> None:
    shape = np.shape(sigma)
    if shape != ():
        raise ValueError(f"{where}: sigma must be a scalar, got an array of shape {shape}")
    dtype = jnp.result_type(sigma)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{where}: sigma must be a real number, got dtype {dtype}")
    value = _checks.concrete_value(sigma)
    if value is not None and not 0.0 < value < np.inf:
        raise ValueError(f"{where}: sigma must be a finite number > 0, got {value}")


def _check_key(where: str, key: Any) -> None:
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if typed and np.shape(key) == ():
        return
    if not typed and dtype == jnp.uint32 and np.ndim(key) == 1:
        return  # a legacy jax.random.PRNGKey
    found = f"dtype {dtype}, shape {np.shape(key)}" if dtype is not None else type(key).__name__
    raise TypeError(f"{where}: key must be a single PRNG key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)), got {found}")


def check_es_inputs(where: str, meta_loss: Callable, hparams: PyTree, key: Any,
                    population: Any, sigma: Any, args: Any, antithetic: bool) -> None:
    """Trace-time checks of :func:`es_hypergrad`'s inputs, errors naming ``where``."""
    _check_callable(where, "meta_loss", meta_loss)
    _check_args(where, args)
    if not isinstance(antithetic, bool):
        raise TypeError(f"{where}: antithetic must be True or False, got {antithetic!r}")
    _check_population(where, population, even=antithetic)
    _check_sigma(where, sigma)
    _check_key(where, key)
    _checks.check_floating(where, "hparams", hparams)
    _checks.check_scalar_output(where, meta_loss, hparams, *args, name="meta_loss")


def _population_of(where: str, state: PESState, hparams: PyTree) -> int:
    """The population size held in ``state``, checked against ``hparams`` and itself."""
    xi = state.perturbation_sum
    if jax.tree_util.tree_structure(xi) != jax.tree_util.tree_structure(hparams):
        raise ValueError(f"{where}: state.perturbation_sum has structure "
                         f"{_checks.describe_structure(xi)}, hparams has "
                         f"{_checks.describe_structure(hparams)}")
    sizes = set()
    for path, x, h in zip(_checks.leaf_paths(hparams), jax.tree_util.tree_leaves(xi),
                          jax.tree_util.tree_leaves(hparams), strict=True):
        if np.ndim(x) != np.ndim(h) + 1 or np.shape(x)[1:] != np.shape(h):
            raise ValueError(f"{where}: state.perturbation_sum leaf {path} has shape "
                             f"{np.shape(x)}; expected (population, *{np.shape(h)})")
        if jnp.result_type(x) != jnp.result_type(h):
            raise TypeError(f"{where}: state.perturbation_sum leaf {path} has dtype "
                            f"{jnp.result_type(x)}, hparams leaf has {jnp.result_type(h)}")
        sizes.add(np.shape(x)[0])
    if len(sizes) != 1:
        raise ValueError(f"{where}: state.perturbation_sum leaves have population axes "
                         f"{sorted(sizes)}; expected one population size")
    population = sizes.pop()
    _check_population(where, population, even=True)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.inner_state):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != population:
            key = jax.tree_util.keystr(path) or "<root>"
            raise ValueError(f"{where}: state.inner_state leaf {key} has shape {np.shape(leaf)}; "
                             f"expected a leading population axis of {population}")
    return population


def _check_unroll(where: str, unroll: Callable, hparams: PyTree, inner_state: PyTree,
                  key: jax.Array, args: tuple) -> None:
    """``unroll`` must map one particle's state to ``(same-shaped state, scalar loss)``."""
    one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                 inner_state)
    out = jax.eval_shape(unroll, hparams, one, key, *args)
    if not isinstance(out, tuple | list) or len(out) != 2:
        raise TypeError(f"{where}: unroll must return a pair (new_inner_state, loss), got {out}")
    new_state, loss = out
    if not isinstance(loss, jax.ShapeDtypeStruct) or loss.shape != () or not jnp.issubdtype(
            loss.dtype, jnp.floating):
        raise TypeError(f"{where}: unroll's loss must be a floating-point scalar, got {loss}")
    same = jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(one) and all(
        (a.shape, a.dtype) == (b.shape, b.dtype) for a, b in
        zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(one), strict=True))
    if not same:
        raise ValueError(f"{where}: unroll must return a new_inner_state with the structure, "
                         f"shapes and dtypes of one particle's inner_state {one}, got {new_state}")


def check_pes_inputs(where: str, unroll: Callable, hparams: PyTree, state: Any, key: Any,
                     sigma: Any, args: Any) -> int:
    """Trace-time checks of :func:`pes_hypergrad`'s inputs; returns the population size."""
    _check_callable(where, "unroll", unroll)
    _check_args(where, args)
    _check_sigma(where, sigma)
    _check_key(where, key)
    _checks.check_floating(where, "hparams", hparams)
    if not isinstance(state, PESState):
        raise TypeError(f"{where}: state must be a bilevel.PESState (from bilevel.pes_init), "
                        f"got {type(state).__name__}")
    population = _population_of(where, state, hparams)
    _check_unroll(where, unroll, hparams, state.inner_state, key, args)
    return population


# --------------------------------------------------------------------------------------------
# Tree maths.


def _standard_normal(key: jax.Array, tree: PyTree, count: int) -> PyTree:
    """``count`` independent ``N(0, I)`` draws shaped like ``tree``, stacked on a leading axis.

    One draw for the whole tree, then sliced: each random-number call site costs about a
    second of XLA compile time on the CPU, so per-leaf draws would make compiles scale with
    the number of leaves.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [int(np.size(x)) for x in leaves]
    flat = jax.random.normal(key, (count, sum(sizes)), jnp.result_type(*leaves))
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1], axis=1)
    draws = [piece.reshape(count, *jnp.shape(x)).astype(jnp.result_type(x))
             for piece, x in zip(pieces, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, draws)


def _antithetic(noise: PyTree) -> PyTree:
    """``[z; −z]``: particle ``i`` and ``i + pairs`` are a pair."""
    return jax.tree_util.tree_map(lambda z: jnp.concatenate([z, -z]), noise)


def _scaled(noise: PyTree, sigma: Any) -> PyTree:
    return jax.tree_util.tree_map(lambda z: jnp.asarray(sigma, z.dtype) * z, noise)


def _shifted(hparams: PyTree, perturbations: PyTree) -> PyTree:
    """``λ + perturbation_i`` for every particle ``i`` (broadcast over the leading axis)."""
    return jax.tree_util.tree_map(lambda h, e: h + e, hparams, perturbations)


def _weighted_sum(weights: jax.Array, stacked: PyTree) -> PyTree:
    """``Σ_i weights_i · stacked_i``, in each leaf's own dtype."""
    return jax.tree_util.tree_map(
        lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def report(where: str, info: ESInfo, on_failure: str) -> None:
    """Honour ``on_failure`` for an estimate whose ``info.finite`` is False."""
    _common.report_failure(
        where, ~info.finite,
        lambda total: f"some of the {int(total)} perturbed losses (or the baseline) are not "
                      f"finite, so the estimate is NaN: the unroll may have diverged; lower "
                      f"sigma or the inner learning rate",
        (info.population,), on_failure)


def _finish(grad: PyTree, losses: jax.Array, finite: jax.Array) -> tuple[PyTree, ESInfo]:
    """NaN the gradient unless every loss was finite, and build the :class:`ESInfo`."""
    grad = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.nan), grad)
    info = ESInfo(outer_loss=jnp.mean(losses), outer_loss_std=jnp.std(losses), finite=finite,
                  population=jnp.asarray(losses.shape[0], jnp.int32))
    return grad, info


# --------------------------------------------------------------------------------------------
# The estimator kernels: the formulas, written once, over a population that may be split.


def _whole(tree: PyTree) -> PyTree:
    return tree


class PopulationSplit(NamedTuple):
    """How a kernel's population is shared between workers; the default is one worker.

    Attributes:
      local: this worker's members of a tree whose leaves lead with the population axis.
      gather: every member's losses, from this worker's.
      total: the sum over workers of an hparams-shaped partial sum.

    :mod:`bilevel.distributed` runs the kernels inside ``jax.shard_map`` with ``local`` a
    slice at the device's index, ``gather`` an ``all_gather`` and ``total`` a ``psum``.
    """

    local: Callable[[PyTree], PyTree] = _whole
    gather: Callable[[jax.Array], jax.Array] = _whole
    total: Callable[[PyTree], PyTree] = _whole


#: One worker holds the whole population.
WHOLE = PopulationSplit()


def es_kernel(meta_loss: Callable, hparams: PyTree, key: jax.Array, population: int,
              sigma: Any, args: tuple, antithetic: bool,
              split: PopulationSplit = WHOLE) -> tuple[PyTree, ESInfo]:
    """The ES estimate of :func:`es_hypergrad`, without its checks or failure report.

    Every worker draws all the directions from ``key`` (cheap next to a meta-loss), evaluates
    its ``split.local`` members, and forms the same weighted sum from the gathered losses.
    """
    draws = population // 2 if antithetic else population
    noise = _standard_normal(key, hparams, draws)
    directions = _antithetic(noise) if antithetic else noise
    mine = split.local(_scaled(directions, sigma))
    losses = split.gather(jax.vmap(lambda h: meta_loss(h, *args))(_shifted(hparams, mine)))
    if antithetic:
        weights = (losses[:draws] - losses[draws:]) / (2 * sigma * draws)
        finite = jnp.all(jnp.isfinite(losses))
    else:
        baseline = meta_loss(hparams, *args)
        weights = (losses - baseline) / (sigma * population)
        finite = jnp.all(jnp.isfinite(losses)) & jnp.isfinite(baseline)
    return _finish(_weighted_sum(weights, noise), losses, finite)


def pes_kernel(unroll: Callable, hparams: PyTree, inner_state: PyTree, perturbation_sum: PyTree,
               key: jax.Array, population: int, sigma: Any, args: tuple,
               split: PopulationSplit = WHOLE
               ) -> tuple[PyTree, PyTree, PyTree, ESInfo]:
    """One PES truncation of :func:`pes_hypergrad` on this worker's particles, unchecked.

    ``inner_state`` and ``perturbation_sum`` hold this worker's particles; returns
    ``(grad, new_inner_state, new_perturbation_sum, info)``.
    """
    pairs = population // 2
    keys = jax.random.split(key, pairs + 1)
    noise_key, data_keys = keys[0], keys[1:]
    perturbations = split.local(_scaled(_antithetic(_standard_normal(noise_key, hparams, pairs)),
                                        sigma))
    pair_keys = split.local(jnp.concatenate([data_keys, data_keys]))  # a pair shares its data
    xi = jax.tree_util.tree_map(jnp.add, perturbation_sum, perturbations)
    inner_state, local = jax.vmap(lambda h, s, k: unroll(h, s, k, *args))(
        _shifted(hparams, perturbations), inner_state, pair_keys)
    losses = split.gather(local)
    # Σ_i ξ_i = 0 over antithetic pairs, so centring the losses changes nothing but round-off.
    weights = split.local((losses - jnp.mean(losses)) / (sigma**2 * population))
    grad = split.total(_weighted_sum(weights, xi))
    grad, info = _finish(grad, losses, jnp.all(jnp.isfinite(losses)))
    return grad, inner_state, xi, info


# --------------------------------------------------------------------------------------------
# Evolution strategies.


def es_hypergrad(meta_loss: Callable, hparams: PyTree, key: jax.Array, population: int = 64,
                 sigma: float = 0.01, args: tuple = (), antithetic: bool = True, *,
                 on_failure: str = "warn") -> tuple[PyTree, ESInfo]:
    """Gaussian-smoothing ES estimate of ``∇_λ meta_loss(λ)``.

    Antithetic (default), with ``population/2`` directions ``ε_i ~ N(0, I)``:
    ``ĝ = mean_i (L(λ + σε_i) − L(λ − σε_i)) ε_i / (2σ)``.
    Otherwise, with ``population`` directions and ``L(λ)`` as baseline:
    ``ĝ = mean_i (L(λ + σε_i) − L(λ)) ε_i / σ``.
    Both are unbiased for ``∇_λ E_ε L(λ + σε)``, which tends to ``∇L(λ)`` as ``σ → 0`` (and
    equals it for quadratics). All evaluations are one ``jax.vmap`` of ``meta_loss``.

    Args:
      meta_loss: ``meta_loss(hparams, *args) -> scalar``, e.g. a whole inner training run
        followed by a validation loss; it need not be differentiable.
      hparams: λ, any pytree of floating arrays.
      key: a PRNG key; the same key gives the same directions, hence the same estimate.
      population: number of perturbed evaluations, a Python int >= 2 (even when antithetic).
      sigma: the smoothing scale σ > 0, in the units of ``hparams``.
      args: further arguments of ``meta_loss``, the same for every member of the population.
      antithetic: use ``±ε`` pairs (default) instead of a baseline evaluation at λ.
      on_failure: when a loss is not finite: ``"warn"`` (default, one
        :class:`hvp.SolveWarning` line attributed to the caller), ``"raise"``
        (:class:`hvp.SolveError`) or ``"ignore"`` (``info.finite`` alone says so).

    Returns:
      ``(grad, info)``: grad shaped like ``hparams``, and an :class:`ESInfo` whose
      ``outer_loss`` is the mean of the perturbed losses. If any loss (the baseline included)
      is NaN or infinite, ``info.finite`` is False and every entry of ``grad`` is NaN.

    Reference: Salimans et al., "Evolution strategies as a scalable alternative to reinforcement
    learning", 2017 (antithetic sampling); Nesterov & Spokoiny 2017 (Gaussian smoothing).
    """
    where = "bilevel.es_hypergrad"
    _common.check_on_failure(where, on_failure)
    check_es_inputs(where, meta_loss, hparams, key, population, sigma, args, antithetic)
    grad, info = es_kernel(meta_loss, hparams, key, int(population), sigma, tuple(args),
                           antithetic)
    report(where, info, on_failure)
    return grad, info


# --------------------------------------------------------------------------------------------
# Persistent evolution strategies.


def pes_init(inner_init: Callable, hparams: PyTree, key: jax.Array, population: int
             ) -> PESState:
    """Start a truncated-PES population: fresh inner problems and ``ξ = 0``.

    Each antithetic pair (particles ``i`` and ``i + population/2``) starts from the same inner
    state, ``inner_init(k_i)`` with its own key ``k_i``. Call it again whenever the inner
    problem reaches its horizon (the unroll's last step): PES is unbiased for the gradient of the
    loss summed over the truncations since the last ``pes_init``, and resetting ``ξ`` with the
    inner state is what starts a new unroll.

    Args:
      inner_init: ``inner_init(key) -> inner_state``, e.g. initial parameters and optimizer state.
      hparams: λ, a pytree of floating arrays; only its structure, shapes and dtypes are used.
      key: a PRNG key for the inner initialisations.
      population: the number of particles, an even Python int >= 2.

    Returns:
      a :class:`PESState` with ``truncations == 0``.
    """
    where = "bilevel.pes_init"
    _check_callable(where, "inner_init", inner_init)
    _check_population(where, population, even=True)
    _check_key(where, key)
    _checks.check_floating(where, "hparams", hparams)
    states = jax.vmap(inner_init)(jax.random.split(key, population // 2))
    inner_state = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), states)
    xi = jax.tree_util.tree_map(
        lambda h: jnp.zeros((population, *jnp.shape(h)), jnp.result_type(h)), hparams)
    return PESState(inner_state, xi, jnp.zeros((), jnp.int32))


def pes_hypergrad(unroll: Callable, hparams: PyTree, state: PESState, key: jax.Array,
                  sigma: float = 0.01, args: tuple = (), *, on_failure: str = "warn"
                  ) -> tuple[PyTree, PESState, ESInfo]:
    """Run one truncation of every particle and return its PES hypergradient estimate.

    Draws antithetic perturbations ``ε_i ~ N(0, σ²I)`` (``ε`` for particle ``i``, ``−ε`` for its
    partner ``i + population/2``), accumulates ``ξ_i ← ξ_i + ε_i``, runs
    ``(s_i, L_i) = unroll(λ + ε_i, s_i, k_i, *args)`` for all particles in one ``jax.vmap``
    (both members of a pair get the same data key ``k_i``), and estimates
    ``ĝ = mean_i ξ_i L_i / σ²``. Because ``ξ`` carries every perturbation a particle's state has
    seen, the sum of these estimates over the truncations since :func:`pes_init` is unbiased for
    the gradient of the (Gaussian-smoothed) loss summed over the whole unroll; truncated BPTT
    and truncated ES only see the current truncation and are biased.

    The caller owns the horizon: when the inner problem has run its full length, start again
    with :func:`pes_init` (otherwise ``ξ`` keeps growing and the variance with it).

    Args:
      unroll: ``unroll(hparams, inner_state, key, *args) -> (new_inner_state, loss)``: one
        truncation (K inner steps) of one particle under the given (perturbed) hparams; ``loss``
        is a scalar, the loss accumulated over those steps; ``new_inner_state`` has the
        structure, shapes and dtypes of ``inner_state``.
      hparams: λ, the pytree ``state`` was initialised with.
      state: a :class:`PESState` from :func:`pes_init` or a previous call.
      key: a PRNG key for this truncation's perturbations and data.
      sigma: the perturbation scale σ > 0, in the units of ``hparams``.
      args: further arguments of ``unroll``, the same for every particle.
      on_failure: when a loss is not finite: ``"warn"`` (default), ``"raise"`` or ``"ignore"``,
        as in :func:`es_hypergrad`.

    Returns:
      ``(grad, new_state, info)``: grad shaped like ``hparams``; ``info.outer_loss`` is the
      mean of this truncation's losses. If any loss is NaN or infinite, ``info.finite`` is False and
      every entry of ``grad`` is NaN (the offending particles' states are likely non-finite too:
      re-initialise).

    Reference: Vicol, Metz, Sohl-Dickstein, "Unbiased gradient estimation in unrolled
    computation graphs with persistent evolution strategies", ICML 2021.
    """
    where = "bilevel.pes_hypergrad"
    _common.check_on_failure(where, on_failure)
    population = check_pes_inputs(where, unroll, hparams, state, key, sigma, args)
    grad, inner_state, xi, info = pes_kernel(unroll, hparams, state.inner_state,
                                             state.perturbation_sum, key, population, sigma,
                                             tuple(args))
    report(where, info, on_failure)
    return grad, PESState(inner_state, xi, state.truncations + 1), info
