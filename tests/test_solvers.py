"""Every solver against a float64 dense solve, under jit and vmap, with honest diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_spd
from helpers import APPROXIMATIONS, CASES, PROBLEMS, SIZE, SOLVERS, TEMPLATE, flat, relative_error

import hvp


@pytest.mark.parametrize("solver_name,problem_name", CASES)
def test_solver_matches_dense_reference(solver_name, problem_name):
    solver, _, tolerance = SOLVERS[solver_name]
    problem = PROBLEMS[problem_name]
    b = problem.rhs()
    x, info = hvp.solve(problem.operator(), b, solver)
    assert relative_error(x, problem.reference(b)) < tolerance
    assert bool(info.converged), hvp.status_message(info)
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(b)


@pytest.mark.parametrize("solver_name", sorted(SOLVERS))
def test_solver_under_jit_equals_eager(solver_name):
    solver, _, tolerance = SOLVERS[solver_name]
    problem = PROBLEMS["spd"]
    b = problem.rhs()
    eager, _ = hvp.solve(problem.operator(), b, solver)

    @jax.jit
    def run(params, b):
        return hvp.solve(hvp.hessian(problem.loss, params), b, solver)

    jitted, info = run(problem.operator().params, b)
    np.testing.assert_allclose(flat(jitted), flat(eager), rtol=tolerance)
    assert bool(info.converged)
    run(problem.operator().params, problem.rhs(seed=7))
    assert run._cache_size() == 1  # a second call with new values must not recompile


@pytest.mark.parametrize("solver_name", sorted(SOLVERS))
def test_solver_under_vmap_over_right_hand_sides(solver_name):
    solver, _, tolerance = SOLVERS[solver_name]
    problem = PROBLEMS["spd"]
    op = problem.operator()
    rhs = [problem.rhs(seed) for seed in (1, 2, 3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rhs)
    xs, infos = jax.vmap(lambda b: hvp.solve(op, b, solver))(stacked)
    assert infos.converged.shape == (3,) and bool(jnp.all(infos.converged))
    for i, b in enumerate(rhs):
        x_i = jax.tree_util.tree_map(lambda t, i=i: t[i], xs)
        assert relative_error(x_i, problem.reference(b)) < tolerance


def test_vmap_over_a_family_of_operators():
    # Batched Hessians: s * A for several scales s, solved at once.
    matrix = PROBLEMS["spd"].matrix

    def solve_scaled(scale, b):
        op = hvp.hessian(lambda x: 0.5 * scale * x @ matrix @ x, jnp.zeros(SIZE))
        return hvp.solve(op, b, hvp.CG(maxiter=50, tol=1e-12))[0]

    scales = jnp.array([0.5, 1.0, 4.0])
    b = jnp.arange(1.0, SIZE + 1.0)
    xs = jax.vmap(solve_scaled, in_axes=(0, None))(scales, b)
    for scale, x in zip(scales, xs, strict=True):
        np.testing.assert_allclose(x, jnp.linalg.solve(scale * matrix, b), rtol=1e-10)


def test_cg_float32_within_float32_tolerance():
    problem = PROBLEMS["spd"]
    b = problem.rhs(dtype=jnp.float32)
    x, info = hvp.solve(problem.operator(jnp.float32), b, hvp.CG(maxiter=50, tol=1e-5))
    assert flat(x).dtype == jnp.float32
    assert relative_error(x, problem.reference(b)) < 1e-4
    assert bool(info.converged)


def test_hvp_counts_are_exact():
    problem = PROBLEMS["spd"]
    op, b = problem.operator(), problem.rhs()
    _, info = hvp.solve(op, b, hvp.CG(maxiter=5, tol=0.0))
    assert (int(info.iterations), int(info.hvp_count)) == (5, 6)  # + the residual check
    _, info = hvp.solve(op, b, hvp.Neumann(maxiter=7, alpha=0.05, tol=0.0))
    assert (int(info.iterations), int(info.hvp_count)) == (7, 8)
    _, info = hvp.solve(op, b, hvp.Neumann(maxiter=7, tol=0.0, power_maxiter=4))
    assert int(info.hvp_count) == 7 + 4 + 1
    _, info = hvp.solve(op, b, hvp.Identity())
    assert int(info.hvp_count) == 1
    _, info = hvp.solve(op, b, hvp.Nystrom(rank=4))
    assert int(info.hvp_count) == 5
    _, info = hvp.solve(op, b, hvp.Dense())
    assert int(info.hvp_count) == SIZE
    _, info = hvp.solve(op, b, hvp.GMRES(maxiter=8, restart=4, tol=0.0))
    assert (int(info.iterations), int(info.hvp_count)) == (8, 10)  # 2 cycles of 4 + 1 each


def test_residual_norm_is_the_true_residual():
    problem = PROBLEMS["ill"]
    op, b = problem.operator(), problem.rhs()
    for solver in (hvp.CG(maxiter=3, tol=0.0), hvp.MINRES(maxiter=3, tol=0.0),
                   hvp.Neumann(maxiter=3, tol=0.0), hvp.Identity(scale=1e-3),
                   hvp.Nystrom(rank=3)):
        x, info = hvp.solve(op, b, solver)
        true = jnp.linalg.norm(flat(b) - problem.matrix @ flat(x))
        np.testing.assert_allclose(info.residual_norm, true, rtol=1e-10)


def test_budget_exhausted_is_reported_not_hidden():
    problem = PROBLEMS["ill"]
    _, info = hvp.solve(problem.operator(), problem.rhs(), hvp.CG(maxiter=3, tol=1e-10))
    assert not bool(info.converged)
    assert int(info.status) == hvp.Status.MAX_ITERATIONS
    assert "max iterations after 3 iterations" in hvp.status_message(info)


def test_cg_error_falls_with_budget_and_neumann_residual_is_monotone():
    problem = PROBLEMS["ill"]
    op, b = problem.operator(), problem.rhs()
    errors = [relative_error(hvp.solve(op, b, hvp.CG(maxiter=k, tol=0.0))[0],
                             problem.reference(b)) for k in (1, 4, 8, 12, 24)]
    assert errors[-1] < 1e-8 and errors[0] > 1e-2
    residuals = [float(hvp.solve(op, b, hvp.Neumann(maxiter=k, tol=0.0))[1].residual_norm)
                 for k in (1, 10, 100)]
    assert residuals[0] > residuals[1] > residuals[2]


def test_warm_start_at_the_solution_needs_no_iterations():
    problem = PROBLEMS["spd"]
    op, b = problem.operator(), problem.rhs()
    exact = hvp.solve(op, b, hvp.Dense())[0]
    for solver in (hvp.CG(tol=1e-8), hvp.MINRES(tol=1e-8), hvp.GMRES(tol=1e-8),
                   hvp.Neumann(tol=1e-8, alpha=0.05)):
        x, info = hvp.solve(op, b, solver, init=exact)
        assert int(info.iterations) == 0 and bool(info.converged)
        assert relative_error(x, exact) < 1e-12


def test_warm_start_from_a_nearby_point_converges_faster():
    problem = PROBLEMS["ill"]
    op, b = problem.operator(), problem.rhs()
    exact = hvp.solve(op, b, hvp.Dense())[0]
    nearby = jax.tree_util.tree_map(lambda t: t * 1.01, exact)
    cold = hvp.solve(op, b, hvp.CG(tol=1e-10))[1]
    warm = hvp.solve(op, b, hvp.CG(tol=1e-10), init=nearby)[1]
    assert int(warm.iterations) < int(cold.iterations)


def test_jacobi_preconditioner_speeds_up_cg_on_a_badly_scaled_problem():
    scales = jnp.geomspace(1.0, 1e3, SIZE)
    matrix = (random_spd(3, SIZE, 3.0) * scales[:, None]) * scales[None, :]
    op = hvp.hessian(lambda x: 0.5 * x @ matrix @ x, jnp.zeros(SIZE))
    b = jnp.ones(SIZE)
    preconditioner = hvp.jacobi_preconditioner(op, jax.random.key(0), num_samples=400)
    plain = hvp.solve(op, b, hvp.CG(maxiter=200, tol=1e-10))
    preconditioned = hvp.solve(op, b, hvp.CG(maxiter=200, tol=1e-10),
                               preconditioner=preconditioner)
    assert bool(preconditioned[1].converged)
    assert int(preconditioned[1].iterations) < int(plain[1].iterations)
    np.testing.assert_allclose(preconditioned[0], jnp.linalg.solve(matrix, b), rtol=1e-8)
    for solver in (hvp.MINRES(maxiter=200, tol=1e-10), hvp.GMRES(maxiter=200, tol=1e-10)):
        x, info = hvp.solve(op, b, solver, preconditioner=preconditioner)
        assert bool(info.converged)
        np.testing.assert_allclose(x, jnp.linalg.solve(matrix, b), rtol=1e-7)


def test_identity_is_exact_for_a_multiple_of_the_identity():
    op = hvp.hessian(lambda x: 2.0 * jnp.sum(x**2), jnp.zeros(5))  # H = 4 I
    b = jnp.arange(5.0)
    x, info = hvp.solve(op, b, hvp.Identity(scale=0.25, tol=1e-12))
    np.testing.assert_allclose(x, b / 4.0, rtol=1e-14)
    assert bool(info.converged)


def test_nystrom_error_falls_with_rank_on_a_decaying_spectrum():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    matrix = jnp.asarray((q * np.geomspace(1e3, 1e-3, 40)) @ q.T)
    op = hvp.MatrixOperator(matrix)
    b = jnp.asarray(rng.standard_normal(40))
    reference = jnp.linalg.solve(matrix + 1e-1 * jnp.eye(40), b)  # Nyström targets (A + ρI)⁻¹
    errors = [relative_error(hvp.solve(op, b, hvp.Nystrom(rank=k, rho=1e-1,
                                                          sketch="gaussian"))[0], reference)
              for k in (2, 10, 25, 40)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-8


def test_randomised_solvers_are_deterministic_given_a_key():
    problem = PROBLEMS["spd"]
    op, b = problem.operator(), problem.rhs()
    solver = hvp.Nystrom(rank=5)
    first, _ = hvp.solve(op, b, solver, key=jax.random.key(3))
    again, _ = hvp.solve(op, b, solver, key=jax.random.key(3))
    other, _ = hvp.solve(op, b, solver, key=jax.random.key(4))
    np.testing.assert_array_equal(flat(first), flat(again))
    assert not np.allclose(flat(first), flat(other))


# LiSSA on a finite-sum least-squares problem, whose minibatch Hessians differ.

def _least_squares(seed=5, n=64, d=6):
    rng = np.random.default_rng(seed)
    features = jnp.asarray(rng.standard_normal((n, d)) * np.linspace(0.5, 1.5, d))
    targets = jnp.asarray(rng.standard_normal(n))

    def loss(w, x, y):
        return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.05 * jnp.sum(w**2)

    return loss, features, targets


def test_lissa_with_the_full_batch_equals_neumann():
    loss, x, y = _least_squares()
    op = hvp.hessian(loss, jnp.zeros(6), x, y, batch_argnums=(0, 1))
    b = jnp.ones(6)
    lissa, info = hvp.solve(op, b, hvp.LiSSA(maxiter=40, batch_size=64, alpha=0.3))
    # LiSSA of depth K sums K + 1 series terms; Neumann with K products sums K.
    neumann, _ = hvp.solve(op, b, hvp.Neumann(maxiter=41, alpha=0.3, tol=0.0))
    np.testing.assert_allclose(lissa, neumann, rtol=1e-10)
    assert int(info.hvp_count) == 41


def test_lissa_minibatch_estimate_is_close_to_the_exact_solve():
    loss, x, y = _least_squares()
    op = hvp.hessian(loss, jnp.zeros(6), x, y, batch_argnums=(0, 1))
    b = jnp.ones(6)
    exact = jnp.linalg.solve(op.dense(), b)
    estimate, info = hvp.solve(op, b, hvp.LiSSA(maxiter=200, batch_size=16, num_samples=32))
    assert relative_error(estimate, exact) < 0.1
    assert bool(info.converged)
    assert int(info.hvp_count) == 200 * 32 + 20 + 1


def test_ggn_operator_solves_match_the_dense_gauss_newton():
    rng = np.random.default_rng(6)
    inputs = jnp.asarray(rng.standard_normal((10, 3)))
    labels = jax.nn.one_hot(jnp.asarray(rng.integers(0, 4, 10)), 4)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4))), "b": jnp.zeros(4)}

    def model(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    def loss(logits, y):
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))

    op = hvp.ggn(model, loss, params, (inputs,), (labels,), damping=1e-3)
    matrix = op.dense()
    assert float(jnp.min(jnp.linalg.eigvalsh(matrix))) > 0  # PSD by construction, + damping
    b = jax.tree_util.tree_map(jnp.ones_like, params)
    x, info = hvp.solve(op, b, hvp.CG(maxiter=200, tol=1e-11))
    assert bool(info.converged)
    np.testing.assert_allclose(flat(x), jnp.linalg.solve(matrix, flat(b)), rtol=1e-8)


def test_mixed_precision_pytree_promotes_and_restores_dtypes():
    params = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.float64)}

    def loss(p):
        return jnp.sum(p["a"] ** 2) + 3.0 * jnp.sum(p["b"] ** 2)

    b = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float64)}
    x, info = hvp.solve(hvp.hessian(loss, params), b, hvp.CG(tol=1e-12))
    assert x["a"].dtype == jnp.float32 and x["b"].dtype == jnp.float64
    np.testing.assert_allclose(x["a"], 0.5)
    np.testing.assert_allclose(x["b"], 1.0 / 6.0)
    assert bool(info.converged)


def test_template_has_the_advertised_size():
    assert hvp.hessian(PROBLEMS["spd"].loss, TEMPLATE).size == SIZE


def test_iterating_past_the_precision_floor_neither_diverges_nor_hides_it():
    # float32, tol=0: CG used to keep iterating after its recursive residual underflowed, and
    # the iterate then diverged; it now stops at the precision floor and says it stagnated.
    n = 4000
    op = hvp.DiagonalOperator(jnp.asarray(np.geomspace(0.008, 0.025, n), jnp.float32))
    b = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    for solver in (hvp.CG(maxiter=150, tol=0.0), hvp.MINRES(maxiter=150, tol=0.0),
                   hvp.Neumann(maxiter=2000, alpha=40.0, tol=0.0)):
        x, info = hvp.solve(op, b, solver)
        assert float(info.residual_norm) < 1e-5 * float(jnp.linalg.norm(b)), type(solver)
        assert int(info.status) == hvp.Status.STAGNATED, hvp.status_message(info)


def test_approximations_worse_than_zero_are_flagged_inaccurate():
    problem = PROBLEMS["ill"]
    op, b = problem.operator(), problem.rhs()
    _, info = hvp.solve(op, b, hvp.Identity(scale=1.0))  # λ up to 1e4: far worse than x = 0
    assert int(info.status) == hvp.Status.INACCURATE and not bool(info.converged)
    _, info = hvp.solve(op, b, hvp.Identity(scale=1.0, tol=None))  # opted out: finite is enough
    assert bool(info.converged)
    _, info = hvp.solve(op, b, hvp.Identity(scale=1e-4))  # 1/λ_max: a contraction
    assert bool(info.converged) and float(info.residual_norm) < float(
        jnp.linalg.norm(flat(b)))


def test_neumann_from_a_poor_warm_start_still_converges():
    # The start's residual exceeds ||b||; divergence is growth past the start, not past ||b||.
    op = hvp.DiagonalOperator(jnp.array([1.0, 0.5, 0.1]))
    b = jnp.ones(3)
    x, info = hvp.solve(op, b, hvp.Neumann(maxiter=500, alpha=1.0, tol=1e-8),
                        init=jnp.full(3, 3.0))
    assert bool(info.converged), hvp.status_message(info)
    np.testing.assert_allclose(x, b / jnp.array([1.0, 0.5, 0.1]), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The registry: names, budgets and the public protocol.

BUDGETED = sorted(name for name in hvp.SOLVERS if name != "dense")


def _operator(name, problem):
    """The problem's Hessian; for LiSSA, as a mean over (three equal) examples it can sample."""
    operator = problem.operator()
    if name != "lissa":
        return operator
    return hvp.hessian(lambda p, w: jnp.mean(w) * problem.loss(p), operator.params, jnp.ones(3),
                       batch_argnums=0)


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("budget", [3, 8])
def test_a_budget_spends_what_the_solver_says(name, budget):
    problem = PROBLEMS["spd"]
    options = {"alpha": 0.1} if "alpha" in hvp.SOLVERS[name].__dataclass_fields__ else {}
    options |= {"batch_size": 1} if name == "lissa" else {}
    operator = _operator(name, problem)
    solver = hvp.make_solver(name, budget, **options)
    _, info = hvp.solve(operator, problem.rhs(), solver, on_failure="ignore")
    assert int(info.hvp_count) == hvp.SOLVERS[name].hvps_at_budget(budget) <= budget + 1
    assert hvp.SOLVERS[name].budget_rule


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_an_approximation_is_never_called_converged_when_it_missed_tol(name):
    problem = PROBLEMS["ill"]
    operator = _operator(name, problem)
    options = {"batch_size": 1} if name == "lissa" else {}
    x, info = hvp.solve(operator, problem.rhs(), hvp.make_solver(name, 3, tol=1e-6, **options),
                        on_failure="ignore")
    missed = relative_error(x, problem.reference(problem.rhs())) > 1e-3
    assert missed and not bool(info.converged), hvp.status_message(info)


def test_make_solver_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"hvp\.make_solver: unknown solver 'cgg'; choose from"):
        hvp.make_solver("cgg")
    with pytest.raises(TypeError, match=r"hvp\.make_solver: CG has no option rank; its fields"):
        hvp.make_solver("cg", 5, rank=3)
    with pytest.raises(ValueError, match=r"hvp\.make_solver: budget must be an integer >= 1"):
        hvp.make_solver("cg", 0)
    assert hvp.make_solver("cg", np.int64(6)) == hvp.CG(maxiter=5, tol=0.0)
    assert hvp.make_solver("minres", maxiter=7) == hvp.MINRES(maxiter=7)


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match=r"hvp\.register: a solver named 'cg' exists"):
        hvp.register("cg")(type("Other", (hvp.AbstractSolver,), {}))


def test_every_registered_solver_is_exported_by_its_class_name():
    for name, cls in hvp.SOLVERS.items():
        assert getattr(hvp, cls.__name__) is cls and cls.__name__ in hvp.__all__
        assert cls.name == name


def test_bicgstab_solves_where_the_symmetric_solvers_cannot():
    problem = PROBLEMS["nonsymmetric"]
    b = problem.rhs()
    x, info = hvp.solve(problem.operator(), b, hvp.BiCGStab(maxiter=50, tol=1e-12))
    assert bool(info.converged) and relative_error(x, problem.reference(b)) < 1e-10
    wrong, _ = hvp.solve(problem.operator(), b, hvp.CG(maxiter=50, tol=1e-12),
                         on_failure="ignore")
    assert relative_error(wrong, problem.reference(b)) > 1e-3
