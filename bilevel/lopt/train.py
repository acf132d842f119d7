"""Meta-training of learned optimizers (``bilevel lopt train``).

Truncated meta-training as in ``learned_optimization`` (Metz et al. 2022): a few task *slots*
each hold an inner training run of a task drawn from :func:`bilevel.lopt.tasks.sample_member`.
Every outer step advances each slot by one truncation of ``unroll`` inner steps under the
current meta-parameters and estimates the meta-gradient of that truncation:

* ``estimator="mixflow"``: :func:`bilevel.unrolled_hypergrad` with ``mode="mixflow"`` through
  the truncation; the meta-loss is the training loss at its last step, on a fresh minibatch
  four times the inner batch. The gradient does not flow into earlier truncations (truncated
  backpropagation).
* ``estimator="pes"``: :func:`bilevel.pes_hypergrad`; the meta-loss is the mean training loss
  over the truncation, and PES's accumulated perturbations make the estimate unbiased over the
  whole inner run (Vicol et al. 2021).

The inner state (parameters and optimizer state) carries over from truncation to truncation
and is reset, with a new task, when the slot reaches its horizon. Horizons are drawn
log-uniformly between ``horizon_start`` and a maximum that grows linearly from
``horizon_start`` to ``horizon`` over the first half of meta-training (a curriculum on unroll
length). Each slot's meta-loss is divided by its task's loss at initialisation, so tasks with
different loss scales give meta-gradients of comparable size (per-task normalisation); the slots'
finite meta-gradients are averaged, clipped by global norm and applied with Adam (AdamW with
``weight_decay > 0``: STAR's decay on the meta-parameters). A slot whose meta-gradient is not
finite or whose normalised loss exceeds ``divergence`` is skipped and reset.

Everything random derives from ``(seed, outer step, slot)``, so a run resumed from a checkpoint
gives the same numbers as one that was never interrupted. :func:`meta_train` is the pure-ish
core (it takes a callback for progress and checkpoints); :func:`add_arguments` / :func:`run` are
the command-line shell.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import pickle
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from bilevel._argtypes import nonnegative_float as _nonnegative_float
from bilevel._argtypes import positive_float as _positive_float
from bilevel._argtypes import positive_int as _positive_int
from bilevel.lopt import optimizers, tasks

PyTree = Any
OPTIMIZERS = ("mlp", "star")
ESTIMATORS = ("mixflow", "pes")
#: The outer minibatch of the mixflow meta-loss is this many inner batches.
OUTER_BATCH_MULTIPLE = 4
CHECKPOINT_NAME = "checkpoint.pkl"


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Hyperparameters of meta-training; checked when constructed.

    Attributes:
      optimizer: ``"mlp"`` (:func:`~bilevel.lopt.mlp_lopt`) or ``"star"``.
      estimator: ``"mixflow"`` or ``"pes"``.
      steps: outer (meta) steps.
      unroll: inner steps per truncation.
      horizon: the longest inner run at the end of the curriculum.
      horizon_start: the shortest inner run, and the curriculum's starting maximum.
      slots: inner runs advanced (and averaged) per outer step.
      learning_rate: outer Adam learning rate.
      clip_norm: global-norm clip of the averaged meta-gradient.
      weight_decay: decoupled weight decay on the meta-parameters (STAR: 0.1-0.5).
      horizon_features: give the optimizer fraction-of-training features (``num_steps`` = the
        slot's horizon).
      nominal_step: STAR's α_nom.
      population: PES population (even).
      sigma: PES perturbation scale.
      divergence: a slot whose normalised meta-loss exceeds this is skipped and reset.
      kinds: the task kinds to draw from (see :data:`bilevel.lopt.tasks.KIND_WEIGHTS`).
      seed: PRNG seed.
      hidden: the optimizer network's hidden widths.
      pool: the number of family configurations drawn (by ``seed``) at the start; slots draw
        their tasks from this pool. Each configuration compiles its own truncation (20-45 s on
        a laptop-class CPU), which dominates short runs; initialisations, data and horizons
        still differ at every reset.
    """

    optimizer: str = "mlp"
    estimator: str = "mixflow"
    steps: int = 200
    unroll: int = 10
    horizon: int = 200
    horizon_start: int = 20
    slots: int = 2
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    horizon_features: bool = False
    nominal_step: float = 1e-3
    population: int = 8
    sigma: float = 0.01
    divergence: float = 10.0
    kinds: tuple[str, ...] = ("mlp", "logistic", "quadratic")
    seed: int = 0
    hidden: tuple[int, ...] = (4, 4)
    pool: int = 8

    def __post_init__(self):
        where = "MetaTrainConfig"
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{where}: optimizer must be one of {OPTIMIZERS}, "
                             f"got {self.optimizer!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"{where}: estimator must be one of {ESTIMATORS}, "
                             f"got {self.estimator!r}")
        for name in ("steps", "unroll", "horizon", "horizon_start", "slots", "population",
                     "pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        if self.population % 2:
            raise ValueError(f"{where}: population must be even, got {self.population}")
        if not self.unroll <= self.horizon_start <= self.horizon:
            raise ValueError(f"{where}: need unroll <= horizon_start <= horizon, got "
                             f"{self.unroll}, {self.horizon_start}, {self.horizon}")
        for name in ("learning_rate", "clip_norm", "sigma", "divergence"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 < value < math.inf:
                raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "nominal_step"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < math.inf:
                raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
        tasks.sample_member(jax.random.key(0), self.kinds)  # validates kinds


# --------------------------------------------------------------------------------------------
# Optimizer construction.


def init_meta(config: MetaTrainConfig, key: jax.Array) -> dict:
    """Fresh meta-parameters for ``config.optimizer``, in JAX's default float dtype (that of
    the tasks' parameters: float64 under ``jax_enable_x64``)."""
    init = optimizers.init_mlp_lopt if config.optimizer == "mlp" else optimizers.init_star_lopt
    return init(key, hidden=config.hidden, horizon_features=config.horizon_features,
                dtype=jnp.result_type(float))


def optimizer_kwargs(config: MetaTrainConfig) -> dict:
    """The keyword arguments (besides ``num_steps``) the trained optimizer is built with."""
    return {"nominal_step": config.nominal_step} if config.optimizer == "star" else {}


def make_optimizer(config: MetaTrainConfig, meta: dict, num_steps: Any
                   ) -> optax.GradientTransformationExtraArgs:
    """The learned optimizer under ``meta``; ``num_steps`` is used with horizon features."""
    num_steps = num_steps if config.horizon_features else None
    if config.optimizer == "mlp":
        return optimizers.mlp_lopt(meta, num_steps)
    return optimizers.star_lopt(meta, num_steps, **optimizer_kwargs(config))


def _continuing(transformation, state):
    """The same update rule whose ``init`` returns ``state``: a truncation that resumes an inner
    run (``unrolled_hypergrad`` initialises the optimizer at the start of its unroll)."""
    return optax.GradientTransformationExtraArgs(lambda params: state, transformation.update)


def outer_optimizer(config: MetaTrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then Adam (AdamW with ``weight_decay > 0``)."""
    if config.weight_decay > 0:
        adam = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    else:
        adam = optax.adam(config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam)


# --------------------------------------------------------------------------------------------
# One truncation of one slot (jitted per task configuration).


class Truncation(NamedTuple):
    grad: PyTree
    inner_state: PyTree  # (params, opt_state), or a PESState
    meta_loss: jax.Array  # normalised
    finite: jax.Array


def _inner_run(config: MetaTrainConfig, task: tasks.Task, meta, inner_state, batches,
               num_steps):
    """Run ``unroll`` steps; returns the new ``(params, opt_state)`` and the losses."""
    return tasks.run_steps(task, make_optimizer(config, meta, num_steps), *inner_state, batches)


def _compiled_for(config: MetaTrainConfig) -> MetaTrainConfig:
    """The config with the fields the compiled functions do not depend on normalised, so that
    runs differing only in length or seed share compilations."""
    return dataclasses.replace(config, steps=1, seed=0)


@functools.lru_cache(maxsize=64)
def _truncation_fn(config: MetaTrainConfig, member: tasks.FamilyMember) -> Callable:
    task = tasks.make_family_task(member)

    def inner_loss(params, meta, batch):
        return task.loss(params, batch)

    def mixflow(meta, inner_state, key, batches, outer_batch, scale, num_steps):
        del key
        params, opt_state = inner_state

        def outer_loss(params, meta, outer_batches):
            per_batch = jax.vmap(task.loss, in_axes=(None, 0))(params, outer_batches)
            return jnp.mean(per_batch) / scale

        grad, info = bilevel.unrolled_hypergrad(
            inner_loss, outer_loss, params, meta,
            optimizer=lambda h: _continuing(make_optimizer(config, h, num_steps), opt_state),
            steps=config.unroll, per_step_args=(batches,), outer_args=(outer_batch,),
            mode="mixflow")
        # unrolled_hypergrad returns θ_T but not the optimizer state: one forward pass more.
        new_state, _ = _inner_run(config, task, jax.lax.stop_gradient(meta), inner_state,
                                  batches, num_steps)
        finite = info.finite & _all_finite(new_state)
        return Truncation(grad, new_state, info.outer_loss, finite)

    def unroll(meta, inner_state, key, batches, scale, num_steps):
        new_state, losses = _inner_run(config, task, meta, inner_state, batches, num_steps)
        return new_state, jnp.mean(losses) / scale

    def pes(meta, pes_state, key, batches, outer_batch, scale, num_steps):
        del outer_batch
        grad, new_state, info = bilevel.pes_hypergrad(unroll, meta, pes_state, key,
                                                      sigma=config.sigma,
                                                      args=(batches, scale, num_steps))
        finite = info.finite & _all_finite(new_state.inner_state)
        return Truncation(grad, new_state, info.loss, finite)

    return jax.jit(mixflow if config.estimator == "mixflow" else pes)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@functools.lru_cache(maxsize=64)
def _slot_init_fn(config: MetaTrainConfig, member: tasks.FamilyMember) -> Callable:
    task = tasks.make_family_task(member)

    def inner_init(key):
        params = task.init(key)
        return params, optimizers.init_state(params)

    if config.estimator == "mixflow":
        return jax.jit(inner_init)
    return jax.jit(lambda meta, key: bilevel.pes_init(inner_init, meta, key, config.population))


# --------------------------------------------------------------------------------------------
# Slots and the meta-training state.


class Slot(NamedTuple):
    """One inner training run."""

    member: tasks.FamilyMember
    inner_state: PyTree  # (params, opt_state) for mixflow; a PESState for PES
    step: int  # inner steps done
    horizon: int
    scale: float  # the task's loss at initialisation
    runs: int  # inner runs started in this slot


class MetaTrainState(NamedTuple):
    """Everything a resumed run needs; pickled (as NumPy) into the checkpoint."""

    config: MetaTrainConfig
    step: int
    meta: dict
    outer_state: PyTree
    slots: tuple[Slot, ...]
    history: tuple[dict, ...]
    seconds: float  # meta-training wall time so far, over all resumptions


def _key(config: MetaTrainConfig, *path: int) -> jax.Array:
    key = jax.random.key(config.seed)
    for p in path:
        key = jax.random.fold_in(key, p)
    return key


def max_horizon(config: MetaTrainConfig, step: int) -> int:
    """The curriculum: linear from ``horizon_start`` to ``horizon`` over the first half."""
    frac = min(1.0, step / max(1.0, config.steps / 2))
    return int(round(config.horizon_start + frac * (config.horizon - config.horizon_start)))


@functools.lru_cache(maxsize=8)
def task_pool(config: MetaTrainConfig) -> tuple[tasks.FamilyMember, ...]:
    """The ``config.pool`` family configurations meta-training draws from (distinct, in order
    of first draw)."""
    pool: list[tasks.FamilyMember] = []
    draw = 0
    while len(pool) < config.pool and draw < 100 * config.pool:
        member = tasks.sample_member(_key(config, 3, draw), config.kinds)
        draw += 1
        if member not in pool:
            pool.append(member)
    return tuple(pool)


def _new_slot(config: MetaTrainConfig, meta: dict, step: int, index: int, runs: int) -> Slot:
    key = _key(config, 1, step, index)
    member_key, horizon_key, init_key = jax.random.split(key, 3)
    pool = task_pool(config)
    member = pool[int(jax.random.randint(member_key, (), 0, len(pool)))]
    high = max_horizon(config, step)
    u = float(jax.random.uniform(horizon_key))
    horizon = config.horizon_start * (high / config.horizon_start) ** u
    horizon = int(math.ceil(horizon / config.unroll) * config.unroll)
    init = _slot_init_fn(_compiled_for(config), member)
    task = tasks.make_family_task(member)
    if config.estimator == "mixflow":
        inner_state = init(init_key)
        scale = float(task.eval_loss(inner_state[0]))
    else:
        inner_state = init(meta, init_key)
        first = jax.tree_util.tree_map(lambda x: x[0], inner_state.inner_state[0])
        scale = float(task.eval_loss(first))
    return Slot(member, inner_state, 0, horizon, max(scale, 1e-8), runs + 1)


def init_meta_train(config: MetaTrainConfig) -> MetaTrainState:
    """Meta-parameters, outer optimizer state and the first inner runs."""
    meta = init_meta(config, _key(config, 0))
    slots = tuple(_new_slot(config, meta, 0, i, 0) for i in range(config.slots))
    return MetaTrainState(config, 0, meta, outer_optimizer(config).init(meta), slots, (), 0.0)


def _batches(config: MetaTrainConfig, slot: Slot, key: jax.Array):
    """The truncation's minibatches and the meta-loss's (``OUTER_BATCH_MULTIPLE`` fresh ones)."""
    task = tasks.make_family_task(slot.member)
    inner_key, outer_key = jax.random.split(key)
    return (task.batches(inner_key, config.unroll),
            task.batches(outer_key, OUTER_BATCH_MULTIPLE))


@functools.lru_cache(maxsize=8)
def _outer_update_fn(config: MetaTrainConfig) -> Callable:
    outer = outer_optimizer(config)

    def apply(meta, outer_state, grad):
        updates, outer_state = outer.update(grad, outer_state, meta)
        return optax.apply_updates(meta, updates), outer_state, optax.tree.norm(grad)

    return jax.jit(apply)


def meta_train_step(state: MetaTrainState) -> tuple[MetaTrainState, dict]:
    """One outer step: a truncation of every slot, the averaged meta-gradient, Adam."""
    config = state.config
    grads, losses, slots, skipped = [], [], [], 0
    for index, slot in enumerate(state.slots):
        key = _key(config, 2, state.step, index)
        batch_key, pes_key = jax.random.split(key)
        batches, outer_batch = _batches(config, slot, batch_key)
        fn = _truncation_fn(_compiled_for(config), slot.member)
        result = fn(state.meta, slot.inner_state, pes_key, batches, outer_batch,
                    jnp.float32(slot.scale), jnp.float32(slot.horizon))
        loss = float(result.meta_loss)
        ok = bool(result.finite) and loss <= config.divergence
        if ok:
            grads.append(result.grad)
            losses.append(loss)
            slot = slot._replace(inner_state=result.inner_state, step=slot.step + config.unroll)
        else:
            skipped += 1
        if not ok or slot.step >= slot.horizon:
            slot = _new_slot(config, state.meta, state.step + 1, index, slot.runs)
        slots.append(slot)
    meta, outer_state, grad_norm = state.meta, state.outer_state, float("nan")
    if grads:
        grad = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        meta, outer_state, norm = _outer_update_fn(_compiled_for(config))(meta, outer_state,
                                                                          grad)
        grad_norm = float(norm)
    record = {"step": state.step + 1,
              "meta_loss": float(np.mean(losses)) if losses else float("nan"),
              "grad_norm": grad_norm, "skipped": skipped,
              "max_horizon": max_horizon(config, state.step)}
    new_state = state._replace(step=state.step + 1, meta=meta, outer_state=outer_state,
                               slots=tuple(slots), history=state.history + (record,))
    return new_state, record


def meta_train(state: MetaTrainState, on_step: Callable[[MetaTrainState, dict], None]
               | None = None, step: Callable | None = None) -> MetaTrainState:
    """Run outer steps until ``state.config.steps``; ``on_step`` sees every new state.

    ``step(state) -> (state, record)`` is :func:`meta_train_step` unless given (the VeLO
    trainer passes its own; any state with ``step``, ``config.steps`` and ``seconds`` works).
    """
    step = meta_train_step if step is None else step
    while state.step < state.config.steps:
        start = time.perf_counter()
        state, record = step(state)
        state = state._replace(seconds=state.seconds + time.perf_counter() - start)
        if on_step is not None:
            on_step(state, record)
    return state


# --------------------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(path: str | os.PathLike, state: NamedTuple) -> None:
    """Pickle ``state`` (arrays as NumPy) to a temporary file, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, jax.device_get(state))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(host, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike, kind: type = MetaTrainState) -> MetaTrainState:
    """Read a checkpoint written by :func:`save_checkpoint` (a file this program wrote) holding
    a ``kind`` (a state with ``meta`` and ``outer_state``)."""
    with open(path, "rb") as f:
        state = pickle.load(f)
    if not isinstance(state, kind):
        raise ValueError(f"lopt.train.load_checkpoint: {path} does not hold a {kind.__name__}")
    return state._replace(meta=jax.tree_util.tree_map(jnp.asarray, state.meta),
                          outer_state=jax.tree_util.tree_map(jnp.asarray, state.outer_state))


def final_metadata(state: MetaTrainState) -> dict:
    """The metadata saved with the meta-parameters: how they were trained."""
    config = state.config
    recent = [r["meta_loss"] for r in state.history[-20:] if math.isfinite(r["meta_loss"])]
    return {
        "optimizer": f"{config.optimizer}_lopt",
        "optimizer_kwargs": optimizer_kwargs(config),
        "horizon_features": config.horizon_features,
        "config": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(config).items()},
        "outer_steps": state.step,
        "meta_training_seconds": round(state.seconds, 1),  # wall clock, compilation included
        "final_meta_loss_last20_mean": float(np.mean(recent)) if recent else None,
        "first_meta_loss": state.history[0]["meta_loss"] if state.history else None,
        "task_pool": [tasks.make_family_task(m).name for m in task_pool(config)],
        "machine": f"{_cpu_model()} ({os.cpu_count()} CPUs), {jax.default_backend()}, "
                   f"jax {jax.__version__}",
        "num_meta_params": optimizers.num_meta_params(state.meta),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bilevel lopt train``."""
    d = MetaTrainConfig()
    parser.add_argument("--optimizer", choices=OPTIMIZERS + ("velo",), default=d.optimizer,
                        help="velo: velo_lopt meta-trained by full-unroll ES "
                             "(bilevel.lopt.velo_train; --slots tasks per step, --population "
                             "and --sigma its ES, --estimator and --unroll unused)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default=d.estimator)
    parser.add_argument("--steps", type=_positive_int, default=d.steps, help="outer steps")
    parser.add_argument("--unroll", type=_positive_int, default=d.unroll,
                        help="inner steps per truncation")
    parser.add_argument("--horizon", type=_positive_int, default=d.horizon,
                        help="longest inner run (end of the curriculum)")
    parser.add_argument("--horizon-start", type=_positive_int, default=d.horizon_start)
    parser.add_argument("--slots", type=_positive_int, default=d.slots,
                        help="inner runs per outer step")
    parser.add_argument("--learning-rate", type=_positive_float, default=d.learning_rate)
    parser.add_argument("--clip-norm", type=_positive_float, default=d.clip_norm)
    parser.add_argument("--weight-decay", type=_nonnegative_float, default=None,
                        help="decay on the meta-parameters (default 0.1 for star, 0 for mlp)")
    parser.add_argument("--horizon-features", action="store_true",
                        help="give the optimizer fraction-of-training (num_steps) inputs")
    parser.add_argument("--population", type=_positive_int, default=d.population,
                        help="PES population (even)")
    parser.add_argument("--sigma", type=_positive_float, default=d.sigma, help="PES sigma")
    parser.add_argument("--kinds", default=",".join(d.kinds),
                        help="task kinds, comma-separated: mlp,logistic,quadratic")
    parser.add_argument("--pool", type=_positive_int, default=d.pool,
                        help="family configurations drawn at the start (each compiles once)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", type=Path, default=Path("lopt_run"),
                        help="directory for the checkpoint, meta-parameters, log and plot")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pkl")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=10)
    parser.add_argument("--data-dir", default=None,
                        help="folder of local dataset files (the family needs none)")










def config_from_args(args: argparse.Namespace) -> MetaTrainConfig:
    weight_decay = args.weight_decay
    if weight_decay is None:
        weight_decay = 0.1 if args.optimizer == "star" else 0.0
    return MetaTrainConfig(
        optimizer=args.optimizer, estimator=args.estimator, steps=args.steps,
        unroll=args.unroll, horizon=args.horizon, horizon_start=args.horizon_start,
        slots=args.slots, learning_rate=args.learning_rate, clip_norm=args.clip_norm,
        weight_decay=weight_decay, horizon_features=args.horizon_features,
        population=args.population, sigma=args.sigma,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), seed=args.seed,
        pool=args.pool)


def write_outputs(out: Path, state: MetaTrainState) -> None:
    """The meta-loss log (CSV), its plot (PNG) and the meta-parameters (``.npz``)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "meta_loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "meta_loss", "grad_norm", "skipped",
                                               "max_horizon"])
        writer.writeheader()
        writer.writerows(state.history)
    optimizers.save_meta_params(out / "meta_params.npz", state.meta, final_metadata(state))
    (out / "metadata.json").write_text(json.dumps(final_metadata(state), indent=2) + "\n")
    plot_meta_loss(out / "meta_loss.png", state)


def plot_meta_loss(path: Path, state: MetaTrainState) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray([r["step"] for r in state.history])
    losses = np.asarray([r["meta_loss"] for r in state.history], float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
    window = min(20, max(1, len(losses) // 5))
    if len(losses) >= window:
        valid = np.where(np.isfinite(losses), losses, np.nan)
        smooth = np.convolve(np.nan_to_num(valid, nan=np.nanmean(valid)),
                             np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    c = state.config
    ax.set(xlabel="outer step", ylabel="meta-loss (loss / initial loss)",
           title=f"{c.optimizer}_lopt, {c.estimator}, unroll {c.unroll}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``bilevel lopt train``: meta-train with a progress bar, checkpoints and resume."""
    if args.optimizer == "velo":
        from bilevel.lopt import velo_train
        return velo_train.run(args, parser)
    return run_meta_training(args, parser, config_from_args=config_from_args,
                             init=init_meta_train, step=meta_train_step, kind=MetaTrainState,
                             checkpoint_name=CHECKPOINT_NAME, write_outputs=write_outputs,
                             final_metadata=final_metadata, label="meta-train")


def run_meta_training(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                      config_from_args: Callable, init: Callable, step: Callable, kind: type,
                      checkpoint_name: str, write_outputs: Callable, final_metadata: Callable,
                      label: str) -> int:
    """The command-line shell of a meta-trainer: options to a config, a fresh or resumed state
    (``--resume`` refuses a checkpoint made with other options), a progress bar, a checkpoint
    every ``--checkpoint-every`` steps and at the end, then the outputs in ``--out``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    out: Path = args.out
    checkpoint = out / checkpoint_name
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    if args.resume:
        if not checkpoint.is_file():
            parser.error(f"--resume: no checkpoint at {checkpoint}")
        state = load_checkpoint(checkpoint, kind)
        if state.config != dataclasses.replace(config, steps=state.config.steps):
            parser.error(f"--resume: the checkpoint at {checkpoint} was made with different "
                         f"options ({state.config})")
        state = state._replace(config=dataclasses.replace(state.config, steps=config.steps))
    else:
        state = init(config)

    columns = (TextColumn(f"[bold]{label}[/]"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TextColumn("{task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task("meta", total=config.steps, completed=state.step, loss="")

        def on_step(state, record):
            progress.update(bar, completed=state.step,
                            loss=f"meta-loss {record['meta_loss']:.4f}")
            if state.step % args.checkpoint_every == 0 or state.step == config.steps:
                save_checkpoint(checkpoint, state)

        state = meta_train(state, on_step, step)
    save_checkpoint(checkpoint, state)
    write_outputs(out, state)
    meta = final_metadata(state)
    print(f"meta-trained {meta['optimizer']} for {state.step} outer steps in "
          f"{state.seconds:.0f} s; meta-loss {meta['first_meta_loss']:.4f} (first) -> "
          f"{meta['final_meta_loss_last20_mean']:.4f} (mean of last 20); "
          f"wrote {out / 'meta_params.npz'}")
    return 0
