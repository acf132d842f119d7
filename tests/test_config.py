"""bilevel.config: each rule's accepted and refused values and its one phrasing, and the bridge
from a config dataclass to argparse options and back."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bilevel.config import (
    Bool,
    Choice,
    Float,
    Int,
    Str,
    Tuple,
    add_arguments,
    field,
    field_like,
    flag,
    from_args,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def _checked(rule, value):
    """``value`` through a one-field config whose field has ``rule``."""

    @dataclasses.dataclass(frozen=True)
    class One:
        x: object = field(None, rule=rule, help="x")

        def __post_init__(self):
            validate(self, "One")

    return One(value).x


# --------------------------------------------------------------------------------------------
# Rules: accepted values (normalised), refused ones, and the message


@pytest.mark.parametrize("rule, value, stored", [
    (Int(min=1), 1, 1),
    (Int(min=1), np.int64(3), 3),
    (Int(min=0), np.uint8(0), 0),
    (Int(), -7, -7),
    (Int(min=1, max=20), 20, 20),
    (Int(min=1, none=True), None, None),
    (Float(gt=0), 2, 2),
    (Float(gt=0), np.float32(0.5), 0.5),
    (Float(gt=0), np.int64(2), 2.0),
    (Float(ge=0), 0.0, 0.0),
    (Float(gt=0, lt=1), 0.95, 0.95),
    (Float(ge=0, le=1e3), 1e3, 1e3),
    (Float(gt=0, none=True), None, None),
    (Choice(("a", "b")), "b", "b"),
    (Str(), "", ""),
    (Bool(), False, False),
    (Tuple(Int(min=1)), [16, np.int32(32)], (16, 32)),
    (Tuple(Int(min=1)), (), ()),
    (Tuple(Str(), unique=True), ["cg", "cg", "lissa"], ("cg", "lissa")),
])
def test_accepted_values_are_stored_normalised(rule, value, stored):
    result = _checked(rule, value)
    assert result == stored and type(result) is type(stored)


@pytest.mark.parametrize("rule, value, what", [
    (Int(min=1), 0, "an integer >= 1"),
    (Int(min=1), True, "an integer >= 1"),  # bool is not an integer
    (Int(min=1), 2.0, "an integer >= 1"),
    (Int(min=1), "3", "an integer >= 1"),
    (Int(min=1), None, "an integer >= 1"),
    (Int(), np.float64(1.0), "an integer"),
    (Int(max=5), 6, "an integer <= 5"),
    (Int(min=1, max=20), 21, "an integer in [1, 20]"),
    (Int(min=1, none=True), 0, "None or an integer >= 1"),
    (Float(gt=0), 0.0, "a finite number > 0"),
    (Float(gt=0), float("inf"), "a finite number > 0"),
    (Float(gt=0), float("nan"), "a finite number > 0"),
    (Float(gt=0), False, "a finite number > 0"),
    (Float(gt=0), "1", "a finite number > 0"),
    (Float(ge=0), -1e-9, "a finite number >= 0"),
    (Float(lt=1), 1.0, "a finite number < 1"),
    (Float(gt=0, lt=1), 1.0, "a number in (0, 1)"),
    (Float(ge=0, le=0.9999999), 1.0, "a number in [0, 0.9999999]"),
    (Float(gt=0, none=True), -1.0, "None or a finite number > 0"),
    (Choice(("a", "b")), "c", "one of ('a', 'b')"),
    (Choice(("a", "b")), ["a"], "one of ('a', 'b')"),  # unhashable: refused, not a TypeError
    (Str("name"), 3, "a name"),
    (Str("integer"), None, "an integer"),
    (Bool(), 1, "True or False"),
    (Tuple(Int(min=1)), (16, 0), "a tuple of integers >= 1"),
    (Tuple(Int(min=1)), "16", "a tuple of integers >= 1"),
    (Tuple(Int(min=1), nonempty=True), (), "a non-empty tuple of integers >= 1"),
    (Tuple(Float(gt=0, lt=1)), (0.5, 1), "a tuple of numbers in (0, 1)"),
    (Tuple(Choice(("mlp", "cnn")), nonempty=True), ("gru",),
     "a non-empty tuple of names from ('mlp', 'cnn')"),
])
def test_refused_values_say_the_rule_one_way(rule, value, what):
    with pytest.raises(ValueError) as error:
        _checked(rule, value)
    assert str(error.value) == f"One: x must be {what}, got {value!r}"


def test_a_float_takes_one_bound_a_side():
    with pytest.raises(ValueError, match="at most one of gt, ge"):
        Float(gt=0, ge=0)


def test_choice_reads_a_live_registry_at_every_check():
    registry = {"cg": object}
    rule = Choice(registry)
    with pytest.raises(ValueError, match=r"must be one of \('cg',\), got 'lissa'"):
        _checked(rule, "lissa")
    registry["lissa"] = object
    assert _checked(rule, "lissa") == "lissa"


def test_a_callable_registry_is_read_only_when_a_value_is_checked():
    calls = []

    def names():
        calls.append(1)
        return ("cg", "neumann")

    rule = Choice(names, summary="a registered solver")
    assert rule.deferred and Tuple(rule).deferred and not calls
    assert _checked(rule, "cg") == "cg" and calls


@pytest.mark.parametrize("rule, text, value", [
    (Int(min=1), "3", 3),
    (Int(), "-2", -2),
    (Float(gt=0), "1e-3", 1e-3),
    (Str(), "x", "x"),
    (Tuple(Int(min=1)), "16,32", (16, 32)),
    (Tuple(Int(min=1)), " 16 , 32 ", (16, 32)),
    (Tuple(Int(min=1)), "", ()),
    (Tuple(Float(gt=0)), "0.1,1", (0.1, 1.0)),
    (Tuple(Str(), unique=True), "cg,lissa,cg", ("cg", "lissa")),
])
def test_words_parse(rule, text, value):
    assert rule(text) == value


@pytest.mark.parametrize("rule, text, message", [
    (Int(min=1), "0", "must be an integer >= 1, got '0'"),
    (Int(min=1), "x", "must be an integer >= 1, got 'x'"),
    (Int(min=1), "2.5", "must be an integer >= 1, got '2.5'"),
    (Float(gt=0), "nan", "must be a finite number > 0, got 'nan'"),
    (Float(gt=0, lt=1), "1", "must be a number in (0, 1), got '1'"),
    (Choice(("a", "b")), "c", "must be one of ('a', 'b'), got 'c'"),
    (Tuple(Int(min=1)), "1,x", "must be a comma-separated list of integers >= 1, got '1,x'"),
    (Tuple(Int(min=1)), "1,,5", "must be a comma-separated list of integers >= 1, got '1,,5'"),
    (Tuple(Int(min=1), nonempty=True), "",
     "must be a non-empty comma-separated list of integers >= 1, got ''"),
    (Tuple(Choice(("mlp", "cnn"))), "mlp,gru",
     "must be a comma-separated list of names from ('mlp', 'cnn'), got 'mlp,gru'"),
])
def test_bad_words_say_the_rule_as_the_field_does(rule, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        rule(text)
    assert str(error.value) == message


# --------------------------------------------------------------------------------------------
# The bridge, on a config shaped like semisup.Config


METHODS = ("supervised", "fixmatch", "confnet")
SOLVERS = {"cg": None, "neumann": None}


@dataclasses.dataclass(frozen=True)
class Run:
    method: str = field("fixmatch", rule=Choice(METHODS), help="how images are weighted")
    steps: int = field(1000, rule=Int(min=1), help="classifier steps")
    threshold: float = field(0.95, rule=Float(gt=0, lt=1), help="confidence threshold")
    lr: float = field(0.03, rule=Float(gt=0), help="learning rate")
    flip: bool = field(True, rule=Bool(), help="flip images")
    ema_only: bool = field(False, rule=Bool(), help="evaluate the average only")
    widths: tuple[int, ...] = field((16, 32), rule=Tuple(Int(min=1)), cli=False,
                                    help="convolution widths (the command's --model sets them)")
    conf_widths: tuple[int, ...] = field((8, 16), rule=Tuple(Int(min=1), nonempty=True),
                                         help="the confidence network's widths")
    solver: str = field("cg", rule=Choice(lambda: SOLVERS, summary="a name in SOLVERS"),
                        help="inverse-HVP solver")
    solver_iters: int = field(10, rule=Int(min=1), cli="--iters", help="its iterations")
    kinds: tuple[str, ...] = field(("mlp",), rule=Tuple(Choice(("mlp", "cnn")), nonempty=True),
                                   help="kinds, a comma list from {choices}")
    rho: float | None = field(None, rule=Float(gt=0, none=True), shown="computed",
                              help="a scale")

    def __post_init__(self):
        validate(self, "Run")
        if self.steps % 5:
            raise ValueError(f"Run: steps ({self.steps}) must be a multiple of 5")


class OneLineParser(argparse.ArgumentParser):
    """As ``bilevel``'s parser: a usage error is one ``prog: error: ...`` line, status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser(**options) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="run")
    add_arguments(parser.add_argument_group("training"), Run, exclude=("solver", "solver_iters"),
                  **options)
    add_arguments(parser.add_argument_group("meta"), Run, only=("solver", "solver_iters"))
    return parser


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    formatter = parser._get_formatter()
    return {a.dest: formatter._expand_help(a) for a in parser._actions if a.option_strings}


def test_parsing_nothing_gives_the_defaults():
    assert from_args(Run, _parser().parse_args([])) == Run()


def test_parsed_options_give_the_config_built_directly():
    argv = ["--method", "confnet", "--steps", "500", "--threshold", "0.9", "--no-flip",
            "--ema-only", "--conf-widths", "4,8,8", "--solver", "neumann", "--iters", "3",
            "--kinds", "cnn,mlp", "--rho", "0.5"]
    expected = Run(method="confnet", steps=500, threshold=0.9, flip=False, ema_only=True,
                   conf_widths=(4, 8, 8), solver="neumann", solver_iters=3, kinds=("cnn", "mlp"),
                   rho=0.5)
    assert from_args(Run, _parser().parse_args(argv)) == expected


def test_values_given_to_from_args_win_and_fields_without_options_keep_their_defaults():
    args = _parser().parse_args(["--steps", "20"])
    assert from_args(Run, args, widths=(), steps=10) == Run(widths=(), steps=10)
    assert from_args(Run, argparse.Namespace(steps=20)) == Run(steps=20)


def test_the_options_are_the_fields_that_declare_one():
    parser = _parser()
    flags = [a.option_strings for a in parser._actions if a.dest != "help"]
    assert flags == [["--method"], ["--steps"], ["--threshold"], ["--lr"], ["--flip", "--no-flip"],
                     ["--ema-only"], ["--conf-widths"], ["--kinds"], ["--rho"], ["--solver"],
                     ["--iters"]]
    assert flag(Run, "solver_iters") == "--iters" and flag(Run, "widths") is None
    assert flag(Run, "lr") == "--lr"
    titles = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert titles["meta"] == ["solver", "iters"]


def test_help_states_the_default_and_the_names():
    helps = _helps(_parser())
    assert helps["steps"] == "classifier steps (default: 1000)"
    assert helps["flip"] == "flip images (default: True)"  # once, on any Python
    assert helps["conf_widths"] == "the confidence network's widths (default: 8,16)"
    assert helps["kinds"] == "kinds, a comma list from mlp, cnn (default: mlp)"
    assert helps["solver"] == "inverse-HVP solver (a name in SOLVERS) (default: cg)"
    assert helps["rho"] == "a scale (default: computed)"
    assert "{supervised,fixmatch,confnet}" in _parser().format_help()  # argparse's choices


def test_the_command_may_have_its_own_defaults_and_words():
    parser = _parser(defaults={"steps": 200, "method": "confnet"},
                     changes={"lr": {"help": "SGD learning rate", "rule": Float(gt=0, le=10)}})
    helps = _helps(parser)
    assert helps["steps"] == "classifier steps (default: 200)"
    assert helps["lr"] == "SGD learning rate (default: 0.03)"
    assert from_args(Run, parser.parse_args([])) == Run(steps=200, method="confnet")
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "11"])
    with pytest.raises(ValueError, match="Run has no field 'step'"):
        add_arguments(OneLineParser(), Run, defaults={"step": 1})


@pytest.mark.parametrize("argv, line", [
    (["--steps", "0"], "run: error: argument --steps: must be an integer >= 1, got '0'"),
    (["--steps", "five"], "run: error: argument --steps: must be an integer >= 1, got 'five'"),
    (["--threshold", "1"], "run: error: argument --threshold: must be a number in (0, 1), got '1'"),
    (["--conf-widths", ""], "run: error: argument --conf-widths: must be a non-empty "
                            "comma-separated list of integers >= 1, got ''"),
    (["--kinds", "gru"], "run: error: argument --kinds: must be a non-empty comma-separated list "
                         "of names from ('mlp', 'cnn'), got 'gru'"),
    (["--method", "x"], "run: error: argument --method: invalid choice: 'x'"),  # argparse's
])
def test_a_bad_word_is_one_error_line_with_status_2(capsys, argv, line):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_deferred_names_and_cross_field_rules_are_checked_by_from_args(capsys):
    parser = _parser()
    args = parser.parse_args(["--solver", "lissa"])  # the registry is not read while parsing
    with pytest.raises(ValueError) as error:
        from_args(Run, args)
    assert str(error.value) == "argument --solver: must be one of ('cg', 'neumann'), got 'lissa'"
    for argv, line in ((["--solver", "lissa"], str(error.value)),
                       (["--steps", "7"], "Run: steps (7) must be a multiple of 5")):
        with pytest.raises(SystemExit) as exit_info:
            from_args(Run, parser.parse_args(argv), parser=parser)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"run: error: {line}\n"


def test_a_field_without_a_default_is_a_required_option():
    @dataclasses.dataclass
    class Needs:
        name: str = field(rule=Str(), help="a name")

    parser = OneLineParser(prog="needs")
    add_arguments(parser, Needs)
    assert from_args(Needs, parser.parse_args(["--name", "x"])) == Needs("x")
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_field_like_shares_the_rule_help_and_option_under_another_name():
    @dataclasses.dataclass(frozen=True)
    class Other:
        steps: int = field_like(Run, "steps", 100)
        iterations: int = field_like(Run, "solver_iters", help="iterations per solve")

        def __post_init__(self):
            validate(self, "Other")

    assert Other() == Other(100, 10)
    assert flag(Other, "iterations") == "--iters"
    with pytest.raises(ValueError, match=r"^Other: steps must be an integer >= 1, got 0$"):
        Other(steps=0)
    # The command's options (Run's defaults included) are what Other is built from.
    assert from_args(Other, _parser().parse_args(["--iters", "4"])) == Other(1000, 4)


# --------------------------------------------------------------------------------------------
# The shell


def test_the_module_imports_neither_jax_nor_numpy():
    code = "import sys, bilevel.argtypes; print(sorted({'jax', 'numpy'} & set(sys.modules)))"
    out = subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, text=True, timeout=60)
    assert out.strip() == "[]"


def test_a_derived_option_refuses_a_bad_value_in_one_line_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "bilevel", "lopt", "train", "--slots", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("bilevel lopt train: error: argument --slots: must be an integer "
                             ">= 1, got '0'\n")


def test_an_alias_names_the_same_option():
    @dataclasses.dataclass(frozen=True)
    class Renamed:
        maxiter: int = field(10, rule=Int(min=1), aliases=("--solver-iters",), help="budget")

        def __post_init__(self):
            validate(self, "Renamed")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Renamed)
    assert from_args(Renamed, parser.parse_args(["--solver-iters", "7"])) == Renamed(maxiter=7)
    assert from_args(Renamed, parser.parse_args(["--maxiter", "3"])) == Renamed(maxiter=3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--solver-iters", "0"])
