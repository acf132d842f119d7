"""The class-mismatch comparison: supervised, FixMatch, the oracle filter, max-softmax weighting,
one-step look-ahead (L2RW) and the confidence network (identity, Neumann, CG inverse-HVP), paired
over seeds, at several amounts of added OOD data. The arms ``fixmatch-heldout`` and
``oracle-heldout`` train on the labelled set alone, as the meta-learning arms do.

    python -m experiments.ssl_arms            # digits, 50 % and 100 % added near OOD, 5 seeds
    python -m experiments.ssl_arms --smoke    # a tiny configuration
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

from bilevel import datasets  # noqa: E402
from experiments import ssl_common as common  # noqa: E402
from experiments._common import positive_int  # noqa: E402
from semisup import fixmatch, metrics, options, protocol  # noqa: E402

ARMS = {"supervised": dict(method="supervised"), "fixmatch": dict(method="fixmatch"),
        "oracle": dict(method="oracle"), "softmax": dict(method="softmax"),
        "l2rw": dict(method="l2rw"),
        "confnet-identity": dict(method="confnet", solver="identity"),
        "confnet-neumann": dict(method="confnet", solver="neumann"),
        "confnet-cg": dict(method="confnet", solver="cg"),
        "confnet-nystrom": dict(method="confnet", solver="nystrom"),
        # IOMatch filters (weights 0/1) without raising the kept images' weight.
        "iomatch": dict(method="iomatch", weight_norm="none"),
        # Trained on the labelled set alone, as the meta-learning arms are (the validation set
        # unused): separates the effect of the weighting from the cost of holding labels out.
        "fixmatch-heldout": dict(method="fixmatch"), "oracle-heldout": dict(method="oracle")}
MODELS = {"mlp": dict(widths=(), hidden=64), "cnn": dict(widths=(16, 32), hidden=64)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
    parser.add_argument("--labels", type=positive_int, default=4, help="labelled per class")
    parser.add_argument("--validation", type=positive_int, default=10)
    parser.add_argument("--unlabelled", type=positive_int, default=300)
    parser.add_argument("--ood", default="near")
    parser.add_argument("--design", choices=protocol.DESIGNS, default="add",
                        help="OOD added to a fixed ID pool, or swapped in at a fixed pool size")
    parser.add_argument("--ratios", default="0.5,1.0")
    parser.add_argument("--arms", default=",".join(a for a in ARMS
                                                   if a not in ("confnet-nystrom", "iomatch")),
                        help="comma-separated arms, each name[:field=value...] to override "
                             "Config fields, e.g. confnet-cg:meta_optimizer=sgd:meta_lr=100")
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--mu", type=positive_int, default=4)
    parser.add_argument("--meta-every", type=positive_int, default=5)
    parser.add_argument("--meta-lr", type=float, default=1e-2)
    parser.add_argument("--maxiter", "--solver-iters", type=positive_int, default=10,
                        help="the meta-step solver's iteration budget (Config.maxiter)")
    parser.add_argument("--damping", type=float, default=0.0,
                        help="added to the Hessian in the confidence network's solves")
    parser.add_argument("--curvature", default="last")
    parser.add_argument("--meta-optimizer", choices=options.META_OPTIMIZERS, default="adam")
    parser.add_argument("--meta-weight-decay", type=float, default=0.0)
    parser.add_argument("--conf-inputs", choices=options.CONF_INPUTS, default="image")
    parser.add_argument("--meta-data", choices=options.META_DATA, default="validation",
                        help="the meta loss's data (l2rw, confnet); 'labelled' spends no labels "
                             "on it, so every arm trains on the whole budget")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--flip", action="store_true", help="flip in the augmentations")
    parser.add_argument("--out", default=str(common.RESULTS / "arms"))
    parser.add_argument("--extra-csv", default=None,
                        help="comma-separated CSVs of earlier runs whose rows join the tables "
                             "(with --arms '' only the tables are rebuilt)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.ratios = 2, 10, "1.0"
        args.arms = "fixmatch,oracle,confnet-cg"
    arms = [a for a in args.arms.split(",") if a]
    fields = dict(steps=args.steps, batch_size=args.batch, mu=args.mu, ema=0.99,
                  flip=args.flip, meta_every=args.meta_every, meta_lr=args.meta_lr,
                  maxiter=args.maxiter, damping=args.damping,
                  meta_optimizer=args.meta_optimizer, meta_weight_decay=args.meta_weight_decay,
                  curvature=args.curvature, threshold=args.threshold,
                  conf_inputs=args.conf_inputs, meta_data=args.meta_data, **MODELS[args.model])
    try:  # every arm's configuration, checked before anything runs
        configs = {arm: fixmatch.Config(**{**fields, **_arm_overrides(arm)}) for arm in arms}
    except ValueError as error:
        parser.error(str(error))
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = list(range(args.seeds))
    dataset = datasets.load(args.dataset)
    rows, timing, pictures = [], {}, {}
    out = common.Path(args.out)
    run_now = list(arms)
    if args.extra_csv:
        rows = [r for path in args.extra_csv.split(",") for r in _read_rows(path)]
        arms = list(dict.fromkeys([r["arm"] for r in rows] + arms))
    with Progress() as progress:
        for ratio in ratios:
            if not run_now:
                continue
            data = common.splits(dataset, seeds, labelled_per_class=args.labels,
                                 validation_per_class=args.validation,
                                 num_unlabelled=args.unlabelled, ood_ratio=ratio, ood=args.ood,
                                 design=args.design)
            for arm in run_now:
                config = configs[arm]
                results, states, seconds = common.run_arm(
                    config, data, seeds, f"{ratio:.0%} {arm}", progress,
                    merge=not arm.split(":")[0].endswith("-heldout"))
                for seed, r in zip(seeds, results, strict=True):
                    rows.append({"ratio": ratio, "arm": arm, "seed": seed,
                                 "train_seconds": seconds, **r})
                if config.weighting.meta_step is not None:
                    timing[(ratio, arm)] = _time_meta_step(config, states, data)
                    pictures[(ratio, arm)] = (config, fixmatch.unstack(states, 0),
                                              jax.tree_util.tree_map(lambda a: np.asarray(a)[0],
                                                                     data))
                progress.console.print(f"{ratio:.0%} {arm}: accuracy "
                                       f"{common.mean_std([r['test_accuracy'] for r in results])}")
                # Rows so far, so a run stopped part-way keeps its finished arms (--extra-csv).
                common.write_csv(out.with_suffix(".partial.csv"), rows)
    for row in rows:
        row.update(timing.get((row["ratio"], row["arm"]), {}))
    common.write_csv(out.with_suffix(".csv"), rows)
    out.with_suffix(".partial.csv").unlink(missing_ok=True)
    text = _markdown(rows, ratios, arms, args)
    out.with_suffix(".md").write_text(text)
    common.write_json(out.with_suffix(".json"), common.machine(args=vars(args)))
    _plot(rows, ratios, arms, out.with_suffix(".png"), args.design)
    for (ratio, arm), picture in pictures.items():
        name = arm.replace(":", "_").replace("=", "")
        _picture(*picture, out.parent / f"{out.name}_weights_{name}_{int(100 * ratio)}.png",
                 f"{arm}, {_amount(ratio, args.design)}, seed 0")
    print(text)
    return 0


def _arm_overrides(spec: str) -> dict:
    """The Config fields of an arm ``name[:field=value...]``, e.g.
    ``confnet-cg:meta_optimizer=sgd:meta_lr=100`` (values parsed as the field's default is
    typed; they override the command line's)."""
    name, *pairs = spec.split(":")
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; choose from {', '.join(ARMS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(fixmatch.Config)}
    fields = dict(ARMS[name])
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in defaults or isinstance(defaults[key], tuple) or not value:
            raise ValueError(f"arm {spec!r}: expected field=value with a scalar field of "
                             f"semisup.Config, got {pair!r}")
        kind = type(defaults[key])
        try:
            fields[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"arm {spec!r}: {key} must be a {kind.__name__}, got "
                             f"{value!r}") from None
    return fields


def _read_rows(path) -> list[dict]:
    import csv

    def value(text):
        try:
            return float(text)
        except ValueError:
            return text
    with open(path) as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _time_meta_step(config, states, data) -> dict:
    """Median wall time of one inner step and one meta-step (one seed, after a warm-up)."""
    state = fixmatch.unstack(states, 0)
    one = jax.tree_util.tree_map(lambda a: jax.numpy.asarray(np.asarray(a)[0]), data)

    def median(fn):
        jax.block_until_ready(fn(config, state, one))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(config, state, one))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    inner, meta = median(fixmatch._step_jit), median(fixmatch._meta_jit)
    return {"inner_step_ms": 1e3 * inner, "meta_step_ms": 1e3 * meta,
            "meta_over_inner": meta / inner}


def _select(rows, ratio, arm, key):
    """``key`` of the rows of one arm and ratio (NaN where a row lacks it: rows of a run
    stopped part-way carry no meta-step timing)."""
    values = [r.get(key, "") for r in rows if r["ratio"] == ratio and r["arm"] == arm]
    return np.array([np.nan if v == "" else v for v in values], dtype=float)


def _markdown(rows, ratios, arms, args) -> str:
    lines = [f"# Class-mismatch comparison ({args.dataset}, {args.model}, {args.labels} labels "
             f"per class + {args.validation} validation per class, {args.unlabelled} "
             f"{'ID unlabelled' if args.design == 'add' else 'unlabelled in all'}, {args.ood} "
             f"OOD, design {args.design}, {args.seeds} paired seeds, {args.steps} steps)",
             "", "Accuracy: ID test accuracy of the EMA weights, mean ± std over seeds. "
             "Δ FixMatch: paired difference with FixMatch, mean [95 % t interval]. Gap closed: "
             "(arm − FixMatch) / (oracle − FixMatch) of the means. Δ FixMatch-heldout: paired "
             "difference with FixMatch trained on the labelled set alone (the validation set "
             "unused), i.e. on the same training labels as l2rw and confnet. AUROC: of each "
             "unlabelled image's mean raw weight during training (final: the confidence "
             "network's last weights), ID against OOD. Logit std: spread of the confidence "
             "network's final logits over the unlabelled images (0 = plain FixMatch). OOD "
             "pass: share of OOD draws passing the 0.95 mask. OOD weight: OOD share of the "
             "unlabelled loss weight. Meta-step "
             "time: median of one meta-step (one seed) and its ratio to one inner step measured "
             "in the same run.", ""]
    for ratio in ratios:
        fix = _select(rows, ratio, "fixmatch", "test_accuracy")
        heldout = _select(rows, ratio, "fixmatch-heldout", "test_accuracy")
        oracle = _select(rows, ratio, "oracle", "test_accuracy")
        gap = oracle.mean() - fix.mean() if len(fix) and len(oracle) else float("nan")
        lines += [f"## {_amount(ratio, args.design)} "
                  f"(oracle − FixMatch = {100 * gap:+.2f} points)", "",
                  "| arm | accuracy | Δ FixMatch | gap closed | Δ FixMatch-heldout | AUROC | "
                  "final AUROC | logit std | OOD pass | OOD weight | HVPs/meta-step | "
                  "meta-step ms (× inner) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm in arms:
            acc = _select(rows, ratio, arm, "test_accuracy")
            if not len(acc):
                lines.append(f"| {arm} | not run |" + " |" * 10)
                continue
            delta = common.paired(acc, fix) if len(fix) and arm != "fixmatch" else "—"
            delta_heldout = (common.paired(acc, heldout) if len(heldout)
                             and arm != "fixmatch-heldout" else "—")
            closed = (acc.mean() - fix.mean()) / gap if len(fix) and gap > 0 else float("nan")
            meta = _select(rows, ratio, arm, "meta_step_ms")  # NaN: the arm has no meta-step
            ratio_inner = _select(rows, ratio, arm, "meta_over_inner")
            timed = [k for k in range(len(meta)) if np.isfinite(meta[k])]
            meta, ratio_inner = [meta[k] for k in timed], [ratio_inner[k] for k in timed]
            hvps = _select(rows, ratio, arm, "hvp_per_meta_step")
            lines.append(
                f"| {arm} | {common.mean_std(acc)} | {delta} | "
                f"{closed:+.2f} | {delta_heldout} | "
                f"{common.mean_std(_select(rows, ratio, arm, 'weight_auroc'))} | "
                f"{common.mean_std(_select(rows, ratio, arm, 'final_weight_auroc'))} | "
                f"{common.mean_std(_select(rows, ratio, arm, 'final_logit_std'))} | "
                f"{common.mean_std(_select(rows, ratio, arm, 'ood_pass_rate'))} | "
                f"{common.mean_std(_select(rows, ratio, arm, 'ood_weight_share'))} | "
                f"{hvps.mean():.1f} | "
                + (f"{meta[0]:.1f} ({ratio_inner[0]:.1f}×)" if len(meta) else "—") + " |")
        lines.append("")
    return "\n".join(lines)


def _amount(ratio, design) -> str:
    """``"50% added OOD"`` (design add) or ``"50% OOD, swapped in"`` (design swap)."""
    return f"{ratio:.0%} added OOD" if design == "add" else f"{ratio:.0%} OOD, swapped in"


def _plot(rows, ratios, arms, path, design="add"):
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(ratios)
    for j, ratio in enumerate(ratios):
        accs = [_select(rows, ratio, a, "test_accuracy") for a in arms]
        means = [100 * acc.mean() if len(acc) else np.nan for acc in accs]
        stds = [100 * acc.std(ddof=1) if len(acc) > 1 else 0.0 for acc in accs]
        ax.bar(np.arange(len(arms)) + j * width, means, width, yerr=stds,
               label=_amount(ratio, design), capsize=2)
    ax.set_xticks(np.arange(len(arms)) + width * (len(ratios) - 1) / 2, arms, rotation=30,
                  fontsize=8, ha="right")
    low = np.nanmin([100 * _select(rows, r, a, "test_accuracy").mean() for r in ratios
                     for a in arms if len(_select(rows, r, a, "test_accuracy"))])
    ax.set_ylim(low - 5, 100)
    ax.set_ylabel("ID test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _picture(config, state, data, path, title, per_row=6):
    """Most and least weighted unlabelled images per predicted class (the final network)."""
    scores = np.asarray(fixmatch.weighting_scores(config, state.conf_params, state.params,
                                                  data.x_unlabelled))
    predicted = np.asarray(fixmatch.predict(config, state.ema_params, data.x_unlabelled)
                           ).argmax(-1)
    classes = int(predicted.max()) + 1
    fig, axes = plt.subplots(classes, 2 * per_row, figsize=(2 * per_row * 0.7, classes * 0.8))
    for c in range(classes):
        index = np.flatnonzero(predicted == c)
        order = index[np.argsort(-scores[index])]
        chosen = list(order[:per_row]) + list(order[::-1][:per_row][::-1])
        for k in range(2 * per_row):
            ax = axes[c, k]
            ax.axis("off")
            if k < len(chosen) and len(order) >= 2 * per_row:
                i = chosen[k]
                ax.imshow(data.x_unlabelled[i].squeeze(), cmap="gray", vmin=0, vmax=1)
                colour = "red" if data.unlabelled_ood[i] else "green"
                ax.set_title(f"{scores[i]:.2f}", fontsize=6, color=colour)
    fig.suptitle(f"{title}: left most, right least weighted per predicted class "
                 f"(red = OOD)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return metrics.auroc(scores, ~np.asarray(data.unlabelled_ood))


if __name__ == "__main__":
    raise SystemExit(main())
