"""Is there an ID-vs-OOD signal in the meta-gradient? Per-image implicit influence after FixMatch.

The confidence network can only learn what its meta-gradient tells it. Here FixMatch is trained
for ``--steps`` steps, then on ``--batches`` fresh unlabelled batches the implicit derivative of
the meta loss with respect to each image's weight is computed exactly as the confidence
network's meta-step does (same inner loss, curvature and inverse-HVP), i.e. the
influence ``dL_meta/dw_i = −λ_u/(μB) · ∇_θℓ_iᵀ (H + δI)⁻¹ ∇_θL_meta`` of every masked image.
If ``−dL/dw`` barely ranks ID above OOD images (AUROC near 0.5), a parametrisation of the
weights has to average a very noisy signal over many draws to learn to filter OOD images from
this meta-objective.

    python -m experiments.ssl_influence --dataset digits --model mlp
    python -m experiments.ssl_influence --smoke
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import bilevel
from bilevel import datasets
from experiments import ssl_common as common
from experiments._common import positive_int
from semisup import fixmatch, meta, metrics, options, solvers

MODELS = {"mlp": dict(widths=(), hidden=64), "cnn": dict(widths=(16, 32), hidden=64),
          # the Fashion-MNIST studies' CNN (experiments/fmnist_headroom.py)
          "cnn-small": dict(widths=(8, 16), hidden=64)}


def influences(config: fixmatch.Config, params, data, key, solver: str, iters: int,
               damping: float):
    """``(dL_meta/dw, mask, ood, index, finite)`` for one fresh unlabelled batch at ``params``.

    The bilevel problem is the confidence network's own (:func:`semisup.meta.meta_losses`,
    on a batch drawn as its meta-step draws one) with the per-image weights as the
    hyperparameters.
    """
    batch, index = meta.meta_batch(config, params, key, data)
    mask = batch[6]
    inner, outer, split = meta.meta_losses(config, weighting=lambda w, *_: w)
    theta, inner_args, outer_args = split(params, batch)
    grad, info = bilevel.hypergrad(inner, outer, theta, jnp.ones_like(mask), inner_args,
                                   outer_args,
                                   solver=solvers.make_solver(solver, iters, damping),
                                   damping=damping, on_failure="ignore", stationarity_tol=None)
    return grad, mask, data.unlabelled_ood[index], index, info.finite


def _measure(runs, states, data, seeds, args, step) -> list[dict]:
    """The influence statistics of every (solver, damping) in ``runs`` and seed at ``states``."""
    rows = []
    for (solver, damping), run in runs.items():
        for i, seed in enumerate(seeds):
            state = fixmatch.unstack(states, i)
            one = jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(np.asarray(a)[i]), data)
            scores, centred, oods, finite = [], [], [], True
            n = one.x_unlabelled.shape[0]
            total, count = np.zeros(n), np.zeros(n)
            for b in range(args.batches):
                grad, mask, ood, index, ok = run(state.params, one, jax.random.key(10_000 + b))
                keep = np.asarray(mask) > 0
                scores.append(-np.asarray(grad)[keep])
                # The weights are normalised over the masked batch, so what a weighting learns
                # from is each image's influence relative to its batch's mean.
                centred.append(scores[-1] - scores[-1].mean() if keep.any() else scores[-1])
                oods.append(np.asarray(ood)[keep])
                np.add.at(total, np.asarray(index)[keep], -np.asarray(grad)[keep])
                np.add.at(count, np.asarray(index)[keep], 1.0)
                finite &= bool(ok)
            scores, centred = np.concatenate(scores), np.concatenate(centred)
            oods = np.concatenate(oods).astype(bool)
            # Each image's influence averaged over its draws (batches and augmentations): the
            # most a parametrisation of the weights could learn from this meta-objective.
            drawn = count > 0
            image_ood = np.asarray(one.unlabelled_ood).astype(bool)[drawn]
            image_mean = total[drawn] / count[drawn]
            rows.append({"step": step, "solver": solver, "damping": damping, "seed": seed,
                         "finite": finite,
                         "masked_id": int((~oods).sum()), "masked_ood": int(oods.sum()),
                         "auroc": metrics.auroc(scores, ~oods),
                         "auroc_centred": metrics.auroc(centred, ~oods),
                         "images": int(drawn.sum()),
                         "draws_per_image": float(count[drawn].mean()) if drawn.any()
                         else np.nan,
                         "auroc_per_image": metrics.auroc(image_mean, ~image_ood),
                         "mean_id": float(scores[~oods].mean()) if (~oods).any() else np.nan,
                         "mean_ood": float(scores[oods].mean()) if oods.any() else np.nan,
                         "share_helpful_ood": float((scores[oods] > 0).mean())
                         if oods.any() else np.nan})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
    parser.add_argument("--labels", type=positive_int, default=3)
    parser.add_argument("--validation", type=positive_int, default=1)
    parser.add_argument("--meta-data", choices=options.META_DATA, default="labelled")
    parser.add_argument("--unlabelled", type=positive_int, default=300)
    parser.add_argument("--ood", default="near")
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--mu", type=positive_int, default=4)
    parser.add_argument("--batches", type=positive_int, default=20)
    parser.add_argument("--solvers", default="identity,cg")
    parser.add_argument("--iters", type=positive_int, default=20)
    parser.add_argument("--dampings", default="1e-3",
                        help="comma-separated damping δ of the solves (identity runs once)")
    parser.add_argument("--curvature", choices=options.CURVATURES, default="last")
    parser.add_argument("--at-steps", default=None,
                        help="comma-separated steps of the one FixMatch run at which to measure "
                             "(default: its end, --steps)")
    parser.add_argument("--out", default=str(common.RESULTS / "influence"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.batches = 2, 10, 2
    seeds = list(range(args.seeds))
    dataset = datasets.load(args.dataset)
    data = common.splits(dataset, seeds, labelled_per_class=args.labels,
                         validation_per_class=args.validation, num_unlabelled=args.unlabelled,
                         ood_ratio=args.ratio, ood=args.ood)
    config = fixmatch.Config(method="fixmatch", steps=args.steps, batch_size=args.batch,
                             mu=args.mu, ema=0.99, flip=False, meta_every=1,
                             meta_data=args.meta_data, curvature=args.curvature,
                             **MODELS[args.model])
    # FixMatch trains on the whole label budget; with meta_data="labelled" the meta loss reads
    # the same images (with "validation", the held-out set it also trained on).
    data = common.for_method(data, config)
    dampings = [float(d) for d in args.dampings.split(",")]
    cases = [(solver, damping) for solver in args.solvers.split(",")
             for damping in (dampings[:1] if solver == "identity" else dampings)]
    try:
        at_steps = sorted({int(t) for t in args.at_steps.split(",")} if args.at_steps
                          else {args.steps})
    except ValueError:
        parser.error(f"--at-steps must be comma-separated integers, got {args.at_steps!r}")
    if at_steps[0] < 1 or at_steps[-1] > args.steps:
        parser.error(f"--at-steps must lie in [1, --steps={args.steps}], got {args.at_steps}")
    # One FixMatch run per seed (its schedule set by --steps), measured at each of --at-steps.
    states = common.initial_states(config, data, seeds)
    # One jitted influence function per case, compiled once and reused at every step.
    runs = {case: jax.jit(functools.partial(influences, config, solver=case[0],
                                            iters=args.iters, damping=case[1]))
            for case in cases}
    rows, done = [], 0
    for step in at_steps:
        states, _ = fixmatch.run_seeds(config, states, data, step - done)
        done = step
        rows += _measure(runs, states, data, seeds, args, step)
    out = common.Path(args.out)
    common.write_csv(out.with_suffix(".csv"), rows)
    common.write_json(out.with_suffix(".json"), common.machine(args=vars(args)))
    lines = [f"# Per-image implicit influence after FixMatch ({args.dataset}, {args.model}, "
             f"{args.labels}+{args.validation} labels/class, meta set {args.meta_data}, "
             f"{args.ratio:.0%} added {args.ood} OOD, a {args.steps}-step run, {args.curvature} "
             f"curvature, {args.seeds} seeds)", "",
             "−dL_meta/dw_i of every masked image in fresh batches: > 0 means up-weighing the "
             "image lowers the meta loss. AUROC: ID against OOD. Centred: minus the mean over "
             "its batch's masked images (the weights are normalised over the batch, so this is "
             "what a weighting learns from).", "",
             "AUROC per image: each masked image's influence averaged over its draws (different "
             "batches and augmentations), the most a parametrisation of the weights could learn "
             "from the meta-gradient.", "",
             "| step | solver | δ | masked ID | masked OOD | AUROC | AUROC centred | "
             "draws per image | AUROC per image | mean ID (×1e-4) | mean OOD (×1e-4) | "
             "OOD with −dL/dw > 0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for step, (solver, damping) in ((t, c) for t in at_steps for c in cases):
        sel = [r for r in rows if r["solver"] == solver and r["damping"] == damping
               and r["step"] == step]
        lines.append(
            f"| {step} | {solver} | {'—' if solver == 'identity' else f'{damping:g}'} | "
            f"{np.mean([r['masked_id'] for r in sel]):.0f} | "
            f"{np.mean([r['masked_ood'] for r in sel]):.0f} | "
            f"{common.mean_std([r['auroc'] for r in sel])} | "
            f"{common.mean_std([r['auroc_centred'] for r in sel])} | "
            f"{np.mean([r['draws_per_image'] for r in sel]):.1f} | "
            f"{common.mean_std([r['auroc_per_image'] for r in sel])} | "
            f"{common.mean_std([1e4 * r['mean_id'] for r in sel])} | "
            f"{common.mean_std([1e4 * r['mean_ood'] for r in sel])} | "
            f"{common.mean_std([r['share_helpful_ood'] for r in sel])} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
