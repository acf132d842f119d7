"""Configs declared once: a dataclass field carries its default, rule (type and range), help and
command-line option, and both the checks and the argparse options are derived from it.

>>> import argparse, dataclasses
>>> from bilevel.config import Choice, Float, Int, add_arguments, field, from_args, validate
>>> @dataclasses.dataclass(frozen=True)
... class Run:
...     steps: int = field(100, rule=Int(min=1), help="outer steps")
...     lr: float = field(1e-3, rule=Float(gt=0), help="learning rate")
...     mode: str = field("fast", rule=Choice(("fast", "exact")), help="how")
...     def __post_init__(self):
...         validate(self, "Run")
>>> Run(steps=0)
Traceback (most recent call last):
ValueError: Run: steps must be an integer >= 1, got 0
>>> parser = argparse.ArgumentParser()
>>> add_arguments(parser, Run)                      # --steps, --lr, --mode
>>> from_args(Run, parser.parse_args(["--lr", "0.1"]))
Run(steps=100, lr=0.1, mode='fast')

Every rule has one phrasing, used by :func:`validate` (``"{where}: {name} must be {rule},
got {value!r}"``) and by its argparse type (``"argument --flag: must be {rule}, got '...'"``,
one ``error:`` line, exit status 2). NumPy integers and floats are accepted and stored as Python
ones; ``bool`` is not an integer. This module imports neither JAX nor NumPy, so that a command's
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable, Collection, Iterable
from typing import Any

__all__ = ["Bool", "Choice", "Float", "Int", "Rule", "Str", "Tuple", "add_arguments", "field",
           "field_like", "flag", "from_args", "validate"]

#: The key of a field's declaration in ``dataclasses.Field.metadata``.
_KEY = "bilevel.config"


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


# --------------------------------------------------------------------------------------------
# Rules


class Rule:
    """What a value must be. A rule implements ``describe`` (``"an integer >= 1"``),
    ``describe_items`` (``"integers >= 1"``, as a :class:`Tuple`'s items) and ``accept`` (the
    value normalised, or a ``ValueError``), and may change ``from_text`` (a command-line word as
    a value), ``show``, ``argparse_options`` and ``deferred``. ``rule(text)`` parses a word, so a
    rule is an argparse ``type``."""

    none: bool = False  # None is accepted too

    def describe(self) -> str:
        raise NotImplementedError

    def describe_items(self) -> str:
        raise NotImplementedError

    def accept(self, value: Any) -> Any:
        raise NotImplementedError

    #: A command-line word as a value to accept (a ``ValueError`` refuses it).
    from_text = staticmethod(str)

    def what(self) -> str:
        """The rule as the messages say it, ``None`` included where accepted."""
        return f"None or {self.describe()}" if self.none else self.describe()

    @property
    def deferred(self) -> bool:
        """Whether the names it checks come from a registry read only when checked (so the
        command line checks them after parsing, see :func:`from_args`)."""
        return False

    def check(self, value: Any) -> Any:
        """``value`` normalised (NumPy numbers as Python ones, lists as tuples), or a
        ``ValueError``."""
        if value is None and self.none:
            return None
        return self.accept(value)

    def parse(self, text: str) -> Any:
        """A command-line word as a value, or an ``argparse.ArgumentTypeError`` saying the rule
        (``must be an integer >= 1, got '0'``)."""
        try:
            return self.accept(self.from_text(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None

    def __call__(self, text: str) -> Any:
        return self.parse(text)

    def show(self, value: Any) -> str:
        """``value`` as the option would be written (the help's default)."""
        return str(value)

    def argparse_options(self, default: Any) -> dict:
        """The ``add_argument`` keywords that parse a value of this rule."""
        return {"type": self}


def _bounds(low: Any, low_closed: bool, high: Any, high_closed: bool) -> str:
    """``" >= 1"``, ``" < 1"``, ``" in (0, 1]"`` or ``""``."""
    if low is not None and high is not None:
        return (f" in {'[' if low_closed else '('}{_number(low)}, {_number(high)}"
                f"{']' if high_closed else ')'}")
    if low is not None:
        return f" {'>=' if low_closed else '>'} {_number(low)}"
    if high is not None:
        return f" {'<=' if high_closed else '<'} {_number(high)}"
    return ""


@dataclasses.dataclass(frozen=True, eq=False)
class Int(Rule):
    """An integer (NumPy's too, stored as ``int``; not ``bool``) in ``[min, max]``."""

    min: int | None = None
    max: int | None = None
    none: bool = False

    def describe(self) -> str:
        return "an integer" + _bounds(self.min, True, self.max, True)

    def describe_items(self) -> str:
        return "integers" + _bounds(self.min, True, self.max, True)

    def accept(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError
        value = int(value)
        if (self.min is not None and value < self.min) or (self.max is not None
                                                           and value > self.max):
            raise ValueError
        return value

    from_text = staticmethod(int)


@dataclasses.dataclass(frozen=True, eq=False)
class Float(Rule):
    """A finite real number (NumPy's stored as ``float``; not ``bool``) with at most one lower
    bound (``gt`` or ``ge``) and one upper (``lt`` or ``le``): ``Float(gt=0, lt=1)`` is (0, 1)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    none: bool = False

    def __post_init__(self):
        if (self.gt is not None and self.ge is not None) or (self.lt is not None
                                                             and self.le is not None):
            raise ValueError("config.Float: give at most one of gt, ge and one of lt, le")

    def _range(self) -> str:
        low = self.ge if self.gt is None else self.gt
        high = self.le if self.lt is None else self.lt
        return _bounds(low, self.gt is None, high, self.lt is None)

    def _both(self) -> bool:
        return {self.gt, self.ge} != {None} and {self.lt, self.le} != {None}

    def describe(self) -> str:
        return ("a number" if self._both() else "a finite number") + self._range()

    def describe_items(self) -> str:
        return ("numbers" if self._both() else "finite numbers") + self._range()

    def accept(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError
        if not isinstance(value, int | float):
            value = float(value)
        ok = (math.isfinite(value)
              and (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
              and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        if not ok:
            raise ValueError
        return value

    from_text = staticmethod(float)


@dataclasses.dataclass(frozen=True, eq=False)
class Choice(Rule):
    """One of ``names``: a collection (a live view of a registry is read at every check) or a
    callable returning one, called only when a value is checked (a registry whose import is
    slow: the command line then checks the option after parsing, and ``summary`` says in
    ``--help`` what the names are)."""

    names: Collection[str] | Callable[[], Collection[str]]
    summary: str | None = None
    none: bool = False

    def _names(self) -> Collection[str]:
        return self.names() if callable(self.names) else self.names

    @property
    def deferred(self) -> bool:
        return callable(self.names)

    def describe(self) -> str:
        return f"one of {tuple(self._names())!r}"

    def describe_items(self) -> str:
        return f"names from {tuple(self._names())!r}"

    def accept(self, value: Any) -> str:
        try:
            if value in self._names():
                return value
        except TypeError:  # unhashable
            pass
        raise ValueError

    def listed(self) -> str:
        """The names as ``--help`` lists them (``summary`` for a deferred registry)."""
        if self.deferred:
            return self.summary or "names checked when the command runs"
        return ", ".join(self._names())

    def argparse_options(self, default: Any) -> dict:
        if self.deferred:
            return {"type": str}
        return {"choices": tuple(self._names())}


@dataclasses.dataclass(frozen=True, eq=False)
class Str(Rule):
    """Any string (``noun`` names it in messages: ``Str("name")``)."""

    noun: str = "string"
    none: bool = False

    def describe(self) -> str:
        return _article(self.noun)

    def describe_items(self) -> str:
        return f"{self.noun}s"

    def accept(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError
        return value


@dataclasses.dataclass(frozen=True, eq=False)
class Bool(Rule):
    """``True`` or ``False``; on the command line a flag (``--x``, or ``--x/--no-x`` when the
    default is ``True``)."""

    none: bool = False

    def describe(self) -> str:
        return "True or False"

    def describe_items(self) -> str:
        return "booleans"

    def accept(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError
        return value

    def argparse_options(self, default: Any) -> dict:
        return {"action": _Toggle if default else "store_true"}


class _Toggle(argparse.BooleanOptionalAction):
    """``--x/--no-x``, whose help is left as given (Python < 3.13 appends the default again)."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.help = help


@dataclasses.dataclass(frozen=True, eq=False)
class Tuple(Rule):
    """A tuple (a list is stored as one) whose items follow ``of``; ``nonempty`` refuses ``()``,
    ``unique`` drops repeats (keeping the first). On the command line: a comma list."""

    of: Rule
    nonempty: bool = False
    unique: bool = False
    none: bool = False

    @property
    def deferred(self) -> bool:
        return self.of.deferred

    def describe(self) -> str:
        return f"a {'non-empty ' if self.nonempty else ''}tuple of {self.of.describe_items()}"

    def describe_items(self) -> str:
        return f"tuples of {self.of.describe_items()}"

    def accept(self, value: Any) -> tuple:
        if not isinstance(value, tuple | list):
            raise ValueError
        items = tuple(self.of.check(item) for item in value)
        if self.unique:
            items = tuple(dict.fromkeys(items))
        if self.nonempty and not items:
            raise ValueError
        return items

    def parse(self, text: str) -> tuple:
        pieces = [piece.strip() for piece in text.split(",")] if text.strip() else []
        try:
            if "" in pieces:
                raise ValueError
            items = [self.of.from_text(piece) for piece in pieces]
            return self.accept(items) if not self.of.deferred else self._shape(items)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a {'non-empty ' if self.nonempty else ''}comma-separated list of "
                f"{self.of.describe_items()}, got {text!r}") from None

    def _shape(self, items: list) -> tuple:
        """The tuple without checking the names (a deferred registry: checked later)."""
        items = tuple(dict.fromkeys(items)) if self.unique else tuple(items)
        if self.nonempty and not items:
            raise ValueError
        return items

    def show(self, value: Any) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else self.of.show(v) for v in value)


# --------------------------------------------------------------------------------------------
# Fields


@dataclasses.dataclass(frozen=True)
class _Declaration:
    help: str
    rule: Rule | None
    cli: bool | str  # False: no option; True: --field-name; a string: that flag
    metavar: str | None
    shown: str | None  # the help's default, where the value alone would mislead
    aliases: tuple[str, ...] = ()  # further flags of the same option (old names)


def field(default: Any = dataclasses.MISSING, *, help: str, rule: Rule | None = None,
          cli: bool | str = True, metavar: str | None = None, shown: str | None = None,
          aliases: tuple[str, ...] = (), default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field declared once: its default, ``rule`` (checked by :func:`validate`),
    ``help`` and command-line option.

    Args:
      default, default_factory: as :func:`dataclasses.field`.
      help: what the field means; the option's help (its default is appended; ``{choices}``
        stands for the names of a :class:`Choice`, or of a :class:`Tuple`'s).
      rule: a :class:`Rule`, or ``None`` for a field that is not checked.
      cli: ``True`` for an option ``--field-name``, a flag such as ``"--slots"`` for an option
        named otherwise, ``False`` for none.
      metavar: the option's argparse ``metavar``.
      shown: what the help says the default is, when the value alone would mislead (argparse's
        ``%(default)s`` may be used in it).
      aliases: further flags of the same option, e.g. a renamed option's old flag.
    """
    return _field(default, default_factory,
                  _Declaration(help, rule, cli, metavar, shown, tuple(aliases)))


def _field(default: Any, default_factory: Any, declaration: _Declaration) -> Any:
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_KEY: declaration})


def field_like(cls: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """A field declared as ``cls``'s field ``name`` (rule, help, option: the same flag even under
    another field name), with another ``default`` and the ``changes`` given (``help``, ``rule``,
    ``cli``, ``metavar``, ``shown``, ``default_factory``)."""
    source = _fields(cls)[name]
    declaration = _declaration(source)
    factory = changes.pop("default_factory", dataclasses.MISSING)
    if default is dataclasses.MISSING and factory is dataclasses.MISSING:
        default, factory = source.default, source.default_factory
    changes.setdefault("cli", flag(cls, name) or False)
    return _field(default, factory, dataclasses.replace(declaration, **changes))


def _fields(cls: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _declaration(f: dataclasses.Field) -> _Declaration | None:
    return f.metadata.get(_KEY)


def flag(cls: Any, name: str) -> str | None:
    """The option of ``cls``'s field ``name`` (``"--horizon-start"``), ``None`` if it has none."""
    declaration = _declaration(_fields(cls)[name])
    if declaration is None or declaration.cli is False:
        return None
    return declaration.cli if isinstance(declaration.cli, str) else "--" + name.replace("_", "-")


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def validate(config: Any, where: str | None = None) -> None:
    """Check every field of ``config`` that has a rule (call it from ``__post_init__``): raise
    ``ValueError("{where}: {name} must be {rule}, got {value!r}")`` for the first that breaks
    its rule, and store the others normalised (NumPy numbers as Python ones, lists as tuples),
    frozen dataclasses included."""
    where = where or type(config).__name__
    for f in dataclasses.fields(config):
        declaration = _declaration(f)
        if declaration is None or declaration.rule is None:
            continue
        value = getattr(config, f.name)
        try:
            checked = declaration.rule.check(value)
        except ValueError:
            raise ValueError(f"{where}: {f.name} must be {declaration.rule.what()}, got "
                             f"{value!r}") from None
        if checked is not value:
            object.__setattr__(config, f.name, checked)


# --------------------------------------------------------------------------------------------
# The argparse bridge


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _names_rule(rule: Rule | None) -> Choice | None:
    """The :class:`Choice` whose names the help lists (argparse lists static ones itself)."""
    if isinstance(rule, Tuple):
        rule = rule.of
    return rule if isinstance(rule, Choice) else None


def _help(declaration: _Declaration, default: Any) -> str:
    text, choice = declaration.help, _names_rule(declaration.rule)
    if choice is not None and "{choices}" in text:
        text = text.replace("{choices}", choice.listed())
    elif choice is not None and choice.deferred:
        text = f"{text} ({choice.listed()})"
    elif choice is not None and choice is not declaration.rule:  # argparse lists a Choice's
        text = f"{text} (from {choice.listed()})"
    if default is dataclasses.MISSING or "(default:" in text:
        return text
    if declaration.shown is not None:
        shown = declaration.shown
    else:
        rule = declaration.rule
        shown = "None" if default is None or rule is None else rule.show(default)
        shown = shown.replace("%", "%%")
    return f"{text} (default: {shown})"


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, *,
                  only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  defaults: dict[str, Any] | None = None,
                  changes: dict[str, dict[str, Any]] | None = None) -> None:
    """Add one option per field of ``cls`` that has one (see :func:`field`) to ``parser`` (a
    parser or an argument group), in field order.

    The option's type is its rule's (a bad word is one ``error:`` line saying the rule, exit
    status 2), a :class:`Choice`'s names are argparse ``choices``, a :class:`Bool` is a flag, a
    :class:`Tuple` a comma list; the help is the field's, with its default appended.

    Args:
      only, exclude: field names to add (default: all) and to leave out.
      defaults: field name -> the option's default, where the command's differs from the
        config's (``None`` for a default the command works out itself).
      changes: field name -> what the option says otherwise than the field: ``help``, ``rule``,
        ``metavar``, ``shown`` (the default as the help states it).
    """
    defaults, changes = defaults or {}, changes or {}
    only = None if only is None else set(only)
    unknown = (set(only or ()) | set(exclude) | set(defaults) | set(changes)) - set(_fields(cls))
    if unknown:
        raise ValueError(f"config.add_arguments: {cls.__name__} has no field "
                         f"{sorted(unknown)[0]!r}")
    for f in dataclasses.fields(cls):
        declaration = _declaration(f)
        option = flag(cls, f.name)
        if option is None or f.name in exclude or (only is not None and f.name not in only):
            continue
        declaration = dataclasses.replace(declaration, **changes.get(f.name, {}))
        default = defaults.get(f.name, _default(f))
        rule = declaration.rule
        keywords = rule.argparse_options(default) if rule is not None else {}
        if declaration.metavar is not None:
            keywords["metavar"] = declaration.metavar
        if default is dataclasses.MISSING:
            keywords["required"] = True
        else:
            keywords["default"] = default
        parser.add_argument(option, *declaration.aliases, dest=_dest(option),
                            help=_help(declaration, default), **keywords)


def from_args(cls: type, namespace: argparse.Namespace, *,
              parser: argparse.ArgumentParser | None = None, **values: Any) -> Any:
    """``cls`` built from the options :func:`add_arguments` added (a field whose option is not
    in ``namespace`` keeps its default) and ``values`` (which win).

    Names from a deferred registry (:class:`Choice` with a callable) are checked here, saying
    the option: ``argument --solver: must be one of (...), got 'x'``. With ``parser``, a bad
    value is ``parser.error`` (one line, exit status 2); without, a ``ValueError``.
    """
    try:
        kwargs = {}
        for f in dataclasses.fields(cls):
            option = flag(cls, f.name)
            if f.name in values or option is None or not hasattr(namespace, _dest(option)):
                continue
            kwargs[f.name] = value = getattr(namespace, _dest(option))
            rule = _declaration(f).rule
            if rule is not None and rule.deferred:
                _check_option(rule, option, value)
        return cls(**kwargs, **values)
    except ValueError as error:
        if parser is None:
            raise
        parser.error(str(error))


def _check_option(rule: Rule, option: str, value: Any) -> None:
    try:
        rule.check(value)
    except ValueError:
        raise ValueError(f"argument {option}: must be {rule.what()}, got {value!r}") from None
