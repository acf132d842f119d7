"""Bad inputs fail at trace time, naming the function and the argument; failed solves are reported.

Every error case runs twice: eagerly, and through ``jax.jit(...).lower`` with the arrays as traced
arguments, which proves the check needs only shapes and dtypes (nothing is compiled or run).
A solve that diverges, meets negative curvature or produces NaN says so in ``info``, and
``on_failure="raise"`` turns that into a ``RuntimeError``, eagerly and under ``jit``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_indefinite, random_spd
from jax.flatten_util import ravel_pytree

import hvp

#: 10 parameters in two leaves; dict keys flatten sorted, so paths read {['b'], ['w']}.
PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.linspace(0.5, 2.0, 4)}
SIZE = 10
INPUTS = jnp.arange(10.0).reshape(5, 2) / 10
TARGETS = jnp.ones((5, 3))


def flat(tree):
    return ravel_pytree(tree)[0]


def loss(params):
    x = flat(params)
    return 0.5 * jnp.sum(x**2) + 0.25 * jnp.sum(x**4)


def elementwise_loss(params):
    return flat(params) ** 2  # shape (10,): not a scalar


def coupled_loss(params, hparams):
    return jnp.sum(flat(params) ** 2 * hparams)


def model(params, inputs):
    return inputs @ params["w"] + params["b"][:3]


def squared_error(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2)


def squared_errors(outputs, targets):
    return 0.5 * (outputs - targets) ** 2  # shape (5, 3): not a scalar


def batch_loss(params, inputs, targets):
    return squared_error(model(params, inputs), targets)


def integer_b(params):
    return {"w": params["w"], "b": params["b"].astype(jnp.int32)}


WRONG_STRUCTURE = {"w": jnp.ones((2, 3))}
WRONG_SHAPE = {"w": jnp.ones((3, 2)), "b": jnp.ones(4)}
MODES_MESSAGE = re.escape("mode must be one of ('fwd_rev', 'rev_rev', 'rev_fwd'), got 'fwd_fwd'")


def case(name, fn, error, match):
    """``fn(params)`` must raise ``error`` matching ``match``; ``params`` is traced under jit."""
    return pytest.param(fn, error, match, id=name)


# Each message names the function, then the argument, then what was found and what is expected.
TRACE_TIME_CASES = [
    # --- a loss that is not a scalar
    case("hvp-nonscalar-fun", lambda p: hvp.hvp(elementwise_loss, p, p), TypeError,
         re.escape("hvp.hvp: fun must return a scalar, got an array of shape (10,)")),
    case("hvp-pytree-fun", lambda p: hvp.hvp(lambda q: (loss(q), loss(q)), p, p), TypeError,
         re.escape("hvp.hvp: fun must return a scalar array, got a pytree")),
    case("hvp-integer-fun", lambda p: hvp.hvp(lambda q: jnp.sum(q["b"] > 1), p, p), TypeError,
         r"hvp\.hvp: fun must return a floating-point scalar, got int"),
    case("hessian-nonscalar-fun", lambda p: hvp.hessian(elementwise_loss, p), TypeError,
         re.escape("hvp.hessian: fun must return a scalar, got an array of shape (10,)")),
    case("cross_vp-nonscalar-fun",
         lambda p: hvp.cross_vp(lambda q, h: elementwise_loss(q) * h, p, jnp.ones(()), p),
         TypeError, re.escape("hvp.cross_vp: fun must return a scalar, got an array of shape")),
    case("hvp_and_cross_vp-nonscalar-fun",
         lambda p: hvp.hvp_and_cross_vp(lambda q, h: elementwise_loss(q) * h, p, jnp.ones(()), p),
         TypeError, re.escape("hvp.hvp_and_cross_vp: fun must return a scalar")),
    case("ggn_vp-nonscalar-loss",
         lambda p: hvp.ggn_vp(model, squared_errors, p, p, (INPUTS,), (TARGETS,)), TypeError,
         re.escape("hvp.ggn_vp: loss must return a scalar, got an array of shape (5, 3)")),
    case("ggn-nonscalar-loss", lambda p: hvp.ggn(model, squared_errors, p, (INPUTS,), (TARGETS,)),
         TypeError, re.escape("hvp.ggn: loss must return a scalar, got an array of shape (5, 3)")),
    # --- vector does not match params
    case("hvp-vector-structure", lambda p: hvp.hvp(loss, p, WRONG_STRUCTURE), ValueError,
         re.escape("hvp.hvp: vector has structure {['w']}, params has {['b'], ['w']}")),
    case("hvp-vector-shape", lambda p: hvp.hvp(loss, p, WRONG_SHAPE), ValueError,
         re.escape("hvp.hvp: vector leaf ['w'] has shape (3, 2), params leaf has shape (2, 3)")),
    case("hvp-vector-structure-rev_rev",
         lambda p: hvp.hvp(loss, p, WRONG_STRUCTURE, mode="rev_rev"), ValueError,
         re.escape("hvp.hvp: vector has structure {['w']}, params has {['b'], ['w']}")),
    case("ggn_vp-vector-shape",
         lambda p: hvp.ggn_vp(model, squared_error, p, WRONG_SHAPE, (INPUTS,), (TARGETS,)),
         ValueError, re.escape("hvp.ggn_vp: vector leaf ['w'] has shape (3, 2)")),
    case("solve-vector-structure",
         lambda p: hvp.solve(hvp.hessian(loss, p), WRONG_STRUCTURE, hvp.CG()), ValueError,
         re.escape("hvp.solve: vector has structure {['w']}, operator.structure has "
                   "{['b'], ['w']}")),
    case("solve-vector-shape",
         lambda p: hvp.solve(hvp.hessian(loss, p), WRONG_SHAPE, hvp.CG()), ValueError,
         re.escape("hvp.solve: vector leaf ['w'] has shape (3, 2), operator.structure leaf has "
                   "shape (2, 3)")),
    case("solve-init-shape",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.CG(), init=WRONG_SHAPE), ValueError,
         re.escape("hvp.solve: init leaf ['w'] has shape (3, 2)")),
    # --- integer params or vectors
    case("hvp-integer-params", lambda p: hvp.hvp(loss, integer_b(p), integer_b(p)), TypeError,
         r"hvp\.hvp: params leaf \['b'\] has dtype int32; expected a floating-point dtype"),
    case("hessian-integer-params", lambda p: hvp.hessian(loss, integer_b(p)), TypeError,
         r"hvp\.hessian: params leaf \['b'\] has dtype int32; expected a floating-point"),
    case("ggn-integer-params",
         lambda p: hvp.ggn(model, squared_error, integer_b(p), (INPUTS,), (TARGETS,)), TypeError,
         r"hvp\.ggn: params leaf \['b'\] has dtype int32; expected a floating-point"),
    case("cross_vp-integer-hparams",
         lambda p: hvp.cross_vp(coupled_loss, p, jnp.ones((), jnp.int32), p), TypeError,
         r"hvp\.cross_vp: hparams leaf <root> has dtype int32; expected a floating-point"),
    case("solve-integer-vector",
         lambda p: hvp.solve(hvp.hessian(loss, p), integer_b(p), hvp.CG()), TypeError,
         r"hvp\.solve: vector leaf \['b'\] has dtype int32; expected a floating-point"),
    # --- negative damping (a constant; a traced damping cannot be checked while tracing)
    case("hessian-negative-damping", lambda p: hvp.hessian(loss, p, damping=-0.1), ValueError,
         re.escape("hvp.hessian: damping must be >= 0, got -0.1")),
    case("ggn-negative-damping",
         lambda p: hvp.ggn(model, squared_error, p, (INPUTS,), (TARGETS,), damping=-1.0),
         ValueError, re.escape("hvp.ggn: damping must be >= 0, got -1.0")),
    # --- unknown mode
    case("hvp-mode", lambda p: hvp.hvp(loss, p, p, mode="fwd_fwd"), ValueError,
         r"hvp\.hvp: " + MODES_MESSAGE),
    case("hessian-mode", lambda p: hvp.hessian(loss, p, mode="fwd_fwd"), ValueError,
         r"hvp\.hessian: " + MODES_MESSAGE),
    case("cross_vp-mode",
         lambda p: hvp.cross_vp(coupled_loss, p, jnp.ones(()), p, mode="fwd_fwd"), ValueError,
         r"hvp\.cross_vp: " + MODES_MESSAGE),
    # --- solver and operator do not fit each other
    case("nystrom-rank-too-large",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Nystrom(rank=SIZE + 1)), ValueError,
         re.escape(f"hvp.Nystrom: rank={SIZE + 1} exceeds the problem size {SIZE}")),
    case("solver-not-a-solver", lambda p: hvp.solve(hvp.hessian(loss, p), p, "cg"), TypeError,
         re.escape("hvp.solve: solver must be an hvp solver such as hvp.CG(), got str")),
    case("solver-class-not-instance",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.CG), TypeError,
         re.escape("hvp.solve: solver must be an hvp solver such as hvp.CG(), got type")),
    case("operator-not-an-operator",
         lambda p: hvp.solve(jnp.eye(SIZE), flat(p), hvp.CG()), TypeError,
         re.escape("hvp.solve: operator must be an hvp.LinearOperator")),
    case("solve-on_failure",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.CG(), on_failure="loud"), ValueError,
         re.escape("hvp.solve: on_failure must be one of ('warn', 'raise', 'ignore'), got "
                   "'loud'")),
    case("lissa-without-batch_argnums",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.LiSSA(batch_size=2)), ValueError,
         re.escape("hvp.LiSSA: the operator must be built with batch_argnums")),
    case("nystrom-preconditioner",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Nystrom(rank=3),
                             preconditioner=hvp.DiagonalOperator(p)), ValueError,
         re.escape("hvp.solve: Nystrom does not take a preconditioner")),
    case("dense-preconditioner",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Dense(),
                             preconditioner=hvp.DiagonalOperator(p)), ValueError,
         re.escape("hvp.solve: Dense does not take a preconditioner")),
    case("lissa-preconditioner",
         lambda p: hvp.solve(hvp.hessian(batch_loss, p, INPUTS, TARGETS, batch_argnums=(0, 1)),
                             p, hvp.LiSSA(batch_size=2), preconditioner=hvp.DiagonalOperator(p)),
         ValueError, re.escape("hvp.solve: LiSSA does not take a preconditioner")),
    case("identity-init", lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Identity(), init=p),
         ValueError, re.escape("hvp.solve: Identity does not take init")),
    case("dense-init", lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Dense(), init=p),
         ValueError, re.escape("hvp.solve: Dense does not take init")),
    case("nystrom-init",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Nystrom(rank=3), init=p),
         ValueError, re.escape("hvp.solve: Nystrom does not take init")),
    # --- materialising more than the size limit
    case("dense-solver-max_size",
         lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Dense(max_size=SIZE - 1)), ValueError,
         re.escape(f"hvp.Dense: the operator has {SIZE} rows, more than max_size={SIZE - 1}")),
    case("hessian-dense-max_size", lambda p: hvp.hessian(loss, p).dense(max_size=SIZE - 1),
         ValueError, re.escape(f"HessianOperator.dense: the operator has {SIZE} rows")
         + f".*max_size={SIZE - 1}"),
    case("ggn-dense-max_size",
         lambda p: hvp.ggn(model, squared_error, p, (INPUTS,), (TARGETS,)).dense(max_size=4),
         ValueError,
         re.escape(f"GGNOperator.dense: the operator has {SIZE} rows") + ".*max_size=4"),
    case("hessian-dense-default-limit",
         lambda p: hvp.hessian(lambda q: jnp.sum(q**2), jnp.zeros(hvp.DEFAULT_DENSE_LIMIT + 1))
         .dense(),
         ValueError, re.escape(f"HessianOperator.dense: the operator has "
                               f"{hvp.DEFAULT_DENSE_LIMIT + 1} rows")
         + f".*max_size={hvp.DEFAULT_DENSE_LIMIT}"),
    # --- solver hyperparameters out of range, rejected when the solver is built
    case("CG-maxiter", lambda p: hvp.CG(maxiter=0), ValueError,
         re.escape("CG: maxiter must be an integer >= 1, got 0")),
    case("CG-maxiter-float", lambda p: hvp.CG(maxiter=2.5), ValueError,
         re.escape("CG: maxiter must be an integer >= 1, got 2.5")),
    case("CG-tol", lambda p: hvp.CG(tol=-1), ValueError,
         re.escape("CG: tol must be a finite number >= 0, got -1")),
    case("MINRES-tol-nan", lambda p: hvp.MINRES(tol=float("nan")), ValueError,
         re.escape("MINRES: tol must be a finite number >= 0, got nan")),
    case("GMRES-restart", lambda p: hvp.GMRES(restart=0), ValueError,
         re.escape("GMRES: restart must be an integer >= 1, got 0")),
    case("Neumann-alpha", lambda p: hvp.Neumann(alpha=-1.0), ValueError,
         re.escape("Neumann: alpha must be None or a finite number > 0, got -1.0")),
    case("Neumann-divergence", lambda p: hvp.Neumann(divergence=0.0), ValueError,
         re.escape("Neumann: divergence must be None or a finite number > 0, got 0.0")),
    case("Nystrom-rank", lambda p: hvp.Nystrom(rank=0), ValueError,
         re.escape("Nystrom: rank must be an integer >= 1, got 0")),
    case("Nystrom-sketch", lambda p: hvp.Nystrom(sketch="x"), ValueError,
         re.escape("Nystrom: sketch must be 'columns' or 'gaussian', got 'x'")),
    case("Nystrom-rho", lambda p: hvp.Nystrom(rho=0.0), ValueError,
         re.escape("Nystrom: rho must be")),
    case("Identity-scale", lambda p: hvp.Identity(scale=0), ValueError,
         re.escape("Identity: scale must be None or a finite number > 0, got 0")),
    case("LiSSA-batch_size", lambda p: hvp.LiSSA(batch_size=0), ValueError,
         re.escape("LiSSA: batch_size must be an integer >= 1, got 0")),
    case("LiSSA-num_samples", lambda p: hvp.LiSSA(num_samples=0), ValueError,
         re.escape("LiSSA: num_samples must be an integer >= 1, got 0")),
    case("Dense-max_size", lambda p: hvp.Dense(max_size=0), ValueError,
         re.escape("Dense: max_size must be an integer >= 1, got 0")),
]


@pytest.mark.parametrize(("fn", "error", "match"), TRACE_TIME_CASES)
def test_bad_input_raises_eagerly(fn, error, match):
    with pytest.raises(error, match=match):
        fn(PARAMS)


@pytest.mark.parametrize(("fn", "error", "match"), TRACE_TIME_CASES)
def test_bad_input_raises_while_tracing_under_jit(fn, error, match):
    # ``lower`` traces without compiling or running: the error needs only shapes and dtypes.
    with pytest.raises(error, match=match):
        jax.jit(fn).lower(PARAMS)


WELL_FORMED = [
    lambda p: hvp.hvp(loss, p, p),
    lambda p: hvp.hvp(loss, p, p, mode="rev_fwd"),
    lambda p: hvp.ggn_vp(model, squared_error, p, p, (INPUTS,), (TARGETS,)),
    lambda p: hvp.cross_vp(coupled_loss, p, jnp.ones(()), p, mode="rev_rev"),
    lambda p: hvp.hvp_and_cross_vp(coupled_loss, p, jnp.ones(()), p),
    lambda p: hvp.hessian(loss, p, damping=0.0).dense(max_size=SIZE),
    lambda p: hvp.ggn(model, squared_error, p, (INPUTS,), (TARGETS,), damping=0.5).mv(p),
    lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Nystrom(rank=SIZE)),
    lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Dense(max_size=SIZE)),
    lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.Identity(),
                        preconditioner=hvp.DiagonalOperator(p)),
    lambda p: hvp.solve(hvp.hessian(batch_loss, p, INPUTS, TARGETS, batch_argnums=(0, 1)), p,
                        hvp.LiSSA(batch_size=2, maxiter=2)),
    lambda p: hvp.solve(hvp.hessian(loss, p), p, hvp.CG(), init=p,
                        preconditioner=hvp.DiagonalOperator(p), on_failure="raise"),
]


@pytest.mark.parametrize("fn", WELL_FORMED)
def test_well_formed_inputs_pass_the_same_checks(fn):
    """The cases above fail because of their one defect, not because the setup is broken."""
    jax.eval_shape(fn, PARAMS)  # traces, runs nothing


# --------------------------------------------------------------------------------------------
# dtype mismatches: the house style asks for a trace-time error naming the function.


def as_float32(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree)


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "rev_fwd"])
def test_vector_dtype_mismatch_is_a_clear_error(mode):
    with pytest.raises((TypeError, ValueError), match=r"hvp\.hvp: vector .*float32"):
        hvp.hvp(loss, PARAMS, as_float32(PARAMS), mode=mode)


def test_solve_float64_vector_on_float32_operator_is_solved_or_clearly_refused():
    operator = hvp.hessian(loss, as_float32(PARAMS))
    try:
        x, info = hvp.solve(operator, PARAMS, hvp.CG(tol=1e-5))
    except (TypeError, ValueError) as error:
        assert re.search(r"hvp\.solve: vector", str(error)), str(error)
    else:
        assert bool(info.converged)
        assert jax.tree_util.tree_map(jnp.result_type, x) == \
            jax.tree_util.tree_map(jnp.result_type, PARAMS)


# --------------------------------------------------------------------------------------------
# Failed solves are reported in info, never hidden.


def quadratic_operator(matrix):
    """The Hessian of ``½ xᵀ M x`` on the pytree PARAMS: the full stack, with a known matrix."""
    return hvp.hessian(lambda p: 0.5 * flat(p) @ matrix @ flat(p), PARAMS)


def rhs(seed=1):
    return ravel_pytree(PARAMS)[1](jax.random.normal(jax.random.key(seed), (SIZE,)))


def true_residual(matrix, x, b):
    return float(jnp.linalg.norm(flat(b) - matrix @ flat(x)))


def assert_honest(info, matrix, x, b):
    """The reported residual is the true one (or both are non-finite), to float64 rounding."""
    residual = true_residual(matrix, x, b)
    if np.isfinite(residual):
        scale = float(jnp.linalg.norm(matrix, 2) * jnp.linalg.norm(flat(x))
                      + jnp.linalg.norm(flat(b)))
        np.testing.assert_allclose(float(info.residual_norm), residual, rtol=1e-8,
                                   atol=1e-12 * scale)
    else:
        assert not np.isfinite(float(info.residual_norm))


SPD = random_spd(0, SIZE, condition=10.0)
LAMBDA_MAX = float(jnp.linalg.eigvalsh(SPD)[-1])
INDEFINITE = random_indefinite(2, SIZE)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_neumann_with_too_large_step_reports_divergence(jit):
    # α = 3/λ_max: the error in the top eigendirection is multiplied by 1 − 3 = −2 per term.
    def run(b):
        return hvp.solve(quadratic_operator(SPD), b, hvp.Neumann(alpha=3 / LAMBDA_MAX,
                                                                 maxiter=200))

    x, info = (jax.jit(run) if jit else run)(rhs())
    assert not bool(info.converged)
    assert int(info.status) == hvp.Status.DIVERGED
    b_norm = float(jnp.linalg.norm(flat(rhs())))
    assert float(info.residual_norm) > hvp.Neumann().divergence * b_norm
    assert int(info.iterations) < 200  # it stopped on divergence, not on the budget
    assert_honest(info, SPD, x, rhs())


def test_neumann_with_a_safe_step_converges_on_the_same_problem():
    x, info = hvp.solve(quadratic_operator(SPD), rhs(), hvp.Neumann(alpha=1 / LAMBDA_MAX,
                                                                    maxiter=500, tol=1e-8))
    assert bool(info.converged) and int(info.status) == hvp.Status.CONVERGED
    assert_honest(info, SPD, x, rhs())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cg_on_indefinite_operator_is_not_converged(seed):
    b = rhs(seed)
    x, info = hvp.solve(quadratic_operator(INDEFINITE), b, hvp.CG(maxiter=100, tol=1e-10))
    assert not bool(info.converged)
    assert int(info.status) in (hvp.Status.NEGATIVE_CURVATURE, hvp.Status.MAX_ITERATIONS)
    assert float(info.residual_norm) > 1e-10 * float(jnp.linalg.norm(flat(b)))
    assert_honest(info, INDEFINITE, x, b)


def test_cg_along_a_negative_eigenvector_reports_negative_curvature():
    eigenvalues, eigenvectors = jnp.linalg.eigh(INDEFINITE)
    assert float(eigenvalues[0]) < 0
    b = ravel_pytree(PARAMS)[1](eigenvectors[:, 0])
    x, info = hvp.solve(quadratic_operator(INDEFINITE), b, hvp.CG(maxiter=100))
    assert int(info.status) == hvp.Status.NEGATIVE_CURVATURE
    assert not bool(info.converged)
    assert_honest(info, INDEFINITE, x, b)


@pytest.mark.parametrize("alpha", [None, 0.1])
def test_neumann_on_indefinite_operator_is_not_converged(alpha):
    x, info = hvp.solve(quadratic_operator(INDEFINITE), rhs(), hvp.Neumann(alpha=alpha,
                                                                           maxiter=100))
    assert not bool(info.converged)
    assert int(info.status) in (hvp.Status.DIVERGED, hvp.Status.MAX_ITERATIONS)
    assert_honest(info, INDEFINITE, x, rhs())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_singular_dense_solve_reports_nonfinite(jit):
    # No curvature along the 'b' leaf: the Hessian is exactly singular.
    operator = hvp.hessian(lambda p: 0.5 * jnp.sum(p["w"] ** 2), PARAMS)
    run = lambda op, b: hvp.solve(op, b, hvp.Dense())  # noqa: E731
    x, info = (jax.jit(run) if jit else run)(operator, rhs())
    assert int(info.status) == hvp.Status.NONFINITE
    assert not bool(info.converged)
    assert not np.all(np.isfinite(flat(x)))


# --------------------------------------------------------------------------------------------
# on_failure="raise": a RuntimeError with the status and residual, eagerly and under jit.

MAX_ITERATIONS_MESSAGE = (r"hvp\.solve: the solve failed: max iterations after 2 iterations "
                          r"\(\d+ HVPs\), residual norm \d\.\d+e[+-]\d+")
DIVERGED_MESSAGE = r"hvp\.solve: the solve failed: diverged after \d+ iterations .*residual norm"

FAILING_SOLVES = [
    pytest.param(lambda b: hvp.solve(quadratic_operator(SPD), b, hvp.CG(maxiter=2, tol=1e-12),
                                      on_failure="raise"), MAX_ITERATIONS_MESSAGE, id="cg-budget"),
    pytest.param(lambda b: hvp.solve(quadratic_operator(SPD), b,
                                      hvp.Neumann(alpha=3 / LAMBDA_MAX, maxiter=200),
                                      on_failure="raise"), DIVERGED_MESSAGE, id="neumann-diverged"),
    pytest.param(lambda b: hvp.solve(quadratic_operator(INDEFINITE), b, hvp.CG(maxiter=100),
                                      on_failure="raise"),
                 r"hvp\.solve: the solve failed: negative curvature after .*residual norm",
                 id="cg-negative-curvature"),
]


@pytest.mark.parametrize(("run", "match"), FAILING_SOLVES)
def test_on_failure_raise_eagerly(run, match):
    with pytest.raises(RuntimeError, match=match):
        run(rhs())


@pytest.mark.parametrize(("run", "match"), FAILING_SOLVES)
def test_on_failure_raise_under_jit(run, match):
    # Under jit the status is known only when the computation runs; the error may come wrapped
    # in a JaxRuntimeError (itself a RuntimeError) whose text carries the original message.
    with pytest.raises(RuntimeError, match=match):
        jax.block_until_ready(jax.jit(run)(rhs()))


def test_on_failure_raise_under_jit_of_vmap():
    run = jax.vmap(FAILING_SOLVES[0].values[0])
    batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), rhs(1), rhs(2))
    with pytest.raises(RuntimeError, match=MAX_ITERATIONS_MESSAGE):
        jax.block_until_ready(jax.jit(run)(batch))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_on_failure_raise_is_silent_when_converged(jit):
    def run(b):
        return hvp.solve(quadratic_operator(SPD), b, hvp.CG(maxiter=100, tol=1e-10),
                         on_failure="raise")

    x, info = jax.block_until_ready((jax.jit(run) if jit else run)(rhs()))
    assert bool(info.converged)
    assert_honest(info, SPD, x, rhs())
