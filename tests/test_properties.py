"""Property tests over random pytrees: the three product modes, operators and CG agree with
``jax.hessian`` on the flattened parameters, keep the vector's structure, and are linear.

Every new pytree shape recompiles, so examples are few (``max_examples`` 10) and tiny: 1-3
leaves of shapes up to (3, 4). Float64 throughout (``conftest`` enables x64), tolerance 1e-10,
except the structure test, which mixes float32 and float64 leaves.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import random_spd
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import hvp

MODES = ("fwd_rev", "rev_rev", "rev_fwd")
FEW = settings(max_examples=10, deadline=None)

SHAPES = st.one_of(st.just(()), st.tuples(st.integers(1, 4)),
                   st.tuples(st.integers(1, 3), st.integers(1, 4)))
CONTAINERS = st.sampled_from(["dict", "tuple", "nested"])
FLOAT64 = st.just(jnp.float64)


def build(container, leaves):
    if container == "dict":
        return {name: leaf for name, leaf in zip("abc", leaves, strict=False)}
    if container == "tuple":
        return tuple(leaves)
    return {"first": leaves[0], "rest": (list(leaves[1:]), None)}


@st.composite
def pytree_problems(draw, dtypes=FLOAT64):
    """``(params, u, v, matrix)``: two directions shaped like params and an SPD matrix."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    leaf_dtypes = [draw(dtypes) for _ in shapes]
    container = draw(CONTAINERS)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)

    def tree():
        return build(container, [jnp.asarray(rng.standard_normal(shape), dtype)
                                 for shape, dtype in zip(shapes, leaf_dtypes, strict=True)])

    params, u, v = tree(), tree(), tree()
    size = sum(int(np.prod(shape)) for shape in shapes)
    return params, u, v, random_spd(seed, size, condition=10.0)


def flat(tree):
    return ravel_pytree(tree)[0]


def quadratic(matrix):
    def loss(params):
        x = flat(params)
        return 0.5 * x @ matrix.astype(x.dtype) @ x

    return loss


def quadratic_plus_quartic(matrix):
    """``½ xᵀAx + ¼ Σ x⁴``: its Hessian ``A + 3 diag(x²)`` is SPD and depends on the point."""
    def loss(params):
        x = flat(params)
        return 0.5 * x @ matrix.astype(x.dtype) @ x + 0.25 * jnp.sum(x**4)

    return loss


def reference_hessian(loss, params):
    """``jax.hessian`` of the loss as a function of the flattened parameters."""
    x, unravel = ravel_pytree(params)
    return jax.hessian(lambda y: loss(unravel(y)))(x)


def assert_close(actual, expected, tol=1e-10):
    """Equal to ``tol`` relative to the size of ``expected`` (absolute near zero)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


def assert_same_layout(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        assert jnp.shape(a) == jnp.shape(e)
        assert jnp.result_type(a) == jnp.result_type(e), (jnp.result_type(a), jnp.result_type(e))


# Each property runs one jitted function per example: one compile per new shape, and the data
# (matrix, params, vectors) are arguments, not constants folded into the program.


@jax.jit
def all_modes_and_reference(matrix, params, u):
    loss = quadratic_plus_quartic(matrix)
    products = {mode: flat(hvp.hvp(loss, params, u, mode=mode)) for mode in MODES}
    return products, reference_hessian(loss, params) @ flat(u)


@FEW
@given(pytree_problems())
def test_modes_agree_with_each_other_and_with_jax_hessian(problem):
    params, u, _, matrix = problem
    products, expected = all_modes_and_reference(matrix, params, u)
    for mode in MODES:
        assert_close(products[mode], expected)
        assert_close(products[mode], products["fwd_rev"])


@functools.partial(jax.jit, static_argnames="mode")
def cg_solve(matrix, params, b, mode):
    operator = hvp.hessian(quadratic(matrix), params, mode=mode)
    x, info = hvp.solve(operator, b, hvp.CG(maxiter=200, tol=1e-12))
    return x, info, operator.mv(x)


@FEW
@given(pytree_problems(), st.sampled_from(MODES))
def test_cg_inverts_the_hessian_of_an_spd_quadratic(problem, mode):
    params, b, _, matrix = problem
    x, info, product = cg_solve(matrix, params, b, mode)
    assert bool(info.converged), hvp.status_message(info)
    residual = jnp.linalg.norm(flat(product) - flat(b))
    assert float(residual) <= 1e-8 * float(jnp.linalg.norm(flat(b)))
    assert_close(flat(x), jnp.linalg.solve(matrix, flat(b)), tol=1e-8)


@jax.jit
def every_output(matrix, params, u):
    loss = quadratic_plus_quartic(matrix)
    operator = hvp.hessian(loss, params, damping=0.1)
    return {
        **{mode: hvp.hvp(loss, params, u, mode=mode) for mode in MODES},
        "mv": operator.mv(u),
        "solve": hvp.solve(operator, u, hvp.CG(maxiter=5))[0],
        "ggn_vp": hvp.ggn_vp(flat, quadratic(matrix), params, u),
    }


@FEW
@given(pytree_problems(dtypes=st.sampled_from([jnp.float32, jnp.float64])))
def test_outputs_keep_the_vectors_structure_shapes_and_dtypes(problem):
    params, u, _, matrix = problem
    for name, output in every_output(matrix, params, u).items():
        try:
            assert_same_layout(output, u)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


@functools.partial(jax.jit, static_argnames="mode")
def dense_and_reference(matrix, params, damping, mode):
    loss = quadratic_plus_quartic(matrix)
    dense = hvp.hessian(loss, params, mode=mode, damping=damping).dense()
    return dense, reference_hessian(loss, params) + damping * jnp.eye(matrix.shape[0])


@FEW
@given(pytree_problems(), st.sampled_from(MODES), st.sampled_from([0.0, 0.5]))
def test_dense_hessian_is_symmetric_and_equals_jax_hessian(problem, mode, damping):
    params, _, _, matrix = problem
    dense, expected = dense_and_reference(matrix, params, damping, mode)
    assert dense.shape == expected.shape
    assert_close(dense, dense.T)
    assert_close(dense, expected)


@jax.jit
def both_sides_of_linearity(matrix, params, u, v, a):
    loss = quadratic_plus_quartic(matrix)
    combined = jax.tree_util.tree_map(lambda x, y: a * x + y, u, v)
    sides = {}
    for mode in MODES:
        product = functools.partial(hvp.hvp, loss, params, mode=mode)
        sides[mode] = (flat(product(combined)), a * flat(product(u)) + flat(product(v)))
    return sides


@FEW
@given(pytree_problems(), st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False))
def test_hvp_is_linear_in_the_vector(problem, a):
    params, u, v, matrix = problem
    for left, right in both_sides_of_linearity(matrix, params, u, v, a).values():
        assert_close(left, right)


@FEW
@given(pytree_problems())
def test_ggn_of_the_identity_model_is_the_hessian_of_the_loss(problem):
    # With model(θ) = flat(θ) the Jacobian is I, so Jᵀ ∇²ℓ J = ∇²ℓ = A.
    params, u, _, matrix = problem
    product = jax.jit(lambda m, p, w: hvp.ggn_vp(flat, quadratic(m), p, w))(matrix, params, u)
    assert_close(flat(product), matrix @ flat(u))


def test_solve_keeps_a_float32_vectors_dtype_on_a_float64_operator():
    params = {"a": jnp.ones((2,)), "b": jnp.ones((3,))}
    matrix = random_spd(0, 5)
    operator = hvp.hessian(quadratic(matrix), params)
    mixed = {"a": jnp.ones((2,), jnp.float32), "b": jnp.ones((3,))}
    assert_same_layout(hvp.solve(operator, mixed, hvp.CG())[0], mixed)  # holds today
    single = {"a": jnp.ones((2,), jnp.float32), "b": jnp.ones((3,), jnp.float32)}
    assert_same_layout(hvp.solve(operator, single, hvp.CG())[0], single)
