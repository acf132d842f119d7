"""The argparse types every command line shares: a bad value is one message naming the rule."""

import argparse
import dataclasses

import pytest

from bilevel import argtypes as _argtypes
from bilevel.config import Float, Int, field, validate


@pytest.mark.parametrize(("text", "message"), [
    ("-1", "must be a finite number > 0, got '-1'"),
    ("0", "must be a finite number > 0, got '0'"),
    ("inf", "must be a finite number > 0, got 'inf'"),
    ("x", "must be a finite number > 0, got 'x'"),
])
def test_positive_float_says_greater_than_zero(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        _argtypes.positive_float(text)


@pytest.mark.parametrize(("argtype", "field_rule", "good", "bad"), [
    (_argtypes.positive_int, Int(min=1), ("1", 1), ("0", 0)),
    (_argtypes.nonnegative_int, Int(min=0), ("0", 0), ("-1", -1)),
    (_argtypes.positive_float, Float(gt=0), ("0.5", 0.5), ("0", 0.0)),
    (_argtypes.nonnegative_float, Float(ge=0), ("0", 0.0), ("-0.5", -0.5)),
])
def test_an_option_and_a_config_field_say_a_rule_alike(argtype, field_rule, good, bad):
    """The argparse type and the config field's check phrase the rule in the same words."""
    assert argtype(good[0]) == good[1]
    with pytest.raises(argparse.ArgumentTypeError) as option_error:
        argtype(bad[0])

    @dataclasses.dataclass
    class Config:
        value: float = field(good[1], rule=field_rule, help="a value")

        def __post_init__(self):
            validate(self, "Config")

    with pytest.raises(ValueError) as field_error:
        Config(bad[1])
    rule = str(option_error.value).split(", got ")[0]
    assert str(field_error.value) == f"Config: value {rule}, got {bad[1]!r}"


def test_out_dir_accepts_a_new_folder_under_a_writable_one_and_refuses_files(tmp_path):
    assert _argtypes.out_dir(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is an existing file; expected a folder"):
        _argtypes.out_dir(str(tmp_path / "file"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        _argtypes.out_dir(str(tmp_path / "file" / "run"))
