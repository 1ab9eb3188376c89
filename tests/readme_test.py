"""The README stays true: its code example runs and CI runs its test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.endswith("(5, 5)") for line in out), out  # ACC, 5x5 accuracy matrix
    assert "1 [-0. -0. -0.]" in out, out  # GPM example: rank 1, protected row projected out


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", _readme(), re.S)
    test_cmd = next(line.strip() for b in bash_blocks for line in b.splitlines()
                    if "pytest" in line)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ci[-1] == test_cmd
