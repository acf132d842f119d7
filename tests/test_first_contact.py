"""What a new user meets in the first hour: hypergradients that can be trusted by default.

A point far from an inner minimiser, NaN data, or a failed solve is never a converged result;
the default is a warning attributed to the user's line; every entry point speaks one
``on_failure`` vocabulary and raises one exception type; arguments are checked under the name
of the function the user called.
"""

import inspect
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_indefinite

import bilevel
import hvp

PROBLEM = bilevel.ridge(jax.random.key(0), dtype=jnp.float64)
DENSE = hvp.Dense()


def _hypergrad(params, hparams, inner_args, outer_args, **kwargs):
    return bilevel.hypergrad(PROBLEM.inner_loss, PROBLEM.outer_loss, params, hparams, inner_args,
                             outer_args, solver=DENSE, **kwargs)


_jitted = jax.jit(lambda p, h, a, b: _hypergrad(p, h, a, b, on_failure="ignore"))


@pytest.fixture(scope="module")
def solved():
    return PROBLEM.solve_inner(PROBLEM.params, PROBLEM.hparams, *PROBLEM.inner_args)


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tree))))


# --------------------------------------------------------------------------------------------
# Stationarity.


def test_hypergrad_at_the_inner_minimiser_is_converged_and_stationary(solved):
    grad, info = _jitted(solved, PROBLEM.hparams, PROBLEM.inner_args, PROBLEM.outer_args)
    assert bool(info.converged) and bool(info.stationary) and bool(info.finite)
    # At the minimiser the inner gradient is round-off (float64).
    assert float(info.inner_grad_norm) < 1e-12
    np.testing.assert_allclose(grad, PROBLEM.exact_hypergrad(PROBLEM.hparams), rtol=1e-8)


@pytest.mark.parametrize("where", ["problem.params", "params + 1"])
def test_hypergrad_far_from_a_minimiser_is_flagged(solved, where):
    params = PROBLEM.params if where == "problem.params" else jax.tree_util.tree_map(
        lambda p: p + 1.0, solved)
    _, info = _jitted(params, PROBLEM.hparams, PROBLEM.inner_args, PROBLEM.outer_args)
    # The dense solve itself converged: only stationarity can say the result is wrong.
    assert int(info.status) == hvp.Status.CONVERGED
    assert not bool(info.stationary)
    assert not bool(info.converged)
    expected = _norm(jax.grad(PROBLEM.inner_loss)(params, PROBLEM.hparams, *PROBLEM.inner_args))
    np.testing.assert_allclose(float(info.inner_grad_norm), expected, rtol=1e-10)


def test_stationarity_tol_sets_the_scale_and_none_skips_the_check(solved):
    params = jax.tree_util.tree_map(lambda p: p + 1e-3, solved)
    args = (params, PROBLEM.hparams, PROBLEM.inner_args, PROBLEM.outer_args)
    _, info = _hypergrad(*args, on_failure="ignore")
    outer = _norm(jax.grad(PROBLEM.outer_loss)(params, PROBLEM.hparams, *PROBLEM.outer_args))
    ratio = float(info.inner_grad_norm) / outer
    _, loose = _hypergrad(*args, on_failure="ignore", stationarity_tol=2 * ratio)
    _, tight = _hypergrad(*args, on_failure="ignore", stationarity_tol=ratio / 2)
    _, skipped = _hypergrad(*args, on_failure="ignore", stationarity_tol=None)
    assert bool(loose.stationary) and not bool(tight.stationary)
    assert bool(skipped.stationary) and bool(jnp.isnan(skipped.inner_grad_norm))


# --------------------------------------------------------------------------------------------
# Non-finite inputs.


def _with_nan(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    first = jnp.asarray(leaves[0])
    leaves[0] = first.at[(0,) * first.ndim].set(jnp.nan)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("argument", ["params", "hparams", "inner_args", "outer_args"])
def test_nan_in_any_input_is_not_finite_and_not_converged(solved, argument):
    args = {"params": solved, "hparams": PROBLEM.hparams, "inner_args": PROBLEM.inner_args,
            "outer_args": PROBLEM.outer_args}
    args[argument] = _with_nan(args[argument])
    _, info = _jitted(args["params"], args["hparams"], args["inner_args"], args["outer_args"])
    assert not bool(info.finite)
    assert not bool(info.converged)


# --------------------------------------------------------------------------------------------
# The default is not silent, and the warning points at the caller's line.

INDEFINITE = hvp.MatrixOperator(random_indefinite(0, 6))
RHS = jnp.ones(6)


def _line_of(marker: str) -> int:
    lines, start = inspect.getsourcelines(_calls)
    return start + next(i for i, line in enumerate(lines) if marker in line)


def _calls(kind: str):
    if kind == "solve-eager":
        return hvp.solve(INDEFINITE, RHS, hvp.CG(maxiter=10))  # CALL solve-eager
    if kind == "solve-jit":
        solve = jax.jit(lambda b: hvp.solve(INDEFINITE, b, hvp.CG(maxiter=10)))  # CALL solve-jit
        return solve(RHS)
    if kind == "hypergrad-eager":
        return bilevel.hypergrad(PROBLEM.inner_loss, PROBLEM.outer_loss,  # CALL hypergrad-eager
                                 PROBLEM.params, PROBLEM.hparams, PROBLEM.inner_args,
                                 PROBLEM.outer_args, solver=DENSE)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["solve-eager", "solve-jit"])
def test_a_failed_solve_warns_by_default_at_the_callers_line(kind):
    with pytest.warns(hvp.SolveWarning) as record:
        jax.block_until_ready(_calls(kind))
    [warning] = [w for w in record if issubclass(w.category, hvp.SolveWarning)]
    message = str(warning.message)
    assert "\n" not in message
    assert re.fullmatch(r"hvp\.solve: the solve failed: negative curvature after \d+ iterations "
                        r"\(\d+ HVPs\), residual norm \S+", message), message
    assert warning.filename == __file__
    assert warning.lineno == _line_of(f"# CALL {kind}")


def test_cg_stopped_by_negative_curvature_warns_through_hypergrad():
    # Indefinite inner Hessian: CG stops at negative curvature and its hypergradient has the
    # opposite sign to the converged one. The user hears about it without reading info.
    def inner(p, h, a):
        return 0.5 * p @ a @ p + h * jnp.sum(p)

    def outer(p, h):
        return jnp.sum(p**2)

    matrix = random_indefinite(1, 6)
    params = -jnp.linalg.solve(matrix, jnp.ones(6))  # stationary, but a saddle
    with pytest.warns(hvp.SolveWarning, match=r"bilevel\.hypergrad: the solve failed: negative "
                                              r"curvature after \d+ iterations") as record:
        jax.jit(lambda p, h, a: bilevel.hypergrad(inner, outer, p, h, (a,), (),
                                                   solver=hvp.CG(maxiter=20)))(
            params, jnp.asarray(1.0), matrix)
    assert all(w.filename == __file__ for w in record)


def test_hypergrad_far_from_a_minimiser_warns_by_default():
    with pytest.warns(hvp.SolveWarning, match=r"bilevel\.hypergrad: params is not a stationary "
                                              r"point of inner_loss") as record:
        _calls("hypergrad-eager")
    assert record[0].filename == __file__
    assert record[0].lineno == _line_of("# CALL hypergrad-eager")


def test_on_failure_ignore_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hvp.solve(INDEFINITE, RHS, hvp.CG(maxiter=10), on_failure="ignore")
        bilevel.hypergrad(PROBLEM.inner_loss, PROBLEM.outer_loss, PROBLEM.params,
                          PROBLEM.hparams, PROBLEM.inner_args, PROBLEM.outer_args,
                          solver=DENSE, on_failure="ignore")


# --------------------------------------------------------------------------------------------
# One vocabulary, one exception type.


def _quadratic_inner(p, h):
    return 0.5 * jnp.sum(p**2) - h * jnp.sum(p)


def _quadratic_outer(p, h):
    return jnp.sum(p**2)


def _diverging_meta_loss(h):
    return jnp.where(h[0] > -1e9, jnp.inf, 0.0)


def _diverging_unroll(h, state, key):
    return state, jnp.inf * jnp.sum(h)


def _failing_call(entry: str, on_failure: str):
    """Each public entry point, in a setting where it fails."""
    h = jnp.asarray(1.0)
    if entry == "hvp.solve":
        return hvp.solve(INDEFINITE, RHS, hvp.CG(maxiter=10), on_failure=on_failure)
    if entry == "hypergrad":
        return bilevel.hypergrad(_quadratic_inner, _quadratic_outer, jnp.zeros(3), h,
                                 solver=DENSE, on_failure=on_failure)
    if entry == "implicit":
        solve = bilevel.implicit(lambda p, h: 0.5 * p @ INDEFINITE.matrix @ p - h * jnp.sum(p),
                                 solver=hvp.CG(maxiter=10), on_failure=on_failure)(
            lambda p0, h: p0)
        return jax.grad(lambda h: jnp.sum(solve(jnp.ones(6), h) ** 2))(h)
    if entry == "unrolled_hypergrad":
        return bilevel.unrolled_hypergrad(_quadratic_inner, _quadratic_outer, jnp.ones(3), h,
                                          optax.sgd(1e200), steps=3, on_failure=on_failure)
    if entry == "es_hypergrad":
        return bilevel.es_hypergrad(_diverging_meta_loss, jnp.ones(2), jax.random.key(0),
                                    population=4, on_failure=on_failure)
    if entry == "pes_hypergrad":
        state = bilevel.pes_init(lambda k: jnp.zeros(2), jnp.ones(2), jax.random.key(0), 4)
        return bilevel.pes_hypergrad(_diverging_unroll, jnp.ones(2), state, jax.random.key(1),
                                     on_failure=on_failure)
    raise ValueError(entry)


ENTRIES = ["hvp.solve", "hypergrad", "implicit", "unrolled_hypergrad", "es_hypergrad",
           "pes_hypergrad"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_raises_solve_error(entry):
    with pytest.raises(hvp.SolveError):
        jax.block_until_ready(_failing_call(entry, "raise"))


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_warns_by_default_and_ignores_on_request(entry):
    with pytest.warns(hvp.SolveWarning):
        jax.block_until_ready(_failing_call(entry, "warn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(_failing_call(entry, "ignore"))


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_has_the_same_on_failure_vocabulary(entry):
    with pytest.raises(ValueError, match=re.escape(
            "on_failure must be one of ('warn', 'raise', 'ignore'), got 'loud'")):
        _failing_call(entry, "loud")


def test_every_entry_point_defaults_to_warn():
    for fun in (hvp.solve, bilevel.hypergrad, bilevel.implicit, bilevel.unrolled_hypergrad,
                bilevel.es_hypergrad, bilevel.pes_hypergrad):
        assert inspect.signature(fun).parameters["on_failure"].default == "warn", fun


def test_solve_error_is_one_type_that_old_except_clauses_still_catch():
    assert bilevel.SolveError is hvp.SolveError
    assert issubclass(hvp.SolveError, RuntimeError)
    assert issubclass(hvp.SolveError, FloatingPointError)


def test_raise_under_hvp_jit_surfaces_as_solve_error_with_its_message():
    run = hvp.jit(lambda b: hvp.solve(INDEFINITE, b, hvp.CG(maxiter=10), on_failure="raise"))
    with pytest.raises(hvp.SolveError, match=r"^hvp\.solve: the solve failed: negative "
                                             r"curvature after \d+ iterations") as caught:
        run(RHS)
    assert not isinstance(caught.value, jax.errors.JaxRuntimeError)
    assert run.lower(RHS) is not None  # still a jitted function: lower, trace, ...


def test_raise_under_plain_jit_carries_the_message():
    run = jax.jit(lambda b: hvp.solve(INDEFINITE, b, hvp.CG(maxiter=10), on_failure="raise"))
    with pytest.raises(RuntimeError, match=r"SolveError: hvp\.solve: the solve failed"):
        jax.block_until_ready(run(RHS))


def test_surface_errors_leaves_other_errors_alone():
    @hvp.surface_errors
    def fails():
        raise ValueError("unrelated")

    with pytest.raises(ValueError, match="unrelated"):
        fails()


# --------------------------------------------------------------------------------------------
# Arguments checked where they enter, under the name of the function the user called.


def test_negative_damping_is_reported_by_hypergrad_itself(solved):
    with pytest.raises(ValueError, match=r"^bilevel\.hypergrad: damping must be >= 0, got -0\.1"):
        _hypergrad(solved, PROBLEM.hparams, PROBLEM.inner_args, PROBLEM.outer_args,
                   damping=-0.1)


@pytest.mark.parametrize("damping", ["1e-3", "abc", None, True, 1j, jnp.ones(2)])
@pytest.mark.parametrize("entry", ["hvp.hessian", "hvp.ggn", "bilevel.hypergrad",
                                   "bilevel.implicit"])
def test_a_damping_that_is_not_a_real_number_fails_at_construction(entry, damping):
    loss = PROBLEM.inner_loss
    with pytest.raises(TypeError, match=rf"^{re.escape(entry)}: damping must be a real"):
        if entry == "hvp.hessian":
            hvp.hessian(lambda p: jnp.sum(p**2), jnp.ones(2), damping=damping)
        elif entry == "hvp.ggn":
            hvp.ggn(lambda p: p, lambda o: jnp.sum(o**2), jnp.ones(2), damping=damping)
        elif entry == "bilevel.hypergrad":
            bilevel.hypergrad(loss, PROBLEM.outer_loss, PROBLEM.params, PROBLEM.hparams,
                              PROBLEM.inner_args, PROBLEM.outer_args, damping=damping)
        else:
            bilevel.implicit(loss, damping=damping)


def test_numpy_integers_are_accepted_wherever_a_python_int_is():
    ten = np.int64(10)
    assert hvp.CG(maxiter=ten).maxiter == 10 and type(hvp.CG(maxiter=ten).maxiter) is int
    assert hvp.Neumann(maxiter=np.int32(5)).maxiter == 5
    assert hvp.Nystrom(rank=np.int64(3)).rank == 3
    assert hvp.CG(maxiter=3, tol=np.float32(1e-3)).tol == pytest.approx(1e-3)
    grad, _ = bilevel.unrolled_hypergrad(_quadratic_inner, _quadratic_outer, jnp.ones(3),
                                         jnp.asarray(1.0), optax.sgd(0.1), steps=np.int64(3),
                                         truncate=np.int64(2), checkpoint_every=np.int64(1))
    assert bool(jnp.isfinite(grad))
    grad, _ = bilevel.es_hypergrad(lambda h: jnp.sum(h**2), jnp.ones(2), jax.random.key(0),
                                   population=np.int64(4))
    assert bool(jnp.all(jnp.isfinite(grad)))
    config = bilevel.TrainerConfig(outer_steps=np.int64(2), inner_steps=np.int64(1),
                                   inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.sgd(0.1))
    assert config.outer_steps == 2


@pytest.mark.parametrize(("which", "args_name"), [("outer", "outer_args"),
                                                  ("inner", "inner_args")])
def test_a_loss_that_does_not_fit_its_args_names_them(solved, which, args_name):
    # The classic slip: a loss written without the hparams argument it does not use.
    inner, outer = PROBLEM.inner_loss, PROBLEM.outer_loss
    if which == "outer":
        outer = lambda p, x, y: jnp.mean((x @ p - y) ** 2)  # noqa: E731
    else:
        inner = lambda p, x, y: jnp.mean((x @ p - y) ** 2)  # noqa: E731
    with pytest.raises(TypeError, match=rf"^bilevel\.hypergrad: {which}_loss is called as "
                                        rf"{which}_loss\(params, hparams, \*{args_name}\)"):
        bilevel.hypergrad(inner, outer, solved, PROBLEM.hparams, PROBLEM.inner_args,
                          PROBLEM.outer_args)
