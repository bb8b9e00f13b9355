"""The package's layout rules, read from its source: which folders import
which, and command-line flag names only in ``cli/``."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "subspace_jax"

# What each folder may not import (CONTRIBUTING.md, "Layout"): the models
# know nothing of training, the data and the step nothing of the run, and
# only the command line knows the command line.
FORBIDDEN = {
    "models": ("train", "run", "plan", "cli", "data"),
    "data": ("train", "run", "plan", "cli"),
    "train": ("run", "plan", "cli", "data"),
    "run": ("cli",),
    "plan": ("cli",),
}


def _modules():
  return sorted(PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return {n for n in names if n.startswith("subspace_jax.")}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_folder_imports_a_layer_above_it(folder):
  found = []
  for path in (PACKAGE / folder).rglob("*.py"):
    for name in _imports(ast.parse(path.read_text())):
      top = name.split(".")[1]
      if top in FORBIDDEN[folder]:
        found.append(f"{path.relative_to(PACKAGE)} imports {name}")
  assert not found, found


def test_no_folder_holds_more_than_12_modules():
  counts = {}
  for path in _modules():
    if path.name != "__init__.py":
      counts[path.parent] = counts.get(path.parent, 0) + 1
  assert max(counts.values()) <= 12, counts


# A flag of this package's command line: --name or --name-with-dashes (not
# another tool's --snake_case flag, which sources.py quotes for tfds).
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])")


def _docstrings(tree: ast.AST) -> set[int]:
  kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
  return {id(node.body[0].value) for node in ast.walk(tree)
          if isinstance(node, kinds) and node.body
          and isinstance(node.body[0], ast.Expr)
          and isinstance(node.body[0].value, ast.Constant)}


def test_flag_names_appear_only_in_the_command_line():
  """Outside ``cli/`` a message names a setting through
  :func:`subspace_jax.naming.setting`, which the command line maps to its
  flag; a literal ``--flag`` in a string would be wrong for Python users."""
  found = []
  for path in _modules():
    if path.relative_to(PACKAGE).parts[0] == "cli":
      continue
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    for node in ast.walk(tree):
      if (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in docs and _FLAG.search(node.value)):
        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: "
                     f"{_FLAG.search(node.value).group()}")
  assert not found, found


def test_the_flag_pattern_finds_flags():
  assert _FLAG.search("use --init-from DIR")
  assert not _FLAG.search("tfds build --data_dir=DIR")
