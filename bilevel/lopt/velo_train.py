"""Meta-training :func:`bilevel.lopt.velo_lopt` by evolution strategies, as VeLO was trained.

Every outer step draws ``tasks_per_step`` tasks from a fixed pool of the meta-training family
(:mod:`bilevel.lopt.tasks`) and, for each, an inner horizon ``T`` log-uniform between
``horizon_start`` and a maximum that grows linearly to ``horizon`` over the first half of
meta-training (a curriculum). Each task's meta-loss is a *full* inner run:

``L(meta) = min(loss(θ_T) / loss(θ_0), cap)``,

``T`` steps of ``velo_lopt(meta, num_steps=T)`` from a fresh initialisation, scored on the
training loss at the end (the mean over four fresh minibatches), divided by the same at the
start so that tasks of different loss scales weigh alike; ``cap`` bounds what one diverging
member of the population can contribute. The meta-gradient is the antithetic ES estimate
(:func:`bilevel.es_hypergrad`, σ = ``sigma``) with the population split over all devices
(:func:`bilevel.distributed.sharded_es_hypergrad`); each task's estimate is normalised to unit
norm (meta-gradients normalised per task), averaged, clipped and applied with Adam.

Inner runs have a static length for XLA, so a horizon is rounded up to a power of two
(``bucket``); the run then does ``bucket`` steps with the optimizer told ``num_steps = T`` and
the parameters frozen after step ``T``. One program is compiled per (task, bucket).

Everything random derives from ``(seed, outer step)``: a run resumed from its checkpoint gives
the numbers of a run never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import checkpoint, distributed
from bilevel.config import Float, Int, field, field_like, from_args, validate
from bilevel.lopt import optimizers, tasks, train, velo
from bilevel.lopt.options import MetaTrainConfig

PyTree = Any
#: The final loss is averaged over this many fresh minibatches.
SCORE_BATCHES = 4
CHECKPOINT_NAME = train.VELO_CHECKPOINT_NAME


@dataclasses.dataclass(frozen=True)
class VeLOTrainConfig:
    """Hyperparameters of ES meta-training; checked when constructed. Each field's help says
    what it means; those shared with :class:`~bilevel.lopt.train.MetaTrainConfig` are declared
    as its (same rule, same ``bilevel lopt train`` option; ``tasks_per_step`` is ``--slots``)."""

    steps: int = field_like(MetaTrainConfig, "steps", 100)
    population: int = field_like(MetaTrainConfig, "population",
                                 help="ES population per task (antithetic: even, and a multiple "
                                      "of the devices)")
    sigma: float = field_like(MetaTrainConfig, "sigma",
                              help="ES smoothing scale on the meta-parameters")
    tasks_per_step: int = field_like(MetaTrainConfig, "slots",
                                     help="tasks (each with its own horizon) per outer step")
    horizon_start: int = field_like(MetaTrainConfig, "horizon_start", 16)
    horizon: int = field_like(MetaTrainConfig, "horizon", 128)
    learning_rate: float = field_like(MetaTrainConfig, "learning_rate")
    clip_norm: float = field_like(MetaTrainConfig, "clip_norm")
    loss_cap: float = field(2.0, rule=Float(gt=0), cli=False,
                            help="upper bound of the normalised meta-loss")
    lstm_width: int = field(16, rule=Int(min=1), cli=False,
                            help="the controller's LSTM width (see bilevel.lopt.init_velo_lopt)")
    bank_size: int = field(8, rule=Int(min=1), cli=False,
                           help="the controller's bank of optimizers (see "
                                "bilevel.lopt.init_velo_lopt)")
    pool: int = field_like(MetaTrainConfig, "pool", 4)
    kinds: tuple[str, ...] = field_like(MetaTrainConfig, "kinds")
    seed: int = field_like(MetaTrainConfig, "seed")

    def __post_init__(self):
        where = "lopt.VeLOTrainConfig"
        validate(self, where)
        if self.population % 2:
            raise ValueError(f"{where}: population must be even (antithetic pairs), "
                             f"got {self.population}")
        if self.horizon < self.horizon_start:
            raise ValueError(f"{where}: horizon ({self.horizon}) must be >= horizon_start "
                             f"({self.horizon_start})")


class VeLOTrainState(NamedTuple):
    """Everything a resumed run needs."""
    config: VeLOTrainConfig
    step: int
    meta: dict
    outer_state: PyTree
    history: tuple[dict, ...]
    seconds: float

    def checkpoint_template(self) -> VeLOTrainState:
        """This state with a fresh outer-optimizer state: the template
        :func:`load_checkpoint` reads a checkpoint on (optax's classes come from optax)."""
        return self._replace(outer_state=outer_optimizer(self.config).init(self.meta))


checkpoint.register(VeLOTrainState)
checkpoint.register(VeLOTrainConfig)


# Keys, the horizon curriculum and the task pool are lopt.train's: they read only the seed,
# steps, horizon_start, horizon, pool and kinds that both configs have.
_key = train._key
max_horizon = train.max_horizon
task_pool = train.task_pool


def bucket(horizon: int) -> int:
    """The static run length for a horizon: the next power of two."""
    return 1 << max(0, int(horizon) - 1).bit_length()


@functools.lru_cache(maxsize=32)
def _task(member: tasks.FamilyMember) -> tasks.Task:
    return tasks.make_family_task(member)


def outer_optimizer(config: VeLOTrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adam(config.learning_rate))


def init_velo_train(config: VeLOTrainConfig) -> VeLOTrainState:
    meta = velo.init_velo_lopt(_key(config, 0), lstm_width=config.lstm_width,
                               bank_size=config.bank_size)
    return VeLOTrainState(config, 0, meta, outer_optimizer(config).init(meta), (), 0.0)


def _score(task: tasks.Task, params: PyTree, score_batches: PyTree) -> jax.Array:
    return jnp.mean(jax.vmap(lambda b: task.loss(params, b))(score_batches))


def inner_run(task: tasks.Task, meta: dict, params: PyTree, batches: PyTree,
              horizon: jax.Array) -> PyTree:
    """``len(batches)`` steps of ``velo_lopt(meta, horizon)``, frozen after step ``horizon``."""
    opt = velo.velo_lopt(meta, horizon)

    def step(carry, inputs):
        params, state = carry
        t, batch = inputs
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, new_state = opt.update(grads, state, params, loss=loss)
        active = t < horizon
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        return (jax.tree_util.tree_map(keep, new_params, params),
                jax.tree_util.tree_map(keep, new_state, state)), loss

    length = jax.tree_util.tree_leaves(batches)[0].shape[0]
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                  (jnp.arange(length), batches))
    return params


def normalised_meta_loss(task: tasks.Task, cap: float) -> Callable:
    """``meta_loss(meta, params0, batches, score0, score_batches, horizon)``: the capped ratio of
    the final to the initial training loss."""
    def meta_loss(meta, params0, batches, score0, score_batches, horizon):
        final = _score(task, inner_run(task, meta, params0, batches, horizon), score_batches)
        ratio = final / score0
        return jnp.where(jnp.isfinite(ratio), jnp.minimum(ratio, cap), cap)
    return meta_loss


@functools.lru_cache(maxsize=64)
def _es_fn(config: VeLOTrainConfig, member: tasks.FamilyMember, length: int) -> Callable:
    del length  # part of the cache key: one program per run length
    task = _task(member)
    meta_loss = normalised_meta_loss(task, config.loss_cap)
    mesh = distributed.data_mesh()

    @jax.jit
    def estimate(meta, key, params0, batches, score0, score_batches, horizon):
        return distributed.sharded_es_hypergrad(
            meta_loss, meta, key, population=config.population, sigma=config.sigma,
            args=(params0, batches, score0, score_batches, horizon), mesh=mesh)

    return estimate


def _task_draw(config: VeLOTrainConfig, step: int, index: int):
    key = _key(config, 1, step, index)
    member_key, horizon_key, init_key, data_key, es_key = jax.random.split(key, 5)
    pool = task_pool(config)
    member = pool[int(jax.random.randint(member_key, (), 0, len(pool)))]
    high = max_horizon(config, step)
    u = float(jax.random.uniform(horizon_key))
    horizon = int(round(config.horizon_start * (high / config.horizon_start) ** u))
    return member, horizon, init_key, data_key, es_key


def velo_train_step(state: VeLOTrainState) -> tuple[VeLOTrainState, dict]:
    """One outer step: ES estimates on ``tasks_per_step`` tasks, then one Adam step."""
    config = state.config
    grads, losses, horizons = [], [], []
    for index in range(config.tasks_per_step):
        member, horizon, init_key, data_key, es_key = _task_draw(config, state.step, index)
        task = _task(member)
        length = bucket(horizon)
        params0 = task.init(init_key)
        batches = task.batches(data_key, length + SCORE_BATCHES)
        run_batches = jax.tree_util.tree_map(lambda x, n=length: x[:n], batches)
        score_batches = jax.tree_util.tree_map(lambda x, n=length: x[n:], batches)
        score0 = _score(task, params0, score_batches)
        grad, info = _es_fn(config, member, length)(
            state.meta, es_key, params0, run_batches, score0, score_batches,
            jnp.asarray(horizon, jnp.float32))
        if bool(info.finite):
            scale = 1.0 / jnp.maximum(optax.tree.norm(grad), 1e-12)
            grads.append(jax.tree_util.tree_map(lambda g, s=scale: g * s, grad))
            losses.append(float(info.outer_loss))
        horizons.append(horizon)
    meta, outer_state = state.meta, state.outer_state
    if grads:
        mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        updates, outer_state = outer_optimizer(config).update(mean, outer_state, meta)
        meta = optax.apply_updates(meta, updates)
    record = {"step": state.step, "meta_loss": float(np.mean(losses)) if losses else math.nan,
              "skipped": config.tasks_per_step - len(grads),
              "horizons": horizons, "max_horizon": max_horizon(config, state.step)}
    return state._replace(step=state.step + 1, meta=meta, outer_state=outer_state,
                          history=state.history + (record,)), record


def velo_train(state: VeLOTrainState, on_step: Callable[[VeLOTrainState, dict], None]
               | None = None) -> VeLOTrainState:
    """Run outer steps until ``state.config.steps``; ``on_step`` sees every new state."""
    return train.meta_train(state, on_step, step=velo_train_step)


#: Atomic checkpoints (:mod:`bilevel.checkpoint`), shared with the other meta-trainers.
save_checkpoint = train.save_checkpoint


def load_checkpoint(path: str | os.PathLike) -> VeLOTrainState:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    return train.load_checkpoint(path, VeLOTrainState)


def final_metadata(state: VeLOTrainState) -> dict:
    """The metadata saved with the meta-parameters: how they were trained."""
    config = state.config
    recent = [r["meta_loss"] for r in state.history[-20:] if math.isfinite(r["meta_loss"])]
    return {
        "optimizer": "velo_lopt",
        "optimizer_kwargs": {},
        "needs_num_steps": True,
        "estimator": "es",
        "config": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(config).items()},
        "outer_steps": state.step,
        "meta_training_seconds": round(state.seconds, 1),
        "final_meta_loss_last20_mean": float(np.mean(recent)) if recent else None,
        "first_meta_loss": state.history[0]["meta_loss"] if state.history else None,
        "task_pool": [_task(m).name for m in task_pool(config)],
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "machine": f"{platform.machine()} {platform.processor() or ''} "
                   f"({os.cpu_count()} CPUs), jax {jax.__version__}".strip(),
        "num_meta_params": optimizers.num_meta_params(state.meta),
    }


# --------------------------------------------------------------------------------------------
# Command line: ``bilevel lopt train --optimizer velo`` (the options of the fields declared as
# MetaTrainConfig's; ``--slots`` is the number of tasks per outer step).


def config_from_args(args) -> VeLOTrainConfig:
    return from_args(VeLOTrainConfig, args)


def write_outputs(out: Path, state: VeLOTrainState) -> None:
    """The meta-loss log (CSV), its plot (PNG) and the meta-parameters (``.npz``)."""
    import csv
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "meta_loss.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "meta_loss", "skipped", "max_horizon", "horizons"])
        for r in state.history:
            writer.writerow([r["step"], r["meta_loss"], r["skipped"], r["max_horizon"],
                             " ".join(map(str, r["horizons"]))])
    metadata = final_metadata(state)
    optimizers.save_meta_params(out / "meta_params.npz", state.meta, metadata)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    losses = np.asarray([r["meta_loss"] for r in state.history], float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.6, alpha=0.5, label="per step")
    window = min(10, max(1, len(losses) // 5))
    if len(losses) >= window:
        ax.plot(np.arange(window - 1, len(losses)),
                np.convolve(losses, np.ones(window) / window, mode="valid"), lw=1.5,
                label=f"mean of {window}")
    ax.set(xlabel="outer step", ylabel="meta-loss (final / initial loss)",
           title=f"velo_lopt, antithetic ES, population {state.config.population}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "meta_loss.png", dpi=120)
    plt.close(fig)


def run(args, parser) -> int:
    """``bilevel lopt train --optimizer velo``: ES meta-training with a progress bar,
    checkpoints and the run-folder rule of :func:`bilevel.lopt.train.run_meta_training`."""
    return train.run_meta_training(
        args, parser, config_from_args=config_from_args, init=init_velo_train,
        step=velo_train_step, kind=VeLOTrainState, checkpoint_name=CHECKPOINT_NAME,
        write_outputs=write_outputs, final_metadata=final_metadata, label="meta-train velo")
