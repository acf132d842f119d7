"""Checkpoints of pytrees: one atomic ``.npz`` file, its structure checked on load, no pickle.

The trainer (:func:`bilevel.train`), ``bilevel lopt train`` and ``bilevel ssl train`` write
their checkpoints with :func:`save` and read them with :func:`load`.

The file is an ordinary ``.npz`` (a zip of ``.npy`` arrays, readable with
``np.load(path, allow_pickle=False)``) holding

* ``leaf_00000``, ``leaf_00001``, ...: the array leaves, in the order the tree is walked
  (dict keys sorted, as JAX flattens them);
* ``__header__``: a uint8 array, the UTF-8 text of a JSON document with the format name and
  version (:data:`VERSION`), the caller's ``metadata``, the tree's structure and, per leaf,
  its path (as :func:`jax.tree_util.keystr` writes it: ``.params['w']``), kind, dtype and
  shape; Python scalars are kept there too.

The structure is rebuilt from that JSON, never unpickled. Dicts with string keys, lists,
tuples, ``None``, NamedTuples and dataclasses (field by field) are written out; a NamedTuple
or dataclass comes back as its class only if the class is in the registry (:func:`register`:
name -> class), the only way a class gets into a loaded tree; nothing is imported by name.
Another node JAX knows (a class registered with :func:`jax.tree_util.register_pytree_node`,
an ``OrderedDict``) is written as its children and rebuilt only on a template. Leaves are
NumPy arrays and scalars, JAX arrays (PRNG key arrays as their key data plus the key's
implementation) and Python ``bool``, ``int``, ``float`` and ``str``; an array of objects
cannot be written.

:func:`load` with ``like`` (a template pytree, e.g. the state a fresh run starts from) checks
the stored tree against it: the structure and every leaf's kind, dtype and shape. It refuses
with a :class:`MismatchError` that names the first leaf path (in walk order) that differs,
what the file holds there and what the template expects; otherwise the tree is built on the
template's classes (so optax's state NamedTuples need no registration) and JAX arrays are put
on the template's shardings. Without ``like`` an unregistered NamedTuple comes back as a
tuple, an unregistered dataclass as a dict, another JAX node as a list of its children.

A file that is not such a checkpoint (garbage, a pickle, a truncated file, an ``.npz``
without the header, a newer format version, a damaged header) is refused with a
:class:`CheckpointError` (a ``ValueError``) that says why. :func:`save` writes a temporary
file in the same folder, fsyncs it and moves it into place with :func:`os.replace`, so a run
killed while saving leaves the previous checkpoint intact.

bilevel 0.1.0's trainer and ``semisup`` wrote ``.npz`` files of bare ``leaf_NNNNN`` arrays
without a header; :func:`load_legacy` reads those onto a template (they hold no pickle
either). Weak types are not kept: arrays come back strongly typed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["FORMAT", "VERSION", "CheckpointError", "MismatchError", "NoHeaderError", "load",
           "load_legacy", "read_metadata", "register", "registered", "save"]

PyTree = Any

#: The format name every header carries.
FORMAT = "bilevel.checkpoint"
#: The format version :func:`save` writes; :func:`load` reads this and older ones.
VERSION = 1
_HEADER = "__header__"
_LEAF = "leaf_{:05d}"
_LEAF_NAME = re.compile(r"leaf_\d{5}")
#: Dtypes NumPy would write as raw bytes (``|V2``): stored as unsigned integers of their width.
_BIT_DTYPES = frozenset({
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn",
    "int2", "int4", "uint2", "uint4"})
_PYTHON = {"bool": bool, "int": int, "float": float, "str": str}
_NAMED = ("namedtuple", "dataclass", "pytree")  # nodes that record a class


class CheckpointError(ValueError):
    """The file at ``path`` cannot be read as a checkpoint; ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"bilevel.checkpoint: cannot read {self.path}: {reason}")


class NoHeaderError(CheckpointError):
    """An ``.npz`` without the header: numpy's own, or bilevel 0.1.0's (:func:`load_legacy`)."""


class MismatchError(CheckpointError):
    """The checkpoint does not match the template: at the leaf path ``where`` the file holds
    ``found`` and the template ``expected`` (short descriptions such as ``float32(3,)``)."""

    def __init__(self, path: str | os.PathLike, where: str, found: str, expected: str):
        self.where, self.found, self.expected = where or "the root", found, expected
        super().__init__(path, f"at {self.where} it holds {found}, the template {expected}")
        self.args = (f"bilevel.checkpoint.load: {self.path} does not match the template: "
                     f"{self.reason}",)


# --------------------------------------------------------------------------------------------
# The registry: the only classes a loaded tree holds without a template.

_REGISTRY: dict[str, type] = {}
_NAMES: dict[type, str] = {}


def register(cls: type, name: str | None = None) -> type:
    """Let :func:`load` rebuild the NamedTuple or dataclass ``cls`` without a template.

    ``name`` (default ``module.QualName``) is what files record. Registering a class again is
    harmless; another class under a taken name is a ``ValueError``. Returns ``cls`` (so it
    works as a decorator).
    """
    is_namedtuple = isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")
    if not (is_namedtuple or (isinstance(cls, type) and dataclasses.is_dataclass(cls))):
        raise TypeError(f"bilevel.checkpoint.register: {cls!r} is neither a NamedTuple nor a "
                        f"dataclass")
    name = f"{cls.__module__}.{cls.__qualname__}" if name is None else name
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"bilevel.checkpoint.register: {name!r} already names "
                         f"{_REGISTRY[name]!r}")
    _REGISTRY[name] = cls
    _NAMES[cls] = name
    return cls


def registered() -> dict[str, type]:
    """A copy of the registry: name -> class."""
    return dict(_REGISTRY)


def _name(cls: type) -> str:
    return _NAMES.get(cls, f"{cls.__module__}.{cls.__qualname__}")


# --------------------------------------------------------------------------------------------
# Walking a tree.


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | np.generic | jax.Array)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _one_level(node: Any) -> tuple[list[tuple[str, Any]], Any] | None:
    """``([(key path, child)], treedef)`` of a node JAX knows; ``None`` for a JAX leaf."""
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef) and len(children) == 1 and children[0][1] is node:
        return None
    return [(jax.tree_util.keystr(path), child) for path, child in children], treedef


def _children(node: Any) -> tuple[str, list[tuple[str, str, Any]]] | None:
    """``(kind, [(key, path suffix, child)])`` of an inner node; ``None`` for a leaf.

    Raises:
      TypeError: ``node`` is neither (the message completes "... is").
    """
    if node is None:
        return "none", []
    if type(node) is dict:
        if not all(isinstance(key, str) for key in node):
            raise TypeError("a dict with keys that are not strings")
        return "dict", [(key, f"[{key!r}]", node[key]) for key in sorted(node)]
    if type(node) in (list, tuple):
        return type(node).__name__, [(str(i), f"[{i}]", c) for i, c in enumerate(node)]
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):
        return "namedtuple", [(f, f".{f}", getattr(node, f)) for f in type(node)._fields]
    if _is_array(node) or type(node) in _PYTHON.values():
        return None
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return "dataclass", [(f.name, f".{f.name}", getattr(node, f.name))
                             for f in dataclasses.fields(node)]
    found = _one_level(node)
    if found is None:
        raise TypeError(f"a {type(node).__module__}.{type(node).__qualname__}: neither an "
                        f"array, a Python bool/int/float/str nor a pytree node")
    return "pytree", [(key, key, child) for key, child in found[0]]


def _describe(node: Any) -> str:
    """What a template holds at a place, for messages."""
    try:
        found = _children(node)
    except TypeError:
        return f"a {type(node).__name__}"
    if found is None:
        if type(node) in _PYTHON.values():
            return f"a Python {type(node).__name__}"
        if _is_key(node):
            return f"key<{jax.random.key_impl(node)}>{jax.random.key_data(node).shape}"
        return f"{np.dtype(node.dtype).name}{np.shape(node)}"
    kind, children = found
    if kind == "none":
        return "None"
    if kind in ("dict", "list", "tuple"):
        return f"a {kind} of {len(children)}"
    return f"a {type(node).__name__} ({kind}) with fields {[k for k, _, _ in children]}"


# --------------------------------------------------------------------------------------------
# Writing.


def _leaf_entry(leaf: Any, index: int, arrays: dict[str, np.ndarray]) -> dict:
    """The header entry of a leaf; its array, if any, goes into ``arrays``."""
    if type(leaf) in _PYTHON.values():
        nonfinite = type(leaf) is float and not math.isfinite(leaf)
        return {"kind": type(leaf).__name__, "value": repr(leaf) if nonfinite else leaf}
    entry: dict = {"kind": "numpy" if isinstance(leaf, np.ndarray) else "numpy_scalar"}
    if isinstance(leaf, jax.Array):
        entry = {"kind": "jax"}
        if _is_key(leaf):
            entry = {"kind": "key", "impl": str(jax.random.key_impl(leaf))}
            leaf = jax.random.key_data(leaf)
    array = np.asarray(jax.device_get(leaf))
    dtype = array.dtype.name
    if dtype in _BIT_DTYPES:
        array = array.view(np.dtype(f"uint{8 * array.dtype.itemsize}"))
    elif array.dtype.kind not in "biufc":
        raise TypeError(f"an array of dtype {array.dtype}; checkpoints hold numeric and bool "
                        f"arrays only (objects would need pickle)")
    arrays[_LEAF.format(index)] = array
    return {**entry, "dtype": dtype, "shape": list(array.shape)}


def _encode(tree: PyTree) -> tuple[dict, list[dict], dict[str, np.ndarray]]:
    """The JSON description of ``tree``, its leaves' header entries and its arrays."""
    leaves: list[dict] = []
    arrays: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> dict:
        try:
            found = _children(node)
            if found is None:
                leaves.append({"path": path, **_leaf_entry(node, len(leaves), arrays)})
                return {"node": "leaf", "index": len(leaves) - 1}
        except TypeError as error:
            raise TypeError(f"bilevel.checkpoint.save: {path or 'the tree'} is {error}") from None
        kind, children = found
        described = {"node": kind, "children": [walk(c, path + s) for _, s, c in children]}
        if kind == "dict" or kind in _NAMED:
            described["keys"] = [key for key, _, _ in children]
        if kind in _NAMED:
            described["class"] = _name(type(node))
        return described

    return walk(tree, ""), leaves, arrays


def save(path: str | os.PathLike, tree: PyTree, metadata: Mapping | None = None) -> None:
    """Write ``tree`` and ``metadata`` to ``path`` atomically (see the module docstring).

    Args:
      path: the file (conventionally ``*.npz``); its folder is created if needed.
      tree: dicts (string keys), lists, tuples, ``None``, NamedTuples, dataclasses and other
        JAX pytree nodes over NumPy arrays, JAX arrays (PRNG keys too) and Python scalars.
      metadata: a JSON-serialisable dict kept in the header (:func:`read_metadata`).

    Raises:
      TypeError: a node or leaf cannot be written (the message names its path), or
        ``metadata`` is not JSON.
    """
    path = Path(path)
    structure, leaves, arrays = _encode(tree)
    header = {"format": FORMAT, "version": VERSION, "metadata": dict(metadata or {}),
              "tree": structure, "leaves": leaves}
    try:
        text = json.dumps(header)
    except (TypeError, ValueError) as error:
        raise TypeError(f"bilevel.checkpoint.save: metadata must be JSON (dicts with string "
                        f"keys, lists, numbers, strings): {error}") from None
    arrays[_HEADER] = np.frombuffer(text.encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, arrays)


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A temporary file in the same folder, fsynced, then ``os.replace``: a reader (or a
    restarted run) sees the old file or the new one, never half of one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading the file.


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class _Archive:
    """An open ``.npz`` whose read errors are :class:`CheckpointError` s."""

    _ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError)

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._sniff()
        try:
            self.npz = np.load(path, allow_pickle=False)
        except self._ERRORS as error:
            raise CheckpointError(path, f"a truncated or damaged .npz ({_short(error)})") from None
        self.files = set(self.npz.files)

    def _sniff(self) -> None:
        """Refuse, saying what it is, a file that is not a zip (as every ``.npz`` is)."""
        with open(self.path, "rb") as f:
            start = f.read(8)
        if start.startswith(b"PK\x03\x04"):
            return
        if not start:
            reason = "the file is empty"
        elif start[:1] == b"\x80":
            reason = "it is a Python pickle, which bilevel never loads (unpickling runs code)"
        elif start.startswith(b"\x93NUMPY"):
            reason = "it is a single .npy array, not an .npz"
        else:
            reason = f"it is not an .npz file (it starts with {start!r})"
        raise CheckpointError(self.path, reason)

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.npz.close()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(self.path, f"a damaged file: it lacks the array {name}")
        try:
            return self.npz[name]
        except self._ERRORS as error:
            raise CheckpointError(self.path, f"a truncated or damaged .npz: its array {name} "
                                             f"cannot be read ({_short(error)})") from None

    def header(self) -> dict:
        if _HEADER not in self.files:
            legacy = any(_LEAF_NAME.fullmatch(name) for name in self.files)
            what = ("bare leaf arrays, as bilevel 0.1.0 wrote them" if legacy
                    else f"arrays {sorted(self.files)[:5]}")
            raise NoHeaderError(self.path, f"it is an .npz without a bilevel checkpoint header "
                                           f"({what})")
        raw = self[_HEADER]
        try:
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise ValueError(f"a {raw.dtype} array of shape {raw.shape}")
            header = json.loads(raw.tobytes().decode())
        except (ValueError, RecursionError) as error:
            raise CheckpointError(self.path, f"its header is damaged ({_short(error)})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(self.path, f"its header is not a {FORMAT} header")
        version = header.get("version")
        if type(version) is not int or version < 1:
            raise CheckpointError(self.path, f"its header has no valid format version "
                                             f"({version!r})")
        if version > VERSION:
            raise CheckpointError(self.path, f"it was written by a newer bilevel (checkpoint "
                                             f"format version {version}; this one reads up to "
                                             f"{VERSION}); upgrade bilevel to read it")
        for name, kind in (("metadata", dict), ("tree", dict), ("leaves", list)):
            if not isinstance(header.get(name), kind):
                raise CheckpointError(self.path, f"its header is damaged (no {name})")
        return header


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` a checkpoint was saved with (only the header is read).

    Raises:
      FileNotFoundError: no file at ``path``.
      CheckpointError: the file is not a checkpoint (the message says why).
    """
    with _Archive(path) as archive:
        return archive.header()["metadata"]


# --------------------------------------------------------------------------------------------
# Leaves.


def _dtype(path: str, name: Any) -> np.dtype:
    """The dtype a header names, if a checkpoint may hold it."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except Exception:  # noqa: BLE001 -- NumPy raises several kinds for a bad dtype string
        dtype = None
    if dtype is None or not (dtype.kind in "biufc" or dtype.name in _BIT_DTYPES):
        raise CheckpointError(path, f"its header names an unknown dtype {name!r}")
    return dtype


def _entry_text(entry: dict) -> str:
    """What a file holds at a leaf, as :func:`_describe` says it of a template."""
    if entry["kind"] in _PYTHON:
        return f"a Python {entry['kind']}"
    prefix = f"key<{entry['impl']}>" if entry["kind"] == "key" else entry["dtype"]
    return f"{prefix}{tuple(entry['shape'])}"


def _read_leaf(archive: _Archive, index: int, entry: Any) -> tuple[dict, Any]:
    """``(entry, value)``: a Python scalar, or the array as stored (key data for a key)."""
    path = archive.path
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise CheckpointError(path, f"its header is damaged (leaf {index})")
    kind = entry.get("kind")
    if kind in _PYTHON:
        value = entry.get("value")
        if kind == "float" and value in ("nan", "inf", "-inf"):
            value = float(value)
        if not (type(value) is _PYTHON[kind] or (kind == "float" and type(value) is int)):
            raise CheckpointError(path, f"its header is damaged (leaf {entry['path']})")
        return entry, _PYTHON[kind](value)
    if kind not in ("numpy", "numpy_scalar", "jax", "key"):
        raise CheckpointError(path, f"its header names an unknown leaf kind {kind!r}")
    if kind == "key" and not isinstance(entry.get("impl"), str):
        raise CheckpointError(path, f"its header is damaged (leaf {entry['path']})")
    dtype, shape = _dtype(path, entry.get("dtype")), entry.get("shape")
    stored = np.dtype(f"uint{8 * dtype.itemsize}") if dtype.name in _BIT_DTYPES else dtype
    array = archive[_LEAF.format(index)]
    if array.dtype != stored or list(array.shape) != shape:
        raise CheckpointError(path, f"a damaged file: leaf {entry['path']} should be "
                                    f"{dtype.name}{tuple(shape or ())}, its array is "
                                    f"{array.dtype}{array.shape}")
    return entry, array.view(dtype)


def _on_device(path: str, entry: dict, value: np.ndarray, sharding: Any) -> jax.Array:
    result = jax.device_put(value) if sharding is None else jax.device_put(value, sharding)
    if result.dtype != value.dtype:
        raise CheckpointError(path, f"leaf {entry['path']} is {value.dtype}, which JAX makes "
                                    f"{result.dtype}; enable jax_enable_x64 to read it")
    return result


def _wrap_key(path: str, entry: dict, data: Any, impl: Any) -> jax.Array:
    try:
        return jax.random.wrap_key_data(data, impl=impl)
    except (TypeError, ValueError) as error:
        raise CheckpointError(path, f"leaf {entry['path']} is not a PRNG key of "
                                    f"{entry['impl']!r} ({_short(error)})") from None


def _as_saved(path: str, entry: dict, value: Any) -> Any:
    """A stored leaf as it was saved (no template)."""
    kind = entry["kind"]
    if kind == "numpy_scalar":
        return value[()]
    if kind == "jax":
        return _on_device(path, entry, value, None)
    if kind == "key":
        return _wrap_key(path, entry, _on_device(path, entry, value, None), entry["impl"])
    return value


def _as_like(path: str, entry: dict, value: Any, like: Any) -> Any:
    """A stored leaf checked against the template's leaf ``like`` and built like it."""
    found, expected = _entry_text(entry), _describe(like)
    if found != expected:
        raise MismatchError(path, entry["path"], found, expected)
    if type(like) in _PYTHON.values() or isinstance(like, np.ndarray):
        return value
    if isinstance(like, np.generic):
        return value[()]
    data = _on_device(path, entry, value, like.sharding)
    return _wrap_key(path, entry, data, jax.random.key_impl(like)) if _is_key(like) else data


# --------------------------------------------------------------------------------------------
# Structure.


def _build(cls: type, kind: str, keys: list[str], values: list, like: Any = None) -> Any:
    """An instance of ``cls`` (a ``kind`` node) from its children's ``values``."""
    if kind == "namedtuple":
        return cls(*values)
    if kind == "pytree":
        return jax.tree_util.tree_unflatten(_one_level(like)[1], values)
    fields = dict(zip(keys, values, strict=True))
    made = cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.init})
    for f in dataclasses.fields(cls):
        if not f.init:
            object.__setattr__(made, f.name, fields[f.name])
    return made


class _Node:
    """One node of a header's tree, checked for shape on the way in."""

    def __init__(self, reader: _Reader, described: Any, path: str):
        if not isinstance(described, dict):
            raise reader.damaged(path)
        self.kind, self.path = described.get("node"), path
        self.children = described.get("children", [])
        self.name = described.get("class", "")
        if self.kind == "leaf":
            self.index = described.get("index")
            return
        self.keys = described.get("keys", [str(i) for i in range(len(self.children))])
        if self.kind not in ("none", "dict", "list", "tuple", *_NAMED) \
                or (self.kind in ("dict", *_NAMED)) != ("keys" in described) \
                or not isinstance(self.children, list) or not isinstance(self.keys, list) \
                or not all(isinstance(k, str) for k in self.keys) \
                or len(self.keys) != len(self.children) or not isinstance(self.name, str):
            raise reader.damaged(path)

    def child_paths(self) -> list[str]:
        if self.kind == "dict":
            return [f"{self.path}[{k!r}]" for k in self.keys]
        if self.kind in ("namedtuple", "dataclass"):
            return [f"{self.path}.{k}" for k in self.keys]
        if self.kind == "pytree":
            return [self.path + k for k in self.keys]
        return [f"{self.path}[{k}]" for k in self.keys]


class _Reader:
    """Rebuilds the tree a header describes, with or without a template."""

    def __init__(self, archive: _Archive, header: dict):
        self.archive, self.path, self.entries = archive, archive.path, header["leaves"]
        self.used: set[int] = set()

    def damaged(self, where: str) -> CheckpointError:
        return CheckpointError(self.path, f"its header is damaged (at {where or 'the root'})")

    def leaf(self, node: _Node) -> tuple[dict, Any]:
        index = node.index
        if type(index) is not int or not 0 <= index < len(self.entries) or index in self.used:
            raise self.damaged(node.path)
        self.used.add(index)
        return _read_leaf(self.archive, index, self.entries[index])

    def text(self, node: _Node) -> str:
        """What the file holds at ``node``, for messages."""
        if node.kind == "leaf":
            index = node.index
            ok = type(index) is int and 0 <= index < len(self.entries)
            return _entry_text(self.entries[index]) if ok else "a leaf"
        if node.kind == "none":
            return "None"
        if node.kind in ("dict", "list", "tuple"):
            return f"a {node.kind} of {len(node.children)}"
        return f"a {node.name.rsplit('.', 1)[-1]} ({node.kind}) with fields {node.keys}"

    def plain(self, described: Any, path: str = "") -> Any:
        node = _Node(self, described, path)
        if node.kind == "leaf":
            return _as_saved(self.path, *self.leaf(node))
        values = [self.plain(c, p) for c, p in zip(node.children, node.child_paths(),
                                                    strict=True)]
        cls = _REGISTRY.get(node.name)
        if node.kind == "none":
            return None
        if node.kind == "dict" or (node.kind == "dataclass" and cls is None):
            return dict(zip(node.keys, values, strict=True))
        if node.kind in ("list", "pytree"):
            return values
        if node.kind == "tuple" or cls is None:
            return tuple(values)
        return self.registered(node, cls, values)

    def registered(self, node: _Node, cls: type, values: list) -> Any:
        is_namedtuple = issubclass(cls, tuple)
        fields = (list(cls._fields) if is_namedtuple
                  else [f.name for f in dataclasses.fields(cls)])
        where = node.path or "the root"
        if (node.kind == "namedtuple") != is_namedtuple or fields != node.keys:
            raise CheckpointError(self.path, f"at {where} it holds a {cls.__name__} with fields "
                                             f"{node.keys}; this bilevel's {cls.__name__} has "
                                             f"{fields}")
        try:
            return _build(cls, node.kind, node.keys, values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(self.path, f"at {where} its {cls.__name__} refuses the stored "
                                             f"values ({_short(error)})") from None

    def like(self, described: Any, like: Any, path: str = "") -> Any:
        node = _Node(self, described, path)
        try:
            expected = _children(like)
        except TypeError as error:
            raise TypeError(f"bilevel.checkpoint.load: like{path} is {error}") from None
        if node.kind == "leaf" and expected is None:
            return _as_like(self.path, *self.leaf(node), like)
        if node.kind == "leaf" or expected is None or node.kind != expected[0]:
            raise MismatchError(self.path, path, self.text(node), _describe(like))
        like_children = expected[1]
        self.check_keys(node, like, [key for key, _, _ in like_children])
        values = [self.like(c, child, path + suffix)
                  for c, (_, suffix, child) in zip(node.children, like_children, strict=True)]
        if node.kind == "none":
            return None
        if node.kind == "dict":
            return dict(zip(node.keys, values, strict=True))
        if node.kind in ("list", "tuple"):
            return type(like)(values)
        try:
            return _build(type(like), node.kind, node.keys, values, like)
        except (TypeError, ValueError) as error:
            raise CheckpointError(self.path, f"at {path or 'the root'} the template's "
                                             f"{type(like).__name__} refuses the stored values "
                                             f"({_short(error)})") from None

    def check_keys(self, node: _Node, like: Any, like_keys: list[str]) -> None:
        """Refuse naming the first key or index (in walk order) where the two differ."""
        if node.keys == like_keys:
            return
        if node.kind in ("namedtuple", "dataclass", "pytree"):
            raise MismatchError(self.path, node.path, self.text(node), _describe(like))
        stored = dict(zip(node.keys, node.children, strict=True))
        if node.kind == "dict":
            key = min(set(node.keys) ^ set(like_keys))
            where = f"{node.path}[{key!r}]"
        else:
            key = next(str(i) for i, (a, b) in enumerate(itertools.zip_longest(node.keys,
                                                                                like_keys))
                       if a != b)
            where = f"{node.path}[{key}]"
        found = self.text(_Node(self, stored[key], where)) if key in stored else "nothing"
        expected = (_describe(like[key] if node.kind == "dict" else like[int(key)])
                    if key in like_keys else "nothing")
        raise MismatchError(self.path, where, found, expected)


def load(path: str | os.PathLike, like: PyTree = None) -> tuple[PyTree, dict]:
    """Read a checkpoint written by :func:`save`; nothing is unpickled.

    Args:
      path: the file.
      like: a template pytree (e.g. the state a fresh run starts from), or ``None``. With a
        template the stored structure and every leaf's kind, dtype and shape must match it;
        the tree is built on the template's classes and JAX arrays go on its shardings.
        Without one, registered NamedTuples and dataclasses (:func:`register`) are rebuilt,
        other NamedTuples come back as tuples and other dataclasses as dicts.

    Returns:
      ``(tree, metadata)``.

    Raises:
      FileNotFoundError: no file at ``path``.
      MismatchError: the tree does not match ``like``; the message names the first leaf path
        that differs, what the file holds there and what the template expects.
      CheckpointError: the file is not a checkpoint or is damaged; the message says why
        (:class:`NoHeaderError`: an ``.npz`` without the header).
    """
    with _Archive(path) as archive:
        header = archive.header()
        reader = _Reader(archive, header)
        tree = reader.plain(header["tree"]) if like is None else reader.like(header["tree"], like)
        if len(reader.used) != len(header["leaves"]):
            raise reader.damaged("the leaf list")
    return tree, header["metadata"]


# --------------------------------------------------------------------------------------------
# bilevel 0.1.0's headerless files.


def load_legacy(path: str | os.PathLike, like: PyTree = None) -> tuple[PyTree, dict[str, str]]:
    """Read a headerless ``.npz`` of bilevel 0.1.0 (the trainer's ``checkpoint.npz``,
    ``semisup``'s) onto ``like``: arrays ``leaf_00000``, ``leaf_00001``, ... are ``like``'s
    leaves in :func:`jax.tree_util.tree_flatten` order (PRNG keys as their key data); their
    number, dtypes and shapes must match ``like``'s.

    Returns:
      ``(tree, extras)``: ``extras`` maps the file's other text arrays (0.1.0's trainer kept
      its JSON ``meta`` and ``history`` there) to their text. Without ``like``, ``tree`` is
      the list of leaf arrays as stored.

    Raises:
      MismatchError: the arrays do not match ``like``.
      CheckpointError: the file is not such an ``.npz`` (one with a header is :func:`load`'s).
    """
    with _Archive(path) as archive:
        if _HEADER in archive.files:
            raise CheckpointError(path, "it has a header, so bilevel.checkpoint.load reads it")
        names = sorted(name for name in archive.files if _LEAF_NAME.fullmatch(name))
        if not names:
            raise CheckpointError(path, f"it is an .npz without leaf arrays (it holds "
                                        f"{sorted(archive.files)[:5]})")
        extras = {}
        for name in sorted(archive.files - set(names)):
            array = archive[name]
            if array.dtype.kind == "U" and array.ndim == 0:
                extras[name] = str(array)
        if like is None:
            return [archive[name] for name in names], extras
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(like)
        if names != [_LEAF.format(i) for i in range(len(names))] or len(names) != len(with_paths):
            raise MismatchError(path, "", f"{len(names)} leaves", f"{len(with_paths)} leaves")
        leaves = [_legacy_leaf(archive, i, jax.tree_util.keystr(key_path), leaf)
                  for i, (key_path, leaf) in enumerate(with_paths)]
    return jax.tree_util.tree_unflatten(treedef, leaves), extras


def _legacy_leaf(archive: _Archive, index: int, where: str, like: Any) -> Any:
    array = archive[_LEAF.format(index)]
    if array.dtype.kind not in "biufc":
        raise CheckpointError(archive.path, f"leaf {where} is an array of {array.dtype}")
    entry = {"path": where, "kind": "numpy", "dtype": array.dtype.name, "shape": list(array.shape)}
    if _is_key(like):
        entry.update(kind="key", impl=str(jax.random.key_impl(like)))
    if not _is_array(like):
        raise MismatchError(archive.path, where, _entry_text(entry), _describe(like))
    return _as_like(archive.path, entry, array, like)
