"""The argparse types every command line shares: a bad value is one message naming the rule."""

import argparse

import pytest

from bilevel import argtypes as _argtypes


@pytest.mark.parametrize(("text", "message"), [
    ("-1", "must be a finite number > 0, got '-1'"),
    ("0", "must be a finite number > 0, got '0'"),
    ("inf", "must be a finite number > 0, got 'inf'"),
    ("x", "expected a number, got 'x'"),
])
def test_positive_float_says_greater_than_zero(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        _argtypes.positive_float(text)


def test_out_dir_accepts_a_new_folder_under_a_writable_one_and_refuses_files(tmp_path):
    assert _argtypes.out_dir(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is an existing file; expected a folder"):
        _argtypes.out_dir(str(tmp_path / "file"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        _argtypes.out_dir(str(tmp_path / "file" / "run"))
