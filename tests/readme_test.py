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
        # As a script: the own-loop example's `if __name__ == "__main__":` block runs too.
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.endswith("(5, 5)") for line in out), out  # ACC, 5x5 accuracy matrix
    assert "1 [-0. -0. -0.]" in out, out  # GPM example: rank 1, protected row projected out
    firsts = {m.group(1): float(m.group(2)) for line in out
              if (m := re.match(r"(finetune|ewc): after both tasks, task 0 accuracy ([0-9.]+)",
                                line))}
    assert firsts["ewc"] > firsts["finetune"] + 0.1, out  # the own-loop EWC example


def test_readme_own_loop_example_is_the_example_file():
    with open(os.path.join(ROOT, "examples", "own_loop_ewc.py")) as f:
        example = f.read()
    body = example[example.index("import jax"):].rstrip()
    assert f"```python\n{body}\n```" in _readme()


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", _readme(), re.S)
    test_cmd = next(line.strip() for b in bash_blocks for line in b.splitlines()
                    if "pytest" in line)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ci[-1] == test_cmd
