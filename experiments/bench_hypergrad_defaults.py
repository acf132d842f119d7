"""What the defaults of ``bilevel.hypergrad`` cost: eager vs jitted, and the stationarity check.

Two figures the README quotes, measured in one run:

* an eager ``bilevel.hypergrad`` on the README's ridge problem against the same call jitted
  (eagerly every call traces and compiles the solver loop again);
* on the digits MLP, a jitted CG(20) hypergradient with the default stationarity check (one
  more inner gradient) against ``stationarity_tol=None``, both with ``on_failure="ignore"``.

Writes ``experiments/results/hypergrad_defaults.md``.

    python experiments/bench_hypergrad_defaults.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
from _common import ROOT, cpu_model, git_commit, positive_int, timed_rounds

import bilevel
import hvp


def eager_against_jit(rounds: int) -> tuple[float, float]:
    problem = bilevel.ridge(jax.random.key(0))
    params = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    solver = hvp.CG(maxiter=20, tol=1e-6)

    def call(p, h, a, b):
        return bilevel.hypergrad(problem.inner_loss, problem.outer_loss, p, h, a, b,
                                 solver=solver)

    args = (params, problem.hparams, problem.inner_args, problem.outer_args)
    jitted = jax.jit(call)
    jax.block_until_ready(jitted(*args))
    jax.block_until_ready(call(*args))
    eager_rounds = max(3, rounds // 3)  # each eager call compiles: seconds
    eager = [0.0] * eager_rounds
    for i in range(eager_rounds):
        start = time.perf_counter()
        jax.block_until_ready(call(*args))
        eager[i] = time.perf_counter() - start
    fast = timed_rounds({"jit": lambda: jitted(*args)}, 20 * rounds, np.random.default_rng(0))
    return float(np.median(eager)), float(np.median(fast["jit"]))


def stationarity_cost(rounds: int) -> float:
    problem = bilevel.make_problem("digits_mlp", jax.random.key(0))
    params = problem.solve_inner(problem.params, problem.hparams, *problem.inner_args)
    args = (params, problem.hparams, problem.inner_args, problem.outer_args)

    def make(tol):
        return jax.jit(lambda p, h, a, b: bilevel.hypergrad(
            problem.inner_loss, problem.outer_loss, p, h, a, b,
            solver=hvp.CG(maxiter=20, tol=0.0), damping=1e-3, on_failure="ignore",
            stationarity_tol=tol))

    calls = {"checked": make(1e-2), "unchecked": make(None)}
    for fn in calls.values():
        jax.block_until_ready(fn(*args))
    times = timed_rounds({k: (lambda f=f: f(*args)) for k, f in calls.items()}, 10 * rounds,
                         np.random.default_rng(1))
    return float(np.median(times["checked"]) / np.median(times["unchecked"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=15, help="rounds (default 15)")
    args = parser.parse_args()
    eager, jitted = eager_against_jit(args.rounds)
    ratio = stationarity_cost(args.rounds)
    commit = git_commit("bilevel", "hvp")
    lines = [
        "# What the defaults of bilevel.hypergrad cost",
        "",
        f"Machine: {cpu_model()}, {jax.devices()[0].platform}, JAX {jax.__version__}, Python "
        f"{platform.python_version()}; commit {commit[0] if commit else '?'}"
        f"{' (uncommitted changes)' if commit and commit[1] else ''}. Medians after a warm-up.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| ridge, CG(20): eager call | {eager * 1e3:.1f} ms |",
        f"| ridge, CG(20): jitted call | {jitted * 1e3:.3f} ms |",
        f"| eager / jitted | {eager / jitted:.0f}x |",
        f"| digits MLP, CG(20): stationarity check on / off | {ratio:.3f}x |",
    ]
    (ROOT / "experiments" / "results" / "hypergrad_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
