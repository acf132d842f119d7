"""``bilevel lopt``'s option declarations: they import no JAX (so ``--help`` answers at once),
every option's help states its default, and the help states the run-folder rule."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.lopt import cli as lopt_cli
from bilevel.lopt import evaluate, options, train

ROOT = Path(__file__).resolve().parents[1]


def _subparsers() -> dict:
    parser = argparse.ArgumentParser(prog="bilevel lopt")
    lopt_cli.add_arguments(parser)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_declaring_the_options_imports_no_jax():
    code = ("import argparse, sys\n"
            "import bilevel.lopt.cli\n"
            "p = argparse.ArgumentParser(prog='bilevel lopt')\n"
            "bilevel.lopt.cli.add_arguments(p)\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help']):\n"
            "    try:\n"
            "        p.parse_args(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'scipy', 'numpy')\n"
            "             if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_imports_its_parts_on_first_use():
    code = ("import sys\n"
            "from bilevel import lopt\n"
            "assert 'jax' not in sys.modules\n"
            "assert callable(lopt.star_lopt) and 'quadratic' in lopt.TASKS\n"
            "assert lopt.optimizers.PRETRAINED_DIR.is_dir() and lopt.velo.velo_lopt\n"
            "print(sorted(set(lopt.__all__) - set(dir(lopt))))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_option_has_help_with_its_default(command):
    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert action.help and "default" in text, action.option_strings


def test_tuple_defaults_are_shown_as_the_comma_lists_the_options_take():
    sub = _subparsers()["eval"]
    helps = {a.dest: sub._get_formatter()._expand_help(a) for a in sub._actions}
    assert "(default: mlp_lopt,star_lopt,velo_lopt,adam,nadamw,sgdm)" in helps["optimizers"]
    assert "(default: 0.0001,0.000316228,0.001," in helps["lrs"]


def test_train_help_states_the_run_folder_rule():
    text = _subparsers()["train"].format_help()
    for phrase in ("resumes it", "left", "untouched", "refused", "--overwrite"):
        assert phrase in text


def test_the_config_and_names_live_in_one_place():
    assert train.MetaTrainConfig is options.MetaTrainConfig
    assert evaluate.OPTIMIZERS == options.LEARNED + options.BASELINES
    assert evaluate.DEFAULT_LRS == options.DEFAULT_LRS and len(options.DEFAULT_LRS) == 9
    defaults = train.config_from_args(_subparsers()["train"].parse_args([]))
    assert defaults == options.MetaTrainConfig()
