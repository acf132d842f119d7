"""Sanity check of the shipped meta-parameters against their own initialisation and Adam.

Final full-training-set loss after 200 steps (3 seeds) on three tasks of the meta-training pool
and two held-out tasks. The evaluation suite (``bilevel lopt eval``) is the authoritative
comparison (tuned baselines, more tasks and horizons); this only shows that meta-training did
something. Run from the repository root:
``python experiments/results/lopt/meta_training/check_shipped.py > .../check_shipped.md``.
With ``--star-variants`` it instead compares the shipped STAR with the not-shipped STAR runs
kept in this folder (``*/meta_params.npz``) on the same tasks plus ``mlp_mnist5k_deep_elu``.
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import lopt
from bilevel.lopt import tasks, train

STEPS, SEEDS = 200, 3


def trained_and_initial(name):
    meta, metadata = lopt.pretrained(name)
    config = train.MetaTrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in metadata["config"].items()})
    # The meta-parameters meta-training started from (same seed, float32 as shipped).
    initial = jax.tree_util.tree_map(lambda x, y: jnp.asarray(x, y.dtype),
                                     train.init_meta(config, train._key(config, 0)), meta)
    return meta, initial


FACTORIES = {
    "mlp": lambda meta: lopt.mlp_lopt(meta),
    "star": lambda meta: lopt.star_lopt(meta, num_steps=STEPS, nominal_step=1e-3),
    "adam": lambda lr: optax.adam(lr),
}


def final_params_fn(task, factory):
    @jax.jit
    def final(h, params0, batches):
        opt = factory(h)
        (params, _), _ = tasks.run_steps(task, opt, params0, opt.init(params0), batches)
        return params

    return jax.vmap(final, (None, 0, 0))


def seed_slice(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def task_list(extra=()):
    return [tasks.TASKS["mlp_digits"](),
            tasks.make_family_task(tasks.FamilyMember("logistic", "mnist5k")),
            tasks.make_family_task(tasks.FamilyMember("quadratic", dim=10, condition=10.0,
                                                      noise=0.01)),
            tasks.TASKS["cnn_digits"](), tasks.TASKS["mlp_digits_wide_deep"](),
            *(tasks.TASKS[name]() for name in extra)]


def final_losses(task, run, h, params0, batches):
    finals = run(h, params0, batches)
    losses = [float(task.eval_loss(seed_slice(finals, i))) for i in range(SEEDS)]
    return f"{np.mean(losses):.4f} ± {np.std(losses):.4f}"


def seeded(task):
    params0 = jax.vmap(task.init)(jax.random.split(jax.random.key(100), SEEDS))
    batches = [task.batches(k, STEPS) for k in jax.random.split(jax.random.key(200), SEEDS)]
    return params0, jax.tree_util.tree_map(lambda *x: jnp.stack(x), *batches)


def star_variants():
    here = Path(__file__).resolve().parent
    variants = {"star_lopt (shipped)": lopt.pretrained("star_lopt")[0]}
    for path in sorted(here.glob("star_lopt_*/meta_params.npz")):
        variants[path.parent.name] = lopt.load_meta_params(path)[0]
    print("| task | held out | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for task in task_list(("mlp_mnist5k_deep_elu",)):
        params0, batches = seeded(task)
        run = final_params_fn(task, FACTORIES["star"])
        row = [final_losses(task, run, meta, params0, batches) for meta in variants.values()]
        print(f"| {task.name} | {task.held_out} | " + " | ".join(row) + " |", flush=True)
    print(f"\n{SEEDS} seeds, {STEPS} steps, final full-training-set loss, num_steps={STEPS}.")


def main():
    mlp, mlp0 = trained_and_initial("mlp_lopt")
    star, star0 = trained_and_initial("star_lopt")
    columns = (("mlp", (mlp0, mlp)), ("star", (star0, star)), ("adam", (1e-3, 1e-2)))
    print("| task (loss at init) | held out | mlp_lopt untrained | mlp_lopt shipped | "
          "star_lopt untrained (= AggMo-Adam 1e-3) | star_lopt shipped | Adam 1e-3 | Adam 1e-2 |")
    print("|---|---|---|---|---|---|---|---|")
    start = time.time()
    for task in task_list():
        params0, batches = seeded(task)
        row = []
        for kind, hs in columns:
            run = final_params_fn(task, FACTORIES[kind])
            row += [final_losses(task, run, h, params0, batches) for h in hs]
        init = np.mean([float(task.eval_loss(seed_slice(params0, i))) for i in range(SEEDS)])
        print(f"| {task.name} ({init:.3f}) | {task.held_out} | " + " | ".join(row) + " |",
              flush=True)
    print(f"\n{SEEDS} seeds, {STEPS} steps, mean ± std over seeds of the final full-training-set "
          f"loss; star_lopt given num_steps={STEPS}; {time.time() - start:.0f} s.")


if __name__ == "__main__":
    star_variants() if "--star-variants" in sys.argv[1:] else main()
