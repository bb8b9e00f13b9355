"""The README's example and the docstring examples run as written."""

import doctest
import pathlib
import re

from subspace_jax import transform

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(text):
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_example_runs_and_learns(capsys):
  blocks = [b for b in _python_blocks((ROOT / "README.md").read_text()) if "for core in" in b]
  assert len(blocks) == 1
  exec(compile(blocks[0], "README.md", "exec"), {})
  losses = [float(x) for x in capsys.readouterr().out.split()]
  assert len(losses) == 3
  # The loss at the start is mean((0 - 1)^2) = 1; every method must learn.
  assert all(0 <= l < 0.5 for l in losses), losses


def test_docstring_examples():
  result = doctest.testmod(transform, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 3 and result.failed == 0
