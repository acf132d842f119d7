"""One vocabulary: the public names follow the README's naming table, and the old names still
work, each with a DeprecationWarning attributed to the caller's line and the same numbers.

Renamed: ``num_iters`` -> ``maxiter`` (``hvp.power_iteration``, ``hvp.lanczos``,
``hvp.extreme_eigenvalues``), ``power_iters`` -> ``power_maxiter`` (``hvp.Neumann``,
``hvp.LiSSA``), ``ESInfo.loss`` / ``loss_std`` -> ``outer_loss`` / ``outer_loss_std``.
``UnrolledInfo.converged`` means "the result can be trusted", no longer a copy of ``finite``.
"""

import dataclasses
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_spd

import bilevel
import hvp
from bilevel import distributed
from bilevel.trainer import TrainerConfig, UnrolledMethod, train

MATRIX = random_spd(0, 8, condition=20.0)
OPERATOR = hvp.MatrixOperator(MATRIX)
RHS = jnp.linspace(1.0, 2.0, 8)


def _deprecated(record, old: str, new: str) -> None:
    """Exactly one DeprecationWarning, naming both names, at a line of this file."""
    found = [w for w in record if issubclass(w.category, DeprecationWarning)]
    assert len(found) == 1, [str(w.message) for w in found]
    assert old in str(found[0].message) and new in str(found[0].message)
    assert found[0].filename == __file__


def _same(a, b) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# num_iters -> maxiter


SPECTRAL = {
    "power_iteration": lambda **kw: hvp.power_iteration(OPERATOR, key=jax.random.key(1), **kw),
    "lanczos": lambda **kw: hvp.lanczos(OPERATOR, key=jax.random.key(1), **kw),
    "extreme_eigenvalues": lambda **kw: hvp.extreme_eigenvalues(OPERATOR,
                                                                key=jax.random.key(1), **kw),
}


@pytest.mark.parametrize("name", sorted(SPECTRAL))
def test_num_iters_is_maxiter_with_a_warning(name):
    call = SPECTRAL[name]
    new = call(maxiter=5)
    with pytest.warns(DeprecationWarning) as record:
        old = call(num_iters=5)
    _deprecated(record, f"hvp.{name}: num_iters=", "maxiter=")
    _same(old, new)
    assert list(inspect.signature(getattr(hvp, name)).parameters)[1] == "maxiter"


@pytest.mark.parametrize("name", sorted(SPECTRAL))
def test_num_iters_and_maxiter_together_is_a_type_error(name):
    with pytest.raises(TypeError, match=f"hvp.{name}: got both num_iters= .* and maxiter="):
        SPECTRAL[name](num_iters=5, maxiter=5)
    with pytest.raises(TypeError, match="got both"):  # maxiter given by position
        getattr(hvp, name)(OPERATOR, 5, num_iters=5)


def test_num_iters_works_under_jit():
    with pytest.warns(DeprecationWarning):
        old = jax.jit(lambda m: hvp.extreme_eigenvalues(hvp.MatrixOperator(m), num_iters=6))(
            MATRIX)
    _same(old, jax.jit(lambda m: hvp.extreme_eigenvalues(hvp.MatrixOperator(m), maxiter=6))(
        MATRIX))


# --------------------------------------------------------------------------------------------
# power_iters -> power_maxiter


def test_neumann_power_iters_is_power_maxiter_with_a_warning():
    with pytest.warns(DeprecationWarning) as record:
        old = hvp.Neumann(maxiter=30, tol=0.0, power_iters=7)
    _deprecated(record, "hvp.Neumann: power_iters=", "power_maxiter=")
    new = hvp.Neumann(maxiter=30, tol=0.0, power_maxiter=7)
    assert old == new and hash(old) == hash(new) and old.power_maxiter == 7
    _same(hvp.solve(OPERATOR, RHS, old, on_failure="ignore"),
          hvp.solve(OPERATOR, RHS, new, on_failure="ignore"))
    with pytest.warns(DeprecationWarning) as record:
        assert old.power_iters == 7
    _deprecated(record, "hvp.Neumann.power_iters", ".power_maxiter")


def test_lissa_power_iters_is_power_maxiter_with_a_warning():
    x = jax.random.normal(jax.random.key(0), (40, 5))
    operator = hvp.hessian(lambda p, x: jnp.mean((x @ p) ** 2) + 0.5 * jnp.sum(p**2),
                           jnp.zeros(5), x, batch_argnums=0)
    with pytest.warns(DeprecationWarning) as record:
        old = hvp.LiSSA(maxiter=20, batch_size=10, power_iters=9)
    _deprecated(record, "hvp.LiSSA: power_iters=", "power_maxiter=")
    new = hvp.LiSSA(maxiter=20, batch_size=10, power_maxiter=9)
    assert old == new
    _same(hvp.solve(operator, jnp.ones(5), old, on_failure="ignore"),
          hvp.solve(operator, jnp.ones(5), new, on_failure="ignore"))


@pytest.mark.parametrize("name", ["neumann", "lissa"])
def test_make_solver_and_from_budget_take_the_old_name(name):
    cls = hvp.SOLVERS[name]
    for build in (lambda **kw: hvp.make_solver(name, 6, **kw),
                  lambda **kw: hvp.make_solver(name, **kw),
                  lambda **kw: cls.from_budget(6, **kw)):
        with pytest.warns(DeprecationWarning) as record:
            old = build(power_iters=3)
        _deprecated(record, "power_iters=", "power_maxiter=")
        assert old == build(power_maxiter=3)


@pytest.mark.parametrize("cls", [hvp.Neumann, hvp.LiSSA])
def test_power_iters_and_power_maxiter_together_is_a_type_error(cls):
    with pytest.raises(TypeError, match=f"hvp.{cls.__name__}: got both power_iters= .* and "
                                        f"power_maxiter="):
        cls(power_iters=3, power_maxiter=3)


@pytest.mark.parametrize("cls", [hvp.Neumann, hvp.LiSSA])
def test_renamed_solvers_stay_plain_frozen_dataclasses(cls):
    solver = cls(power_maxiter=4)
    names = [field.name for field in dataclasses.fields(cls)]
    assert "power_maxiter" in names and "power_iters" not in names
    assert "power_iters" not in inspect.signature(cls).parameters
    assert dataclasses.replace(solver, maxiter=3) == cls(maxiter=3, power_maxiter=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.power_maxiter = 5
    assert jax.tree_util.tree_leaves(solver) == [solver]  # a static leaf, as before
    with pytest.raises(ValueError, match="power_maxiter must be an integer >= 1"):
        cls(power_maxiter=0)


def test_new_names_raise_no_deprecation_warning_anywhere_inside():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        hvp.solve(OPERATOR, RHS, hvp.Neumann(maxiter=5), on_failure="ignore")
        hvp.make_solver("lissa", 4)
        hvp.extreme_eigenvalues(OPERATOR, maxiter=4)
        config = TrainerConfig(outer_steps=1, inner_steps=1, inner_optimizer=optax.sgd(0.1),
                               outer_optimizer=optax.sgd(0.1),
                               method=bilevel.ESMethod(population=4, steps=2))
        result = train(_inner, _outer, jnp.ones(3), jnp.asarray(0.5), config, progress=False)
    assert {"es_loss", "es_loss_std"} <= set(result.history[0])


# --------------------------------------------------------------------------------------------
# ESInfo.loss -> outer_loss


def _es(key):
    return bilevel.es_hypergrad(lambda h: jnp.sum((h - 1.0) ** 2), jnp.zeros(3), key,
                                population=8, sigma=0.1)


def test_es_info_says_outer_loss():
    assert bilevel.ESInfo._fields == ("outer_loss", "outer_loss_std", "finite", "population")
    _, info = _es(jax.random.key(0))
    for old, new in (("loss", "outer_loss"), ("loss_std", "outer_loss_std")):
        with pytest.warns(DeprecationWarning) as record:
            value = getattr(info, old)
        _deprecated(record, f"bilevel.ESInfo.{old}", f".{new}")
        assert value is getattr(info, new)


def test_es_info_is_a_pytree_under_jit_and_vmap():
    keys = jax.random.split(jax.random.key(0), 3)
    infos = jax.jit(jax.vmap(lambda k: _es(k)[1]))(keys)
    assert isinstance(infos, bilevel.ESInfo) and infos.outer_loss.shape == (3,)
    np.testing.assert_allclose(infos.outer_loss[1], _es(keys[1])[1].outer_loss, rtol=1e-12)
    with pytest.warns(DeprecationWarning):
        _same(infos.loss, infos.outer_loss)


def test_pes_and_the_sharded_estimators_fill_outer_loss():
    hparams = jnp.ones(2)
    state = bilevel.pes_init(lambda k: jnp.zeros(2), hparams, jax.random.key(0), 4)

    def unroll(h, s, key):
        return s + h, jnp.sum((s + h) ** 2)

    _, _, info = bilevel.pes_hypergrad(unroll, hparams, state, jax.random.key(1))
    mesh = distributed.data_mesh()
    _, _, sharded = distributed.sharded_pes_hypergrad(
        unroll, hparams, distributed.shard_pes_state(state, mesh), jax.random.key(1), mesh=mesh)
    np.testing.assert_allclose(sharded.outer_loss, info.outer_loss, rtol=1e-12)
    _, es_info = distributed.sharded_es_hypergrad(lambda h: jnp.sum((h - 1.0) ** 2),
                                                  jnp.zeros(3), jax.random.key(0), population=8,
                                                  sigma=0.1, mesh=mesh)
    np.testing.assert_allclose(es_info.outer_loss, _es(jax.random.key(0))[1].outer_loss,
                               rtol=1e-12)


# --------------------------------------------------------------------------------------------
# UnrolledInfo.converged: the result can be trusted


def _inner(p, h):
    return 0.5 * jnp.sum(p**2) - h * jnp.sum(p)


def _outer(p, h):
    return jnp.sum(p**2)


def _unroll(lr, on_failure="ignore"):
    return bilevel.unrolled_hypergrad(_inner, _outer, jnp.ones(3), jnp.asarray(0.5),
                                      optax.sgd(lr), steps=20, on_failure=on_failure)


def test_converged_is_true_on_a_normal_unroll():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad, info = _unroll(0.1, on_failure="warn")
    assert bool(info.converged) and bool(info.finite) and bool(jnp.isfinite(grad))


def test_converged_is_false_on_a_diverging_but_finite_unroll():
    # sgd(2.5) on a unit quadratic multiplies the distance to the minimum by -1.5 per step:
    # the inner loss grows about 2.25x a step, finite all along.
    grad, info = _unroll(2.5)
    assert bool(info.finite) and bool(jnp.isfinite(grad))
    assert bool(jnp.all(jnp.isfinite(info.inner_losses)))
    assert float(info.inner_losses[-1]) > 100 * abs(float(info.inner_losses[0]))
    assert not bool(info.converged)


def test_a_diverging_unroll_is_reported_by_on_failure():
    with pytest.warns(hvp.SolveWarning, match="the inner loop diverged: the inner loss went "
                                              "from") as record:
        _unroll(2.5, on_failure="warn")
    assert record[0].filename == __file__
    with pytest.raises(hvp.SolveError, match="inner loop diverged"):
        _unroll(2.5, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _unroll(2.5, on_failure="ignore")


def test_converged_under_jit_and_vmap():
    converged = jax.jit(jax.vmap(lambda lr: _unroll(lr)[1].converged))(jnp.array([0.1, 2.5]))
    np.testing.assert_array_equal(converged, [True, False])


def test_unrolled_method_reports_converged_in_the_history():
    config = TrainerConfig(outer_steps=2, inner_steps=0, inner_optimizer=optax.sgd(2.5),
                           outer_optimizer=optax.sgd(1e-3), method=UnrolledMethod(steps=20))
    result = train(_inner, _outer, jnp.ones(3), jnp.asarray(0.5), config, progress=False)
    assert not any(result.series("converged")) and all(result.series("finite"))
    config = dataclasses.replace(config, inner_optimizer=optax.sgd(0.1))
    result = train(_inner, _outer, jnp.ones(3), jnp.asarray(0.5), config, progress=False)
    assert all(result.series("converged"))
