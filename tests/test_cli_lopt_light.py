"""``bilevel lopt``'s option declarations: they import no JAX (so ``--help`` answers at once),
every option's help states its default, and the help states the run-folder rule."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.lopt import cli as lopt_cli
from bilevel.lopt import evaluate, options, tasks, train

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
    assert options.KINDS == tuple(tasks.KIND_WEIGHTS)  # --kinds' names are the family's
    # --optimizer's and lopt eval's names are the registry's (plus velo, trained by ES)
    from bilevel.lopt import optimizers
    assert options.OPTIMIZERS == tuple(optimizers.LEARNED_OPTIMIZERS)
    assert options.LEARNED == tuple(f"{name}_lopt" for name in options.OPTIMIZERS) + (
        "velo_lopt",)


def test_train_options_are_the_config_fields():
    """``lopt train`` has one option per MetaTrainConfig field that declares one, its default
    and help the field's; velo's config reads the same options (tasks_per_step is --slots)."""
    import dataclasses

    from bilevel.config import flag
    from bilevel.lopt import velo_train

    sub = _subparsers()["train"]
    actions = {a.option_strings[0]: a for a in sub._actions if a.option_strings}
    for config in (options.MetaTrainConfig, velo_train.VeLOTrainConfig):
        for f in dataclasses.fields(config):
            option = flag(config, f.name)
            assert (option in actions) == (option is not None), (config, f.name)
            if config is options.MetaTrainConfig and option not in (None, "--weight-decay"):
                assert actions[option].default == f.default, option
                assert actions[option].help.startswith(f.metadata["bilevel.config"].help[:20])
    assert flag(velo_train.VeLOTrainConfig, "tasks_per_step") == "--slots"
    args = sub.parse_args(["--optimizer", "velo", "--slots", "3", "--kinds", "quadratic"])
    assert velo_train.config_from_args(args) == velo_train.VeLOTrainConfig(
        steps=200, horizon_start=20, horizon=200, pool=8, tasks_per_step=3,
        kinds=("quadratic",))


def test_the_resume_rule_names_each_difference_by_its_option():
    """A field is named by its option (velo's tasks_per_step is --slots), a field without one
    by its name."""
    from bilevel.lopt import velo_train

    stored = velo_train.VeLOTrainConfig(steps=4)
    requested = velo_train.VeLOTrainConfig(steps=4, tasks_per_step=3, loss_cap=3.0, seed=1)
    assert train.changed_options(stored, requested, done=2) == [
        "--slots 2 there, 3 here", "loss_cap 2.0 there, 3.0 here", "--seed 0 there, 1 here"]
