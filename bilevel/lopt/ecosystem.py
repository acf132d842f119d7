"""The learned optimizers in the JAX ecosystem: one constructor for every shipped optimizer, and
flax's ``TrainState`` with the loss passed on.

Every learned optimizer is an ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
the minibatch loss as ``loss=`` (VeLO reads it; the others accept it). So they compose with
optax's combinators, which pass extra keyword arguments on: ``optax.chain``,
``optax.MultiSteps``, ``optax.multi_transform`` / ``optax.masked`` (frozen parameters are
simply not seen by the learned optimizer), ``optax.apply_if_finite``; and with
``flax.nnx.Optimizer`` (``optimizer.update(model, grads, loss=loss)``). One exception, in
optax: ``optax.chain`` passes extra arguments only to a ``GradientTransformationExtraArgs``,
and ``optax.MultiSteps`` (the object, or its ``gradient_transformation()``) is not one, so a
chain *around* ``MultiSteps`` drops the loss; chain inside it instead,
``optax.MultiSteps(optax.chain(clip, opt), k)``. Under ``MultiSteps`` the optimizer sees the
loss of the last minibatch of each accumulation.

>>> from bilevel import lopt
>>> opt = lopt.pretrained_optimizer("velo_lopt", num_steps=1000)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from bilevel.lopt import optimizers, safeguards, velo


class Builder(NamedTuple):
    """How to make one learned optimizer from its meta-parameters.

    Attributes:
      build: ``build(meta, num_steps, **kwargs) -> optax transformation``: the step rule as
        meta-trained.
      reads_horizon: ``reads_horizon(meta) -> bool``: whether these meta-parameters need the
        horizon ``num_steps``.
      builtin_safeguards: whether ``build`` takes the safeguards' keyword arguments itself
        (``velo_lopt``, whose floor also enters its step); the others are wrapped in
        :func:`~bilevel.lopt.safeguards.safeguarded`.
    """

    build: Callable[..., optax.GradientTransformationExtraArgs]
    reads_horizon: Callable[[dict], bool]
    builtin_safeguards: bool = False


def _has_horizon_inputs(meta: dict) -> bool:
    return np.shape(meta["network"]["w0"])[0] == optimizers.NUM_INPUTS_WITH_HORIZON


#: ``metadata["optimizer"]`` -> :class:`Builder`. A new learned optimizer adds one line here.
BUILDERS = {
    "mlp_lopt": Builder(optimizers.mlp_lopt, _has_horizon_inputs),
    "star_lopt": Builder(optimizers.star_lopt, _has_horizon_inputs),
    "velo_lopt": Builder(velo.velo_lopt, lambda meta: True, builtin_safeguards=True),
}


def _check_num_steps(where: str, num_steps: Any) -> None:
    """A positive finite number or a traced scalar; ``None`` is handled by the caller."""
    is_number = (not isinstance(num_steps, bool | str)
                 and np.ndim(num_steps) == 0
                 and jnp.issubdtype(jnp.result_type(num_steps), jnp.number))
    if not is_number:
        raise ValueError(f"{where}: num_steps (the training horizon) must be a scalar > 0, "
                         f"got {num_steps!r}")
    try:
        value = float(num_steps)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced: a horizon chosen inside jit
    if not 0 < value < np.inf:
        raise ValueError(f"{where}: num_steps (the training horizon) must be a finite number "
                         f"> 0, got {num_steps!r}")


def build_optimizer(meta: dict, metadata: dict, num_steps: Any | None = None, *,
                    safeguards: bool = True, **overrides: Any
                    ) -> optax.GradientTransformationExtraArgs:
    """The learned optimizer that ``meta`` parametrises, as its metadata records it.

    Args:
      meta, metadata: from :func:`~bilevel.lopt.load_meta_params` (a file written by
        ``bilevel lopt train``) or :func:`~bilevel.lopt.pretrained`; ``metadata["optimizer"]``
        names the optimizer (a key of :data:`BUILDERS`) and ``metadata["optimizer_kwargs"]``
        holds the keyword arguments it was meta-trained with.
      num_steps: the training horizon, the number of updates the optimizer will make: a number
        > 0 or a traced scalar. Needed by meta-parameters that read the fraction of training
        (``velo_lopt``, and ``mlp_lopt`` / ``star_lopt`` made with ``horizon_features=True``);
        accepted and unused by the others, so that the same call makes every optimizer.
      safeguards: apply the trust region and the divergence guard of
        :mod:`bilevel.lopt.safeguards` (default); ``False`` gives the step rule exactly as
        meta-trained (for ``velo_lopt``, VeLO's: ``min_scale=0`` and no trust region or guard).
      **overrides: keyword arguments of the optimizer that replace the recorded ones (STAR's
        ``nominal_step`` and ``weight_decay``) and, with ``safeguards``, the safeguards'
        settings (``min_scale``, ``max_relative_step``, ``max_regress``, ``guard_rate``; see
        :func:`~bilevel.lopt.safeguards.safeguarded`), the same for every optimizer.

    Returns:
      the ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params,
      loss=loss)``.
    """
    return _build("lopt.build_optimizer", meta, metadata, num_steps, safeguards, overrides)


def pretrained_optimizer(name: str, num_steps: Any | None = None, *, safeguards: bool = True,
                         **overrides: Any) -> optax.GradientTransformationExtraArgs:
    """A shipped learned optimizer, ready to use: :func:`~bilevel.lopt.pretrained`'s
    meta-parameters built with their recorded keyword arguments.

    >>> from bilevel import lopt
    >>> for name in lopt.available_pretrained():                  # doctest: +SKIP
    ...     opt = lopt.pretrained_optimizer(name, num_steps=1000)
    ...     state = opt.init(params)
    ...     updates, state = opt.update(grads, state, params, loss=loss)

    Args:
      name: one of :func:`~bilevel.lopt.available_pretrained` (``"mlp_lopt"``,
        ``"star_lopt"``, ``"velo_lopt"``).
      num_steps: the training horizon, the number of updates the optimizer will make; needed by
        ``star_lopt`` and ``velo_lopt``, accepted and unused by ``mlp_lopt`` (see
        :func:`build_optimizer`).
      safeguards: with the trust region and divergence guard (default; see
        :func:`build_optimizer`); ``False``: the meta-trained step rule, bit for bit.
      **overrides: keyword arguments replacing the recorded ones (``star_lopt``:
        ``nominal_step``, ``weight_decay``) and the safeguards' settings (``min_scale``,
        ``max_relative_step``, ``max_regress``, ``guard_rate``).

    Returns:
      an ``optax.GradientTransformationExtraArgs``.
    """
    where = "lopt.pretrained_optimizer"
    names = optimizers.available_pretrained()
    if name not in names:
        raise ValueError(f"{where}: no shipped learned optimizer named {name!r}; "
                         f"available: {list(names)}")
    meta, metadata = optimizers.pretrained(name)
    return _build(f"{where}({name!r})", meta, metadata, num_steps, safeguards, overrides)


def _build(where: str, meta: dict, metadata: dict, num_steps: Any, guarded: Any,
           overrides: dict) -> optax.GradientTransformationExtraArgs:
    name = metadata.get("optimizer") if isinstance(metadata, dict) else None
    if name not in BUILDERS:
        raise ValueError(f"{where}: metadata['optimizer'] must name one of {sorted(BUILDERS)}, "
                         f"got {name!r}")
    if not isinstance(guarded, bool):
        raise ValueError(f"{where}: safeguards must be True or False, got {guarded!r}")
    builder = BUILDERS[name]
    accepted = [p for p in inspect.signature(builder.build).parameters
                if p not in ("meta", "num_steps", *safeguards.DEFAULTS)]
    settings = {k: v for k, v in overrides.items() if k in safeguards.DEFAULTS}
    overrides = {k: v for k, v in overrides.items() if k not in settings}
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        known = ["num_steps", *accepted, "safeguards", *safeguards.DEFAULTS]
        raise TypeError(f"{where}: {name} takes no keyword argument {unknown[0]!r}; "
                        f"it accepts {known}")
    if settings and not guarded:
        raise ValueError(f"{where}: {sorted(settings)[0]} sets a safeguard, which "
                         f"safeguards=False switches off")
    safeguards.check_safeguards(where, **{**safeguards.DEFAULTS, **settings})
    if num_steps is not None:
        _check_num_steps(where, num_steps)
    horizon = builder.reads_horizon(meta)
    if horizon and num_steps is None:
        raise ValueError(f"{where}: {name} reads the fraction of training t/num_steps; pass "
                         f"num_steps= (the number of updates it will make)")
    recorded = {k: v for k, v in dict(metadata.get("optimizer_kwargs", {})).items()
                if k != "num_steps"}
    kwargs = {**recorded, **overrides}
    if builder.builtin_safeguards:
        off = {**safeguards.DEFAULTS, **safeguards.OFF}
        return builder.build(meta, num_steps if horizon else None, **kwargs,
                             **({**safeguards.DEFAULTS, **settings} if guarded else off))
    rule = builder.build(meta, num_steps if horizon else None, **kwargs)
    return safeguards.safeguarded(rule, **settings) if guarded else rule


# --------------------------------------------------------------------------------------------
# flax.


def _bind_extra_args(tx: optax.GradientTransformation, extra_args: dict
                     ) -> optax.GradientTransformation:
    """``tx`` whose ``update(updates, state, params)`` passes ``extra_args`` on (dropped by a
    plain ``GradientTransformation``, as ``optax.chain`` does)."""
    tx = optax.with_extra_args_support(tx)

    def update(updates, state, params=None):
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformation(tx.init, update)


class TrainState(train_state.TrainState):
    """flax's ``TrainState`` whose :meth:`apply_gradients` passes the loss to the optimizer.

    >>> from bilevel import lopt
    >>> state = lopt.TrainState.create(                             # doctest: +SKIP
    ...     apply_fn=model.apply, params=variables["params"],
    ...     tx=lopt.pretrained_optimizer("velo_lopt", num_steps=1000))
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)   # doctest: +SKIP
    >>> state = state.apply_gradients(grads=grads, loss=loss)           # doctest: +SKIP

    Any optax transformation works; one without extra arguments ignores the loss.
    """

    def apply_gradients(self, *, grads: Any, loss: Any = None, **kwargs: Any) -> TrainState:
        """One update of ``params`` and ``opt_state``, ``step`` incremented.

        Args:
          grads: gradients shaped like ``params``.
          loss: the minibatch loss, passed to ``tx.update(..., loss=loss)`` unless None.
          **kwargs: a keyword naming a field of the state replaces it (as in flax); any other
            is passed to ``tx.update`` as an extra argument.
        """
        fields = {field.name for field in dataclasses.fields(self)}
        extra_args = {k: v for k, v in kwargs.items() if k not in fields}
        if loss is not None:
            extra_args["loss"] = loss
        replaced = {k: v for k, v in kwargs.items() if k in fields}
        # flax's update (including its overwrite-with-gradient collection) with tx bound to the
        # extra arguments for this one call.
        bound = self.replace(tx=_bind_extra_args(self.tx, extra_args))
        new = super(TrainState, bound).apply_gradients(grads=grads, **replaced)
        return new.replace(tx=replaced.get("tx", self.tx))
