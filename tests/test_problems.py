"""Canonical bilevel problems: accurate inner solves, closed-form hypergradients against finite
differences and autodiff, an independent dense IFT reference for the rest, float32 builds, the
registry and determinism. Everything numerical runs in float64 (conftest turns x64 on)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from jax.flatten_util import ravel_pytree

from bilevel import problems

#: case id -> (registry name, constructor kwargs, has a closed-form hypergradient).
CASES = {
    "ridge": ("ridge", {}, True),
    "ridge-per-feature": ("ridge", {"per_feature": True}, True),
    "logistic": ("logistic_l2", {}, False),
    "logistic-digits": ("logistic_l2", {"data": "digits", "n_train": 80, "n_val": 80}, False),
    "imaml": ("imaml", {}, True),
    "reweighting": ("reweighting", {}, True),
    "reweighting-logistic": ("reweighting", {"loss": "logistic"}, False),
    "digits_mlp": ("digits_mlp", {}, False),
}
EXACT = [case for case, (_, _, exact) in CASES.items() if exact]
NOT_EXACT = [case for case, (_, _, exact) in CASES.items() if not exact]

#: Inner gradient norm that solve_inner must reach in float64 (measured: 1e-15 or better for all,
#: the nonconvex MLP included), and in float32 (measured: 3e-6 or better).
GRAD_TOL_64 = 1e-8
GRAD_TOL_32 = 1e-4
#: Central differences with step 1e-5: truncation ~1e-10, round-off ~1e-11 relative.
FD_STEP = 1e-5
FD_TOL = 1e-6


def _flat(tree):
    return ravel_pytree(tree)[0]


def _relative_error(x, reference):
    return float(jnp.linalg.norm(_flat(x) - _flat(reference)) / jnp.linalg.norm(_flat(reference)))


def _build(case, dtype=jnp.float64, seed=0):
    name, kwargs, _ = CASES[case]
    return problems.make_problem(name, jax.random.key(seed), dtype=dtype, **kwargs)


def _generic_hparams(problem, seed=1):
    """The initial hparams moved by N(0, 0.5²): no symmetric or special point."""
    flat, unravel = ravel_pytree(problem.hparams)
    noise = np.random.default_rng(seed).normal(0.0, 0.5, flat.shape)
    return unravel(flat + jnp.asarray(noise, flat.dtype))


# The helpers are jitted with the losses static and the data as arguments: eager autodiff
# compiles every primitive on its own and cost most of this file's time.


@functools.partial(jax.jit, static_argnums=0)
def _grad_norm(inner_loss, params, hparams, inner_args):
    return jnp.linalg.norm(_flat(jax.grad(inner_loss)(params, hparams, *inner_args)))


def _inner_grad_norm(problem, params, hparams):
    return float(_grad_norm(problem.inner_loss, params, hparams, problem.inner_args))


@functools.partial(jax.jit, static_argnums=0)
def _outer(outer_loss, params, hparams, outer_args):
    return outer_loss(params, hparams, *outer_args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _autodiff_hypergrad(solve_inner, outer_loss, params, hparams, inner_args, outer_args):
    """Reverse mode through the solver itself (meaningful where it is a closed form)."""
    def hyperobjective(h):
        return outer_loss(solve_inner(params, h, *inner_args), h, *outer_args)

    return jax.grad(hyperobjective)(hparams)


def _central_differences(problem, hparams, start, step=FD_STEP):
    """Central differences of ``λ ↦ outer(solve_inner(start, λ), λ)``, one coordinate at a time.

    ``start`` is θ*(λ): warm starts keep the nonconvex MLP in one basin (from its random init,
    L-BFGS carried λ and λ + 1e-5 to different local minima once). The solver is called as it is
    (already compiled), not inside a new jit that would compile it again."""
    def fun(h):
        solution = problem.solve_inner(start, h, *problem.inner_args)
        return _outer(problem.outer_loss, solution, h, problem.outer_args)

    flat, unravel = ravel_pytree(hparams)
    basis = np.eye(flat.size) * step
    diffs = [fun(unravel(flat + e)) - fun(unravel(flat - e)) for e in basis]
    return unravel(jnp.stack(diffs) / (2 * step))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_ift(inner_loss, outer_loss, solution, hparams, inner_args, outer_args):
    theta, unravel_theta = ravel_pytree(solution)
    lam, unravel_lam = ravel_pytree(hparams)

    def inner(t, h):
        return inner_loss(unravel_theta(t), unravel_lam(h), *inner_args)

    def outer(t, h):
        return outer_loss(unravel_theta(t), unravel_lam(h), *outer_args)

    hessian = jax.hessian(inner)(theta, lam)
    cross = jax.jacfwd(jax.grad(inner), argnums=1)(theta, lam)  # (params, hparams)
    grad_theta, grad_lam = jax.grad(outer, argnums=(0, 1))(theta, lam)
    return unravel_lam(grad_lam - cross.T @ jnp.linalg.solve(hessian, grad_theta)), hessian


def _dense_ift_hypergrad(problem, hparams, solution):
    """Reference written here, independently of the library: materialised Hessian and cross
    Jacobian, ``dL/dλ = ∂_λ L − (∂²_{θλ} f)ᵀ H⁻¹ ∇_θ L`` with one dense solve. Returns the
    hypergradient and the Hessian."""
    return _dense_ift(problem.inner_loss, problem.outer_loss, solution, hparams,
                      problem.inner_args, problem.outer_args)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    # OpenBLAS (behind jnp.linalg and np.linalg on the CPU) spins its threads; on a busy 2-core
    # machine that made a 1,210² eigvalsh take 15 s instead of 0.2 s.
    with threadpoolctl.threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(case id, float64 problem, generic hparams, the solution there)."""
    problem = _build(request.param)
    hparams = _generic_hparams(problem)
    solution = problem.solve_inner(problem.params, hparams, *problem.inner_args)
    return request.param, problem, hparams, solution


@pytest.fixture(scope="module")
def finite_differences(case):
    _, problem, hparams, solution = case
    return _central_differences(problem, hparams, solution)


@pytest.fixture(scope="module")
def dense_reference(case):
    """(dense IFT hypergradient, dense Hessian) at the case's solution."""
    _, problem, hparams, solution = case
    return _dense_ift_hypergrad(problem, hparams, solution)


# --------------------------------------------------------------------------------------------
# Inner solutions


def test_solve_inner_is_stationary(case):
    # Tolerance 1e-8 (float64) for every problem, at a generic hparams and at the initial one.
    _, problem, hparams, solution = case
    assert _inner_grad_norm(problem, solution, hparams) < GRAD_TOL_64
    at_init = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    assert _inner_grad_norm(problem, at_init, problem.hparams) < GRAD_TOL_64


def test_solve_inner_keeps_structure_and_dtype(case):
    _, problem, _, solution = case
    assert jax.tree_util.tree_structure(solution) == jax.tree_util.tree_structure(problem.params)
    for leaf, ref in zip(jax.tree_util.tree_leaves(solution),
                         jax.tree_util.tree_leaves(problem.params), strict=True):
        assert leaf.shape == ref.shape and leaf.dtype == jnp.float64


def test_solution_is_a_strict_minimum(case, dense_reference):
    # Positive-definite Hessian at θ*: the IFT applies, and for the MLP it is a local minimum.
    _, hessian = dense_reference
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian))  # LAPACK: no XLA compilation
    assert float(eigenvalues[0]) > 1e-6 * float(eigenvalues[-1]), case[0]


def test_solve_inner_does_not_recompile(case):
    _, problem, hparams, _ = case
    solve = getattr(problem.solve_inner, "func", problem.solve_inner)  # unwrap functools.partial
    before = solve._cache_size()
    moved = jax.tree_util.tree_map(lambda h: h + 0.125, hparams)
    problem.solve_inner(problem.params, moved, *problem.inner_args)
    assert solve._cache_size() == before


# --------------------------------------------------------------------------------------------
# Hypergradients


@pytest.mark.parametrize("case", EXACT, indirect=True)
def test_exact_hypergrad_matches_finite_differences(case, finite_differences):
    _, problem, hparams, _ = case
    exact = problem.exact_hypergrad(hparams)
    assert _relative_error(exact, finite_differences) < FD_TOL


@pytest.mark.parametrize("case", EXACT, indirect=True)
def test_exact_hypergrad_matches_autodiff_and_dense_ift(case, dense_reference):
    # The closed-form solvers are differentiable: reverse mode through the linear solve, and the
    # dense IFT reference, are two more independent references (float64, 1e-10).
    _, problem, hparams, _ = case
    exact = problem.exact_hypergrad(hparams)
    autodiff = _autodiff_hypergrad(problem.solve_inner, problem.outer_loss, problem.params,
                                   hparams, problem.inner_args, problem.outer_args)
    assert _relative_error(exact, autodiff) < 1e-10
    assert _relative_error(exact, dense_reference[0]) < 1e-10


@pytest.mark.parametrize("case", EXACT, indirect=True)
def test_exact_hypergrad_has_the_structure_of_hparams(case):
    _, problem, hparams, _ = case
    exact = problem.exact_hypergrad(hparams)
    assert jax.tree_util.tree_structure(exact) == jax.tree_util.tree_structure(hparams)
    for leaf, ref in zip(jax.tree_util.tree_leaves(exact), jax.tree_util.tree_leaves(hparams),
                         strict=True):
        assert leaf.shape == ref.shape and leaf.dtype == ref.dtype


@pytest.mark.parametrize("case", NOT_EXACT, indirect=True)
def test_finite_differences_match_a_dense_ift_reference(case, finite_differences,
                                                        dense_reference):
    # No closed form: the finite differences of outer(solve_inner(λ)) run, are finite, and agree
    # with a dense implicit-function-theorem reference written in this file (1e-6 relative).
    _, problem, _, _ = case
    assert problem.exact_hypergrad is None
    assert bool(jnp.all(jnp.isfinite(_flat(finite_differences))))
    assert _relative_error(finite_differences, dense_reference[0]) < FD_TOL


def test_reweighting_hypergradient_points_at_the_flipped_labels():
    # The known answer of the reweighting problem: descent lowers the weights of flipped labels.
    problem = problems.data_reweighting(jax.random.key(0), dtype=jnp.float64)
    flipped = problem.metadata["flipped"]
    assert int(flipped.sum()) == round(0.3 * 40)
    grad = problem.exact_hypergrad(problem.hparams)
    assert float(grad[flipped].mean()) > 0.0 > float(grad[~flipped].mean())


def test_solve_inner_under_vmap_over_hparams():
    # Newton's lax loops, line search included, batch over hparams (float64, 1e-10).
    problem = _build("logistic")
    batch = jnp.stack([_generic_hparams(problem, seed) for seed in (1, 2, 3)])
    batched = jax.vmap(problem.solve_inner, in_axes=(None, 0, None, None))(
        problem.params, batch, *problem.inner_args)
    for i in range(3):
        single = problem.solve_inner(problem.params, batch[i], *problem.inner_args)
        np.testing.assert_allclose(batched[i], single, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# float32, determinism, the registry, argument checks


@pytest.mark.parametrize("case_id", list(CASES))
def test_builds_in_float32(case_id):
    problem = _build(case_id, dtype=jnp.float32)
    floating = jax.tree_util.tree_leaves(
        (problem.params, problem.hparams, problem.inner_args, problem.outer_args))
    assert all(leaf.dtype == jnp.float32 for leaf in floating
               if jnp.issubdtype(leaf.dtype, jnp.floating))
    solution = jax.eval_shape(problem.solve_inner, problem.params, problem.hparams,
                              *problem.inner_args)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(solution))
    for loss, args in ((problem.inner_loss, problem.inner_args),
                       (problem.outer_loss, problem.outer_args)):
        value = jax.eval_shape(loss, problem.params, problem.hparams, *args)
        assert value.shape == () and value.dtype == jnp.float32


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.slow] if name == "digits_mlp" else [])
    for name in sorted(problems.PROBLEMS)])  # digits_mlp: ~5 s of L-BFGS compilation
def test_solves_in_float32(name):
    # Every solver kind (linear solves, Newton, L-BFGS) at the registry's defaults; the inner
    # gradient norm reaches 1e-4 (measured: 3e-6 or better), the closed-form hypergradients
    # agree with float64 to 1e-4 relative.
    problem = problems.make_problem(name, jax.random.key(0), dtype=jnp.float32)
    solution = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(solution))
    assert _inner_grad_norm(problem, solution, problem.hparams) < GRAD_TOL_32
    if problem.exact_hypergrad is not None:
        exact32 = problem.exact_hypergrad(problem.hparams)
        problem64 = problems.make_problem(name, jax.random.key(0), dtype=jnp.float64)
        exact64 = problem64.exact_hypergrad(problem64.hparams)
        assert _flat(exact32).dtype == jnp.float32
        assert _relative_error(exact32.astype(jnp.float64), exact64) < 1e-4


def _data(problem):
    return jax.tree_util.tree_leaves(
        (problem.params, problem.hparams, problem.inner_args, problem.outer_args))


@pytest.mark.parametrize("name", sorted(problems.PROBLEMS))
def test_same_key_same_data_other_key_other_data(name):
    first, again = (problems.make_problem(name, jax.random.key(3)) for _ in range(2))
    for a, b in zip(_data(first), _data(again), strict=True):
        np.testing.assert_array_equal(a, b)
    raw = problems.make_problem(name, jax.random.PRNGKey(3))  # raw uint32 keys work too
    for a, b in zip(_data(first), _data(raw), strict=True):
        np.testing.assert_array_equal(a, b)
    other = problems.make_problem(name, jax.random.key(4))
    assert any(not np.array_equal(a, b) for a, b in zip(_data(first), _data(other), strict=True))


@pytest.mark.parametrize("name", sorted(problems.PROBLEMS))
def test_float32_and_float64_share_their_data(name):
    data32 = _data(problems.make_problem(name, jax.random.key(0), dtype=jnp.float32))
    data64 = _data(problems.make_problem(name, jax.random.key(0), dtype=jnp.float64))
    for a, b in zip(data32, data64, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-6, atol=1e-6)


def test_registry_names():
    assert sorted(problems.PROBLEMS) == ["digits_mlp", "imaml", "logistic_l2", "reweighting",
                                         "ridge"]
    for name in problems.PROBLEMS:
        assert problems.make_problem(name, jax.random.key(0)).name == name


def test_make_problem_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown problem 'lasso'; known problems: digits_mlp, "
                                         "imaml, logistic_l2, reweighting, ridge"):
        problems.make_problem("lasso", jax.random.key(0))


def test_make_problem_passes_keyword_arguments():
    problem = problems.make_problem("ridge", jax.random.key(0), dim=3, per_feature=True)
    assert problem.params.shape == (3,) and problem.hparams.shape == (3,)
    mlp = problems.make_problem("digits_mlp", jax.random.key(0), hidden=8)
    assert mlp.metadata["num_params"] == _flat(mlp.params).size == 64 * 8 + 8 + 8 * 10 + 10


@pytest.mark.parametrize("name,kwargs,message", [
    ("ridge", {"n_train": 0}, "ridge: n_train must be an integer >= 1, got 0"),
    ("ridge", {"dtype": jnp.int32}, "ridge: dtype must be a floating-point dtype, got int32"),
    ("logistic_l2", {"data": "mnist"}, "data must be 'synthetic' or 'digits', got 'mnist'"),
    ("logistic_l2", {"data": "digits", "dim": 10}, "digits have dim 64, got dim=10"),
    ("logistic_l2", {"data": "digits", "n_train": 300, "n_val": 300},
     r"n_train \+ n_val must be <= 357"),
    ("imaml", {"prox": 0.0}, "prox must be > 0, got 0.0"),
    ("reweighting", {"noise_fraction": 1.0}, r"noise_fraction must be in \[0, 1\), got 1.0"),
    ("reweighting", {"loss": "hinge"}, "loss must be 'squared' or 'logistic', got 'hinge'"),
    ("digits_mlp", {"hidden": 0}, "digits_mlp: hidden must be an integer >= 1, got 0"),
])
def test_invalid_arguments_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        problems.make_problem(name, jax.random.key(0), **kwargs)


def _halves(problem, hparams, first: bool):
    """(hparams, *inner_args) with the batch_argnums arguments cut to one half of the examples."""
    arguments = list((hparams, *problem.inner_args))
    for i in problem.batch_argnums:
        n = jax.tree_util.tree_leaves(arguments[i])[0].shape[0]
        arguments[i] = jax.tree_util.tree_map(
            lambda a, n=n: a[: n // 2] if first else a[n // 2:], arguments[i])
    return arguments


def test_batch_argnums_name_an_axis_the_inner_loss_averages(case):
    # LiSSA's minibatch Hessians are unbiased only if the inner loss is a mean over the axis
    # batch_argnums names (plus terms without data): then the loss on all examples is the
    # average of the losses on two equal halves, to round-off (every n_train here is even).
    case_id, problem, hparams, solution = case
    if case_id == "imaml":  # a sum over tasks, each with its own parameters: nothing to sample
        assert problem.batch_argnums == ()
        return
    arguments = (hparams, *problem.inner_args)
    sizes = {leaf.shape[0] for i in problem.batch_argnums
             for leaf in jax.tree_util.tree_leaves(arguments[i])}
    assert problem.batch_argnums and len(sizes) == 1 and sizes.pop() % 2 == 0
    full = problem.inner_loss(solution, hparams, *problem.inner_args)
    halves = [problem.inner_loss(solution, *_halves(problem, hparams, first))
              for first in (True, False)]
    np.testing.assert_allclose(float(full), 0.5 * float(sum(halves)), rtol=1e-12)
    # Not vacuous: the two halves' losses differ.
    assert abs(float(halves[0]) - float(halves[1])) > 1e-6 * abs(float(full))


@pytest.mark.parametrize("batch_argnums,message", [
    ((3,), r"batch_argnums must be a tuple of distinct positions .* \[0, 3\), got \(3,\)"),
    ([1, 2], r"must be a tuple of distinct positions"),
    ((1, 1), r"must be a tuple of distinct positions"),
    ((0, 1), r"sharing one leading \(example\) axis"),  # ridge's λ is a scalar
])
def test_bad_batch_argnums_are_named(batch_argnums, message):
    problem = _build("ridge")
    with pytest.raises(ValueError, match=r"BilevelProblem\('ridge'\): .*" + message):
        dataclasses.replace(problem, batch_argnums=batch_argnums)


def test_batch_argnums_sizes_must_agree():
    problem = _build("reweighting")
    x, y = problem.inner_args
    with pytest.raises(ValueError, match="leading sizes are"):
        dataclasses.replace(problem, inner_args=(x, y[:-1]))


def test_digits_mlp_per_parameter_decay_agrees_with_per_layer():
    # With every λ_i of a layer equal to that layer's λ_l the two inner losses are one function
    # of θ, so H and v = H⁻¹∇L_out are shared, and the chain rule gives the IFT's cross term
    # ∂_{λ_l}(∇_θL · v) = Σ_{i in l} ∂_{λ_i}(∇_θL · v) for any v: checked for a random v.
    layer = problems.digits_mlp(jax.random.key(3), hidden=4, dtype=jnp.float64)
    each = problems.digits_mlp(jax.random.key(3), hidden=4, per_parameter=True,
                               dtype=jnp.float64)
    assert jax.tree_util.tree_structure(each.hparams) == jax.tree_util.tree_structure(
        each.params)
    assert each.batch_argnums == layer.batch_argnums == (1, 2)
    flat, unravel = ravel_pytree(layer.params)
    rng = np.random.default_rng(0)
    theta = unravel(jnp.asarray(rng.normal(size=flat.shape)))
    v = unravel(jnp.asarray(rng.normal(size=flat.shape)))
    np.testing.assert_allclose(each.inner_loss(theta, each.hparams, *each.inner_args),
                               layer.inner_loss(theta, layer.hparams, *layer.inner_args),
                               rtol=1e-13)

    def cross(problem, hparams):
        grad = jax.grad(problem.inner_loss)(theta, hparams, *problem.inner_args)
        return jnp.vdot(_flat(grad), _flat(v))

    per_layer = jax.grad(functools.partial(cross, layer))(layer.hparams)
    per_parameter = jax.grad(functools.partial(cross, each))(each.hparams)
    for name in ("layer1", "layer2"):
        summed = sum(float(jnp.sum(g)) for g in jax.tree_util.tree_leaves(per_parameter[name]))
        np.testing.assert_allclose(summed, float(per_layer[name]), rtol=1e-10)
        # Closed form of each term: ∂_{λ_i}(e^{λ_i} θ_i v_i) = e^{λ_i} θ_i v_i.
        for key in ("w", "b"):
            np.testing.assert_allclose(
                per_parameter[name][key],
                jnp.exp(each.hparams[name][key]) * theta[name][key] * v[name][key], rtol=1e-12)


def test_hyperobjective_is_outer_at_the_solution():
    problem = _build("ridge-per-feature")
    hparams = _generic_hparams(problem)
    solution = problem.solve_inner(problem.params, hparams, *problem.inner_args)
    expected = problem.outer_loss(solution, hparams, *problem.outer_args)
    assert float(problem.hyperobjective(hparams)) == float(expected)
    assert float(problem.hyperobjective(hparams, params_init=solution)) == float(expected)
