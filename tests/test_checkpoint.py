"""bilevel.checkpoint: exact round trips of every leaf kind, atomic writes, the template check
naming the leaf, refusals that say why, no pickle; semisup's thin layer and bilevel 0.1.0's
headerless files."""

import dataclasses
import json
import os
import pickle
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel import checkpoint


class Pair(NamedTuple):
    first: object
    second: object


@dataclasses.dataclass(frozen=True)
class Settings:
    name: str
    sizes: tuple
    rate: float = 0.5


class Unregistered(NamedTuple):
    value: object


@dataclasses.dataclass
class UnregisteredConfig:
    width: int


checkpoint.register(Pair)
checkpoint.register(Settings)


class Box:
    """A pytree node JAX knows but the checkpoint registry does not (as a user's might be)."""

    def __init__(self, content, label):
        self.content, self.label = content, label


jax.tree_util.register_pytree_with_keys(
    Box, lambda b: (((jax.tree_util.GetAttrKey("content"), b.content),), b.label),
    lambda label, children: Box(children[0], label))

PARAMS = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.zeros(3, jnp.float64)}


def every_kind():
    """A nested tree with every kind of node and leaf a checkpoint holds."""
    adam = optax.adam(1e-3)
    opt_state = adam.update(PARAMS, adam.init(PARAMS), PARAMS)[1]  # count 1, moments non-zero
    return {
        "arrays": [np.linspace(0, 1, 5, dtype=np.float32), np.array([1e-300, -2.5]),
                   np.arange(4, dtype=np.int32).reshape(2, 2), np.array([True, False]),
                   np.array([1 + 2j], np.complex64), np.uint8(7), np.float64(np.pi)],
        "jax": (jnp.asarray([1.5, -0.0], jnp.float32), jnp.asarray(3, jnp.int32),
                jnp.asarray([0.1], jnp.bfloat16), jnp.zeros((0, 3))),
        "keys": [jax.random.key(7), jax.random.split(jax.random.key(1), 3),
                 jax.random.key(2, impl="rbg")],
        "python": [3, -2**70, 0.1, float("nan"), float("-inf"), True, False, "text", None],
        "pair": Pair(np.ones(2), Pair(None, 4)),
        "settings": Settings("run", (8, 16)),
        "opt_state": opt_state,
        "empty": {"dict": {}, "list": [], "tuple": ()},
    }


def assert_identical(a, b, where=""):
    """Same classes, same structure, bit-identical leaves (NaN equal to NaN)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b) or sorted(a) == sorted(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, tuple | list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif dataclasses.is_dataclass(a):
        assert dataclasses.asdict(a) == dataclasses.asdict(b), where
    elif isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        assert jax.random.key_impl(a) == jax.random.key_impl(b), where
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    elif isinstance(a, np.ndarray | np.generic | jax.Array):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b), where
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_of_every_leaf_kind_is_exact(tmp_path):
    tree = every_kind()
    checkpoint.save(tmp_path / "c.npz", tree, {"step": 3, "note": "x", "loss": [0.5, None]})
    assert checkpoint.read_metadata(tmp_path / "c.npz") == {"step": 3, "note": "x",
                                                            "loss": [0.5, None]}
    on_template, metadata = checkpoint.load(tmp_path / "c.npz", like=tree)
    assert metadata["step"] == 3
    assert_identical(tree, on_template)
    # Without a template: registered classes come back; optax's NamedTuples are plain tuples.
    plain, _ = checkpoint.load(tmp_path / "c.npz")
    assert_identical({k: v for k, v in tree.items() if k != "opt_state"},
                     {k: v for k, v in plain.items() if k != "opt_state"})
    assert type(plain["opt_state"][0]) is tuple
    assert_identical(jax.tree_util.tree_leaves(tree["opt_state"]),
                     jax.tree_util.tree_leaves(plain["opt_state"]))


def test_template_gives_the_classes_and_shardings(tmp_path):
    tree = {"opt": optax.sgd(0.1, momentum=0.9).init(PARAMS), "x": Unregistered(np.ones(2)),
            "config": UnregisteredConfig(3), "box": Box(jnp.ones(2), "label")}
    checkpoint.save(tmp_path / "c.npz", tree)
    plain, _ = checkpoint.load(tmp_path / "c.npz")
    assert type(plain["x"]) is tuple and len(plain["x"]) == 1
    assert plain["config"] == {"width": 3}
    assert isinstance(plain["box"], list) and len(plain["box"]) == 1
    loaded, _ = checkpoint.load(tmp_path / "c.npz", like=tree)
    assert type(loaded["opt"][0]) is type(tree["opt"][0])
    assert type(loaded["x"]) is Unregistered and loaded["config"] == UnregisteredConfig(3)
    assert type(loaded["box"]) is Box and loaded["box"].label == "label"
    leaf = loaded["opt"][0].trace["w"]
    assert isinstance(leaf, jax.Array) and leaf.sharding == PARAMS["w"].sharding


def test_resumed_optax_state_continues_exactly(tmp_path):
    adam = optax.adam(1e-2)
    state = adam.init(PARAMS)
    grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
    checkpoint.save(tmp_path / "c.npz", state)
    restored, _ = checkpoint.load(tmp_path / "c.npz", like=adam.init(PARAMS))
    assert_identical(adam.update(grads, state)[1], adam.update(grads, restored)[1])


def test_a_registered_class_whose_fields_changed_is_refused(tmp_path):
    class Old(NamedTuple):
        a: int

    checkpoint.register(Old, name="tests.Changing")
    checkpoint.save(tmp_path / "c.npz", Old(1))

    class New(NamedTuple):
        a: int
        b: int

    checkpoint._REGISTRY["tests.Changing"] = New  # as a later version would define it
    try:
        fields = r"holds a New with fields \['a'\]; this bilevel's New has \['a', 'b'\]"
        with pytest.raises(checkpoint.CheckpointError, match=fields):
            checkpoint.load(tmp_path / "c.npz")
    finally:
        del checkpoint._REGISTRY["tests.Changing"]


def test_registry_is_explicit():
    assert checkpoint.register(Pair) is Pair  # again: harmless
    assert checkpoint.registered()[f"{Pair.__module__}.Pair"] is Pair

    class Pair2(NamedTuple):
        x: int

    with pytest.raises(ValueError, match="already names"):
        checkpoint.register(Pair2, name=f"{Pair.__module__}.Pair")
    with pytest.raises(TypeError, match="neither a NamedTuple nor a dataclass"):
        checkpoint.register(dict)


# --------------------------------------------------------------------------------------------
# Atomic writes.


def test_a_write_that_dies_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"a": np.zeros(3)}, {"version": "old"})
    before = path.read_bytes()

    def savez_dies_halfway(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"a": np.ones(3)}, {"version": "new"})
    monkeypatch.undo()

    def replace_dies(src, dst):
        raise KeyboardInterrupt  # killed between the write and the rename

    monkeypatch.setattr(os, "replace", replace_dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"a": np.ones(3)}, {"version": "new"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]
    assert path.read_bytes() == before
    assert checkpoint.read_metadata(path) == {"version": "old"}


def test_a_tree_that_cannot_be_written_writes_nothing(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"a": np.zeros(3)})
    before = path.read_bytes()
    for tree, fragment in [
        ({"a": np.array([{"x": 1}, None], dtype=object)}, r"\['a'\] is an array of dtype "
                                                          r"object.*would need pickle"),
        ({"a": [np.zeros(1), lambda x: x]}, r"\['a'\]\[1\] is a .*function"),
        ({1: np.zeros(1)}, "the tree is a dict with keys that are not strings"),
        (Pair(np.array(["text"]), 1), r"\.first is an array of dtype <U4"),
    ]:
        with pytest.raises(TypeError, match=fragment):
            checkpoint.save(path, tree)
    with pytest.raises(TypeError, match="metadata must be JSON"):
        checkpoint.save(path, {"a": np.zeros(3)}, {"array": np.zeros(2)})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.npz"]


# --------------------------------------------------------------------------------------------
# The template check names the first leaf that differs.

TEMPLATE = {"params": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},
            "opt": Pair(np.zeros((), np.int32), None), "key": jax.random.key(0),
            "layers": [np.zeros(1), np.zeros(1)], "step": 3}


@pytest.mark.parametrize("change, where, found, expected", [
    ({"params": {"w": np.zeros((2, 4), np.float32), "b": np.zeros(3, np.float32)}},
     "['params']['w']", "float32(2, 3)", "float32(2, 4)"),
    ({"params": {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)}},
     "['params']['w']", "float32(2, 3)", "float64(2, 3)"),
    ({"params": {"w": np.zeros((2, 3), np.float32)}}, "['params']['b']", "float32(3,)",
     "nothing"),
    ({"params": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32),
                 "a": np.zeros(1)}}, "['params']['a']", "nothing", "float64(1,)"),
    ({"opt": Pair(np.zeros((), np.int32), np.zeros(2))}, "['opt'].second", "None",
     "float64(2,)"),
    ({"opt": Unregistered(np.zeros((), np.int32))}, "['opt']",
     "a Pair (namedtuple) with fields ['first', 'second']",
     "a Unregistered (namedtuple) with fields ['value']"),
    ({"key": np.zeros(2, np.uint32)}, "['key']", "key<threefry2x32>(2,)", "uint32(2,)"),
    ({"key": jax.random.key(0, impl="rbg")}, "['key']", "key<threefry2x32>(2,)",
     "key<rbg>(4,)"),
    ({"layers": [np.zeros(1)]}, "['layers'][1]", "float64(1,)", "nothing"),
    ({"layers": (np.zeros(1), np.zeros(1))}, "['layers']", "a list of 2", "a tuple of 2"),
    ({"step": 3.0}, "['step']", "a Python int", "a Python float"),
    ({"step": np.int64(3)}, "['step']", "a Python int", "int64()"),
])
def test_mismatch_names_the_leaf_and_what_differs(tmp_path, change, where, found, expected):
    checkpoint.save(tmp_path / "c.npz", TEMPLATE)
    with pytest.raises(checkpoint.MismatchError) as info:
        checkpoint.load(tmp_path / "c.npz", like={**TEMPLATE, **change})
    error = info.value
    assert (error.where, error.found, error.expected) == (where, found, expected)
    assert str(error) == (f"bilevel.checkpoint.load: {tmp_path / 'c.npz'} does not match the "
                          f"template: at {where} it holds {found}, the template {expected}")
    assert isinstance(error, ValueError)


def test_float64_leaf_without_x64_is_refused_not_truncated(tmp_path):
    checkpoint.save(tmp_path / "c.npz", {"x": jnp.ones(2, jnp.float64)})
    with jax.enable_x64(False):
        with pytest.raises(checkpoint.CheckpointError, match=r"\['x'\] is float64, which JAX "
                                                             r"makes float32; enable "
                                                             r"jax_enable_x64"):
            checkpoint.load(tmp_path / "c.npz")


# --------------------------------------------------------------------------------------------
# Files that are not checkpoints are refused, saying why; nothing is unpickled.


def _rewrite_header(path, edit):
    """Write ``path`` again with its header JSON changed by ``edit`` (a hand-made file)."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays["__header__"].tobytes().decode())
    edit(header)
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)


def _make(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "garbage":
        path.write_bytes(os.urandom(300).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    elif kind == "text":
        path.write_text("hello")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"a": np.zeros(3)}))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "truncated":
        checkpoint.save(path, {"a": np.zeros(1000)})
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "numpy_npz":
        np.savez(path, weights=np.zeros(3))
    elif kind == "legacy":
        np.savez(path, leaf_00000=np.zeros(3))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hi")
    else:
        checkpoint.save(path, {"a": np.zeros(3)})
        _rewrite_header(path, {
            "future": lambda h: h.update(version=checkpoint.VERSION + 1),
            "other_format": lambda h: h.update(format="something.else"),
            "no_version": lambda h: h.update(version="1"),
            "bad_dtype": lambda h: h["leaves"][0].update(dtype="O"),
            "wrong_shape": lambda h: h["leaves"][0].update(shape=[4]),
            "unknown_kind": lambda h: h["leaves"][0].update(kind="object"),
            "bad_node": lambda h: h["tree"].update(node="set"),
            "orphan_leaf": lambda h: h["leaves"].append(dict(h["leaves"][0])),
        }[kind])
    return path


@pytest.mark.parametrize("kind, reason", [
    ("garbage", r"it is not an \.npz file \(it starts with b'"),
    ("text", r"it is not an \.npz file \(it starts with b'hello'\)"),
    ("empty", "the file is empty"),
    ("pickle", "it is a Python pickle, which bilevel never loads"),
    ("npy", r"it is a single \.npy array, not an \.npz"),
    ("truncated", r"a truncated or damaged \.npz"),
    ("numpy_npz", r"it is an \.npz without a bilevel checkpoint header \(arrays \['weights'\]\)"),
    ("legacy", r"without a bilevel checkpoint header \(bare leaf arrays, as bilevel 0\.1\.0"),
    ("zip", r"without a bilevel checkpoint header \(arrays \['notes.txt'\]\)"),
    ("future", rf"it was written by a newer bilevel \(checkpoint format version "
               rf"{checkpoint.VERSION + 1}; this one reads up to {checkpoint.VERSION}\); "
               rf"upgrade bilevel"),
    ("other_format", "its header is not a bilevel.checkpoint header"),
    ("no_version", r"its header has no valid format version \('1'\)"),
    ("bad_dtype", "its header names an unknown dtype 'O'"),
    ("wrong_shape", r"a damaged file: leaf \['a'\] should be float64\(4,\), its array is "
                    r"float64\(3,\)"),
    ("unknown_kind", "its header names an unknown leaf kind 'object'"),
    ("bad_node", r"its header is damaged \(at the root\)"),
    ("orphan_leaf", r"its header is damaged \(at the leaf list\)"),
])
def test_files_that_are_not_checkpoints_are_refused_saying_why(tmp_path, monkeypatch, kind,
                                                                reason):
    path = _make(tmp_path, kind)
    monkeypatch.setattr(pickle, "load", None)  # anything that unpickled would fail loudly
    monkeypatch.setattr(pickle, "loads", None)
    readers = [lambda: checkpoint.load(path),
               lambda: checkpoint.load(path, like={"a": np.zeros(3)})]
    if kind not in ("wrong_shape", "unknown_kind", "bad_dtype", "bad_node", "orphan_leaf"):
        readers.append(lambda: checkpoint.read_metadata(path))  # reads the header only
    for read in readers:
        with pytest.raises(checkpoint.CheckpointError, match=reason) as info:
            read()
        assert isinstance(info.value, ValueError)
        assert str(info.value).startswith(f"bilevel.checkpoint: cannot read {path}: ")
        assert isinstance(info.value, checkpoint.NoHeaderError) == (
            kind in ("numpy_npz", "legacy", "zip"))


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "none.npz")


def test_files_are_plain_npz_readable_without_pickle(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, every_kind(), {"a": 1})
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
        header = json.loads(archive["__header__"].tobytes().decode())
    assert header["format"] == "bilevel.checkpoint" and header["version"] == checkpoint.VERSION
    assert header["metadata"] == {"a": 1}
    entries = {entry["path"]: entry for entry in header["leaves"]}
    assert entries["['keys'][1]"] == {"path": "['keys'][1]", "kind": "key",
                                      "impl": "threefry2x32", "dtype": "uint32", "shape": [3, 2]}
    assert entries["['python'][0]"] == {"path": "['python'][0]", "kind": "int", "value": 3}
    assert entries["['jax'][2]"]["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------
# bilevel 0.1.0's headerless files, and semisup's layer.


def test_legacy_headerless_file_loads_on_a_template(tmp_path):
    template = {"b": jnp.zeros(2, jnp.float32), "a": Pair(jax.random.key(3), np.int32(1))}
    leaves = jax.tree_util.tree_leaves(template)
    host = [jax.random.key_data(x) if i == 0 else x for i, x in enumerate(leaves)]
    np.savez(tmp_path / "old.npz", meta=np.array('{"format": 1}'),
             **{f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(host)})
    tree, extras = checkpoint.load_legacy(tmp_path / "old.npz", like=template)
    assert_identical(template, tree)
    assert extras == {"meta": '{"format": 1}'}
    with pytest.raises(checkpoint.MismatchError, match=r"at \['b'\] it holds float32\(2,\), "
                                                       r"the template float32\(3,\)"):
        checkpoint.load_legacy(tmp_path / "old.npz",
                               like={**template, "b": jnp.zeros(3, jnp.float32)})
    with pytest.raises(checkpoint.MismatchError, match="3 leaves, the template 2 leaves"):
        checkpoint.load_legacy(tmp_path / "old.npz", like={"b": template["b"], "c": np.ones(1)})
    checkpoint.save(tmp_path / "new.npz", template)
    with pytest.raises(checkpoint.CheckpointError, match="it has a header"):
        checkpoint.load_legacy(tmp_path / "new.npz", like=template)


def test_semisup_checkpoint_is_a_thin_layer(tmp_path):
    from semisup import checkpoint as semisup_checkpoint

    template = {"step": jnp.zeros((), jnp.int32), "w": jnp.ones(3)}
    state = {"step": jnp.asarray(5, jnp.int32), "w": jnp.arange(3.0)}
    semisup_checkpoint.save(tmp_path / "c.npz", state)
    assert checkpoint.read_metadata(tmp_path / "c.npz") == {"writer": "semisup"}
    assert_identical(state, semisup_checkpoint.load(tmp_path / "c.npz", template))
    # bilevel 0.1.0's semisup files (bare leaves in flatten order) still load.
    np.savez(tmp_path / "old.npz", leaf_00000=np.asarray(5, np.int32), leaf_00001=np.arange(3.0))
    assert_identical(state, semisup_checkpoint.load(tmp_path / "old.npz", template))
    with pytest.raises(ValueError, match=r"does not match this configuration \(at \['w'\] it "
                                         r"holds float64\(3,\), the template float64\(4,\)\)"):
        semisup_checkpoint.load(tmp_path / "c.npz", {**template, "w": jnp.ones(4)})
    checkpoint.save(tmp_path / "other.npz", state, {"writer": "bilevel.train"})
    with pytest.raises(ValueError, match=r"is not a checkpoint written by semisup.checkpoint.save "
                                         r"\(it was written by 'bilevel.train'\)"):
        semisup_checkpoint.load(tmp_path / "other.npz", template)
