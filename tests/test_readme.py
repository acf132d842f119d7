"""The README's Python example runs and prints what its comments say."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
    text = (ROOT / "README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```python")[1:]]


def test_readme_first_example_runs():
    code = _python_blocks()[0] + "\nprint(hvp.status_message(info))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "converged after 6 iterations" in result.stdout


def test_readme_hypergradient_example_runs():
    code = _python_blocks()[1] + "\nassert bool(info.finite)\n"
    code += "assert result.history[-1]['outer_loss'] < result.history[0]['outer_loss']\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
