"""Data streams for :func:`bilevel.train`: minibatches drawn on device, or batches from the host.

:func:`bilevel.train` takes each loss's data (``inner_args``, ``outer_args``) in one of three
kinds:

* a **tuple of arrays**: the whole data set at every step (full batch, the default);
* a :class:`Minibatches` of per-sample arrays: batch indices drawn inside the jitted step from a
  key and the draw's number, so a resumed run draws exactly the batches the killed one would
  have;
* a **host iterator** of batches (each a tuple like ``inner_args``), or a zero-argument function
  returning a fresh one: read on the host and sent to the step. A checkpoint stores how many
  batches were consumed; a resumed run calls the function again and skips them. A bare iterator
  cannot be rewound, so resuming from one is refused.

Each outer step consumes ``inner_steps + 1`` inner batches (one per plain inner step, then one
for the method's hypergradient) and one outer batch.

Example::

    x, y = ...  # (n, d), (n,)
    data = bilevel.Minibatches((x, y), batch_size=32)
    result = bilevel.train(inner_loss, outer_loss, params, hparams, config, data, (x_val, y_val))
    # draw t of the inner stream is data.batch(key, t), with the key train derives from the seed
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["Minibatches"]

#: Rounds of the Feistel network that orders an epoch (each round mixes one half into the
#: other; they act on batch_size numbers, so more rounds cost little).
_ROUNDS = 8


# --------------------------------------------------------------------------------------------
# Per-sample arrays.


def num_samples(where: str, name: str, arrays: tuple) -> int:
    """The common leading size of the arrays of ``arrays``, after checking they have one."""
    sizes = set()
    for leaf in jax.tree_util.tree_leaves(arrays):
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"{where}: every array in {name} needs a leading sample axis, but "
                             f"{name} holds a scalar")
        sizes.add(shape[0])
    if not sizes:
        raise ValueError(f"{where}: {name} holds no arrays to draw minibatches from")
    if len(sizes) > 1:
        raise ValueError(f"{where}: {name} holds arrays with leading axes of sizes "
                         f"{sorted(sizes)}; the leading axis is the sample axis, the same for all")
    return sizes.pop()


def _take(arrays: tuple, indices: jax.Array) -> tuple:
    return jax.tree_util.tree_map(lambda a: jnp.take(a, indices, axis=0), arrays)


# --------------------------------------------------------------------------------------------
# The order of an epoch: a keyed permutation of [0, n), evaluated at the positions asked for.


def _half_bits(n: int) -> int:
    """h such that the Feistel domain [0, 4^h) holds [0, n) and is under 4n (so that cycle
    walking takes fewer than 4 rounds on average)."""
    return max(1, math.ceil(math.log2(max(n, 2)) / 2))


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer mixer (MurmurHash3's finaliser): every input bit flips about half of the
    output bits. Cheap, unlike a threefry call per round, which made the step's compile 3x
    longer."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


@functools.partial(jax.jit, static_argnums=2)  # compiled once per n, also when called eagerly
def _permute(key: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    """``π(positions)`` for the pseudo-random permutation π of [0, n) that ``key`` selects.

    A balanced Feistel network on 2h bits is a bijection of [0, 4^h) whatever its round
    function; applying it again to a value that lands outside [0, n) until it lands inside
    (cycle walking) restricts it to a bijection of [0, n). Round r's function is
    ``mix(half ^ k_r)`` with round keys ``k = jax.random.bits(key, (rounds,))``. Cost
    O(len(positions)), whatever n: no n-sized permutation is built.
    """
    h = _half_bits(n)
    mask = jnp.uint32((1 << h) - 1)
    round_keys = jax.random.bits(key, (_ROUNDS,), jnp.uint32)

    def encrypt(x):
        left, right = x >> h, x & mask
        for r in range(_ROUNDS):
            left, right = right, left ^ (_mix(right ^ round_keys[r]) & mask)
        return (left << h) | right

    x = encrypt(positions.astype(jnp.uint32))
    x = jax.lax.while_loop(lambda x: jnp.any(x >= n),
                           lambda x: jnp.where(x >= n, encrypt(x), x), x)
    return x.astype(jnp.int32)


def distinct_indices(key: jax.Array, n: int, count: int) -> jax.Array:
    """``count`` distinct indices of [0, n), the first ``count`` entries of the pseudo-random
    permutation ``key`` selects: O(count) work, where ``jax.random.choice(..., replace=False)``
    shuffles all n (11.9 ms a draw at n = 32768 on this project's CPU)."""
    return _permute(key, jnp.arange(count, dtype=jnp.uint32), n)


def epoch_indices(key: jax.Array, n: int, batch_size: int, draws: jax.Array) -> jax.Array:
    """The indices of draws ``draws`` (int32 array, any shape) of the epochs of [0, n) that
    ``key`` selects, shape ``draws.shape + (batch_size,)``: epoch ``e`` is the permutation keyed
    by ``jax.random.fold_in(key, e)``, cut into ``n // batch_size`` consecutive batches (the
    ``n % batch_size`` samples it puts last sit that epoch out); draw ``t`` is batch
    ``t % (n // batch_size)`` of epoch ``t // (n // batch_size)``. O(batch_size) per draw."""
    per_epoch = n // batch_size
    draws = jnp.asarray(draws, jnp.int32)
    positions = (draws % per_epoch)[..., None] * batch_size + jnp.arange(batch_size,
                                                                          dtype=jnp.int32)
    epochs = (draws // per_epoch).reshape(-1)

    def one(e, p):
        return _permute(jax.random.fold_in(key, e), p, n)

    return jax.vmap(one)(epochs, positions.reshape(-1, batch_size)).reshape(positions.shape)


# --------------------------------------------------------------------------------------------
# Minibatches.


@jax.tree_util.register_pytree_node_class
class Minibatches:
    """Minibatches of per-sample arrays, drawn on device from a key and the draw's number.

    Draw ``t`` (0, 1, 2, ...) is a pure function of ``(key, t)``, computed under ``jit``:
    :func:`bilevel.train` draws inside its compiled step and derives ``key`` from
    ``TrainerConfig.seed``, so the same seed gives the same batches and a resumed run continues
    the stream exactly.

    * ``replace=False`` (default): **epochs**, as a shuffled data loader with ``drop_remainder``.
      Epoch ``e`` orders the n samples by a pseudo-random permutation keyed by
      ``jax.random.fold_in(key, e)`` and cuts it into ``n // batch_size`` consecutive batches;
      draw ``t`` is batch ``t % (n // batch_size)`` of epoch ``t // (n // batch_size)``. Within
      an epoch each sample appears at most once, and exactly once when ``batch_size`` divides n;
      otherwise the ``n % batch_size`` samples the epoch's order puts last (others each epoch)
      sit that epoch out. The permutation is an 8-round Feistel network on [0, n) with cycle
      walking, keyed by ``jax.random.bits`` of the epoch's key and evaluated only at the
      batch's positions: a draw costs O(batch_size), not O(n). It is a pseudo-random order
      for shuffling data, not a cryptographic one.
    * ``replace=True``: **independent draws**: draw ``t`` is ``batch_size`` indices uniform on
      [0, n), with replacement, from ``jax.random.fold_in(key, t)``.

    A ``Minibatches`` is a pytree (its arrays are the leaves; ``batch_size`` and ``replace`` are
    static), so it can be passed to jitted functions.

    Example::

        data = bilevel.Minibatches((x, y), batch_size=32)
        x_batch, y_batch = data.batch(jax.random.key(0), 7)   # the 8th minibatch
        bilevel.train(inner_loss, outer_loss, params, hparams, config, data, (x_val, y_val))

    With a method that draws its own minibatches (:mod:`bilevel.stochastic`), the stream gives
    the method its arrays and its batch size; the method draws its batches itself, several per
    outer step, each without replacement, from the trainer's key (see :func:`bilevel.train`).

    Args:
      arrays: a tuple of arrays (or of pytrees of arrays) whose leading axes, the sample axis,
        have one size n; the loss gets a batch as its data arguments, ``loss(params, hparams,
        *batch)``, and should be a mean over the rows.
      batch_size: rows per batch, in [1, n] (with ``replace=True`` any integer >= 1).
      replace: draw independent batches with replacement instead of epochs.
    """

    __slots__ = ("arrays", "batch_size", "replace")

    def __init__(self, arrays: tuple, batch_size: int, *, replace: bool = False):
        where = "bilevel.Minibatches"
        if not isinstance(arrays, tuple | list):
            raise TypeError(f"{where}: arrays must be a tuple of arrays with a leading sample "
                            f"axis, got {type(arrays).__name__}")
        if not isinstance(replace, bool):
            raise ValueError(f"{where}: replace must be True or False, got {replace!r}")
        if (not isinstance(batch_size, int | np.integer) or isinstance(batch_size, bool)
                or batch_size < 1):
            raise ValueError(f"{where}: batch_size must be an integer >= 1, got {batch_size!r}")
        size = num_samples(where, "arrays", tuple(arrays))
        if not replace and batch_size > size:
            raise ValueError(f"{where}: batch_size={batch_size} is larger than the {size} "
                             f"samples of arrays (the leading axis of its arrays); lower it, or "
                             f"draw with replace=True")
        if size >= 2**31:
            raise ValueError(f"{where}: arrays have {size} samples; at most 2**31 - 1 are "
                             f"supported (int32 indices)")
        self._set(tuple(arrays), int(batch_size), replace)

    def _set(self, arrays, batch_size, replace):
        object.__setattr__(self, "arrays", arrays)
        object.__setattr__(self, "batch_size", batch_size)
        object.__setattr__(self, "replace", replace)

    def __setattr__(self, name, value):
        raise AttributeError(f"bilevel.Minibatches is immutable; {name} cannot be set")

    def __repr__(self) -> str:
        return (f"Minibatches(<{self.num_samples} samples>, batch_size={self.batch_size}, "
                f"replace={self.replace})")

    def tree_flatten(self):
        return (self.arrays,), (self.batch_size, self.replace)

    @classmethod
    def tree_unflatten(cls, aux, children):
        self = object.__new__(cls)  # no checks: jax rebuilds it around tracers and placeholders
        self._set(children[0], *aux)
        return self

    @property
    def num_samples(self) -> int:
        """n, the size of the arrays' leading axis."""
        return int(np.shape(jax.tree_util.tree_leaves(self.arrays)[0])[0])

    @property
    def batches_per_epoch(self) -> int:
        """``n // batch_size`` (the epoch's length in draws with ``replace=False``)."""
        return self.num_samples // self.batch_size

    def describe(self) -> dict:
        """What a checkpoint records of the stream, to refuse resuming with another one."""
        return {"kind": "Minibatches", "samples": self.num_samples,
                "batch_size": self.batch_size, "replace": self.replace}

    def indices(self, key: jax.Array, step: int | jax.Array) -> jax.Array:
        """The sample indices (int32, shape ``(batch_size,)``) of draw ``step``."""
        return self.indices_range(key, step, 1)[0]

    def indices_range(self, key: jax.Array, first: int | jax.Array, count: int) -> jax.Array:
        """The indices of draws ``first, ..., first + count - 1``, shape ``(count, batch_size)``;
        row i is ``indices(key, first + i)``."""
        steps = jnp.asarray(first, jnp.int32) + jnp.arange(count, dtype=jnp.int32)
        n, b = self.num_samples, self.batch_size
        if self.replace:
            return jax.vmap(lambda t: jax.random.randint(jax.random.fold_in(key, t), (b,), 0, n,
                                                         dtype=jnp.int32))(steps)
        return epoch_indices(key, n, b, steps)

    def batch(self, key: jax.Array, step: int | jax.Array) -> tuple:
        """Draw ``step``: the arrays' rows at :meth:`indices`, a tuple like ``arrays``."""
        return _take(self.arrays, self.indices(key, step))

    def first_batch(self) -> tuple:
        """Rows ``0 .. batch_size - 1``: shaped like every batch (for checks before a run)."""
        return jax.tree_util.tree_map(lambda a: a[: self.batch_size], self.arrays)


# --------------------------------------------------------------------------------------------
# What the jitted step receives for a stream: draws it can index.


@jax.tree_util.register_pytree_node_class
class SampledFeed:
    """A :class:`Minibatches` and its key: the step draws its batches itself."""

    def __init__(self, data: Minibatches, key: jax.Array):
        self.data, self.key = data, key

    def tree_flatten(self):
        return (self.data, self.key), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def selectors(self, first: jax.Array, count: int) -> jax.Array:
        """One row per draw ``first .. first + count - 1``: its indices."""
        return self.data.indices_range(self.key, first, count)

    def batch(self, selector: jax.Array) -> tuple:
        return _take(self.data.arrays, selector)


@jax.tree_util.register_pytree_node_class
class FetchedFeed:
    """Batches read on the host, stacked on a leading axis (one entry per draw of the step)."""

    def __init__(self, batches: tuple):
        self.batches = batches

    def tree_flatten(self):
        return (self.batches,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def selectors(self, first: jax.Array, count: int) -> tuple:
        del first, count  # the host read exactly this step's draws
        return self.batches

    def batch(self, selector: tuple) -> tuple:
        return selector


# --------------------------------------------------------------------------------------------
# Host-side reading of an iterator of batches.


def _leaf_spec(leaf: Any) -> tuple:
    return np.shape(leaf), np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)


def _stack(leaves: tuple) -> jax.Array:
    """One leaf of the step's batches, on the device (device arrays stay there)."""
    return jnp.stack([x if isinstance(x, jax.Array) else np.asarray(x) for x in leaves])


class HostStream:
    """Reads ``draws`` batches per outer step from an iterator, checking every batch against the
    first (structure, shapes, dtypes: the step is compiled once), and counts what it consumed.

    ``source`` is an iterator (cannot be rewound) or a zero-argument function returning an
    iterable (called once; on resume its first ``consumed`` batches are skipped).
    """

    def __init__(self, where: str, name: str, source: Iterator | Callable, draws: int):
        self.where, self.name, self.draws = where, name, draws
        self.rewindable = not isinstance(source, Iterator)
        if self.rewindable:
            made = source()
            try:
                self.iterator = iter(made)
            except TypeError:
                raise TypeError(f"{where}: {name}() must return an iterator (or iterable) of "
                                f"batches, got {type(made).__name__}") from None
        else:
            self.iterator = source
        self.consumed = 0
        self.pending: list[tuple] = []
        self.structure = self.specs = None
        self.first = self._next("the first batch")
        self.pending.append(self.first)

    def describe(self) -> dict:
        """What a checkpoint records: the batches the steps run so far have used."""
        return {"kind": "iterator", "consumed": self.consumed - len(self.pending)}

    def _check(self, batch: Any) -> tuple:
        number = self.consumed + 1
        if not isinstance(batch, tuple | list):
            raise TypeError(f"{self.where}: {self.name} yielded a {type(batch).__name__} as "
                            f"batch {number}; each batch must be a tuple of the loss's data "
                            f"arguments, as a plain {self.name} would be")
        batch = tuple(batch)
        leaves, structure = jax.tree_util.tree_flatten(batch)
        specs = [_leaf_spec(leaf) for leaf in leaves]
        if self.structure is None:
            self.structure, self.specs = structure, specs
            return batch
        if structure != self.structure:
            raise ValueError(f"{self.where}: {self.name} yielded batch {number} with structure "
                             f"{structure}, but the first batch had {self.structure}; every "
                             f"batch must have the first's structure, shapes and dtypes (the "
                             f"step is compiled once)")
        for i, (spec, first) in enumerate(zip(specs, self.specs, strict=True)):
            if spec != first:
                raise ValueError(
                    f"{self.where}: {self.name} yielded batch {number} whose leaf {i} has shape "
                    f"{spec[0]} and dtype {spec[1]}, but the first batch's has shape {first[0]} "
                    f"and dtype {first[1]}; every batch must have the first's structure, shapes "
                    f"and dtypes (the step is compiled once; drop or pad a short last batch)")
        return batch

    def _next(self, what: str) -> tuple:
        try:
            batch = next(self.iterator)
        except StopIteration:
            raise ValueError(f"{self.where}: {self.name} ran out after {self.consumed} batches, "
                             f"before {what} ({self.draws} per outer step: inner_steps + 1 for "
                             f"inner_args, 1 for outer_args); make it yield enough for "
                             f"outer_steps, e.g. by cycling over epochs") from None
        batch = self._check(batch)
        self.consumed += 1
        return batch

    def skip(self, consumed: int, step: int) -> None:
        """Continue after the ``consumed`` batches a checkpoint at outer ``step`` records."""
        if consumed == 0:
            return
        if not self.rewindable:
            raise ValueError(
                f"{self.where}: {self.name} is an iterator, which cannot be rewound to resume "
                f"the checkpoint at outer step {step} ({consumed} batches consumed); pass a "
                f"zero-argument function returning a fresh iterator instead (train calls it "
                f"and skips the batches already consumed)")
        self.pending.clear()  # the first batch read is the first one skipped
        while self.consumed < consumed:
            self._next(f"the {consumed} batches the checkpoint consumed")

    def pull(self) -> FetchedFeed:
        """This step's ``draws`` batches, stacked on a leading axis, on the device."""
        batches = self.pending[: self.draws]
        del self.pending[: self.draws]
        while len(batches) < self.draws:
            batches.append(self._next(f"outer step {self.consumed // self.draws + 1}"))
        stacked = jax.tree_util.tree_map(lambda *xs: _stack(xs), *batches)
        return FetchedFeed(stacked)
