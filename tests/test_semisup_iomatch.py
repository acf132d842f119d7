"""IOMatch (``method="iomatch"``) against its formulas, and ``Config.meta_start``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_ssl_config

from semisup import batch as batch_module
from semisup import fixmatch, models, strategies


def _log_softmax(x, axis):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_one_vs_all_loss_is_openmatchs():
    # −log p_in(y) + max_{k≠y} −log p_out(k), per image, by a loop in float64.
    logits = jax.random.normal(jax.random.key(0), (5, 2, 4)) * 2.0
    labels = jnp.array([0, 3, 1, 1, 2])
    log_p = _log_softmax(logits, axis=1)
    expected = np.mean([-log_p[i, 1, y] + max(-log_p[i, 0, k] for k in range(4) if k != y)
                        for i, y in enumerate(np.asarray(labels))])
    assert float(strategies.one_vs_all_loss(logits, labels)) == pytest.approx(expected,
                                                                              rel=1e-6)


def test_open_set_targets_are_a_distribution_with_the_outlier_mass_last():
    heads = models.init_open_heads(jax.random.key(1), 8, 3)
    feats = jax.random.normal(jax.random.key(2), (6, 8))
    weak_logits = jax.random.normal(jax.random.key(3), (6, 3))
    outlier, target = strategies.open_set_targets(heads, feats, weak_logits)
    binary, open_logits = models.open_heads(heads, feats)
    assert binary.shape == (6, 2, 3) and open_logits.shape == (6, 4) and target.shape == (6, 4)
    p = np.exp(_log_softmax(weak_logits, -1))
    o = np.exp(_log_softmax(binary, 1))
    np.testing.assert_allclose(outlier, np.sum(p * o[:, 0], -1), rtol=1e-5)
    np.testing.assert_allclose(target[:, :3], p * o[:, 1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sum(target, -1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(target[:, 3], outlier)


_tiny = tiny_ssl_config


def test_iomatch_loss_is_its_three_terms(digits_split):
    config = _tiny("iomatch", threshold=0.2, weight_norm="none")
    weighting = config.weighting
    state = fixmatch.init(config, jax.random.key(0), digits_split)
    assert set(state.params) == {"body", "head", "aux"}
    data = jax.tree_util.tree_map(jnp.asarray, digits_split)
    b = batch_module.draw(config, state.params, jax.random.key(4), data)
    scores = weighting.scores(config, state, data, b)
    weights = weighting.weights(scores, b.mask)
    total = weighting.loss(config, state.params, b, weights)

    # The same three terms, from separate forward passes and float64 NumPy.
    params = state.params

    def forward(images):
        feats = models.features(params["body"], images, config.widths, config.hidden)
        return (np.asarray(models.head(params["head"], feats), np.float64),
                *(np.asarray(a, np.float64) for a in models.open_heads(params["aux"], feats)))

    closed_l, binary_l, _ = forward(b.x_labelled)
    closed_s, _, open_s = forward(b.strong)
    _, binary_w, _ = forward(b.weak)
    y = np.asarray(b.y_labelled)
    rows = np.arange(len(y))
    supervised = -np.mean(_log_softmax(closed_l, -1)[rows, y])
    log_o = _log_softmax(binary_l, 1)
    negatives = np.where(np.eye(log_o.shape[-1])[y] > 0, -np.inf, -log_o[:, 0])
    one_vs_all = np.mean(-log_o[rows, 1, y] + negatives.max(-1))
    p = np.exp(_log_softmax(np.asarray(b.weak_logits), -1))
    o = np.exp(_log_softmax(binary_w, 1))
    outlier = np.sum(p * o[:, 0], -1)
    np.testing.assert_allclose(scores, 1.0 - outlier, rtol=1e-5)
    inlier = (outlier < 0.5) * np.asarray(b.mask)
    pseudo = np.asarray(b.pseudo)
    unlabelled = np.mean(inlier * -_log_softmax(closed_s, -1)[np.arange(len(pseudo)), pseudo])
    q = np.concatenate([p * o[:, 1], outlier[:, None]], -1)
    open_loss = np.mean((q.max(-1) >= 0.5) * -np.sum(q * _log_softmax(open_s, -1), -1))
    assert float(total) == pytest.approx(supervised + config.lambda_u * unlabelled + one_vs_all
                                         + open_loss, rel=1e-5)


def test_iomatch_trains_its_heads_and_reports_inlier_scores(digits_split):
    config = _tiny("iomatch", threshold=0.2, weight_norm="none")
    state = fixmatch.init(config, jax.random.key(0), digits_split)
    new, losses = fixmatch.run_periods(config, state, digits_split, config.periods)
    assert np.all(np.isfinite(losses))
    moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                   state.params["aux"], new.params["aux"])
    assert all(jax.tree_util.tree_leaves(moved))
    seen = np.asarray(new.seen)
    score = np.asarray(new.score_sum)[seen > 0] / seen[seen > 0]
    assert np.all((score >= 0) & (score <= 1))
    weights = np.asarray(new.weight_sum)
    assert set(np.unique(weights)) <= set(range(int(seen.max()) + 1))  # a filter: 0 or 1 each


def test_confnet_before_meta_start_is_fixmatch(digits_split):
    fm = _tiny("fixmatch", threshold=0.2)
    late = _tiny("confnet", threshold=0.2, meta_start=fm.steps + 1)
    key = jax.random.key(0)
    fm_state, _ = fixmatch.run_periods(fm, fixmatch.init(fm, key, digits_split), digits_split,
                                       fm.periods)
    start = fixmatch.init(late, key, digits_split)
    state, _ = fixmatch.run_periods(late, start, digits_split, late.periods)
    assert int(state.meta_steps) == 0 and int(state.hvp_count) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.conf_params, start.conf_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, fm_state.params)
    # meta_start=3 with meta_every=2: the meta-step after step 2 is skipped, the one after 4 runs.
    mid = _tiny("confnet", threshold=0.2, meta_start=3)
    state, _ = fixmatch.run_periods(mid, fixmatch.init(mid, key, digits_split), digits_split,
                                    mid.periods)
    assert int(state.meta_steps) == 1


def test_meta_start_must_be_a_count():
    with pytest.raises(ValueError, match="meta_start"):
        fixmatch.Config(meta_start=-1)
