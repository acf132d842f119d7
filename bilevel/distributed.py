"""Data parallelism over devices and hosts on JAX's own SPMD engine (``jax.sharding``).

Nothing here is a runtime of its own. The hypergradient functions are unchanged; what changes is
where their inputs live. Place the batch axis of the data sharded over a one-axis mesh and the
parameters replicated, call the function under ``jax.jit``, and XLA's SPMD partitioner (GSPMD)
computes each device's share of the batch and inserts the all-reduces that sum the per-device
gradients, Hessian-vector products and cross products; the batch itself never moves::

    mesh = distributed.data_mesh()                                  # all (global) devices
    params, hparams = distributed.replicate((params, hparams), mesh)
    inner_args = distributed.shard_batch((x, y), mesh, name="inner_args")
    g, info = jax.jit(lambda p, h, a: bilevel.hypergrad(inner, outer, p, h, a, ...))(
        params, hparams, inner_args)

This holds for :func:`hvp.hvp`, :func:`hvp.solve` on :func:`hvp.hessian`,
:func:`bilevel.hypergrad` and :func:`bilevel.unrolled_hypergrad` (both modes; per-step
minibatches are sharded on axis 1 since axis 0 is the step). The losses must reduce over the
batch with ``mean``/``sum`` (the usual case): a loss that mixes examples (a sort or a reshape
across the batch) makes XLA gather the batch, and random minibatches
(``HessianOperator.subsample``, used by LiSSA) are assembled by moving the chosen examples
between devices. :func:`collectives` shows what a compiled program communicates.

Zeroth-order estimators shard their population instead: :func:`sharded_es_hypergrad` and
:func:`sharded_pes_hypergrad` give the estimates of :func:`bilevel.es_hypergrad` and
:func:`bilevel.pes_hypergrad` for the same key, with each device evaluating its share of the
population (``jax.shard_map``), PES particles' states staying on their devices, and only the
population's losses and one hparams-sized sum crossing devices.

Several hosts: call :func:`initialize` first in every process, build the mesh over the global
devices, and turn each process's own slice of the data into one global array with
:func:`global_batch`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bilevel import es
from hvp import checks as _checks

PyTree = Any

__all__ = [
    "Collective",
    "collectives",
    "data_mesh",
    "global_batch",
    "initialize",
    "replicate",
    "shard_batch",
    "shard_pes_state",
    "sharded_es_hypergrad",
    "sharded_pes_hypergrad",
]


# --------------------------------------------------------------------------------------------
# Start-up and the mesh.


def _cluster_processes() -> int:
    """How many processes a cluster scheduler JAX knows (SLURM, Open MPI, ...) launched; 1 if
    none is detected. Uses JAX's own detection, the one ``jax.distributed.initialize()`` runs."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # the detection moved: rely on explicit arguments or the variable
        return 1
    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            try:
                return int(env.get_process_count())
            except Exception:  # a half-configured scheduler: let jax.distributed decide
                return 2
    return 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               **kwargs: Any) -> bool:
    """Join a multi-host JAX job through ``jax.distributed.initialize``; a no-op on one process.

    Call it in every process before any other JAX call. With no arguments it starts the
    distributed runtime only where there is one to join: ``JAX_COORDINATOR_ADDRESS`` is set, or
    a scheduler JAX detects (SLURM, Open MPI, MPICH, Kubernetes, Cloud TPU) launched more than
    one process, whose variables then supply the address, process count and id. Otherwise, on a
    single process, it does nothing, so one script runs unchanged on a laptop and on a cluster.
    Calling it again after the runtime started does nothing either.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable from every process.
      num_processes: the number of processes in the job.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local devices this process drives (default: all it sees).
      **kwargs: passed to ``jax.distributed.initialize`` (``initialization_timeout``, ...).

    Returns:
      True if the distributed runtime is running (started now or before), False if this is a
      single-process run and nothing was started.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = any(a is not None for a in (coordinator_address, num_processes, process_id,
                                           local_device_ids)) or bool(kwargs)
    if not explicit and not os.environ.get("JAX_COORDINATOR_ADDRESS") and (
            _cluster_processes() <= 1):
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids, **kwargs)
    return True


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = "batch") -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process) for data
    parallelism.

    The axis is of ``jax.sharding.AxisType.Auto``, so inside ``jax.jit`` the partitioner chooses
    the layout of intermediates (GSPMD) and the library's functions need no annotations.

    Args:
      devices: the devices, in mesh order; ``None`` means ``jax.devices()``, which after
        :func:`initialize` lists all hosts' devices, ordered by ``jax.make_mesh`` for the
        interconnect.
      axis_name: the mesh axis name the batch is sharded over.

    Returns:
      a :class:`jax.sharding.Mesh` of shape ``(len(devices),)``.
    """
    where = "bilevel.distributed.data_mesh"
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"{where}: axis_name must be a non-empty string, got {axis_name!r}")
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError(f"{where}: devices is empty; expected at least one device")
    if len(set(devices)) != len(devices):
        raise ValueError(f"{where}: devices lists a device more than once: {devices}")
    return jax.make_mesh((len(devices),), (axis_name,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


# --------------------------------------------------------------------------------------------
# Placing data.


def _check_mesh(where: str, mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh (from "
                        f"bilevel.distributed.data_mesh), got {type(mesh).__name__}")


def _batch_spec(mesh: Mesh, axis: int) -> P:
    """Axis ``axis`` split over every mesh axis, the others replicated.

    No trailing ``None``s: ``P("batch", None)`` and the ``P("batch")`` that jit gives its
    outputs are the same layout but not equal objects, and jit would compile again for it.
    """
    return P(*([None] * axis), tuple(mesh.axis_names))


def _check_axis(where: str, axis: Any) -> None:
    if not isinstance(axis, int | np.integer) or isinstance(axis, bool) or axis < 0:
        raise ValueError(f"{where}: axis must be an integer >= 0 (0 for inner_args and "
                         f"outer_args, 1 for per_step_args), got {axis!r}")


def _check_batch_leaf(where: str, name: str, path: str, shape: tuple, axis: int,
                      parts: int, what: str) -> None:
    if len(shape) <= axis:
        raise ValueError(f"{where}: {name} leaf {path} has shape {shape}, which has no batch "
                         f"axis {axis}; place arrays without a batch axis with "
                         f"bilevel.distributed.replicate")
    if shape[axis] % parts:
        raise ValueError(f"{where}: {name} leaf {path} has batch size {shape[axis]} on axis "
                         f"{axis}, not divisible by the {parts} {what}; use a batch size that "
                         f"is a multiple of {parts}")


def shard_batch(tree: PyTree, mesh: Mesh, axis: int = 0, name: str = "tree") -> PyTree:
    """Place every leaf of ``tree`` with its batch axis split evenly over the mesh's devices.

    Device ``i`` holds examples ``[i·B/n, (i+1)·B/n)`` of each leaf (``NamedSharding(mesh,
    P(..., "batch", ...))``). Use ``axis=0`` for ``inner_args`` / ``outer_args`` and ``axis=1``
    for ``per_step_args`` (whose axis 0 is the step). On several hosts every process must pass
    the same global array; to start from each process's own data use :func:`global_batch`.

    Args:
      tree: a pytree of arrays, each with a batch axis ``axis`` of the same size ``B``.
      mesh: the mesh, e.g. from :func:`data_mesh`.
      axis: the batch axis of every leaf.
      name: how error messages call ``tree`` (e.g. ``"inner_args"``).

    Returns:
      ``tree`` with every leaf a ``jax.Array`` sharded on ``axis``.

    Raises:
      ValueError: a leaf has no axis ``axis`` or ``B`` is not divisible by the device count;
        the message names the leaf's path and the sizes.
    """
    where = "bilevel.distributed.shard_batch"
    _check_mesh(where, mesh)
    _check_axis(where, axis)

    def place(path, leaf):
        shape = np.shape(leaf)
        _check_batch_leaf(where, name, jax.tree_util.keystr(path) or "<root>", shape, axis,
                          mesh.size, "devices of the mesh")
        return jax.device_put(leaf, NamedSharding(mesh, _batch_spec(mesh, axis)))

    return jax.tree_util.tree_map_with_path(place, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a full copy of every leaf of ``tree`` on each device of ``mesh`` (parameters,
    hyperparameters, optimizer states, arrays without a batch axis)."""
    _check_mesh("bilevel.distributed.replicate", mesh)
    return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch(local_tree: PyTree, mesh: Mesh, axis: int = 0, name: str = "local_tree"
                 ) -> PyTree:
    """One global batch-sharded array per leaf from each process's own slice of the batch.

    On several hosts, process ``p`` loads only its part of the data (``B_local`` examples, its
    own files or shard of a dataset); this stitches the parts into arrays of global batch
    ``B_local × process_count``, laid out as :func:`shard_batch` lays out a whole batch, without
    any data crossing hosts (``jax.make_array_from_process_local_data``). Process ``p``'s
    examples come after those of processes ``0 .. p−1`` when the mesh orders devices by
    process, as :func:`data_mesh` does. On one process it equals :func:`shard_batch`.

    Args:
      local_tree: this process's pytree of host arrays (NumPy) with batch axis ``axis``; every
        process passes the same structure, shapes and dtypes.
      mesh: the global mesh, e.g. :func:`data_mesh` after :func:`initialize`.
      axis: the batch axis of every leaf.
      name: how error messages call ``local_tree``.

    Returns:
      ``local_tree`` with every leaf a global ``jax.Array`` sharded on ``axis``.
    """
    where = "bilevel.distributed.global_batch"
    _check_mesh(where, mesh)
    _check_axis(where, axis)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if local_devices == 0:
        raise ValueError(f"{where}: mesh has no device of this process "
                         f"({jax.process_index()}); build it over the global devices")

    def place(path, leaf):
        shape = np.shape(leaf)
        _check_batch_leaf(where, name, jax.tree_util.keystr(path) or "<root>", shape, axis,
                          local_devices, "devices this process holds in the mesh")
        sharding = NamedSharding(mesh, _batch_spec(mesh, axis))
        global_shape = (*shape[:axis], shape[axis] * mesh.size // local_devices,
                        *shape[axis + 1:])
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf), global_shape)

    return jax.tree_util.tree_map_with_path(place, local_tree)


# --------------------------------------------------------------------------------------------
# Populations of zeroth-order estimators.


def _check_population_split(where: str, population: int, mesh: Mesh) -> None:
    if population % mesh.size:
        raise ValueError(f"{where}: population {population} is not divisible by the "
                         f"{mesh.size} devices of the mesh; use a multiple of {mesh.size}")


def _per_device(mesh: Mesh, body: Callable, in_specs: tuple, out_specs: Any) -> Callable:
    """``body`` run once per device of ``mesh`` on its blocks (``jax.shard_map``).

    ``check_vma=False``: the user's loss is single-device code (a ``lax.scan`` whose carry starts
    from a constant, say) that the varying-axis type check refuses, and outputs declared
    replicated are replicated by construction (computed from all-gathered or psum-ed values).
    """
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def _mine(tree: PyTree, axes: tuple, count: int) -> PyTree:
    """This device's ``count`` consecutive rows of every leaf (inside ``shard_map``)."""
    start = jax.lax.axis_index(axes) * count
    return jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, count, axis=0), tree)


def _device_split(axes: tuple, count: int) -> es.PopulationSplit:
    """The estimator kernels' population split over the devices of a ``shard_map``."""
    return es.PopulationSplit(local=lambda tree: _mine(tree, axes, count),
                              gather=lambda losses: jax.lax.all_gather(losses, axes, tiled=True),
                              total=lambda tree: jax.lax.psum(tree, axes))


def sharded_es_hypergrad(meta_loss: Callable, hparams: PyTree, key: jax.Array,
                         population: int = 64, sigma: float = 0.01, args: tuple = (),
                         antithetic: bool = True, *, mesh: Mesh, on_failure: str = "warn"
                         ) -> tuple[PyTree, es.ESInfo]:
    """:func:`bilevel.es_hypergrad` with the population split over the devices of ``mesh``.

    The same estimator, ``ĝ = mean_i (L(λ + σε_i) − L(λ − σε_i)) ε_i / (2σ)`` (antithetic) or
    ``mean_i (L(λ + σε_i) − L(λ)) ε_i / σ``, from the same directions for the same ``key``.
    As in Salimans et al., every device draws all the directions from the shared key (cheap
    next to a meta-loss), evaluates its own ``population / devices`` perturbed meta-losses, and
    the devices exchange only those losses (one all-gather of ``population`` numbers); each
    then forms the same weighted sum. Results equal the single-device ones up to float
    round-off. Without antithetic pairs every device also evaluates the baseline ``L(λ)``.

    Args:
      meta_loss, hparams, key, population, sigma, args, antithetic: as in
        :func:`bilevel.es_hypergrad`; ``hparams``, ``key`` and ``args`` are replicated.
      mesh: the mesh whose devices share the population (e.g. :func:`data_mesh`);
        ``population`` must be a multiple of its size.
      on_failure: as in :func:`bilevel.es_hypergrad`.

    Returns:
      ``(grad, info)`` as :func:`bilevel.es_hypergrad` returns them, replicated.

    Reference: Salimans et al., "Evolution strategies as a scalable alternative to reinforcement
    learning", 2017 (shared random seeds: workers communicate scalars only).
    """
    where = "bilevel.distributed.sharded_es_hypergrad"
    _check_mesh(where, mesh)
    args = tuple(args)
    _checks.check_on_failure(where, on_failure)
    es.check_es_inputs(where, meta_loss, hparams, key, population, sigma, args, antithetic)
    _check_population_split(where, population, mesh)
    split = _device_split(tuple(mesh.axis_names), population // mesh.size)

    def body(hparams, key, args):
        return es.es_kernel(meta_loss, hparams, key, int(population), sigma, args, antithetic,
                            split)

    grad, info = _per_device(mesh, body, (P(), P(), P()), P())(hparams, key, args)
    es.report(where, info, on_failure)
    return grad, info


def shard_pes_state(state: es.PESState, mesh: Mesh) -> es.PESState:
    """Place a :class:`bilevel.PESState` (from :func:`bilevel.pes_init`) with its particles split
    over the devices of ``mesh``: each device holds the inner states and perturbation sums of
    ``population / devices`` particles, and they stay there across
    :func:`sharded_pes_hypergrad` calls."""
    where = "bilevel.distributed.shard_pes_state"
    _check_mesh(where, mesh)
    if not isinstance(state, es.PESState):
        raise TypeError(f"{where}: state must be a bilevel.PESState (from bilevel.pes_init), "
                        f"got {type(state).__name__}")
    particles = (state.inner_state, state.perturbation_sum)
    inner_state, xi = shard_batch(particles, mesh, axis=0, name="state")
    return es.PESState(inner_state, xi, replicate(state.truncations, mesh))


def sharded_pes_hypergrad(unroll: Callable, hparams: PyTree, state: es.PESState,
                          key: jax.Array, sigma: float = 0.01, args: tuple = (), *, mesh: Mesh,
                          on_failure: str = "warn") -> tuple[PyTree, es.PESState, es.ESInfo]:
    """:func:`bilevel.pes_hypergrad` with the particles split over the devices of ``mesh``.

    Each device keeps its particles' inner states and perturbation sums ``ξ_i`` and runs their
    truncations; perturbations and data keys are drawn from ``key`` exactly as
    :func:`bilevel.pes_hypergrad` draws them (every device draws all and keeps its own). Only
    the losses (one all-gather of ``population`` numbers) and the partial sums of
    ``ĝ = mean_i ξ_i L_i / σ²`` (one all-reduce of an hparams-sized vector) cross devices, so
    the estimate and the new state equal the single-device ones up to float round-off.

    Args:
      unroll, hparams, state, key, sigma, args: as in :func:`bilevel.pes_hypergrad`; place the
        state with :func:`shard_pes_state` first (otherwise every call moves it).
      mesh: the mesh whose devices share the particles; the population must be a multiple of
        its size.
      on_failure: as in :func:`bilevel.pes_hypergrad`.

    Returns:
      ``(grad, new_state, info)`` as :func:`bilevel.pes_hypergrad`, with ``new_state``'s
      particles split over the mesh and ``grad``, ``info`` replicated.

    Reference: Vicol, Metz, Sohl-Dickstein, "Unbiased gradient estimation in unrolled
    computation graphs with persistent evolution strategies", ICML 2021.
    """
    where = "bilevel.distributed.sharded_pes_hypergrad"
    _check_mesh(where, mesh)
    args = tuple(args)
    _checks.check_on_failure(where, on_failure)
    population = es.check_pes_inputs(where, unroll, hparams, state, key, sigma, args)
    _check_population_split(where, population, mesh)
    spec = P(tuple(mesh.axis_names))
    split = _device_split(tuple(mesh.axis_names), population // mesh.size)

    def body(hparams, inner_state, xi, key, args):
        return es.pes_kernel(unroll, hparams, inner_state, xi, key, population, sigma, args,
                             split)

    grad, inner_state, xi, info = _per_device(
        mesh, body, (P(), spec, spec, P(), P()), (P(), spec, spec, P()))(
        hparams, state.inner_state, state.perturbation_sum, key, args)
    es.report(where, info, on_failure)
    return grad, es.PESState(inner_state, xi, state.truncations + 1), info


# --------------------------------------------------------------------------------------------
# Reading the communication off a compiled program.


class Collective(NamedTuple):
    """One cross-device collective instruction of a compiled (partitioned) HLO program.

    Attributes:
      op: ``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``, ``"all-to-all"`` or
        ``"collective-permute"``.
      shapes: the result's array shapes (several when XLA combined collectives into one).
      dtypes: the result's element types, as HLO spells them (``"f32"``, ...).
      nbytes: bytes of the result, per device, for one execution of the instruction.
      loop_depth: how many while loops enclose it (0: runs once per call).
      trips: how many times it runs per call, the product of the enclosing loops' trip counts
        where XLA knows them (``lax.scan``, ``fori_loop``); None inside a loop that stops on a
        condition (a CG solve: multiply by its iteration count).
    """

    op: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    nbytes: int
    loop_depth: int
    trips: int | None


_COLLECTIVE = re.compile(
    r"=\s*(?P<result>.*?)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"(?:to_apply|calls|true_computation|false_computation|condition)=%"
                     r"([^\s,}]+)|branch_computations=\{([^}]*)\}")
_BODY = re.compile(r"\bbody=%([^\s,}]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(text)]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * (_BITS.get(dtype) or int(dtype[1:])) // 8


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """Each computation's instruction lines, and the entry computation's name."""
    bodies, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header["name"]
            bodies[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and line.startswith(" "):
            bodies[current].append(line)
    return bodies, entry


def _loop_nesting(bodies: dict[str, list[str]], entry: str | None
                  ) -> dict[str, tuple[int, int | None]]:
    """``(loop depth, runs per call)`` of every computation reachable from the entry."""
    if entry is None:  # a fragment without computations: treat it as straight-line code
        return {}
    nesting = {entry: (0, 1)}
    stack = [entry]
    while stack:
        name = stack.pop()
        depth, runs = nesting[name]
        for line in bodies.get(name, []):
            trips = _TRIPS.search(line)
            loop_runs = None if runs is None or trips is None else runs * int(trips[1])
            called = [(body, depth + 1, loop_runs) for body in _BODY.findall(line)]
            for single, group in _CALLED.findall(line):
                names = [single] if single else [n.strip().lstrip("%") for n in group.split(",")]
                called += [(n, depth, runs) for n in names if n]
            for callee, callee_depth, callee_runs in called:
                if callee not in nesting:
                    nesting[callee] = (callee_depth, callee_runs)
                    stack.append(callee)
    return nesting


def collectives(compiled: Any) -> list[Collective]:
    """The collectives of a compiled program: what data parallelism costs in communication.

    The volume one call moves per device is ``sum(c.nbytes * c.trips for c in ...)`` when
    every ``trips`` is known; an instruction in a loop that stops on a condition has
    ``trips=None`` and runs once per iteration of that loop.

    Args:
      compiled: ``jax.jit(f).lower(*args).compile()``, or its ``as_text()``.

    Returns:
      a list of :class:`Collective`, in program order.
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    bodies, entry = _computations(text)
    nesting = _loop_nesting(bodies, entry)
    found = []
    for name, lines in ([(None, text.splitlines())] if entry is None else bodies.items()):
        depth, trips = nesting.get(name, (0, 1))
        for line in lines:
            match = _COLLECTIVE.search(line)
            if match is None:
                continue
            results = _arrays(match["result"])
            found.append(Collective(
                op=match["op"], shapes=tuple(s for _, s in results),
                dtypes=tuple(d for d, _ in results),
                nbytes=sum(_nbytes(d, s) for d, s in results), loop_depth=depth, trips=trips))
    return found
