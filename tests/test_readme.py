"""The README's Python example runs and prints what its comments say."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = text.split("```python", 1)[1].split("```", 1)[0]
    code += "\nprint(hvp.status_message(info))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "converged after 6 iterations" in result.stdout
