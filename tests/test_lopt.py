"""Learned optimizers: features and updates against NumPy, closed forms, meta-gradients against
finite differences, meta-parameter files, the shipped meta-parameters, tasks, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from bilevel import lopt

MOM, RMS, FAC = np.array([0.9, 0.99, 0.999]), 0.999, np.array([0.9, 0.99, 0.999])
EPS = 1e-5  # central differences of the meta-loss, float64
TAUS = np.array([1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5])
CENTRES = np.array([0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1])


# --------------------------------------------------------------------------------------------
# An independent NumPy reference of the update (2-D tensors with more columns than rows, and
# 1-D tensors).


def _np_leaf_state(p):
    if p.ndim == 2:
        return {"m": np.zeros(p.shape + (3,)), "v": np.zeros(p.shape + (1,)),
                "row": np.zeros((p.shape[0], 3)), "col": np.zeros((p.shape[1], 3))}
    return {"m": np.zeros(p.shape + (3,)), "v": np.zeros(p.shape + (1,)),
            "full": np.zeros(p.shape + (3,))}


def _np_features(p, g, s):
    """Updates ``s`` in place; returns the 28 normalised features, shape (*p.shape, 28)."""
    s["m"] = MOM * s["m"] + (1 - MOM) * g[..., None]
    s["v"] = RMS * s["v"] + (1 - RMS) * g[..., None] ** 2
    m, v = s["m"], s["v"]
    g2 = g[..., None] ** 2 + 1e-30
    if p.ndim == 2:  # rows < columns: the largest axis (columns, axis 1) is reduced for "row"
        assert p.shape[0] < p.shape[1]
        s["row"] = FAC * s["row"] + (1 - FAC) * g2.mean(axis=1)
        s["col"] = FAC * s["col"] + (1 - FAC) * g2.mean(axis=0)
        row_factor = 1 / np.sqrt(np.maximum(s["row"] / (s["row"].mean(axis=0) + 1e-9), 1e-9))
        col_factor = 1 / np.sqrt(np.maximum(s["col"], 1e-9))
        both = row_factor[:, None, :] * col_factor[None, :, :]
        fac_g = g[..., None] * both
        row = np.broadcast_to(s["row"][:, None, :], m.shape)
        col = np.broadcast_to(s["col"][None, :, :], m.shape)
        extra = [row, col, 1 / np.sqrt(row + 1e-8), 1 / np.sqrt(col + 1e-8), m * both]
    else:
        s["full"] = FAC * s["full"] + (1 - FAC) * g2
        full = s["full"]
        fac_g = g[..., None] / np.sqrt(full + 1e-30)
        extra = [full, full, 1 / np.sqrt(full + 1e-8), 1 / np.sqrt(full + 1e-8),
                 m / np.sqrt(full + 1e-6)]
    rs = 1 / np.sqrt(v + 1e-6)
    x = np.concatenate([g[..., None], p[..., None], m, v, m * rs, rs, fac_g, *extra], axis=-1)
    axes = tuple(range(p.ndim))
    return x / np.sqrt(1e-5 + np.mean(x**2, axis=axes, keepdims=True))


def _np_network(net, x):
    layers = len(net) // 2
    for i in range(layers):
        x = x @ np.asarray(net[f"w{i}"], np.float64) + np.asarray(net[f"b{i}"], np.float64)
        if i < layers - 1:
            x = np.maximum(x, 0)
    return x


def _np_run(meta, params, grads_seq, kind, num_steps=None, alpha=0.0, wd=0.0):
    """Updates of mlp_lopt / star_lopt (meta decays at zero) over a sequence of gradients."""
    states = {k: _np_leaf_state(p) for k, p in params.items()}
    params = {k: p.copy() for k, p in params.items()}
    all_updates = []
    for t, grads in enumerate(grads_seq):
        clock = [np.tanh(t / TAUS - 1)]
        if num_steps is not None:
            clock.append(np.tanh(10 * (t / num_steps - CENTRES)))
        clock = np.concatenate(clock)
        updates = {}
        for k, p in params.items():
            x = _np_features(p, grads[k], states[k])
            x = np.concatenate([x, np.broadcast_to(clock, p.shape + clock.shape)], axis=-1)
            out = _np_network(meta["network"], x)
            if kind == "mlp":
                u = -1e-3 * out[..., 0] * np.exp(1e-3 * out[..., 1])
            else:
                m, v = states[k]["m"], states[k]["v"]
                nominal = np.mean(m / np.sqrt(v + 1e-6), axis=-1)
                u = (-wd * np.exp(1e-3 * out[..., 3]) * p
                     - 1e-3 * out[..., 0] * np.exp(1e-3 * out[..., 1]) / np.sqrt(v[..., 0] + 1e-6)
                     - alpha * np.exp(1e-3 * out[..., 2]) * nominal)
            updates[k] = u
        params = {k: params[k] + updates[k] for k in params}
        all_updates.append(updates)
    return all_updates


def _random_problem(seed, steps=3):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((3, 5)), "b": rng.standard_normal(5)}
    grads = [{k: rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-3, 0)
              for k, p in params.items()} for _ in range(steps)]
    return params, grads


def _run(opt, params, grads_seq, jit=True):
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    out = []
    for grads in grads_seq:
        grads = jax.tree_util.tree_map(jnp.asarray, grads)
        updates, state = update(grads, state, params, loss=jnp.asarray(1.0))
        params = optax.apply_updates(params, updates)
        out.append(jax.tree_util.tree_map(np.asarray, updates))
    return out


def _meta64(init, seed, **kwargs):
    meta = init(jax.random.key(seed), dtype=jnp.float64, **kwargs)
    # Non-zero output layer and biases, so that every head and every layer matter.
    rng = np.random.default_rng(seed)
    net = {k: jnp.asarray(np.asarray(v) + 0.3 * rng.standard_normal(np.shape(v)))
           for k, v in meta["network"].items()}
    return {**meta, "network": net}


@pytest.mark.parametrize("horizon", [False, True])
def test_mlp_lopt_matches_numpy_reference(horizon):
    meta = _meta64(lopt.init_mlp_lopt, 1, horizon_features=horizon)
    params, grads = _random_problem(2)
    num_steps = 7 if horizon else None
    got = _run(lopt.mlp_lopt(meta, num_steps=num_steps), params, grads)
    want = _np_run(meta, params, grads, "mlp", num_steps)
    for g, w in zip(got, want, strict=True):
        for k in params:  # float64 throughout: agreement to round-off
            np.testing.assert_allclose(g[k], w[k], rtol=1e-10, atol=1e-15)


def test_star_lopt_matches_numpy_reference():
    meta = _meta64(lopt.init_star_lopt, 3)
    params, grads = _random_problem(4)
    opt = lopt.star_lopt(meta, nominal_step=1e-2, weight_decay=1e-3)
    got = _run(opt, params, grads)
    want = _np_run(meta, params, grads, "star", alpha=1e-2, wd=1e-3)
    for g, w in zip(got, want, strict=True):
        for k in params:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-10, atol=1e-15)


def test_untrained_star_is_aggmo_adam_closed_form():
    """With the output layer at zero (the initialisation), STAR is weight decay plus the
    AggMo-Adam step ``α · mean_i m_i/√(v + 1e-6)`` with the fixed decays: a hand computation."""
    meta = lopt.init_star_lopt(jax.random.key(0), dtype=jnp.float64)
    rng = np.random.default_rng(5)
    p = rng.standard_normal(4)
    gs = [rng.standard_normal(4) for _ in range(3)]
    got = _run(lopt.star_lopt(meta, nominal_step=0.05, weight_decay=0.01), {"p": p},
               [{"p": g} for g in gs], jit=False)  # eagerly, once
    m1 = m2 = m3 = v = 0.0
    x = p.copy()
    for g, u in zip(gs, got, strict=True):
        m1, m2, m3 = 0.9 * m1 + 0.1 * g, 0.99 * m2 + 0.01 * g, 0.999 * m3 + 0.001 * g
        v = 0.999 * v + 0.001 * g * g
        step = -0.01 * x - 0.05 * (m1 + m2 + m3) / 3 / np.sqrt(v + 1e-6)
        np.testing.assert_allclose(u["p"], step, rtol=1e-12)
        x = x + step


def test_mlp_lopt_with_constant_outputs_is_a_fixed_step():
    """Zero weights and output biases (c, a): every parameter moves by −0.001·c·exp(0.001 a)."""
    meta = lopt.init_mlp_lopt(jax.random.key(0), dtype=jnp.float64)
    net = {k: jnp.zeros_like(v) for k, v in meta["network"].items()}
    net["b2"] = jnp.asarray([3.0, 500.0])
    params, grads = _random_problem(6, steps=2)
    got = _run(lopt.mlp_lopt({**meta, "network": net}), params, grads)
    for step in got:
        for u in step.values():
            np.testing.assert_allclose(u, -0.001 * 3.0 * np.exp(0.5), rtol=1e-12)


def test_scalar_and_float32_parameters():
    meta = lopt.init_mlp_lopt(jax.random.key(0))
    params = {"s": jnp.float32(1.0), "w": jnp.ones((2, 3, 4), jnp.float32)}
    opt = lopt.mlp_lopt(meta)
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda x: 0.1 * jnp.ones_like(x), params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    assert updates["s"].shape == () and updates["w"].shape == (2, 3, 4)
    assert all(u.dtype == jnp.float32 for u in jax.tree_util.tree_leaves(updates))
    assert all(np.all(np.isfinite(u)) for u in jax.tree_util.tree_leaves(updates))
    assert int(state.iteration) == 1


def test_meta_parameter_counts():
    assert lopt.num_meta_params(lopt.init_mlp_lopt(jax.random.key(0))) == 197
    assert lopt.num_meta_params(lopt.init_star_lopt(jax.random.key(0))) == 207
    meta = lopt.init_mlp_lopt(jax.random.key(0), horizon_features=True)
    assert lopt.num_meta_params(meta) == 197 + 9 * 4


# --------------------------------------------------------------------------------------------
# Meta-gradients.


@pytest.mark.parametrize("kind", ["mlp", pytest.param("star", marks=pytest.mark.slow)])  # 20 s each
def test_mixflow_meta_gradient_matches_finite_differences(kind):
    """d(loss after 4 learned-optimizer steps)/d(meta) on a quadratic, float64, against central
    differences along random directions (tolerance 1e-6 relative)."""
    task = lopt.tasks.quadratic_task(dim=6, condition=10.0, noise=0.1)
    key = jax.random.key(7)
    params0 = task.init(key)
    batches = task.batches(key, 4)
    if kind == "mlp":
        meta = _meta64(lopt.init_mlp_lopt, 8)
        factory = lopt.mlp_lopt
    else:
        meta = _meta64(lopt.init_star_lopt, 8)
        factory = lambda h: lopt.star_lopt(h, nominal_step=0.1)  # noqa: E731

    def inner(p, h, batch):
        return task.loss(p, batch)

    def outer(p, h):
        return task.eval_loss(p)

    grad, info = jax.jit(lambda h: bilevel.unrolled_hypergrad(
        inner, outer, params0, h, optimizer=factory, steps=4, per_step_args=(batches,),
        mode="mixflow"))(meta)
    assert bool(info.finite)

    @jax.jit
    def meta_loss(h):  # the unroll written out independently of unrolled_hypergrad
        opt, params = factory(h), params0
        state = opt.init(params)
        for t in range(4):
            batch = jax.tree_util.tree_map(lambda x: x[t], batches)  # noqa: B023
            loss, grads = jax.value_and_grad(task.loss)(params, batch)
            updates, state = opt.update(grads, state, params, loss=loss)
            params = optax.apply_updates(params, updates)
        return task.eval_loss(params)

    np.testing.assert_allclose(meta_loss(meta), info.outer_loss, rtol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(2):
        direction = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape)),
                                           meta)
        plus, minus = (jax.tree_util.tree_map(lambda h, d, s=s: h + s * EPS * d, meta,
                                              direction) for s in (1.0, -1.0))
        fd = float(meta_loss(plus) - meta_loss(minus)) / (2 * EPS)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(
            jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction), strict=True))
        assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd)), (analytic, fd)


# --------------------------------------------------------------------------------------------
# Files.


def test_save_load_round_trip(tmp_path):
    meta = lopt.init_star_lopt(jax.random.key(1), horizon_features=True)
    path = lopt.save_meta_params(tmp_path / "sub" / "m.npz", meta, {"steps": 3, "name": "x"})
    loaded, metadata = lopt.load_meta_params(path)
    assert metadata == {"steps": 3, "name": "x"}
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(meta)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(meta),
                    strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_shipped_meta_parameters_load_and_give_finite_updates():
    assert {"mlp_lopt", "star_lopt"} <= set(lopt.available_pretrained())
    task = lopt.tasks.quadratic_task(dim=5)
    for name in ("mlp_lopt", "star_lopt"):
        meta, metadata = lopt.pretrained(name)
        num_steps = 10 if metadata["horizon_features"] else None
        factory = lopt.star_lopt if "star" in metadata["optimizer"] else lopt.mlp_lopt
        opt = factory(meta, num_steps=num_steps, **metadata["optimizer_kwargs"])
        params = task.init(jax.random.key(0))
        state = opt.init(params)
        for batch_index in range(3):
            batch = jax.tree_util.tree_map(lambda x: x[batch_index],  # noqa: B023
                                           task.batches(jax.random.key(1), 3))
            grads = jax.grad(task.loss)(params, batch)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        assert np.all(np.isfinite(params["x"])), name
        assert metadata["outer_steps"] > 0 and metadata["meta_training_seconds"] > 0


# --------------------------------------------------------------------------------------------
# Tasks.


@pytest.mark.slow  # 24 s: one compile per named task
def test_named_tasks_build_and_have_finite_losses():
    offline = [n for n in lopt.TASKS if n not in lopt.tasks.NEEDS_DATA_DIR]
    assert sum(lopt.TASKS[n]().held_out for n in offline) >= 3
    for name in offline:
        task = lopt.TASKS[name]()
        assert task.name == name
        params = task.init(jax.random.key(0))
        batches = task.batches(jax.random.key(1), 2)
        assert all(np.shape(x)[0] == 2 for x in jax.tree_util.tree_leaves(batches))
        first = jax.tree_util.tree_map(lambda x: x[0], batches)
        assert np.isfinite(float(task.loss(params, first)))
        assert np.isfinite(float(task.eval_loss(params)))


def test_sample_task_is_deterministic_and_covers_kinds():
    a = lopt.sample_task(jax.random.key(3))
    b = lopt.sample_task(jax.random.key(3))
    assert a.name == b.name and not a.held_out
    kinds = {lopt.tasks.sample_member(jax.random.key(i)).kind for i in range(40)}
    assert kinds == {"mlp", "logistic", "quadratic"}


def test_data_dir_task_without_files_fails_clearly(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="fashion|IDX|idx"):
        lopt.TASKS["mlp_fashion_mnist"](data_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_errors():
    mlp = lopt.init_mlp_lopt(jax.random.key(0))
    star = lopt.init_star_lopt(jax.random.key(0))
    with pytest.raises(ValueError, match="star_lopt: the network has 2 outputs, expected 4"):
        lopt.star_lopt(mlp)
    with pytest.raises(ValueError, match="mlp_lopt: meta must be a dict with keys"):
        lopt.mlp_lopt({"network": mlp["network"]})
    with pytest.raises(ValueError, match="num_steps must be None"):
        lopt.mlp_lopt(mlp, num_steps=100)
    with pytest.raises(ValueError, match="pass num_steps"):
        lopt.star_lopt(lopt.init_star_lopt(jax.random.key(0), horizon_features=True))
    with pytest.raises(ValueError, match="num_steps must be > 0"):
        lopt.star_lopt(lopt.init_star_lopt(jax.random.key(0), horizon_features=True),
                       num_steps=0)
    with pytest.raises(ValueError, match="nominal_step must be a finite number >= 0"):
        lopt.star_lopt(star, nominal_step=-1.0)
    with pytest.raises(ValueError, match="init_mlp_lopt: hidden must be"):
        lopt.init_mlp_lopt(jax.random.key(0), hidden=(4, 0))
    opt = lopt.mlp_lopt(mlp)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="update needs params"):
        opt.update(params, opt.init(params))
    with pytest.raises(ValueError, match="no shipped meta-parameters named 'nope'"):
        lopt.pretrained("nope")
    with pytest.raises(FileNotFoundError, match="load_meta_params: no file"):
        lopt.load_meta_params("/nonexistent/x.npz")
    with pytest.raises(ValueError, match="batches: steps must be a positive int"):
        lopt.tasks.quadratic_task().batches(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="activation must be one of"):
        lopt.tasks.image_mlp_task(activation="swish")
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        lopt.tasks.sample_member(jax.random.key(0), ("cnn",))


# --------------------------------------------------------------------------------------------
# The feature-major update against the trailing-axis formulation of the same equations.


def _trailing_axis_update(meta, kind, grads, state, params, alpha=0.0, wd=0.0):
    """One update built from the public feature functions: an (N, 39) feature matrix, normalised
    per tensor, through ``apply_network`` (the layout the optimizers avoid for speed)."""
    from bilevel.lopt import optimizers as O

    bm = O.learned_decays(O.MOMENTUM_DECAYS, meta["momentum_decays"])
    bv = O.learned_decays(O.RMS_DECAYS, meta["rms_decays"])
    bf = O.learned_decays(O.ADAFACTOR_DECAYS, meta["adafactor_decays"])
    clock = O.time_features(state.iteration, None, meta["momentum_decays"].dtype)
    out = {}
    for name, p in params.items():
        g, m, v, fac = grads[name], state.momentum[name], state.second_moment[name], \
            state.factored[name]
        m = bm * m + (1 - bm) * g[..., None]
        v = bv * v + (1 - bv) * jnp.square(g)[..., None]
        fac, fac_g = O._update_factored(fac, g, bf)
        x = O.normalise_per_tensor(O.accumulator_features(p, g, m, v, fac, fac_g))
        x = jnp.concatenate([x, jnp.broadcast_to(clock, (*p.shape, clock.shape[0]))], -1)
        y = O.apply_network(meta["network"], x)
        if kind == "mlp":
            out[name] = -O.STEP_MULT * y[..., 0] * jnp.exp(O.EXP_MULT * y[..., 1])
        else:
            rv = jax.lax.rsqrt(v[..., 0] + 1e-6)
            nominal = jnp.mean(m * jax.lax.rsqrt(v + 1e-6), axis=-1)
            out[name] = (-wd * jnp.exp(O.EXP_MULT * y[..., 3]) * p
                         - O.STEP_MULT * y[..., 0] * jnp.exp(O.EXP_MULT * y[..., 1]) * rv
                         - alpha * jnp.exp(O.EXP_MULT * y[..., 2]) * nominal)
    return out


@pytest.mark.parametrize("kind", ["mlp", "star"])
def test_feature_major_update_matches_trailing_axis_formulation(kind):
    # Shapes the NumPy reference does not cover: tall matrices (rows > columns), three axes with
    # the largest first, and a vector; after two steps so that every accumulator is non-zero.
    rng = np.random.default_rng(7)
    params = {"tall": rng.standard_normal((6, 4)), "cube": rng.standard_normal((5, 2, 3)),
              "vec": rng.standard_normal(4)}
    params = {k: jnp.asarray(v) for k, v in params.items()}
    init, make = ((lopt.init_mlp_lopt, lopt.mlp_lopt) if kind == "mlp"
                  else (lopt.init_star_lopt, lopt.star_lopt))
    meta = _meta64(init, 3)
    meta = {**meta, "momentum_decays": jnp.asarray([0.02, -0.05, 0.01]),
            "adafactor_decays": jnp.asarray([-0.03, 0.04, 0.0])}
    kwargs = {} if kind == "mlp" else {"nominal_step": 0.01, "weight_decay": 0.1}
    opt = make(meta, **kwargs)
    state = opt.init(params)
    for step in range(3):
        grads = {k: jnp.asarray(rng.standard_normal(p.shape) * 10.0 ** -step)
                 for k, p in params.items()}
        expected = _trailing_axis_update(meta, kind, grads, state, params,
                                         kwargs.get("nominal_step", 0.0),
                                         kwargs.get("weight_decay", 0.0))
        updates, state = jax.jit(opt.update)(grads, state, params)
        for name in params:
            np.testing.assert_allclose(updates[name], expected[name], rtol=1e-10, atol=1e-300)
        params = optax.apply_updates(params, updates)


def test_update_vmaps_over_parameter_sets():
    meta = _meta64(lopt.init_star_lopt, 1)
    opt = lopt.star_lopt(meta, nominal_step=0.01)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4, 5))), "b": jnp.asarray(
        rng.standard_normal((3, 5)))}
    grads = jax.tree_util.tree_map(lambda x: 0.1 * x + 0.01, params)
    states = jax.vmap(opt.init)(params)
    batched, _ = jax.jit(jax.vmap(opt.update))(grads, states, params)
    for i in range(3):
        one = {k: v[i] for k, v in params.items()}
        single, _ = opt.update({k: v[i] for k, v in grads.items()}, opt.init(one), one)
        for name in params:
            np.testing.assert_allclose(batched[name][i], single[name], rtol=1e-12)


def test_update_builds_no_per_parameter_feature_matrix():
    # The compiled update of one 300 x 400 float32 tensor must not hold the (N, 39) feature
    # matrix or copies of its features: its temp memory stays below 8 arrays of the tensor's
    # size (about 4 now; the trailing-axis formulation needed over 50).
    meta = lopt.init_mlp_lopt(jax.random.key(0))
    opt = lopt.mlp_lopt(meta)
    p = {"w": jnp.ones((300, 400), jnp.float32)}
    compiled = jax.jit(opt.update).lower(p, opt.init(p), p).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 8 * 300 * 400 * 4, temp / (300 * 400 * 4)
