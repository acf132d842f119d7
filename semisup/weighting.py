"""How the unlabelled images are weighted: the :class:`Weighting` protocol and the registry
:data:`WEIGHTINGS` of the methods that ``semisup.Config(method=...)`` and ``bilevel ssl train
--method`` accept.

This module imports no JAX, so ``bilevel ssl --help`` lists the methods from here. The built-in
weightings are written in :mod:`semisup.strategies`; :data:`WEIGHTINGS` knows their names from
:data:`BUILTIN` and imports that module the first time one of them is looked up. A new
weighting is a class registered with :func:`register_weighting`: from outside the package, its
own module; as a built-in, its class in :mod:`semisup.strategies` and one line in
:data:`BUILTIN`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import jax

    from semisup.batch import Batch
    from semisup.config import Config, State
    from semisup.protocol import Split


class Weighting:
    """The protocol of a weighting: what the training loop asks of ``config.method``.

    FixMatch's weighted loss is ``CE(labelled) + λ_u · mean_{μB}(w_i · mask_i · CE(pseudo_i,
    strong_i))``. In every inner step the loop draws a :class:`semisup.Batch` (the weak view's
    logits, pseudo-labels and confidence mask included), asks the weighting for one raw score
    per unlabelled image, turns the scores into raw weights with :meth:`weights`, and normalises
    those (by default, ``Config.weight_norm="mask"``) to mean 1 over the images that pass the
    mask (:func:`semisup.normalise`), so that a weighting only moves FixMatch's unlabelled weight
    between images. The scores are held fixed in the classifier's step, and each image's scores
    are summed in ``State.score_sum``.

    A weighting is a frozen dataclass without fields (its settings are :class:`semisup.Config`'s)
    made and entered in :data:`WEIGHTINGS` by :func:`register_weighting`. It says:

    * ``uses_unlabelled``: ``False`` makes the step's loss the labelled cross-entropy alone
      (``supervised``); :meth:`scores` is then never called.
    * ``uses_validation``: whether it reads the meta set (:func:`semisup.meta_set`: the held-out
      validation labels, unless ``Config.meta_data="labelled"``); callers merge the validation
      set into the training set of the others (``Config.uses_validation``).
    * ``constant_scores``: its scores are the same for every image (``fixmatch``), so the
      metrics report no ranking (AUROC) of them.
    * :meth:`scores` and :meth:`weights`: the per-image computation, under ``jit``.
    * :meth:`loss`: the classifier's inner loss on a batch, FixMatch's weighted loss unless a
      weighting trains heads of its own (:meth:`init_heads`: ``iomatch``).
    * Trainable parameters, optionally: :meth:`init_params` returns them (``None``: it has
      none), ``State.conf_params`` carries them, ``meta_step`` (``None``: no meta-step) trains
      them after every ``meta_every`` inner steps with the meta-optimiser of
      ``Config.meta_optimizer`` (its state is ``State.meta_opt_state``), and
      :meth:`param_scores` scores images under them (the metrics score the unaugmented
      unlabelled images with it at the end). :class:`semisup.ParametricWeighting` supplies
      ``scores`` and the implicit-hypergradient ``meta_step`` of the confidence network to a
      subclass that writes ``init_params`` and ``param_scores``.
    """

    #: The name in :data:`WEIGHTINGS`, set by :func:`register_weighting`.
    name: ClassVar[str] = ""
    uses_unlabelled: ClassVar[bool] = True
    uses_validation: ClassVar[bool] = False
    constant_scores: ClassVar[bool] = False
    #: ``meta_step(config, state, data) -> state``, or ``None``: no meta-step.
    meta_step: ClassVar[Callable[..., Any] | None] = None

    def scores(self, config: Config, state: State, data: Split, batch: Batch) -> jax.Array:
        """Raw per-image scores ``(μB,)`` of the unlabelled batch, before the mask and the
        normalisation."""
        raise NotImplementedError(f"{type(self).__name__} implements no scores")

    def weights(self, scores: jax.Array, mask: jax.Array) -> jax.Array:
        """The raw weights of ``scores`` (before :func:`semisup.normalise`); the scores
        themselves unless a weighting says otherwise."""
        return scores

    def loss(self, config: Config, params: Any, batch: Batch, weights: jax.Array) -> jax.Array:
        """The inner step's loss of the classifier ``params`` on ``batch``, the unlabelled
        images weighted by ``weights`` (normalised, unless ``Config.weight_norm="none"``):
        FixMatch's weighted loss (:func:`semisup.batch_loss`) unless a weighting trains heads of
        its own (:meth:`init_heads`)."""
        from semisup.losses import batch_loss
        return batch_loss(config, params, batch.x_labelled, batch.y_labelled, batch.strong,
                          batch.pseudo, batch.mask, weights)

    def init_heads(self, config: Config, key: jax.Array, num_classes: int) -> Any:
        """Parameters of extra heads on the classifier's features that this weighting's
        :meth:`loss` trains with the classifier (they sit in the classifier's parameters under
        ``"aux"``, take its optimiser steps and its EMA), or ``None``: it has none."""
        return None

    def init_params(self, config: Config, key: jax.Array, image_shape: tuple[int, int, int],
                    num_classes: int) -> Any:
        """The initial trainable parameters (a pytree), or ``None``: the weighting has none."""
        return None

    def param_scores(self, config: Config, params: Any, images: jax.Array,
                     probs: jax.Array) -> jax.Array:
        """Raw scores of ``images`` under the trainable parameters ``params``; ``probs`` are
        the classifier's class probabilities of ``images`` (held fixed)."""
        raise NotImplementedError(f"{type(self).__name__} has no trainable parameters")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"semisup.register_weighting: name must be a lower-case identifier, "
                         f"got {name!r}")


def _check_class(cls: Any) -> None:
    where = "semisup.register_weighting"
    if not (isinstance(cls, type) and issubclass(cls, Weighting)):
        raise TypeError(f"{where}: {cls!r} is not a subclass of semisup.Weighting")
    if cls.uses_unlabelled and cls.scores is Weighting.scores:
        raise TypeError(f"{where}: {cls.__name__} implements no scores (or set "
                        f"uses_unlabelled = False)")
    if cls.meta_step is not None and (cls.init_params is Weighting.init_params
                                      or cls.param_scores is Weighting.param_scores):
        raise TypeError(f"{where}: {cls.__name__} has a meta_step but no trainable parameters "
                        f"(init_params and param_scores)")


class _Registry(MutableMapping):
    """Name -> :class:`Weighting` subclass. Names and ``in`` are answered without importing;
    looking up a built-in imports the module that defines it (:data:`BUILTIN`)."""

    def __init__(self, builtin: dict[str, str]):
        self._entries: dict[str, type | str] = dict(builtin)

    def __getitem__(self, name: str) -> type:
        entry = self._entries[name]
        if isinstance(entry, str):
            importlib.import_module(entry)
            entry = self._entries[name]
            if isinstance(entry, str):
                raise ImportError(f"semisup.WEIGHTINGS: module {entry} registers no weighting "
                                  f"named {name!r}")
        return entry

    def __setitem__(self, name: str, cls: type) -> None:
        _check_name(name)
        _check_class(cls)
        entry = self._entries.get(name)
        if entry is not None and entry != cls.__module__:  # a built-in fills its own slot
            raise ValueError(f"semisup.register_weighting: a weighting named {name!r} exists "
                             f"({entry})")
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"WEIGHTINGS({', '.join(self._entries)})"


#: The built-in weightings: name -> the module that registers it (imported on first look-up).
BUILTIN = {
    "supervised": "semisup.strategies",
    "fixmatch": "semisup.strategies",
    "oracle": "semisup.strategies",
    "softmax": "semisup.strategies",
    "l2rw": "semisup.strategies",
    "confnet": "semisup.strategies",
    "iomatch": "semisup.strategies",
}

#: Method name -> :class:`Weighting` subclass, in registration order (the built-ins first).
WEIGHTINGS = _Registry(BUILTIN)


def register_weighting(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` (a :class:`Weighting` subclass) a frozen dataclass and
    enter it in :data:`WEIGHTINGS` as ``name``, a method of :class:`semisup.Config`.

    Raises:
      ValueError: ``name`` is not a lower-case identifier, or is taken.
      TypeError: ``cls`` is not a :class:`Weighting`, or lacks what its flags promise.
    """
    _check_name(name)

    def decorate(cls: type) -> type:
        _check_class(cls)
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.name = name
        WEIGHTINGS[name] = cls
        return cls

    return decorate


class NameView(Sequence):
    """The names ``names()`` returns, read at every use: a tuple-like live view of a registry,
    so that what is registered after an import is among them (``contains``, if given, answers
    ``in`` for one name)."""

    def __init__(self, names: Callable[[], tuple[str, ...]],
                 contains: Callable[[str], bool] | None = None):
        self._names = names
        self._contains = contains

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return self._contains(name) if self._contains else name in self._names()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._names())


#: The methods: the names of :data:`WEIGHTINGS` (a live view).
METHODS = NameView(lambda: tuple(WEIGHTINGS), WEIGHTINGS.__contains__)
#: The methods whose weights read the meta set (a live view; importing the built-ins).
USES_VALIDATION = NameView(lambda: tuple(name for name, cls in WEIGHTINGS.items()
                                         if cls.uses_validation))
