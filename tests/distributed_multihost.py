"""One process of a two-process data-parallel job on the CPU, for ``tests/test_distributed.py``.

Usage: ``python tests/distributed_multihost.py PROCESS_ID NUM_PROCESSES PORT``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``. Each process loads only its own half of
the batch, joins the job through ``bilevel.distributed.initialize``, stitches the halves into
global arrays with ``global_batch`` and computes ``bilevel.hypergrad`` over all the processes'
devices; process 0 also computes it on one local device from the whole batch and prints both
results as JSON.
"""

import json
import sys

import jax
import numpy as np
from distributed_checks import HPARAMS, PARAMS, TRAIN, VALID, inner_loss, outer_loss
from jax.experimental import multihost_utils

import bilevel
import hvp
from bilevel import distributed


def main(process_id: int, num_processes: int, port: int) -> None:
    started = distributed.initialize(f"localhost:{port}", num_processes, process_id,
                                     initialization_timeout=60)

    def fun(params, hparams, inner_args, outer_args):
        return bilevel.hypergrad(inner_loss, outer_loss, params, hparams, inner_args,
                                 outer_args, solver=hvp.CG(maxiter=30, tol=1e-6),
                                 stationarity_tol=None)[0]  # PARAMS is not a minimiser

    mesh = distributed.data_mesh()
    mine = lambda a: a[process_id * len(a) // num_processes:][:len(a) // num_processes]  # noqa: E731
    inner = distributed.global_batch(tuple(mine(a) for a in TRAIN), mesh, name="inner_args")
    outer = distributed.global_batch(tuple(mine(a) for a in VALID), mesh, name="outer_args")
    grad = jax.jit(fun)(*distributed.replicate((PARAMS, HPARAMS), mesh), inner, outer)
    # The global batch holds the processes' parts in process order.
    gathered = multihost_utils.process_allgather(inner[0], tiled=True)
    result = {"started": started, "processes": jax.process_count(),
              "devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "global_batch": int(inner[0].shape[0]),
              "in_process_order": bool(np.array_equal(gathered, TRAIN[0])),
              "sharded": jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), grad)}
    if process_id == 0:
        local = jax.local_devices()[0]
        single = jax.jit(fun)(*jax.device_put((PARAMS, HPARAMS, TRAIN, VALID), local))
        result["single"] = jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), single)
        print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
