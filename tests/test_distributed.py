"""bilevel.distributed: data parallelism on 8 forced CPU devices and across 2 processes.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the multi-device
checks run in processes of their own: ``tests/distributed_checks.py`` (8 devices, one process;
each public entry point sharded vs. on one device, and the collectives of the compiled
programs) and ``tests/distributed_multihost.py`` (2 processes of 4 devices joined by
``jax.distributed``). This file runs them and checks what needs no extra devices.
"""

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bilevel import distributed

TESTS = Path(__file__).resolve().parent
CHECKS = 16  # tests in distributed_checks.py, parametrisations included


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


@pytest.mark.slow  # 24 s in a subprocess; the two-process agreement test stays
def test_eight_device_checks_pass():
    command = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-q",
               "-rfEs", str(TESTS / "distributed_checks.py")]
    run = subprocess.run(command, env=_env(8), cwd=TESTS.parent, capture_output=True,
                         text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    assert re.search(rf"\b{CHECKS} passed\b", summary), summary
    assert not re.search(r"failed|error|skipped", summary), summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one_device():
    port = _free_port()
    script = str(TESTS / "distributed_multihost.py")
    processes = [subprocess.Popen([sys.executable, script, str(i), "2", str(port)],
                                  env=_env(4), cwd=TESTS.parent, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, (out + err)[-4000:]
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert result["started"] and result["processes"] == 2
    assert (result["devices"], result["local_devices"], result["global_batch"]) == (8, 4, 64)
    assert result["in_process_order"]
    for key in ("log_l2", "offset"):  # float32, partial sums in another order: 1e-5
        np.testing.assert_allclose(result["sharded"][key], result["single"][key], rtol=1e-5,
                                   atol=1e-6)


# --------------------------------------------------------------------------------------------
# What one device can check.


def test_initialize_is_a_noop_on_one_process(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert distributed.initialize() is False
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_one_device_mesh_takes_any_batch():
    mesh = distributed.data_mesh()
    assert mesh.shape == {"batch": jax.device_count()} == {"batch": 1}
    x = distributed.shard_batch(np.arange(7.0), mesh)
    np.testing.assert_array_equal(np.asarray(x), np.arange(7.0))


def test_data_mesh_refuses_bad_input():
    with pytest.raises(TypeError, match="data_mesh: axis_name must be a non-empty string"):
        distributed.data_mesh(axis_name="")
    with pytest.raises(ValueError, match="data_mesh: devices is empty"):
        distributed.data_mesh([])


FRAGMENT = """
  %all-reduce.9 = (f32[5]{0}, f32[]) all-reduce(%bitcast.5, %fusion), channel_id=2, to_apply=%add
  %ag = bf16[64,3]{1,0} all-gather-start(%p), dimensions={0}
  %x = pred[] all-reduce(%y), to_apply=%or
  %not_a_collective = f32[4]{0} add(%a, %b)
"""

MODULE = """HloModule m, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %s = f32[] add(%x, %y)
}

%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %r = f32[4]{0} all-reduce(%v), channel_id=3, to_apply=%add
}

%outer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %w = (s32[], f32[4]) while(%t), body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %g = f32[2,4]{1,0} all-gather(%v), dimensions={0}
}

%solve_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %r2 = f32[4]{0} all-reduce(%v), channel_id=4, to_apply=%add
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %r0 = f32[] all-reduce(%a), channel_id=1, to_apply=%add
  %w1 = (s32[], f32[4]) while(%t), body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %w2 = (s32[], f32[4]) while(%t), condition=%cond, body=%solve_body
}
"""


def test_collectives_reads_ops_shapes_and_bytes():
    found = distributed.collectives(FRAGMENT)
    assert [(c.op, c.shapes, c.dtypes, c.nbytes) for c in found] == [
        ("all-reduce", ((5,), ()), ("f32", "f32"), 24),
        ("all-gather", ((64, 3),), ("bf16",), 384),
        ("all-reduce", ((),), ("pred",), 1)]
    assert {(c.loop_depth, c.trips) for c in found} == {(0, 1)}


def test_collectives_counts_runs_through_nested_loops():
    found = [(c.op, c.nbytes, c.loop_depth, c.trips) for c in distributed.collectives(MODULE)]
    assert found == [("all-reduce", 16, 2, 15),  # 3 trips inside 5 trips
                     ("all-gather", 32, 1, 5),
                     ("all-reduce", 16, 1, None),  # a loop without a known trip count
                     ("all-reduce", 4, 0, 1)]


def test_collectives_of_a_one_device_program_is_empty():
    compiled = jax.jit(lambda x: x.sum()).lower(np.ones(4)).compile()
    assert distributed.collectives(compiled) == []


# --------------------------------------------------------------------------------------------
# The benchmark script.

BENCH = TESTS.parent / "experiments" / "bench_scaling.py"


def test_bench_scaling_refuses_bad_arguments_in_one_line():
    run = subprocess.run([sys.executable, str(BENCH), "--devices", "0"], capture_output=True,
                         text=True, timeout=120, env=_env(1))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "--devices" in run.stderr, run.stderr


@pytest.mark.slow
def test_bench_scaling_smoke(tmp_path):
    command = [sys.executable, str(BENCH), "--smoke", "--entries", "hypergrad", "es",
               "--rounds", "1", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(1))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert {p.name for p in tmp_path.iterdir()} == {"scaling.md", "scaling.csv", "scaling.png"}
    with (tmp_path / "scaling.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["entry"], r["scaling"], r["devices"]) for r in rows} == {
        (e, s, n) for e in ("hypergrad", "es") for s in ("strong", "weak") for n in ("1", "2")}
    assert all(float(r["rel_diff_vs_1_device"]) < 1e-5 for r in rows), rows
    sharded = [r for r in rows if r["entry"] == "hypergrad" and r["devices"] == "2"]
    assert all(r["all_gathers"] == "0" and int(r["all_reduces"]) > 0 for r in sharded), sharded
