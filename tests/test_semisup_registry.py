"""semisup's weightings are a registry of strategies: each built-in gives the weights its formula
says (against a computation written out here, not the library's), a weighting registered from
outside the package with the public API alone trains (with or without a meta-step), and what
the registry refuses it says why."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import semisup
from bilevel import datasets
from semisup import fixmatch, models
from semisup.batch import draw


@pytest.fixture(scope="module")
def digits_split():
    return semisup.make_split(datasets.load("digits"), labelled_per_class=2,
                              validation_per_class=2, num_unlabelled=30, ood_ratio=1.0, seed=0)


def _config(method, **kw):
    return semisup.Config(method=method, steps=4, batch_size=4, mu=2, widths=(), hidden=64,
                          flip=False, meta_every=2, maxiter=3, ema=0.99, meta_lr=3e-3,
                          threshold=0.2, **kw)


# --------------------------------------------------------------------------------------------
# The built-ins against their formulas, after one inner step (float32, hence 1e-5).


def _reference_scores(method, config, state, data, batch):
    """Each method's raw scores, written out from its formula (numpy, per image)."""
    logits = np.asarray(batch.weak_logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if method == "fixmatch":
        return np.ones(len(logits))
    if method == "oracle":
        return 1.0 - np.asarray(data.unlabelled_ood)[np.asarray(batch.index)]
    if method == "softmax":
        return probs.max(-1)
    if method == "confnet":
        return np.asarray(models.confidence(state.conf_params, batch.weak, config.conf_widths))
    # l2rw: max(0, ∇ℓ_i · ∇L_val), with every image's gradient taken on its own.
    def image_loss(params, image, label):
        out = models.logits(params, image[None], config.widths, config.hidden)
        return semisup.cross_entropy(out, label[None])[0]

    def validation(params):
        out = models.logits(params, data.x_validation, config.widths, config.hidden)
        return jnp.mean(semisup.cross_entropy(out, data.y_validation))

    per_image = jax.vmap(jax.grad(image_loss), in_axes=(None, 0, 0))(
        state.params, batch.strong, batch.pseudo)
    flat = np.stack([ravel_pytree(jax.tree_util.tree_map(lambda a, i=i: a[i], per_image))[0]
                     for i in range(len(logits))])
    direction = np.asarray(ravel_pytree(jax.grad(validation)(state.params))[0])
    return np.maximum(np.asarray(batch.mask) * (flat @ direction), 0.0)


def _reference_weights(method, scores, mask, weight_norm="mask"):
    if method == "confnet":  # 2·sigmoid(z − z̄), z̄ the mean logit over the masked images
        centre = (scores * mask).sum() / max(mask.sum(), 1.0)
        scores = 2.0 / (1.0 + np.exp(-(scores - centre)))
    if weight_norm == "none":
        return scores
    total = (scores * mask).sum()
    return scores * mask.sum() / (total if total > 0 else 1.0)


# fixmatch (a constant-score mask), confnet (a parametric one) and the unnormalised oracle in the
# default run; the rest cost 6-21 s of compiles each and run with -m slow.
@pytest.mark.parametrize("method, weight_norm", [
    (m, "mask") if m in ("fixmatch", "confnet") else
    pytest.param(m, "mask", marks=pytest.mark.slow) for m in
    ("supervised", "fixmatch", "oracle", "softmax", "l2rw", "confnet")] + [
    ("oracle", "none"), pytest.param("confnet", "none", marks=pytest.mark.slow)])
def test_a_builtin_weighting_gives_the_weights_of_its_formula(method, weight_norm, digits_split):
    config = _config(method, weight_norm=weight_norm)
    data = jax.tree_util.tree_map(jnp.asarray, digits_split)
    state = semisup.init(config, jax.random.key(1), data)
    if method == "confnet":  # away from the initial logits 0, where every weight is 1
        rng = np.random.default_rng(0)
        state = state._replace(conf_params=jax.tree_util.tree_map(
            lambda a: a + jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype),
            state.conf_params))
    after, _ = fixmatch._step_jit(config, state, data)
    _, k_batch = jax.random.split(jax.random.wrap_key_data(state.key))
    batch = draw(config, state.params, k_batch, data)
    index, mask = np.asarray(batch.index), np.asarray(batch.mask, np.float64)
    seen = np.zeros(len(data.x_unlabelled))
    np.add.at(seen, index, 1.0)
    np.testing.assert_array_equal(after.seen, seen)
    if method == "supervised":
        for total in (after.score_sum, after.weight_sum, after.mask_sum):
            assert not np.any(np.asarray(total))
        return
    scores = _reference_scores(method, config, state, data, batch)
    weights = _reference_weights(method, scores, mask, weight_norm)
    assert mask.sum() > 1  # the test can fail: some images pass the mask ...
    assert method == "fixmatch" or np.ptp(weights[mask > 0]) > 1e-3  # ... with unequal weights
    expected_scores, expected_weights = np.zeros_like(seen), np.zeros_like(seen)
    np.add.at(expected_scores, index, scores)
    np.add.at(expected_weights, index, weights * mask)
    scale = np.abs(expected_scores).max()
    np.testing.assert_allclose(after.score_sum, expected_scores, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(after.weight_sum, expected_weights, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# A weighting from outside the package, public API only.


def test_a_weighting_registered_from_outside_trains(digits_split):
    name = "test_certainty"

    @semisup.register_weighting(name)
    class Certainty(semisup.Weighting):
        """``1 − H(p_weak) / log K``: the more certain the classifier, the more weight."""

        def scores(self, config, state, data, batch):
            probs = jax.nn.softmax(batch.weak_logits)
            entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)
            return 1.0 - entropy / jnp.log(probs.shape[-1])

    try:
        assert semisup.WEIGHTINGS[name] is Certainty and name in semisup.METHODS
        config = _config(name)
        assert config.weighting == Certainty() and not config.uses_validation
        assert name not in semisup.USES_VALIDATION
        data = semisup.merge_validation(digits_split)
        state = semisup.init(config, jax.random.key(0), data)
        state, losses = semisup.run_periods(config, state, data, config.periods)
        assert int(state.step) == 4 and np.all(np.isfinite(losses))
        assert int(state.meta_steps) == 0  # no meta-step
        # Normalised to mean 1 over the masked images of every step.
        assert float(np.sum(state.weight_sum)) == pytest.approx(float(np.sum(state.mask_sum)),
                                                                rel=1e-5)
        drawn = np.asarray(state.seen) > 0
        mean = np.asarray(state.score_sum)[drawn] / np.asarray(state.seen)[drawn]
        assert np.all((mean > 0) & (mean < 1)) and np.ptp(mean) > 0
        result = semisup.evaluate(config, state, data)
        assert 0.0 <= result["weight_auroc"] <= 1.0
        assert math.isnan(result["final_weight_auroc"])
    finally:
        del semisup.WEIGHTINGS[name]
    assert name not in semisup.METHODS
    with pytest.raises(ValueError, match="semisup.Config: method must be one of"):
        semisup.Config(method=name)


def test_a_trainable_weighting_from_outside_gets_the_meta_step(digits_split):
    name = "test_class_prior"

    @semisup.register_weighting(name)
    class ClassPrior(semisup.ParametricWeighting):
        """A learned logit per class, ``z = p_weak · b``, weights ``2·sigmoid(z − z̄)``."""

        def init_params(self, config, key, image_shape, num_classes):
            return {"bias": jnp.zeros((num_classes,), jnp.float32)}

        def param_scores(self, config, params, images, probs):
            return probs @ params["bias"]

        def weights(self, scores, mask):
            return semisup.confidence_weights(scores, mask)

    try:
        config = _config(name)
        assert config.uses_validation and name in semisup.USES_VALIDATION
        state = semisup.init(config, jax.random.key(0), digits_split)
        assert state.conf_params["bias"].shape == (6,)
        state, losses = semisup.run_periods(config, state, digits_split, config.periods)
        assert np.all(np.isfinite(losses))
        assert int(state.meta_steps) == 2 and int(state.meta_failures) == 0
        assert int(state.hvp_count) > 0 and np.any(np.asarray(state.conf_params["bias"]) != 0)
        result = semisup.evaluate(config, state, digits_split)
        assert 0.0 <= result["final_weight_auroc"] <= 1.0 and result["hvp_per_meta_step"] > 0
    finally:
        del semisup.WEIGHTINGS[name]


# --------------------------------------------------------------------------------------------
# What the registry refuses.


def test_registration_errors_say_why():
    class NoScores(semisup.Weighting):
        pass

    class NoParameters(semisup.Weighting):
        meta_step = semisup.implicit_meta_step

        def scores(self, config, state, data, batch):
            return batch.mask

    with pytest.raises(ValueError, match="lower-case identifier"):
        semisup.register_weighting("Bad-Name")
    with pytest.raises(ValueError, match="a weighting named 'fixmatch' exists"):
        semisup.register_weighting("fixmatch")(type("Other", (semisup.Weighting,), {
            "scores": lambda self, *args: None}))
    with pytest.raises(TypeError, match="not a subclass of semisup.Weighting"):
        semisup.register_weighting("test_plain")(object)
    with pytest.raises(TypeError, match="NoScores implements no scores"):
        semisup.register_weighting("test_no_scores")(NoScores)
    with pytest.raises(TypeError, match="has a meta_step but no trainable parameters"):
        semisup.register_weighting("test_no_parameters")(NoParameters)
    assert not any(name.startswith("test_") for name in semisup.WEIGHTINGS)


def test_the_builtins_are_listed_before_any_is_imported():
    """The registry's names and membership come from semisup.weighting.BUILTIN; looking one up
    gives the class its module registered."""
    from semisup import strategies, weighting
    assert tuple(weighting.BUILTIN) == tuple(semisup.WEIGHTINGS)[:len(weighting.BUILTIN)]
    for name in weighting.BUILTIN:
        cls = semisup.WEIGHTINGS[name]
        assert cls.name == name and cls.__module__ == strategies.__name__
        assert cls.uses_validation == (name in ("l2rw", "confnet"))
