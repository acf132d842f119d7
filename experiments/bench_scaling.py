"""Benchmark: data-parallel hypergradients and ES populations against the number of devices.

For n in ``--devices`` (default 1 2 4 8) it runs, on a mesh over the first n devices
(``bilevel.distributed.data_mesh``), with the data batch-sharded and the parameters replicated:

* ``hypergrad``: ``bilevel.hypergrad`` with ``hvp.CG(maxiter=k, tol=0)`` (a fixed k HVPs);
* ``unrolled``: ``bilevel.unrolled_hypergrad(mode="mixflow")`` through T Adam steps;
* ``es``: ``bilevel.distributed.sharded_es_hypergrad``, whose population (each member a short
  SGD run on replicated data) is split over the devices;

each at a fixed global size (strong scaling: batch B, population P) and at a fixed size per
device (weak scaling: batch b·n, population p·n). Per configuration it reports throughput
(examples, or population members, per second) as a ratio to the 1-device run, the
communication read off the compiled program (``bilevel.distributed.collectives``: bytes per
device per call, the CG loop's collectives counted once per HVP), per-device memory from
``memory_analysis()``, and the relative difference to the same computation on one device.

On the CPU the devices are forced (``XLA_FLAGS=--xla_force_host_platform_device_count``) and
all share the machine's cores, so throughput cannot grow with n there: the CPU run shows
correctness, communication volume and per-device memory, not speed. On a machine with several
GPUs (``--platform gpu``) the same script measures real scaling.

Usage::

    python experiments/bench_scaling.py                          # full run (CPU, ~10 min)
    python experiments/bench_scaling.py --smoke --out /tmp/s     # tiny variant (~1 min)
    python experiments/bench_scaling.py --platform gpu           # the GPUs of this machine

Writes ``scaling.md``, ``scaling.csv`` and ``scaling.png`` into ``--out`` (default
``experiments/results/scaling``). All devices counts run in one process, timed in interleaved
rounds (random order per round, ``block_until_ready``, one warm-up call each), and every ratio
is a median of per-round ratios against the 1-device run of the same round.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common  # noqa: E402  (experiments/ is on sys.path when run as a script)
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
import hvp
from bilevel import distributed

PyTree = Any
MiB = 2**20
ENTRIES = ("hypergrad", "unrolled", "es")
SCALINGS = ("strong", "weak")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    layer_sizes: tuple[int, ...]  # MLP input, hidden..., classes
    batch: int  # strong scaling: global batch
    batch_per_device: int  # weak scaling: batch per device
    cg_iters: int  # hypergrad: CG iterations (tol=0, so always this many)
    steps: int  # unrolled: Adam steps
    population: int  # es, strong scaling
    population_per_device: int  # es, weak scaling
    es_steps: int  # es: SGD steps per member
    es_batch: int  # es: examples each member trains on (replicated)
    rounds: int  # timing rounds


FULL = Config(name="full", layer_sizes=(32, 128, 10), batch=4096, batch_per_device=512,
              cg_iters=10, steps=10, population=64, population_per_device=8, es_steps=5,
              es_batch=512, rounds=7)
SMOKE = Config(name="smoke", layer_sizes=(8, 16, 3), batch=64, batch_per_device=16, cg_iters=3,
               steps=2, population=16, population_per_device=4, es_steps=2, es_batch=32,
               rounds=2)


# --------------------------------------------------------------------------------------------
# Pure core: an MLP with one log-L2 strength per layer.


mlp = _common.mlp
cross_entropy = _common.cross_entropy
inner_loss = _common.inner_loss
outer_loss = _common.outer_loss


def make_data(seed: int, sizes: tuple[int, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs, labels from a fixed random linear teacher (host arrays)."""
    teacher = np.random.default_rng(12345).standard_normal((sizes[0], sizes[-1]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    logits = 3.0 * x @ teacher / math.sqrt(sizes[0])
    gumbel = rng.gumbel(size=logits.shape)
    return x, np.argmax(logits + gumbel, axis=1).astype(np.int32)


def initial(sizes: tuple[int, ...]) -> tuple[PyTree, PyTree]:
    params = jax.device_get(_common.init_mlp(jax.random.key(0), sizes))
    hparams = {name: np.float32(math.log(1e-3)) for name in params}
    return params, hparams


def hypergrad_fn(cfg: Config) -> Callable:
    def fun(params, hparams, x, y, x_val, y_val):
        # Damping 1: the untrained MLP's Hessian is indefinite, and CG would stop at the first
        # negative curvature instead of running its k iterations.
        grad, info = bilevel.hypergrad(inner_loss, outer_loss, params, hparams, (x, y),
                                       (x_val, y_val), damping=1.0,
                                       solver=hvp.CG(maxiter=cfg.cg_iters, tol=0.0),
                                       on_failure="ignore", stationarity_tol=None)
        return grad, info.hvp_count

    return fun


def unrolled_fn(cfg: Config) -> Callable:
    def fun(params, hparams, x, y, x_val, y_val):
        grad, _ = bilevel.unrolled_hypergrad(inner_loss, outer_loss, params, hparams,
                                             optax.adam(1e-3), cfg.steps, inner_args=(x, y),
                                             outer_args=(x_val, y_val), mode="mixflow",
                                             on_failure="ignore")
        return grad, jnp.int32(0)

    return fun


def es_meta_loss(cfg: Config) -> Callable:
    def meta_loss(hparams, params, x, y, x_val, y_val):
        def step(p, _):
            return jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p,
                                          jax.grad(inner_loss)(p, hparams, x, y)), None

        final, _ = jax.lax.scan(step, params, None, length=cfg.es_steps)
        return outer_loss(final, hparams, x_val, y_val)

    return meta_loss


def es_fn(cfg: Config, population: int, mesh: jax.sharding.Mesh | None) -> Callable:
    meta_loss = es_meta_loss(cfg)

    def fun(params, hparams, x, y, x_val, y_val):
        args, key = (params, x, y, x_val, y_val), jax.random.key(7)
        if mesh is None:
            grad, _ = bilevel.es_hypergrad(meta_loss, hparams, key, population, 0.01, args,
                                           on_failure="ignore")
        else:
            grad, _ = distributed.sharded_es_hypergrad(meta_loss, hparams, key, population,
                                                       0.01, args, mesh=mesh)
        return grad, jnp.int32(0)

    return fun


# --------------------------------------------------------------------------------------------
# One configuration: placement, compilation, communication, memory, agreement.


def relative_difference(a: PyTree, b: PyTree) -> float:
    flat = [(np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel())
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                            strict=True)]
    diff = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in flat))
    return diff / max(math.sqrt(sum(float(np.sum(y**2)) for _, y in flat)), 1e-30)


def runs(collective: distributed.Collective, loop_iterations: int) -> int:
    """Executions per call; a loop that stops on a condition (the CG solve) runs
    ``loop_iterations`` times."""
    return collective.trips if collective.trips is not None else loop_iterations


def wire_fraction(op: str, n: int) -> float:
    """Bytes a device sends per result byte under the usual ring algorithms: all-reduce
    ``2(n−1)/n``, all-gather and reduce-scatter ``(n−1)/n``, a permute 1 (0 on one device)."""
    if n == 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(op, (n - 1) / n)


def prepare(cfg: Config, entry: str, scaling: str, n: int, devices: list) -> dict[str, Any]:
    mesh = distributed.data_mesh(devices[:n])
    params, hparams = initial(cfg.layer_sizes)
    if entry == "es":
        size = cfg.population if scaling == "strong" else cfg.population_per_device * n
        batch = cfg.es_batch
        sharded_fun, single_fun = es_fn(cfg, size, mesh), es_fn(cfg, size, None)
    else:
        size = batch = cfg.batch if scaling == "strong" else cfg.batch_per_device * n
        make = hypergrad_fn if entry == "hypergrad" else unrolled_fn
        sharded_fun = single_fun = make(cfg)
    data = (*make_data(1, cfg.layer_sizes, batch), *make_data(2, cfg.layer_sizes, batch))
    place = distributed.replicate if entry == "es" else distributed.shard_batch
    args = (*distributed.replicate((params, hparams), mesh), *place(data, mesh))
    start = time.perf_counter()
    compiled = jax.jit(sharded_fun).lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    grad, loop_iterations = jax.block_until_ready(compiled(*args))
    reference = jax.jit(single_fun)(*jax.device_put((params, hparams, *data), devices[0]))[0]
    found = distributed.collectives(compiled)
    return dict(
        entry=entry, scaling=scaling, devices=n, size=size,
        size_per_device=size // n, unit="members" if entry == "es" else "examples",
        call=lambda: compiled(*args), compile_s=compile_s,
        rel_diff_vs_1_device=relative_difference(grad, reference),
        all_reduces=sum(c.op == "all-reduce" for c in found),
        all_gathers=sum(c.op == "all-gather" for c in found),
        other_collectives=sum(c.op not in ("all-reduce", "all-gather") for c in found),
        bytes_per_pass=sum(c.nbytes for c in found),
        bytes_per_call=sum(c.nbytes * runs(c, int(loop_iterations)) for c in found),
        wire_bytes_per_call=round(sum(wire_fraction(c.op, n) * c.nbytes
                                      * runs(c, int(loop_iterations)) for c in found)),
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes))


def es_float64_agreement(cfg: Config, devices: list, n: int) -> float:
    """ES on ``n`` devices vs one, in float64: the float32 estimate divides loss differences by
    ``2σ``, so float32 round-off in single losses shows in it; float64 shows the sharding."""
    jax.config.update("jax_enable_x64", True)
    try:
        def wide(tree):
            return jax.tree_util.tree_map(
                lambda a: np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else a,
                tree)

        params, hparams = wide(initial(cfg.layer_sizes))
        data = wide((*make_data(1, cfg.layer_sizes, cfg.es_batch),
                     *make_data(2, cfg.layer_sizes, cfg.es_batch)))
        mesh = distributed.data_mesh(devices[:n])
        sharded = jax.jit(es_fn(cfg, cfg.population, mesh))(
            *distributed.replicate((params, hparams, *data), mesh))[0]
        single = jax.jit(es_fn(cfg, cfg.population, None))(
            *jax.device_put((params, hparams, *data), devices[0]))[0]
        return relative_difference(sharded, single)
    finally:
        jax.config.update("jax_enable_x64", False)


def time_rounds(group: list[dict[str, Any]], rounds: int, rng: np.random.Generator) -> None:
    """Warm-up, then ``rounds`` rounds calling every configuration once in a random order;
    stores per-round times and the median ratios to the 1-device configuration."""
    for row in group:
        jax.block_until_ready(row["call"]())
        row["times"] = np.empty(rounds)
    for r in range(rounds):
        for i in rng.permutation(len(group)):
            start = time.perf_counter()
            jax.block_until_ready(group[i]["call"]())
            group[i]["times"][r] = time.perf_counter() - start
    base = next(row for row in group if row["devices"] == min(g["devices"] for g in group))
    for row in group:
        row["median_s"] = float(np.median(row["times"]))
        row["throughput"] = row["size"] / row["median_s"]
        # Per-round ratio of throughputs, (size / t) / (size_1 / t_1).
        ratios = (row["size"] / row["times"]) / (base["size"] / base["times"])
        row["throughput_ratio"] = float(np.median(ratios))
        row["ideal_ratio"] = row["devices"] / base["devices"]


# --------------------------------------------------------------------------------------------
# Thin shell: tables, files, plot.


def machine(load_before: tuple[float, ...], devices: list) -> dict[str, str]:
    found = _common.git_commit("bilevel", "hvp")
    commit = ("unknown" if found is None else
              found[0] + (" with uncommitted changes in bilevel/ or hvp/" if found[1] else
                          " (clean)"))
    return {"platform": platform.platform(), "CPU": _common.cpu_model(),
            "cores": str(os.cpu_count()), "Python": platform.python_version(),
            "JAX": f"{jax.__version__} (jaxlib {jax.lib.__version__}), optax {optax.__version__}",
            "devices": f"{jax.default_backend()}: {devices[0].device_kind} x{len(devices)}"
                       + (" (forced host devices sharing the cores above)"
                          if jax.default_backend() == "cpu" else ""),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "library at commit": commit,
            "load average (1 min) before / after":
                f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
            "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")}


COLUMNS = [("entry", "entry"), ("scaling", "scaling"), ("devices", "n"),
           ("size", "global size"), ("size_per_device", "per device"),
           ("throughput", "throughput /s"), ("throughput_ratio", "throughput vs n=1"),
           ("ideal_ratio", "ideal"), ("median_s", "median s"),
           ("all_reduces", "all-reduce ops"), ("all_gathers", "all-gather ops"),
           ("other_collectives", "other collective ops"),
           ("bytes_per_call", "collective bytes/call"),
           ("wire_bytes_per_call", "sent bytes/call/device (ring)"),
           ("argument_bytes", "args MiB/device"), ("temp_bytes", "temp MiB/device"),
           ("rel_diff_vs_1_device", "rel. diff vs 1 device")]


def cell(key: str, value: Any) -> str:
    if key in ("argument_bytes", "temp_bytes"):
        return f"{value / MiB:.3f}"
    if key in ("throughput_ratio", "ideal_ratio"):
        return f"{value:.2f}x"
    if key == "throughput":
        return f"{value:,.0f}"
    if key == "median_s":
        return f"{value:.4f}"
    if key == "rel_diff_vs_1_device":
        return f"{value:.1e}"
    if key in ("bytes_per_call", "wire_bytes_per_call"):
        return f"{value:,}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(key, row[key]) for key, _ in COLUMNS) + " |"
              for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = [key for key, _ in COLUMNS] + ["unit", "bytes_per_pass", "output_bytes",
                                            "compile_s"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, comm, memory) = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"hypergrad": "tab:blue", "unrolled": "tab:orange", "es": "tab:green"}
    counts = sorted({r["devices"] for r in rows})
    for entry in ENTRIES:
        for scaling, style in (("strong", "-o"), ("weak", "--s")):
            mine = [r for r in rows if r["entry"] == entry and r["scaling"] == scaling]
            if not mine:
                continue
            n = [r["devices"] for r in mine]
            label = f"{entry}, {scaling}"
            speed.plot(n, [r["throughput_ratio"] for r in mine], style, color=colors[entry],
                       label=label)
            several = [r for r in mine if r["devices"] > 1]  # one device sends nothing
            comm.plot([r["devices"] for r in several],
                      [r["wire_bytes_per_call"] for r in several], style, color=colors[entry],
                      label=label)
            memory.plot(n, [(r["argument_bytes"] + r["temp_bytes"]) / MiB for r in mine], style,
                        color=colors[entry], label=label)
    speed.plot(counts, [c / counts[0] for c in counts], ":", color="0.4", label="ideal")
    if jax.default_backend() == "cpu":
        speed.axhline(os.cpu_count() or 1, color="tab:red", ls="--", lw=1,
                      label=f"{os.cpu_count()} cores: the most forced devices can give")
    for axis, label in ((speed, "throughput vs 1 device"),
                        (comm, "bytes sent per call per device (ring estimate)"),
                        (memory, "arguments + temp MiB per device")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set_xlabel("devices")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=7)
    speed.set_title("throughput (forced CPU devices share the cores)"
                    if jax.default_backend() == "cpu" else "throughput")
    comm.set_title("communication read off the compiled HLO")
    memory.set_title("per-device memory (memory_analysis)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def findings(rows: list[dict[str, Any]], es_float64: float | None) -> str:
    gathers = sum(r["all_gathers"] for r in rows if r["entry"] != "es")
    lines = []
    for name, mine in (("hypergrad and unrolled", [r for r in rows if r["entry"] != "es"]),
                       ("es", [r for r in rows if r["entry"] == "es"])):
        if mine:
            worst = max(r["rel_diff_vs_1_device"] for r in mine)
            lines.append(f"- {name}: largest relative difference between a sharded result and "
                         f"the same computation on one device, float32: {worst:.1e}.")
    if es_float64 is not None:
        verdict = ("so the float32 differences of es are round-off in single losses amplified "
                   "by the estimator, which divides loss differences by 2σ = 0.02 (different "
                   "per-device population sizes change how XLA vectorises the members, hence "
                   "the last bits of each loss), not an error of the sharding"
                   if es_float64 < 1e-9 else
                   "which is NOT at float64 round-off: the sharded estimate differs")
        lines.append(f"- es in float64, strong scaling, {max(r['devices'] for r in rows)} "
                     f"devices vs one: {es_float64:.1e}, {verdict}.")
    ratios = [r["throughput_ratio"] for r in rows if r["devices"] > 1]
    if jax.default_backend() == "cpu" and ratios:
        lines.append(f"- Throughput vs one device at n > 1: {min(ratios):.2f}x to "
                     f"{max(ratios):.2f}x, against an ideal of n: forced CPU devices share "
                     f"{os.cpu_count()} cores (here with other jobs), so at most about "
                     f"{os.cpu_count()}x is possible whatever n; these ratios say nothing "
                     f"about real devices.")
    if any(r["entry"] != "es" for r in rows):
        lines.append(f"- All-gather instructions in the data-parallel programs (hypergrad, "
                     f"unrolled) over all device counts: {gathers}.")
    for entry in ENTRIES:
        strong = [r for r in rows if r["entry"] == entry and r["scaling"] == "strong"]
        volumes = [r["wire_bytes_per_call"] for r in strong if r["devices"] > 1]
        if volumes:
            what = ("parameter-sized all-reduces (gradients, HVPs, cross products), "
                    "independent of the batch" if entry != "es" else
                    "the population's losses only")
            lines.append(f"- {entry}: bytes each device sends per call at n > 1 (strong "
                         f"scaling): {', '.join(f'{v:,}' for v in volumes)}; {what}.")
    return "\n".join(lines)


def report(cfg: Config, rows: list[dict[str, Any]], info: dict[str, str], seconds: float,
           n_params: int, es_float64: float | None) -> str:
    command = "python experiments/bench_scaling.py " + " ".join(sys.argv[1:])
    cpu_note = ("**On the CPU these devices are forced host devices that share the machine's "
                f"{info['cores']} cores**, so a mesh of n of them has the compute of at most "
                f"{info['cores']} cores whatever n (one device's program already uses some of "
                "them), and other jobs on the machine add noise: the throughput column says "
                "nothing about real devices. What this run establishes "
                "is correctness (the rel. diff column), the communication volume (read off the "
                "compiled programs) and the per-device memory. Run with `--platform gpu` on a "
                "machine with several GPUs for real scaling numbers."
                if jax.default_backend() == "cpu" else "")
    machine_rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    return f"""# Scaling over devices: data-parallel hypergradients and ES populations ({cfg.name})

Generated by `{command.strip()}` in {seconds:.0f} s. Numbers are from this run.

{cpu_note}

## Machine

|  |  |
|---|---|
{machine_rows}

## Setup

GELU MLP {' → '.join(map(str, cfg.layer_sizes))} ({n_params:,} float32 parameters), one log-L2
strength per layer as hyperparameters, synthetic data from a random linear teacher.
Data are batch-sharded over a mesh of the first n devices
(`bilevel.distributed.shard_batch`), parameters and hyperparameters replicated
(`bilevel.distributed.replicate`); the functions are the library's own, under `jax.jit`.

- `hypergrad`: `bilevel.hypergrad(..., solver=hvp.CG(maxiter={cfg.cg_iters}, tol=0),
  damping=1.0)` at the initial parameters (the damping keeps CG from stopping at negative
  curvature, so every call does the same {cfg.cg_iters} iterations); throughput in training
  examples per second (the validation batch has the same size).
- `unrolled`: `bilevel.unrolled_hypergrad(..., optax.adam(1e-3), steps={cfg.steps},
  mode="mixflow")`, full batch at every step; examples per second.
- `es`: `bilevel.distributed.sharded_es_hypergrad` (antithetic, σ = 0.01), each member
  {cfg.es_steps} SGD steps on {cfg.es_batch} replicated examples; population members per
  second.
- Strong scaling: global batch {cfg.batch} (population {cfg.population}); weak scaling:
  {cfg.batch_per_device} examples ({cfg.population_per_device} members) per device.
- Communication: `bilevel.distributed.collectives(compiled)`: "collective bytes" is each
  collective's result bytes times its runs per call (scan trip counts from the HLO; the CG
  loop's once per HVP); "sent bytes" converts them to what one device sends under ring
  algorithms (all-reduce 2(n−1)/n, all-gather (n−1)/n of the result; 0 on one device, where
  XLA keeps some collectives over a group of one).
- Memory: `compiled.memory_analysis()` of the partitioned program, i.e. per device.
- Time: {cfg.rounds} interleaved rounds after a warm-up; ratios are medians of per-round
  ratios to the 1-device run.

## Results

{table(rows)}

## What this shows

{findings(rows, es_float64)}

![throughput, communication, memory against devices](scaling.png)
"""


# --------------------------------------------------------------------------------------------
# main


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/scaling"),
                        help="folder for scaling.{md,csv,png}")
    parser.add_argument("--devices", type=_common.positive_int, nargs="+", default=None,
                        help="device counts (default 1 2 4 8; smoke: 1 2)")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: forced host devices; gpu: this machine's GPUs")
    parser.add_argument("--entries", choices=ENTRIES, nargs="+", default=list(ENTRIES))
    parser.add_argument("--rounds", type=_common.positive_int, default=None,
                        help=f"timing rounds (default {FULL.rounds})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the timing order")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (about a minute)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start, load_before = time.perf_counter(), os.getloadavg()
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    cfg = dataclasses.replace(cfg, rounds=args.rounds or cfg.rounds)
    counts = sorted(set(args.devices or ((1, 2) if args.smoke else (1, 2, 4, 8))))
    if args.platform == "cpu":
        # Read when the backend starts, which has not happened yet in this process.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={max(counts)}").strip()
        jax.config.update("jax_platforms", "cpu")
    devices = jax.devices()
    if len(devices) < max(counts):
        print(f"bench_scaling: --devices asks for {max(counts)} devices, the "
              f"{jax.default_backend()} backend has {len(devices)}", file=sys.stderr)
        return 2
    batches = [cfg.batch] + [cfg.batch_per_device * n for n in counts]
    populations = [cfg.population] + [cfg.population_per_device * n for n in counts]
    if any(b % n for b in batches for n in counts) or any(p % n for p in populations
                                                            for n in counts):
        print(f"bench_scaling: batch {cfg.batch} and population {cfg.population} must be "
              f"divisible by every device count {counts}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(initial(cfg.layer_sizes)[0]))
    print(f"bench_scaling ({cfg.name}): devices {counts} of {len(devices)} "
          f"{jax.default_backend()} devices, MLP {cfg.layer_sizes} ({n_params:,} params)",
          flush=True)
    rows = []
    for entry in args.entries:
        for scaling in SCALINGS:
            group = []
            for n in counts:
                row = prepare(cfg, entry, scaling, n, devices)
                print(f"  {entry:9s} {scaling:6s} n={n}: compiled in {row['compile_s']:.1f} s, "
                      f"rel. diff {row['rel_diff_vs_1_device']:.1e}", flush=True)
                group.append(row)
            time_rounds(group, cfg.rounds, rng)
            rows += group
    es_float64 = (es_float64_agreement(cfg, devices, max(counts)) if "es" in args.entries
                  else None)
    print("\n" + table(rows) + "\n\n" + findings(rows, es_float64) + "\n", flush=True)
    info = machine(load_before, devices[:max(counts)])
    seconds = time.perf_counter() - start
    title = (f"bench_scaling ({cfg.name}): {info['devices']}, {info['CPU']}, "
             f"JAX {jax.__version__}")
    plot(args.out / "scaling.png", rows, title)
    write_csv(args.out / "scaling.csv", rows)
    (args.out / "scaling.md").write_text(report(cfg, rows, info, seconds, n_params,
                                                es_float64))
    print(f"wrote {args.out}/scaling.md, .csv, .png in {time.perf_counter() - start:.1f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
