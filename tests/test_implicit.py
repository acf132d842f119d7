"""Implicit hypergradients against closed forms, finite differences and jaxopt's custom_root."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel
import hvp

N, DIM = 40, 6


@pytest.fixture(scope="module")
def ridge():
    """Ridge regression with per-feature log-L2 strengths; closed-form hypergradient."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, DIM)))
    y = x @ jnp.arange(1.0, DIM + 1) + jnp.asarray(rng.standard_normal(N))
    xv = jnp.asarray(rng.standard_normal((N, DIM)))
    yv = xv @ jnp.arange(1.0, DIM + 1)

    def inner(theta, lam, x, y):
        return 0.5 * jnp.mean((x @ theta - y) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * theta**2)

    def outer(theta, lam, x, y):
        return 0.5 * jnp.mean((x @ theta - y) ** 2)

    def solve(lam, x=x, y=y):
        return jnp.linalg.solve(x.T @ x / N + jnp.diag(jnp.exp(lam)), x.T @ y / N)

    def closed_form(lam):
        # dθ*/dλ = −A⁻¹ diag(e^λ θ*), A = XᵀX/n + diag e^λ; dL/dλ = (dθ*/dλ)ᵀ ∇_θ L_val.
        theta = solve(lam)
        a = x.T @ x / N + jnp.diag(jnp.exp(lam))
        grad_val = xv.T @ (xv @ theta - yv) / N
        return -jnp.exp(lam) * theta * jnp.linalg.solve(a, grad_val)

    lam = jnp.linspace(-1.0, 0.5, DIM)
    return dict(inner=inner, outer=outer, solve=solve, closed_form=closed_form, lam=lam,
                data=(x, y), val=(xv, yv))


def test_hypergrad_matches_closed_form_with_dense_and_cg(ridge):
    lam = ridge["lam"]
    theta = ridge["solve"](lam)
    expected = ridge["closed_form"](lam)
    for solver, tolerance in ((hvp.Dense(), 1e-6), (hvp.CG(maxiter=50, tol=1e-10), 1e-4),
                              (hvp.MINRES(maxiter=50, tol=1e-10), 1e-4)):
        grad, info = bilevel.hypergrad(ridge["inner"], ridge["outer"], theta, lam,
                                       ridge["data"], ridge["val"], solver=solver)
        error = jnp.linalg.norm(grad - expected) / jnp.linalg.norm(expected)
        assert float(error) < tolerance, type(solver).__name__
        assert bool(info.converged) and bool(info.finite)
    # In float64 the exact solve is far better than the stated bound.
    grad, _ = bilevel.hypergrad(ridge["inner"], ridge["outer"], theta, lam, ridge["data"],
                                ridge["val"], solver=hvp.Dense())
    np.testing.assert_allclose(grad, expected, rtol=1e-10)


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "rev_fwd"])
def test_hypergrad_modes_agree(ridge, mode):
    lam = ridge["lam"]
    grad, _ = bilevel.hypergrad(ridge["inner"], ridge["outer"], ridge["solve"](lam), lam,
                                ridge["data"], ridge["val"], solver=hvp.Dense(), mode=mode)
    np.testing.assert_allclose(grad, ridge["closed_form"](lam), rtol=1e-10)


def test_direct_term_is_included():
    # outer depends on λ directly: L_out = ||θ||² + λ², inner = ½||θ − λ||² ⇒ θ* = λ,
    # dL/dλ = 2θ* + 2λ = 4λ.
    lam = jnp.array([0.3, -1.2])
    grad, _ = bilevel.hypergrad(lambda t, h: 0.5 * jnp.sum((t - h) ** 2),
                                lambda t, h: jnp.sum(t**2) + jnp.sum(h**2), lam, lam,
                                solver=hvp.Dense())
    np.testing.assert_allclose(grad, 4 * lam, rtol=1e-12)


def _logistic_problem():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((60, 4)))
    y = (x @ jnp.array([1.0, -2.0, 0.5, 0.0]) + 0.3 * jnp.asarray(rng.standard_normal(60)) > 0
         ).astype(jnp.float64)
    xv = jnp.asarray(rng.standard_normal((60, 4)))
    yv = (xv @ jnp.array([1.0, -2.0, 0.5, 0.0]) > 0).astype(jnp.float64)

    def logistic(w, x, y):
        z = x @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def inner(w, lam, x, y):
        return logistic(w, x, y) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)

    def outer(w, lam, x, y):
        return logistic(w, x, y)

    def newton(lam):
        def step(_, w):
            g = jax.grad(inner)(w, lam, x, y)
            return w - jnp.linalg.solve(jax.hessian(inner)(w, lam, x, y), g)

        return jax.lax.fori_loop(0, 30, step, jnp.zeros(4))

    return inner, outer, newton, (x, y), (xv, yv)


@pytest.mark.slow  # 13 s; the closed-form ridge checks cover the same path
def test_hypergrad_matches_finite_differences_on_per_feature_logistic_l2():
    inner, outer, newton, data, val = _logistic_problem()
    lam = jnp.array([-2.0, -1.0, 0.0, 1.0])
    grad, info = bilevel.hypergrad(inner, outer, newton(lam), lam, data, val,
                                   solver=hvp.CG(maxiter=50, tol=1e-12))
    assert bool(info.converged)

    def value(lam):
        return outer(newton(lam), lam, *val)

    eps = 1e-5
    finite_differences = jnp.array([(value(lam.at[i].add(eps)) - value(lam.at[i].add(-eps)))
                                    / (2 * eps) for i in range(4)])
    np.testing.assert_allclose(grad, finite_differences, rtol=1e-6, atol=1e-10)


def test_hypergrad_with_gauss_newton_curvature_equals_hessian_for_least_squares(ridge):
    # For a linear model with squared loss the GGN equals the Hessian.
    lam = ridge["lam"]
    x, y = ridge["data"]

    def curvature(theta, lam, x, y):
        return hvp.ggn(lambda t, x: x @ t, lambda z, y: 0.5 * jnp.mean((z - y) ** 2), theta,
                       (x,), (y,), damping=0.0)

    # The L2 term is not in the GGN above: add it through an inner loss without it.
    def inner_no_l2(theta, lam, x, y):
        return 0.5 * jnp.mean((x @ theta - y) ** 2) + 0.0 * jnp.sum(lam)

    theta = ridge["solve"](lam)
    with_ggn, _ = bilevel.hypergrad(inner_no_l2, ridge["outer"], theta, lam, (x, y),
                                    ridge["val"], solver=hvp.Dense(), curvature=curvature)
    with_hessian, _ = bilevel.hypergrad(inner_no_l2, ridge["outer"], theta, lam, (x, y),
                                        ridge["val"], solver=hvp.Dense())
    np.testing.assert_allclose(with_ggn, with_hessian, rtol=1e-10)
    # A traced damping (0 here) is not refused under jit just because its value is unknown.
    jitted = jax.jit(lambda d: bilevel.hypergrad(inner_no_l2, ridge["outer"], theta, lam, (x, y),
                                                 ridge["val"], solver=hvp.Dense(),
                                                 curvature=curvature, damping=d)[0])
    np.testing.assert_allclose(jitted(0.0), with_hessian, rtol=1e-10)
    with pytest.raises(ValueError, match="damping applies to the default Hessian"):
        bilevel.hypergrad(inner_no_l2, ridge["outer"], theta, lam, (x, y), ridge["val"],
                          curvature=curvature, damping=0.1)


def test_hypergrad_on_pytrees_under_jit_and_vmap():
    def inner(params, hparams, x):
        return (0.5 * jnp.sum((params["a"] - x) ** 2) * hparams["scale"]
                + 0.5 * jnp.exp(hparams["log_l2"]) * jnp.sum(params["b"] ** 2)
                + jnp.sum(params["b"] * x[:2]))

    def outer(params, hparams):
        return jnp.sum(params["a"] ** 2) + jnp.sum(params["b"]) + hparams["scale"] ** 2

    hparams = {"scale": jnp.array(2.0), "log_l2": jnp.array(0.5)}
    x = jnp.array([1.0, -1.0, 2.0])

    def solution(hparams, x):
        return {"a": x, "b": -x[:2] / jnp.exp(hparams["log_l2"])}

    def exact(hparams, x):
        return jax.grad(lambda h: outer(solution(h, x), h))(hparams)

    @jax.jit
    def run(hparams, x):
        return bilevel.hypergrad(inner, outer, solution(hparams, x), hparams, (x,),
                                 solver=hvp.CG(maxiter=20, tol=1e-12))

    grad, info = run(hparams, x)
    for key in hparams:
        np.testing.assert_allclose(grad[key], exact(hparams, x)[key], rtol=1e-10, atol=1e-12)
    run({"scale": jnp.array(3.0), "log_l2": jnp.array(0.1)}, x)
    assert run._cache_size() == 1

    batch = {"scale": jnp.array([1.0, 2.0, 3.0]), "log_l2": jnp.array([0.0, 0.5, 1.0])}
    grads, infos = jax.vmap(run, in_axes=(0, None))(batch, x)
    assert infos.converged.shape == (3,)
    for i in range(3):
        h_i = jax.tree_util.tree_map(lambda t, i=i: t[i], batch)
        np.testing.assert_allclose(grads["log_l2"][i], exact(h_i, x)["log_l2"], rtol=1e-10,
                                   atol=1e-15)


def test_unconverged_solve_is_flagged_and_can_raise(ridge):
    lam = ridge["lam"]
    theta = ridge["solve"](lam)
    args = (ridge["inner"], ridge["outer"], theta, lam, ridge["data"], ridge["val"])
    _, info = bilevel.hypergrad(*args, solver=hvp.CG(maxiter=1, tol=1e-12))
    assert not bool(info.converged)
    assert int(info.status) == hvp.Status.MAX_ITERATIONS
    with pytest.raises(FloatingPointError, match=r"after 1 iterations .*residual norm"):
        bilevel.hypergrad(*args, solver=hvp.CG(maxiter=1, tol=1e-12), on_failure="raise")
    with pytest.warns(RuntimeWarning, match="the solve failed"):
        bilevel.hypergrad(*args, solver=hvp.CG(maxiter=1, tol=1e-12), on_failure="warn")
    jitted = jax.jit(lambda lam: bilevel.hypergrad(
        ridge["inner"], ridge["outer"], theta, lam, ridge["data"], ridge["val"],
        solver=hvp.CG(maxiter=1, tol=1e-12), on_failure="raise")[0])
    with pytest.raises(Exception, match="residual norm"):
        jax.block_until_ready(jitted(lam))


def test_non_finite_hypergradient_is_flagged(ridge):
    lam = ridge["lam"]
    theta = ridge["solve"](lam).at[0].set(jnp.nan)
    grad, info = bilevel.hypergrad(ridge["inner"], ridge["outer"], theta, lam, ridge["data"],
                                   ridge["val"], solver=hvp.CG(maxiter=5))
    assert not bool(info.finite) and not bool(info.converged)
    assert int(info.status) == hvp.Status.NONFINITE


def test_warm_start_from_the_previous_inverse_hvp(ridge):
    lam = ridge["lam"]
    theta = ridge["solve"](lam)
    args = (ridge["inner"], ridge["outer"], theta, lam, ridge["data"], ridge["val"])
    _, first = bilevel.hypergrad(*args, solver=hvp.CG(maxiter=50, tol=1e-10))
    _, again = bilevel.hypergrad(*args, solver=hvp.CG(maxiter=50, tol=1e-10),
                                 init=first.inverse_hvp)
    assert int(again.iterations) == 0 < int(first.iterations)


def test_bad_inputs_raise_clear_errors(ridge):
    lam, theta = ridge["lam"], ridge["solve"](ridge["lam"])
    inner, outer = ridge["inner"], ridge["outer"]
    with pytest.raises(TypeError, match="bilevel.hypergrad: hparams leaf .* dtype int"):
        bilevel.hypergrad(inner, outer, theta, jnp.arange(DIM), ridge["data"], ridge["val"])
    with pytest.raises(TypeError, match="bilevel.hypergrad: inner_loss must return a scalar"):
        bilevel.hypergrad(lambda t, h, x, y: x @ t, outer, theta, lam, ridge["data"],
                          ridge["val"])
    with pytest.raises(TypeError, match="bilevel.hypergrad: outer_loss must return a scalar"):
        bilevel.hypergrad(inner, lambda t, h, x, y: t, theta, lam, ridge["data"], ridge["val"])
    with pytest.raises(ValueError, match="bilevel.hypergrad: mode must be one of"):
        bilevel.hypergrad(inner, outer, theta, lam, ridge["data"], ridge["val"], mode="fwd")
    with pytest.raises(ValueError, match="on_failure must be one of"):
        bilevel.hypergrad(inner, outer, theta, lam, ridge["data"], ridge["val"],
                          on_failure="explode")
    with pytest.raises(ValueError, match="bilevel.hypergrad: damping must be >= 0"):
        bilevel.hypergrad(inner, outer, theta, lam, ridge["data"], ridge["val"], damping=-1.0)


# The decorator.


def _solve_by_gradient_descent(inner):
    def solve_inner(init, lam, x, y):
        def step(_, theta):
            return theta - 0.1 * jax.grad(inner)(theta, lam, x, y)

        return jax.lax.fori_loop(0, 2000, step, init)

    return solve_inner


def test_implicit_decorator_gives_the_closed_form_under_grad_jit_and_vmap(ridge):
    inner, outer = ridge["inner"], ridge["outer"]
    solve_inner = bilevel.implicit(inner, solver=hvp.CG(maxiter=50, tol=1e-12))(
        _solve_by_gradient_descent(inner))
    x, y = ridge["data"]

    def meta_loss(lam):
        return outer(solve_inner(jnp.zeros(DIM), lam, x, y), lam, *ridge["val"])

    lam = ridge["lam"]
    np.testing.assert_allclose(jax.grad(meta_loss)(lam), ridge["closed_form"](lam), rtol=1e-8)
    np.testing.assert_allclose(jax.jit(jax.grad(meta_loss))(lam), ridge["closed_form"](lam),
                               rtol=1e-8)
    lams = jnp.stack([lam, lam + 0.3])
    batched = jax.vmap(jax.grad(meta_loss))(lams)
    for i in range(2):
        np.testing.assert_allclose(batched[i], ridge["closed_form"](lams[i]), rtol=1e-8)


def test_implicit_decorator_differentiates_closed_over_arrays_and_data(ridge):
    x, y = ridge["data"]
    lam = ridge["lam"]

    def meta_loss(scale, x):
        def inner(theta, lam, x, y):  # closes over `scale`, a tracer under grad
            return ridge["inner"](theta, lam, x, y) + 0.5 * scale * jnp.sum(theta**2)

        @bilevel.implicit(inner, solver=hvp.CG(maxiter=50, tol=1e-12))
        def solve_inner(init, lam, x, y):
            a = x.T @ x / N + jnp.diag(jnp.exp(lam) + scale)
            return jnp.linalg.solve(a, x.T @ y / N)

        return ridge["outer"](solve_inner(jnp.zeros(DIM), lam, x, y), lam, *ridge["val"])

    def reference(scale, x):
        a = x.T @ x / N + jnp.diag(jnp.exp(lam) + scale)
        return ridge["outer"](jnp.linalg.solve(a, x.T @ y / N), lam, *ridge["val"])

    got = jax.grad(meta_loss, argnums=(0, 1))(0.7, x)
    expected = jax.grad(reference, argnums=(0, 1))(0.7, x)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-8, atol=1e-12)


def test_implicit_decorator_handles_integer_inner_args():
    def inner(w, lam, x, labels):
        logits = x @ w
        nll = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(
            logits, labels[:, None], axis=1)[:, 0])
        return nll + 0.5 * jnp.exp(lam) * jnp.sum(w**2)

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((30, 3)))
    labels = jnp.asarray(rng.integers(0, 2, 30))

    def newton(init, lam, x, labels):
        def step(_, w):
            g = jax.grad(inner)(w, lam, x, labels).ravel()
            h = jax.hessian(lambda v: inner(v.reshape(3, 2), lam, x, labels))(w.ravel())
            return (w.ravel() - jnp.linalg.solve(h, g)).reshape(3, 2)

        return jax.lax.fori_loop(0, 25, step, init)

    solve_inner = bilevel.implicit(inner, solver=hvp.CG(maxiter=50, tol=1e-12))(newton)

    def meta(lam):
        return jnp.sum(solve_inner(jnp.zeros((3, 2)), lam, x, labels) ** 2)

    eps = 1e-5
    fd = (meta(0.1 + eps) - meta(0.1 - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(meta)(0.1), fd, rtol=1e-6)


def test_implicit_decorator_warns_when_its_backward_solve_fails(ridge):
    inner = ridge["inner"]
    solve_inner = bilevel.implicit(inner, solver=hvp.CG(maxiter=1, tol=1e-12))(
        lambda init, lam, x, y: ridge["solve"](lam, x, y))
    with pytest.warns(RuntimeWarning, match="bilevel.implicit: the solve failed"):
        jax.grad(lambda lam: jnp.sum(solve_inner(jnp.zeros(DIM), lam, *ridge["data"])))(
            ridge["lam"])


def test_parity_with_jaxopt_custom_root(ridge):
    from jaxopt.implicit_diff import custom_root
    from jaxopt.linear_solve import solve_cg

    inner, outer = ridge["inner"], ridge["outer"]
    x, y = ridge["data"]

    def optimality(theta, lam, x, y):
        return jax.grad(inner)(theta, lam, x, y)

    @custom_root(optimality, solve=lambda mv, b: solve_cg(mv, b, tol=1e-12, maxiter=50))
    def jaxopt_solver(init, lam, x, y):
        return ridge["solve"](lam, x, y)

    ours = bilevel.implicit(inner, solver=hvp.CG(maxiter=50, tol=1e-12))(
        lambda init, lam, x, y: ridge["solve"](lam, x, y))

    def meta(solver):
        return lambda lam: outer(solver(jnp.zeros(DIM), lam, x, y), lam, *ridge["val"])

    lam = ridge["lam"]
    np.testing.assert_allclose(jax.grad(meta(ours))(lam), jax.grad(meta(jaxopt_solver))(lam),
                               rtol=1e-10)


def test_implicit_decorator_wraps_a_jaxopt_solver(ridge):
    import jaxopt

    inner, outer = ridge["inner"], ridge["outer"]

    @bilevel.implicit(inner, solver=hvp.CG(maxiter=50, tol=1e-12))
    def solve_inner(init, lam, x, y):
        solver = jaxopt.LBFGS(fun=inner, maxiter=200, tol=1e-12, implicit_diff=False)
        return solver.run(init, lam, x, y).params

    def meta_loss(lam):
        return outer(solve_inner(jnp.zeros(DIM), lam, *ridge["data"]), lam, *ridge["val"])

    lam = ridge["lam"]
    np.testing.assert_allclose(jax.jit(jax.grad(meta_loss))(lam), ridge["closed_form"](lam),
                               rtol=1e-7)
