"""Metrics of a run (test accuracy, weight AUROC, OOD mask pass rate) and paired statistics."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from semisup import fixmatch
from semisup.protocol import Split


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` against the rest.

    The Mann-Whitney statistic with average ranks for ties: the probability that a random
    positive scores higher than a random negative (ties count 1/2). NaN if a class is empty.
    """
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"semisup.auroc: scores and positive must be equal 1-D shapes, got "
                         f"{scores.shape} and {positive.shape}")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95
                      ) -> tuple[float, float, float]:
    """Mean of ``a − b`` over paired seeds and its two-sided t confidence interval.

    Returns ``(mean, low, high)``; the interval is NaN with fewer than two pairs.
    """
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise ValueError(f"semisup.paired_difference: a and b must be equal-length 1-D, got "
                         f"{np.shape(a)} and {np.shape(b)}")
    mean = float(diff.mean())
    if len(diff) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    return mean, mean - half, mean + half


def evaluate(config: fixmatch.Config, state: fixmatch.State, data: Split) -> dict[str, float]:
    """The metrics of one (unbatched) run.

    Returns a dict with ``test_accuracy`` (EMA weights), ``test_accuracy_raw``,
    ``validation_accuracy``; ``weight_auroc`` (AUROC of each unlabelled image's mean raw score
    over training, ID as positive; NaN for methods whose scores are absent or constant);
    ``final_weight_auroc`` (the final scores of the unaugmented images under the weighting's
    trained parameters, the confidence network's logits for ``confnet``; NaN for methods
    without a meta-step) and ``final_logit_std`` (the spread of those scores over the
    unlabelled images: 0 is plain FixMatch, ±4 already makes near-binary weights);
    ``ood_pass_rate`` and ``id_pass_rate`` (share of draws of OOD / ID images that passed the
    confidence mask); ``ood_weight_share`` (OOD share of the unlabelled loss weight);
    ``hvp_per_meta_step``, ``meta_failures``.

    Pseudo-labels are the final EMA classifier's predictions of the unaugmented unlabelled
    images: ``pseudo_label_accuracy`` (their accuracy on the ID images);
    ``correct_weight_auroc`` (AUROC of the mean raw score of the drawn ID images, correct
    pseudo-label as positive: a weighting may be right to down-weight wrong pseudo-labels of ID
    images; NaN where ``weight_auroc`` is); ``pseudo_label_top_share`` (the unlabelled loss
    weight each image received over training, summed per final pseudo-label, ID and OOD images
    alike: the most frequent class's share, 1/K balanced, 1 one class; NaN without unlabelled
    weight).
    """
    ood = np.asarray(data.unlabelled_ood, bool)
    seen = np.asarray(state.seen)
    drawn = seen > 0
    mean_score = np.asarray(state.score_sum)[drawn] / seen[drawn]
    mask_sum, weight_sum = np.asarray(state.mask_sum), np.asarray(state.weight_sum)
    weighting = config.weighting
    weighted = weighting.uses_unlabelled and not weighting.constant_scores
    total_weight = weight_sum.sum()

    def rate(select):
        return float(mask_sum[select].sum() / max(seen[select].sum(), 1.0))

    metrics = {
        "test_accuracy": fixmatch.accuracy(config, state.ema_params, data.x_test, data.y_test),
        "test_accuracy_raw": fixmatch.accuracy(config, state.params, data.x_test, data.y_test),
        "validation_accuracy": fixmatch.accuracy(config, state.ema_params, data.x_validation,
                                                 data.y_validation),
        "weight_auroc": auroc(mean_score, ~ood[drawn]) if weighted else math.nan,
        "final_weight_auroc": math.nan,
        "final_logit_std": math.nan,
        "ood_pass_rate": rate(ood) if ood.any() else math.nan,
        "id_pass_rate": rate(~ood),
        "ood_weight_share": float(weight_sum[ood].sum() / total_weight) if total_weight > 0
        else math.nan,
        "hvp_per_meta_step": float(state.hvp_count) / max(int(state.meta_steps), 1),
        "meta_failures": int(state.meta_failures),
    }
    metrics.update(_pseudo_labels(config, state, data, mean_score, drawn, weighted))
    if weighting.meta_step is not None:
        scores = np.asarray(fixmatch.weighting_scores(config, state.conf_params, state.params,
                                                      np.asarray(data.x_unlabelled)))
        metrics["final_weight_auroc"] = auroc(scores, ~ood)
        metrics["final_logit_std"] = float(scores.std())
    return metrics


def _pseudo_labels(config: fixmatch.Config, state: fixmatch.State, data: Split,
                   mean_score: np.ndarray, drawn: np.ndarray, weighted: bool) -> dict[str, float]:
    images = np.asarray(data.x_unlabelled)
    if len(images) == 0:
        return {"pseudo_label_accuracy": math.nan, "correct_weight_auroc": math.nan,
                "pseudo_label_top_share": math.nan}
    probs = np.concatenate([np.asarray(fixmatch.predict(config, state.ema_params,
                                                        np.asarray(images[i:i + 1024])))
                            for i in range(0, len(images), 1024)])
    label = np.asarray(data.unlabelled_label)
    ood = np.asarray(data.unlabelled_ood, bool)
    pseudo = probs.argmax(-1)
    correct = (pseudo == label) & ~ood
    counts = np.bincount(pseudo, weights=np.asarray(state.weight_sum, np.float64),
                         minlength=probs.shape[-1])
    scored = ~ood[drawn]  # the drawn ID images, in the order of mean_score
    positive = correct[drawn][scored]
    return {
        "pseudo_label_accuracy": float(correct[~ood].mean()) if (~ood).any() else math.nan,
        "correct_weight_auroc": auroc(mean_score[scored], positive) if weighted else math.nan,
        "pseudo_label_top_share": float(counts.max() / counts.sum()) if counts.sum() > 0
        else math.nan,
    }

