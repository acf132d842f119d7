"""semisup: augmentation, FixMatch's loss, the confidence network's meta-gradient, the protocol,
checkpoint/resume and the ``bilevel ssl`` command line."""

import dataclasses
import json
import math
import pickle
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_ssl_config
from jax.flatten_util import ravel_pytree

import bilevel
import hvp
import semisup
from bilevel import datasets
from bilevel.cli import main as bilevel_main
from semisup import augment, fixmatch, models

# --------------------------------------------------------------------------------------------
# Augmentation (float32 images, exact comparisons where the operation is a permutation).


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(3), (6, 8, 8, 1), jnp.float32)


def test_flip_and_translate_on_a_constructed_image():
    image = jnp.zeros((8, 8, 1)).at[2, 1, 0].set(1.0)
    assert jnp.array_equal(augment.flip(image, True), image[:, ::-1])
    assert jnp.array_equal(augment.flip(image, False), image)
    shifted = augment.translate(image, 1, -1, pad=1)
    assert float(shifted[3, 0, 0]) == 1.0 and float(shifted.sum()) == 1.0
    # The border is reflected: shifting right by one copies column 1 into column 0.
    right = augment.translate(image, 0, 1, pad=1)
    assert float(right[2, 2, 0]) == 1.0 and float(right[2, 0, 0]) == 1.0


def test_weak_augment_is_a_flip_and_translation_of_its_input(images):
    out = augment.weak_augment(jax.random.key(0), images, flip_images=True)
    assert out.shape == images.shape and out.dtype == images.dtype
    for image, result in zip(images, out, strict=True):
        candidates = [augment.translate(augment.flip(image, f), dy, dx, 1)
                      for f in (False, True) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(jnp.array_equal(result, c) for c in candidates)


def test_weak_augment_without_flip_never_mirrors():
    image = jnp.zeros((1, 8, 8, 1)).at[0, 4, 0, 0].set(1.0)
    batch = jnp.repeat(image, 32, axis=0)
    out = augment.weak_augment(jax.random.key(1), batch, flip_images=False)
    columns = jnp.argmax(out[:, 4, :, 0].max(axis=0) > 0)
    assert int(columns) <= 1  # the bright pixel stays at the left border (0 or 1)


def test_augmentations_are_deterministic_per_key_and_stay_in_range(images):
    strong = jax.jit(lambda k, x: augment.strong_augment(k, x, flip_images=False))
    a, b = strong(jax.random.key(5), images), strong(jax.random.key(5), images)
    c = strong(jax.random.key(6), images)
    assert jnp.array_equal(a, b) and not jnp.array_equal(a, c)
    assert a.shape == images.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(augment.OPERATIONS))
def test_each_operation_keeps_shape_and_range(images, name):
    out = augment.apply_operation(name, images[0], 0.7, -1.0)
    assert out.shape == images[0].shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_operations_against_closed_forms(images):
    image = images[0]
    assert jnp.allclose(augment.apply_operation("solarize", image, 0.0), image)
    assert jnp.allclose(augment.apply_operation("solarize", image, 1.0), 1.0 - image)
    equalized = augment.apply_operation("equalize", image, 0.5)
    ranks = np.argsort(np.argsort(np.asarray(image).ravel())) / 63.0
    assert np.allclose(np.asarray(equalized).ravel(), ranks, atol=1e-6)
    assert jnp.allclose(augment.apply_operation("rotate", image, 0.0), image, atol=1e-6)


def test_cutout_fills_an_exact_square():
    out = augment.cutout(jnp.zeros((8, 8, 1)), 4, 4, 4)
    assert float(out.sum()) == pytest.approx(16 * augment.FILL)
    assert jnp.all(out[2:6, 2:6] == augment.FILL)


def test_augment_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"semisup.weak_augment: images must have shape"):
        augment.weak_augment(jax.random.key(0), jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match="num_ops"):
        augment.strong_augment(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), num_ops=-1)


# --------------------------------------------------------------------------------------------
# Losses and weights.


def test_fixmatch_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    lab, strong = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    weak = rng.normal(size=(5, 4)) * 4
    labels = np.array([0, 3, 1])
    weights = np.array([0.5, 1.0, 2.0, 1.5, 1.0])
    pseudo, mask = fixmatch.pseudo_labels(jnp.asarray(weak), 0.8)
    loss, (lx, lu) = fixmatch.fixmatch_loss(jnp.asarray(lab), jnp.asarray(labels),
                                            jnp.asarray(strong), pseudo, mask,
                                            jnp.asarray(weights), 2.0)

    def ce(logits, y):
        return -(logits[y] - np.log(np.exp(logits).sum()))
    p_weak = np.exp(weak) / np.exp(weak).sum(1, keepdims=True)
    hand_mask = (p_weak.max(1) >= 0.8).astype(float)
    hand_lx = np.mean([ce(lab[i], labels[i]) for i in range(3)])
    hand_lu = np.mean([weights[i] * hand_mask[i] * ce(strong[i], p_weak[i].argmax())
                       for i in range(5)])
    assert np.array_equal(np.asarray(mask), hand_mask)
    assert float(lx) == pytest.approx(hand_lx, abs=1e-12)
    assert float(lu) == pytest.approx(hand_lu, abs=1e-12)
    assert float(loss) == pytest.approx(hand_lx + 2.0 * hand_lu, abs=1e-12)


def test_normalise_gives_mean_one_over_the_mask():
    weights = jnp.array([0.2, 3.0, 1.0, 0.5])
    mask = jnp.array([1.0, 0.0, 1.0, 1.0])
    out = fixmatch.normalise(weights, mask)
    assert float(jnp.sum(out * mask) / jnp.sum(mask)) == pytest.approx(1.0, abs=1e-12)
    assert jnp.all(fixmatch.normalise(jnp.zeros(4), mask) == 0)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_confidence_network_starts_at_weight_one(images, num_classes):
    conf = models.init_confidence(jax.random.key(0), (8, 8, 1), (2,), num_classes)
    probs = None if num_classes is None else jax.nn.softmax(
        jax.random.normal(jax.random.key(1), (len(images), num_classes)))
    logits = jax.jit(models.confidence, static_argnums=2)(conf, images, (2,), probs)
    assert jnp.array_equal(logits, jnp.zeros(len(images)))
    mask = jnp.asarray(np.arange(len(images)) % 2, jnp.float32)
    assert jnp.array_equal(fixmatch.confidence_weights(logits, mask),
                           jnp.ones(len(images)))


def test_confidence_weights_are_centred_over_the_mask_and_shift_invariant():
    logits = jnp.array([0.5, -1.0, 3.0, 2.0], jnp.float64)
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    centre = (0.5 - 1.0 + 2.0) / 3  # the masked-out logit does not count
    expected = 2.0 / (1.0 + np.exp(-(np.asarray(logits) - centre)))
    np.testing.assert_allclose(fixmatch.confidence_weights(logits, mask), expected, rtol=1e-14)
    np.testing.assert_allclose(fixmatch.confidence_weights(logits + 7.0, mask), expected,
                               rtol=1e-14)
    # A common shift has an exactly zero gradient: the direction the normalisation leaves flat.
    shift = jax.grad(lambda c: jnp.sum(jnp.sin(fixmatch.normalise(
        fixmatch.confidence_weights(logits + c, mask), mask))))(0.0)
    assert float(shift) == pytest.approx(0.0, abs=1e-14)
    none = fixmatch.confidence_weights(logits, jnp.zeros(4))  # no image passes: centre 0
    np.testing.assert_allclose(none, 2.0 / (1.0 + np.exp(-np.asarray(logits))), rtol=1e-14)


def test_auroc_and_paired_difference_against_closed_forms():
    assert semisup.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert semisup.auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    mean, low, high = semisup.paired_difference(np.array([1.0, 2.0, 3.0]), np.zeros(3))
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_{0.975, 2} · s / √n
    assert mean == 2.0 and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)


# --------------------------------------------------------------------------------------------
# The meta-gradient against finite differences of the exactly solved inner problem (float64).


@pytest.mark.parametrize("conf_inputs", [  # "image" alone: 28 s of compiles, the same path
    pytest.param(c, marks=pytest.mark.slow) if c == "image" else c for c in fixmatch.CONF_INPUTS])
def test_meta_gradient_with_dense_solve_matches_finite_differences(conf_inputs):
    config = fixmatch.Config(method="confnet", widths=(), hidden=3, weight_decay=0.05,
                             lambda_u=1.0, conf_widths=(2,), curvature="last",
                             conf_inputs=conf_inputs)
    rng = np.random.default_rng(1)
    num_classes, shape = 3, (4, 4, 1)
    params = models.init_classifier(jax.random.key(0), shape, num_classes, (), 3)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    conf = models.init_confidence(jax.random.key(1), shape, (2,),
                                  num_classes if conf_inputs == "image+softmax" else None)
    conf = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5), conf)
    x_l, x_s, x_v = (jnp.asarray(rng.uniform(size=(n, *shape))) for n in (4, 6, 5))
    weak = jnp.asarray(rng.uniform(size=(6, *shape)))
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(6, num_classes)) * 2))
    y_l, y_v = jnp.asarray([0, 1, 2, 0]), jnp.asarray([2, 1, 0, 1, 2])
    pseudo = jnp.asarray([0, 1, 2, 2, 1, 0])
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    batch = (x_l, y_l, weak, probs, x_s, pseudo, mask, x_v, y_v)
    inner, outer, split = fixmatch.meta_losses(config)
    theta0, inner_args, outer_args = split(params, batch)
    flat0, unravel = ravel_pytree(theta0)

    @jax.jit
    def solve(phi):  # Newton's method on the strictly convex head problem, to round-off
        def loss(flat):
            return inner(unravel(flat), phi, *inner_args)

        def newton(flat, _):
            return flat - jnp.linalg.solve(jax.hessian(loss)(flat), jax.grad(loss)(flat)), None
        return unravel(jax.lax.scan(newton, flat0, None, length=20)[0])

    theta = solve(conf)
    grad, info = bilevel.hypergrad(inner, outer, theta, conf, inner_args, outer_args,
                                   solver=hvp.Dense())
    assert bool(info.converged)
    direction = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), conf)
    eps = 1e-5

    def outer_at(t):
        phi = jax.tree_util.tree_map(lambda c, d: c + t * d, conf, direction)
        return outer(solve(phi), phi, *outer_args)

    finite_difference = (outer_at(eps) - outer_at(-eps)) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                   jax.tree_util.tree_leaves(direction),
                                                   strict=True))
    assert abs(float(finite_difference)) > 1e-6  # the test can fail: the signal is not zero
    assert float(analytic) == pytest.approx(float(finite_difference), rel=1e-6, abs=1e-10)
    # The library entry point gives the same numbers with CG to convergence, and so does every
    # other Krylov solver of the registry that a meta-step can use (BiCGStab, ...).
    krylov = ["cg"] if conf_inputs != "image" else [
        name for name in fixmatch.SOLVERS
        if not (hvp.SOLVERS[name].approximation or hvp.SOLVERS[name].stationary_iteration)]
    for name in krylov:
        config_k = fixmatch.Config(**{**config.__dict__, "solver": name, "maxiter": 50})
        grad_k, _ = fixmatch.meta_gradient(config_k, {**params, "head": theta}, conf, batch)
        # (They stop at a relative residual of 1e-6, hence the looser tolerance.)
        assert np.allclose(ravel_pytree(grad_k)[0], ravel_pytree(grad)[0], rtol=1e-4,
                           atol=1e-9), name


@pytest.mark.slow  # 27 s; the head-only dense check below stays in the default run
def test_meta_gradient_over_the_whole_classifier_matches_a_dense_formula():
    """``curvature="all"``: −(∂²L/∂φ∂θ)ᵀ (H + δI)⁻¹ ∇_θ L_val, assembled from ``jax.hessian``
    and ``jax.jacobian`` of the flattened classifier (body and head), float64."""
    damping = 1.0  # H is indefinite here (λ_min ≈ −0.56): the damped operator is SPD
    config = fixmatch.Config(method="confnet", widths=(), hidden=3, weight_decay=0.05,
                             lambda_u=1.0, conf_widths=(2,), curvature="all", solver="cg",
                             maxiter=200, damping=damping, conf_inputs="image+softmax")
    rng = np.random.default_rng(2)
    num_classes, shape = 3, (4, 4, 1)
    params = models.init_classifier(jax.random.key(0), shape, num_classes, (), 3)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    conf = models.init_confidence(jax.random.key(1), shape, (2,), num_classes)
    conf = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5), conf)
    x_l, x_s, x_v, weak = (jnp.asarray(rng.uniform(size=(n, *shape))) for n in (4, 6, 5, 6))
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(6, num_classes)) * 2))
    batch = (x_l, jnp.asarray([0, 1, 2, 0]), weak, probs, x_s, jnp.asarray([0, 1, 2, 2, 1, 0]),
             jnp.asarray([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), x_v, jnp.asarray([2, 1, 0, 1, 2]))
    grad, info = fixmatch.meta_gradient(config, params, conf, batch)
    assert bool(info.converged)

    inner, outer, split = fixmatch.meta_losses(config)
    theta, inner_args, outer_args = split(params, batch)
    assert theta is params  # the whole classifier, body included
    flat_theta, unravel_theta = ravel_pytree(theta)
    flat_phi, unravel_phi = ravel_pytree(conf)

    def inner_flat(t, f):
        return inner(unravel_theta(t), unravel_phi(f), *inner_args)

    hessian = jax.hessian(inner_flat)(flat_theta, flat_phi) + damping * np.eye(len(flat_theta))
    cross = jax.jacobian(jax.grad(inner_flat), argnums=1)(flat_theta, flat_phi)
    g_val = jax.grad(lambda t: outer(unravel_theta(t), conf, *outer_args))(flat_theta)
    expected = -cross.T @ np.linalg.solve(np.asarray(hessian), np.asarray(g_val))
    assert np.linalg.norm(expected) > 1e-6
    # CG stops at a relative residual of 1e-6 (semisup.make_solver), hence 1e-5 in norm.
    error = np.linalg.norm(ravel_pytree(grad)[0] - expected) / np.linalg.norm(expected)
    assert error < 1e-5


# --------------------------------------------------------------------------------------------
# The protocol.


def _unique_dataset(per_class=20, classes=10, test_per_class=5, shape=(4, 4, 1)):
    """Images whose first pixel is their index, so overlap between sets is detectable."""
    n = per_class * classes
    x = np.zeros((n + test_per_class * classes, *shape), np.float32)
    x[:, 0, 0, 0] = np.arange(len(x))
    y = np.concatenate([np.repeat(np.arange(classes), per_class),
                        np.repeat(np.arange(classes), test_per_class)]).astype(np.int32)
    return datasets.Dataset(x[:n], y[:n], x[n:], y[n:], classes, "unique")


@pytest.mark.parametrize("design,ratio", [("add", 0.0), ("add", 0.25), ("add", 0.5),
                                          ("add", 1.0), ("swap", 0.5)])
def test_split_counts_disjointness_and_ood_fractions(design, ratio):
    data = _unique_dataset()
    split = semisup.make_split(data, labelled_per_class=2, validation_per_class=3,
                               num_unlabelled=40, ood_ratio=ratio, design=design, seed=4)
    num_id, num_ood = semisup.ood_count(40, ratio, design)
    assert (len(split.y_labelled), len(split.y_validation)) == (12, 18)
    assert np.bincount(split.y_labelled).tolist() == [2] * 6
    assert len(split.x_unlabelled) == num_id + num_ood
    assert int(split.unlabelled_ood.sum()) == num_ood == round(ratio * 40)
    ids = [s[:, 0, 0, 0].astype(int) for s in (split.x_labelled, split.x_validation,
                                               split.x_unlabelled, split.x_test)]
    everything = np.concatenate(ids)
    assert len(np.unique(everything)) == len(everything)
    original = np.concatenate([data.y_train, data.y_test])
    assert np.all(original[ids[2][split.unlabelled_ood]] >= 6)
    assert np.all(original[ids[2][~split.unlabelled_ood]] < 6)
    assert np.all(split.unlabelled_label[split.unlabelled_ood] == -1)
    assert set(np.unique(split.y_test)) == set(range(6)) and len(split.y_test) == 30
    again = semisup.make_split(data, labelled_per_class=2, validation_per_class=3,
                               num_unlabelled=40, ood_ratio=ratio, design=design, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(split, again, strict=True))


def test_merge_validation_spends_the_same_label_budget():
    split = semisup.make_split(_unique_dataset(), labelled_per_class=2, validation_per_class=3,
                               num_unlabelled=10, ood_ratio=0.5)
    merged = semisup.merge_validation(split)
    assert len(merged.y_labelled) == 30 and np.bincount(merged.y_labelled).tolist() == [5] * 6
    assert np.array_equal(merged.x_validation, split.x_validation)


def test_split_far_ood_and_errors():
    data = _unique_dataset()
    split = semisup.make_split(data, labelled_per_class=1, validation_per_class=1,
                               num_unlabelled=10, ood_ratio=0.5, ood="far")
    assert split.x_unlabelled.shape == (15, 4, 4, 1) and int(split.unlabelled_ood.sum()) == 5
    with pytest.raises(ValueError, match="only"):
        semisup.make_split(data, labelled_per_class=2, validation_per_class=3,
                           num_unlabelled=200, ood_ratio=0.0)
    with pytest.raises(ValueError, match="ood_ratio"):
        semisup.make_split(data, labelled_per_class=2, validation_per_class=3,
                           num_unlabelled=10, ood_ratio=1.5, design="swap")
    with pytest.raises(ValueError, match="ood_dataset"):
        semisup.make_split(data, labelled_per_class=2, validation_per_class=3,
                           num_unlabelled=10, ood_ratio=0.5, ood="other")


# --------------------------------------------------------------------------------------------
# Training: every method runs; resuming from a checkpoint changes nothing.


_tiny = tiny_ssl_config  # digits_split, the split these runs use, is conftest's fixture


# Compile-bound: confnet, l2rw and iomatch (the one with heads of its own) exercise every code
# path between them.
_SLOW = pytest.mark.slow
_DEFAULT_RUN = ("confnet", "l2rw", "iomatch")


@pytest.mark.parametrize("method", [m if m in _DEFAULT_RUN else pytest.param(m, marks=_SLOW)
                                    for m in fixmatch.METHODS])
def test_every_method_trains_and_reports(method, digits_split):
    config = _tiny(method, threshold=0.2)
    state = fixmatch.init(config, jax.random.key(0), digits_split)
    state, losses = fixmatch.run_periods(config, state, digits_split, config.periods)
    assert int(state.step) == 4 and np.all(np.isfinite(losses))
    result = semisup.evaluate(config, state, digits_split)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    in_dist = ~np.asarray(digits_split.unlabelled_ood, bool)
    assert result["pseudo_label_accuracy"] == fixmatch.accuracy(
        config, state.ema_params, np.asarray(digits_split.x_unlabelled)[in_dist],
        np.asarray(digits_split.unlabelled_label)[in_dist])
    classes = int(np.max(digits_split.y_test)) + 1
    share = result["pseudo_label_top_share"]
    assert math.isnan(share) or 1 / classes <= share <= 1
    weighted = config.weighting.uses_unlabelled and not config.weighting.constant_scores
    assert (0.0 <= result["correct_weight_auroc"] <= 1.0) if weighted else math.isnan(
        result["correct_weight_auroc"])
    if method == "confnet":
        assert int(state.meta_steps) == 2 and result["hvp_per_meta_step"] > 0
        assert result["meta_failures"] == 0


@pytest.mark.slow  # 27 s; the softmax input's meta-gradient is checked in the default run
def test_confnet_with_softmax_input_and_the_labelled_meta_set_trains(digits_split):
    config = _tiny("confnet", threshold=0.2, conf_inputs="image+softmax", meta_data="labelled")
    data = semisup.merge_validation(digits_split)  # what callers do when uses_validation is off
    state = fixmatch.init(config, jax.random.key(0), data)
    assert "Dense_1" in state.conf_params  # the softmax branch adds a hidden layer
    state, losses = fixmatch.run_periods(config, state, data, config.periods)
    assert np.all(np.isfinite(losses)) and int(state.meta_steps) == 2
    assert not np.array_equal(np.asarray(state.score_sum), np.zeros_like(state.score_sum))
    result = semisup.evaluate(config, state, data)
    assert 0.0 <= result["final_weight_auroc"] <= 1.0 and result["meta_failures"] == 0
    logits = fixmatch.confidence_scores(config, state.conf_params, data.x_unlabelled,
                                        state.params)
    assert result["final_logit_std"] == pytest.approx(float(np.std(np.asarray(logits))),
                                                      rel=1e-6)
    with pytest.raises(ValueError, match="params"):
        fixmatch.confidence_scores(config, state.conf_params, data.x_unlabelled)


def test_checkpoint_resume_gives_identical_state(digits_split, tmp_path):
    config = _tiny("confnet", threshold=0.2)
    start = fixmatch.init(config, jax.random.key(0), digits_split)
    straight, _ = fixmatch.run_periods(config, start, digits_split, 2)
    half, _ = fixmatch.run_periods(config, start, digits_split, 1)
    semisup.save_checkpoint(tmp_path / "c.npz", half)
    resumed = semisup.load_checkpoint(tmp_path / "c.npz", start)
    resumed, _ = fixmatch.run_periods(config, resumed, digits_split, 1)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _float64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if np.asarray(a).dtype.kind == "f" else a, tree)


@pytest.mark.slow  # 68 s of compiles
def test_unrolled_influence_replays_fixmatch_and_matches_finite_differences(digits_split):
    config = _tiny("fixmatch", threshold=0.2)
    data = jax.tree_util.tree_map(jnp.asarray, _float64(digits_split))
    state = fixmatch.init(config, jax.random.key(0), data)
    params = _float64(state.params)
    state = state._replace(params=params, ema_params=params,
                           opt_state=fixmatch._optimizer(config).init(params))
    grad, info = semisup.unrolled_influence(config, state, data, data.x_test, data.y_test)
    # At w = 1 the unrolled run is FixMatch's own, step for step.
    reference, _ = fixmatch.run_periods(config, state, data, config.periods)
    for a, b in zip(jax.tree_util.tree_leaves(reference.params),
                    jax.tree_util.tree_leaves(info.params), strict=True):
        assert np.allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
    # Only images that were drawn and passed the mask have an influence.
    grad = np.asarray(grad)
    masked = np.asarray(reference.mask_sum) > 0
    assert np.all(grad[~masked] == 0) and np.all(grad[masked] != 0)
    # An independent forward run with weights w: central differences along a random direction.
    def batch_loss(p, w, x_l, y_l, index, weak, strong):
        pseudo, mask = fixmatch.pseudo_labels(fixmatch._logits(config, p, weak), 0.2)
        out = fixmatch._logits(config, p, jnp.concatenate([x_l, strong]))
        return fixmatch.fixmatch_loss(out[:len(x_l)], y_l, out[len(x_l):], pseudo, mask,
                                      w[index], 1.0)[0]

    @jax.jit
    def test_loss(w):
        p, opt_state = params, fixmatch._optimizer(config).init(params)
        key = jax.random.wrap_key_data(state.key)
        for _ in range(config.steps):
            key, k_batch = jax.random.split(key)
            grads = jax.grad(batch_loss)(p, w, *fixmatch._sample(config, k_batch, data))
            updates, opt_state = fixmatch._optimizer(config).update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
        return jnp.mean(fixmatch.cross_entropy(fixmatch._logits(config, p, data.x_test),
                                               data.y_test))

    direction = np.random.default_rng(0).normal(size=grad.shape)
    ones, eps = np.ones(grad.shape), 1e-5
    finite_difference = (test_loss(ones + eps * direction) - test_loss(ones - eps * direction)
                         ) / (2 * eps)
    assert float(test_loss(ones)) == pytest.approx(float(info.outer_loss), rel=1e-12)
    assert abs(float(finite_difference)) > 1e-4  # the test can fail: the signal is not zero
    assert float(grad @ direction) == pytest.approx(float(finite_difference), rel=1e-7)
    # The Python-driven loop (plain reverse mode, step by step) gives the same derivative.
    python, python_info = semisup.unrolled_influence(config, state, data, data.x_test,
                                                     data.y_test, loop="python")
    assert np.allclose(np.asarray(python), grad, rtol=1e-10, atol=1e-14)
    assert float(python_info.outer_loss) == pytest.approx(float(info.outer_loss), rel=1e-12)


def test_unrolled_influence_errors_name_the_argument(digits_split):
    config = _tiny("fixmatch", threshold=0.2)
    state = fixmatch.init(config, jax.random.key(0), digits_split)
    x, y = digits_split.x_test, digits_split.y_test
    with pytest.raises(ValueError, match="step 0"):
        semisup.unrolled_influence(config, state._replace(step=jnp.asarray(3)), digits_split,
                                   x, y)
    with pytest.raises(ValueError, match="x_eval must have shape"):
        semisup.unrolled_influence(config, state, digits_split, x[:, :4], y)
    with pytest.raises(ValueError, match="y_eval must be integer labels"):
        semisup.unrolled_influence(config, state, digits_split, x, y.astype(np.float32))
    with pytest.raises(ValueError, match="steps must be an integer"):
        semisup.unrolled_influence(config, state, digits_split, x, y, steps=0)
    with pytest.raises(ValueError, match="truncate must be None or an integer"):
        semisup.unrolled_influence(config, state, digits_split, x, y, truncate=5)
    with pytest.raises(ValueError, match="loop must be"):
        semisup.unrolled_influence(config, state, digits_split, x, y, loop="while")


@pytest.mark.slow  # 31 s of compiles, one per meta optimizer
def test_meta_optimizers_and_weight_decay_step_as_their_update_rules(digits_split):
    # One meta-step from the same state and key under four optimizers (float32). SGD with a large
    # step gives the meta-gradient g = −Δ/lr well above round-off; Adam's first step must be
    # −lr·g/(|g| + 1e-8) wherever g is resolved, and decoupled weight decay must add exactly
    # −lr·wd·φ.
    base = _tiny("confnet", threshold=0.2)
    state, _ = fixmatch.run_periods(base, fixmatch.init(base, jax.random.key(0), digits_split),
                                    digits_split, 1)

    def step(**kw):
        config = dataclasses.replace(base, **kw)
        start = state._replace(
            meta_opt_state=fixmatch._meta_optimizer(config).init(state.conf_params))
        new = fixmatch._meta_jit(config, start, digits_split)
        return ravel_pytree(new.conf_params)[0] - ravel_pytree(state.conf_params)[0]

    phi = ravel_pytree(state.conf_params)[0]
    big, lr, wd = 1e3, 3e-3, 0.5
    sgd = step(meta_optimizer="sgd", meta_lr=big)
    sgd_wd = step(meta_optimizer="sgd", meta_lr=big, meta_weight_decay=wd / big)
    adam, adamw = step(meta_lr=lr), step(meta_lr=lr, meta_weight_decay=wd)
    g = -sgd / big
    resolved = jnp.abs(g) > 1e-5 * jnp.max(jnp.abs(g))
    assert float(jnp.max(jnp.abs(g))) > 0 and int(resolved.sum()) > phi.size // 2
    np.testing.assert_allclose(adam[resolved], (-lr * g / (jnp.abs(g) + 1e-8))[resolved],
                               rtol=1e-3)
    assert float(jnp.max(jnp.abs(adam))) <= lr * (1 + 1e-5)
    np.testing.assert_allclose(sgd_wd - sgd, -wd * phi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(adamw - adam, -lr * wd * phi, rtol=1e-3, atol=1e-9)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="semisup.Config: method"):
        fixmatch.Config(method="mixmatch")
    with pytest.raises(ValueError, match="multiple of meta_every"):
        fixmatch.Config(steps=7, meta_every=5)
    with pytest.raises(ValueError, match="threshold"):
        fixmatch.Config(threshold=1.5)
    with pytest.raises(ValueError, match="semisup.Config: conf_inputs"):
        fixmatch.Config(conf_inputs="softmax")
    with pytest.raises(ValueError, match="semisup.Config: meta_data"):
        fixmatch.Config(meta_data="test")
    with pytest.raises(ValueError, match="semisup.Config: meta_optimizer"):
        fixmatch.Config(meta_optimizer="rmsprop")
    with pytest.raises(ValueError, match="semisup.Config: meta_weight_decay"):
        fixmatch.Config(meta_weight_decay=-1.0)
    with pytest.raises(ValueError, match="semisup.Config: maxiter must be an integer >= 1"):
        fixmatch.Config(maxiter=0)


def test_solver_iters_is_the_deprecated_name_of_maxiter():
    with pytest.warns(DeprecationWarning, match="solver_iters is deprecated; use maxiter"):
        old = semisup.Config(solver_iters=3)
    assert old == semisup.Config(maxiter=3) and old.maxiter == 3
    with pytest.warns(DeprecationWarning, match="solver_iters is deprecated"):
        assert old.solver_iters == 3
    # dataclasses.replace passes every field, so the old name given there must win.
    with pytest.warns(DeprecationWarning):
        assert dataclasses.replace(old, solver_iters=7).maxiter == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(old, maxiter=5).maxiter == 5
        assert pickle.loads(pickle.dumps(old)) == old
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="maxiter"):
        semisup.Config(solver_iters=0)


# --------------------------------------------------------------------------------------------
# The meta-step's solvers: drawn from hvp.SOLVERS.


def test_solvers_are_the_registered_ones_a_meta_step_can_use():
    """Every registered solver but the dense reference, and but LiSSA, whose check_operator
    refuses the full-batch Hessian a meta-step hands it; each builds a Config."""
    assert set(fixmatch.SOLVERS) == set(hvp.SOLVERS) - {"dense", "lissa"}
    assert tuple(semisup.SOLVERS) == tuple(fixmatch.SOLVERS)
    for name in fixmatch.SOLVERS:
        assert fixmatch.Config(solver=name).solver == name
        assert isinstance(fixmatch.make_solver(name, 5, 1e-3), hvp.SOLVERS[name])
    for name in ("dense", "lissa", "bogus"):
        with pytest.raises(ValueError, match=f"semisup.Config: solver .*got '{name}'"):
            fixmatch.Config(solver=name)
    with pytest.raises(ValueError, match="semisup.make_solver: unknown solver 'lissa'"):
        fixmatch.make_solver("lissa", 5)


def test_make_solver_keeps_the_settings_of_the_committed_results():
    iters = 7
    assert fixmatch.make_solver("identity", iters) == hvp.Identity(tol=None)
    assert fixmatch.make_solver("neumann", iters) == hvp.Neumann(maxiter=7, tol=1e-6)
    assert fixmatch.make_solver("cg", iters) == hvp.CG(maxiter=7, tol=1e-6)
    assert fixmatch.make_solver("nystrom", iters, 1e-4) == hvp.Nystrom(rank=7, rho=1e-3)
    assert fixmatch.make_solver("nystrom", iters, 0.1) == hvp.Nystrom(rank=7, rho=0.1)
    # Any other solver: the products of `iters` CG iterations plus the residual check.
    assert fixmatch.make_solver("minres", iters) == hvp.MINRES(maxiter=7, tol=1e-6)
    assert fixmatch.make_solver("bicgstab", iters) == hvp.BiCGStab(maxiter=3, tol=1e-6)


def test_a_newly_registered_solver_is_a_choice_with_no_other_edit():
    class Minibatches(hvp.CG):  # as LiSSA: refuses an operator without batch_argnums
        def check_operator(self, operator):
            if getattr(operator, "batch_argnums", None) is None:
                raise ValueError("needs batch_argnums")

    try:
        @hvp.register("throwaway_cg")
        class ThrowawayCG(hvp.CG):
            pass

        hvp.register("throwaway_minibatch")(Minibatches)
        assert "throwaway_cg" in fixmatch.SOLVERS and "throwaway_cg" in semisup.SOLVERS
        assert "throwaway_minibatch" not in fixmatch.SOLVERS
        assert fixmatch.Config(solver="throwaway_cg").solver == "throwaway_cg"
        assert fixmatch.make_solver("throwaway_cg", 7) == ThrowawayCG(maxiter=7, tol=1e-6)
    finally:
        hvp.SOLVERS.pop("throwaway_cg", None)
        hvp.SOLVERS.pop("throwaway_minibatch", None)
    assert "throwaway_cg" not in fixmatch.SOLVERS


def test_meta_data_decides_which_labels_the_meta_loss_reads(digits_split):
    held_out = _tiny("confnet")
    own = _tiny("confnet", meta_data="labelled")
    assert held_out.uses_validation and not own.uses_validation
    assert not _tiny("fixmatch").uses_validation
    assert fixmatch.meta_set(held_out, digits_split)[0] is digits_split.x_validation
    assert fixmatch.meta_set(own, digits_split)[1] is digits_split.y_labelled


# --------------------------------------------------------------------------------------------
# The command line.


@pytest.mark.parametrize("argv", [
    ["ssl", "train", "--out", "x", "--method", "mixmatch"],
    ["ssl", "train", "--out", "x", "--steps", "0"],
    ["ssl", "train", "--out", "x", "--ood-ratio", "-1"],
    ["ssl", "train", "--out", "x", "--conf-inputs", "softmax"],
    ["ssl", "train", "--out", "x", "--meta-data", "test"],
    ["ssl", "train", "--out", "x", "--meta-optimizer", "rmsprop"],
    ["ssl", "train", "--out", "x", "--meta-weight-decay", "-1"],
    ["ssl", "train"],
    ["ssl", "eval"],
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bilevel_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_cli_runtime_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bilevel_main(["ssl", "eval", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        bilevel_main(["ssl", "train", "--out", str(tmp_path), "--dataset", "cifar10",
                      "--data-dir", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


TRAIN = ["--labels-per-class", "2", "--validation-per-class", "2", "--unlabelled", "30",
         "--steps", "4", "--batch-size", "4", "--mu", "2", "--meta-every", "2",
         "--maxiter", "3", "--threshold", "0.2", "--checkpoint-every", "1"]


def test_cli_train_stop_resume_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert bilevel_main(["ssl", "train", "--out", str(out), *TRAIN, "--stop-after", "1"]) == 0
    assert "step 2 of 4" in capsys.readouterr().out
    assert bilevel_main(["ssl", "train", "--out", str(out), *TRAIN]) == 0
    assert "step 4 of 4" in capsys.readouterr().out
    assert bilevel_main(["ssl", "eval", "--out", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    straight = tmp_path / "straight"
    assert bilevel_main(["ssl", "train", "--out", str(straight), *TRAIN]) == 0
    assert bilevel_main(["ssl", "eval", "--out", str(straight)]) == 0
    assert json.loads((straight / "metrics.json").read_text()) == resumed
    with pytest.raises(SystemExit) as exit_info:  # other options into the same folder
        bilevel_main(["ssl", "train", "--out", str(out), *TRAIN[:-2], "--seed", "3"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_cifar_path_on_tiny_fake_files(tmp_path):
    from fake_data import write_fake_cifar10, write_fake_cifar100
    write_fake_cifar10(tmp_path, per_batch=20, n_test=30)
    write_fake_cifar100(tmp_path, n_train=12)
    out = tmp_path / "run"
    argv = ["ssl", "train", "--out", str(out), "--dataset", "cifar10", "--data-dir",
            str(tmp_path), "--ood", "cifar100", "--ood-ratio", "0.5", "--labels-per-class", "1",
            "--validation-per-class", "1", "--unlabelled", "6", "--steps", "2", "--batch-size",
            "2", "--mu", "1", "--meta-every", "2", "--solver-iters", "2", "--threshold", "0.2"]
    assert bilevel_main(argv) == 0
    assert bilevel_main(["ssl", "eval", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and 0.0 <= metrics["test_accuracy"] <= 1.0
