"""How a message names a setting.

The library's settings are fields of its configs: ``RunConfig.batch_size``
is ``batch_size``, ``OptimizerConfig.learning_rate`` inside a run is
``optimizer.learning_rate``. A message that asks for a setting to change
names it with :func:`setting`: by its field, or, while a front end has set
its own names with :func:`use_names` (the command line: ``--batch-size``,
``--lr``), by the name its user gave the setting there. So the library
never spells a command-line flag, and the command line's messages never
spell a Python field.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

__all__ = ["setting", "use_names"]

# (field, value or None) -> the name a message uses; None: the field's own.
Namer = Callable[[str, Any], str]

_namer: Namer | None = None


def setting(field: str, value: Any = None) -> str:
  """The name of setting ``field`` in a message (``"batch_size"``, or the
  front end's ``"--batch-size"``). ``value`` asks for the name that sets
  it to that value where the front end has one per value (``resume`` set
  to False: ``--no-resume``)."""
  if _namer is not None:
    return _namer(field, value)
  return field if value is None else f"{field}={value!r}"


@contextlib.contextmanager
def use_names(namer: Namer | None) -> Iterator[None]:
  """Within the block, :func:`setting` names settings with ``namer``.

  Process-wide (messages raised in other threads use it too), so a front
  end sets it once around its work.
  """
  global _namer
  previous, _namer = _namer, namer
  try:
    yield
  finally:
    _namer = previous
