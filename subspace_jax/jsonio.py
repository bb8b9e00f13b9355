"""JSON read from files that may be damaged or written by a stranger.

Every JSON document the library reads from a file goes through here: a
checkpoint's ``config.json`` and weight index, tokenizer configs, the lines
of a fine-tuning JSONL file and the JSON items of a training checkpoint.
Python's ``json`` alone turns such input into tracebacks: a deeply nested
document into ``RecursionError`` (or, once parsed, into one in any code that
walks it), ``Infinity`` or ``1e400`` into a float that overflows the first
``int()`` it meets, a value of the wrong type into a ``TypeError`` far from
the file. Here a document is

* at most ``max_bytes`` long (read no further than that),
* nested at most ``max_depth`` arrays/objects deep (checked on the text,
  before parsing),
* made of finite numbers only (``NaN``, ``Infinity`` and numbers that
  overflow a float are refused),
* and, given a JSON Schema (https://json-schema.org, checked by the
  ``jsonschema`` package), of the types and within the ranges the reader
  uses,

or else a :class:`JSONError` (a ``ValueError``) whose message is one line
naming the key::

    config = jsonio.read(path, schema=SCHEMA)  # JSONError: "path: key: ..."
    record = jsonio.loads(line)                # JSONError: "not valid JSON ..."
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

__all__ = ["JSONError", "MAX_DEPTH", "MAX_BYTES", "loads", "read", "check"]

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted by default."""

MAX_BYTES = 64 * 2**20
"""Longest file :func:`read` accepts by default (64 MiB)."""

# A JSON string, escapes included (the "unrolled loop" form: linear time).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
# Longest part of a value quoted in a message.
_QUOTE = 80


class JSONError(ValueError):
  """JSON that cannot be used; the message is one line."""


def _nesting(text: str) -> int:
  """How deep the arrays and objects of ``text`` nest (outside strings)."""
  skeleton = _STRING.sub("", text).encode("utf-8", "surrogatepass")
  codes = np.frombuffer(skeleton, np.uint8)
  steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE)
  return int(np.cumsum(steps).max(initial=0))


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise JSONError(f"the number {text[:_QUOTE]} does not fit a float")
  return value


def _no_constant(name: str) -> Any:
  raise JSONError(f"{name} is not a finite number")


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
  """Parses one JSON document (see the module docstring).

  Args:
    text: The document (bytes are decoded as UTF-8).
    max_depth: Deepest nesting of arrays and objects accepted.

  Returns:
    The value, with finite numbers only.

  Raises:
    JSONError: ``not valid JSON (...)``, or why the document is refused;
      the caller prefixes where it comes from.
  """
  if isinstance(text, (bytes, bytearray)):
    try:
      text = bytes(text).decode("utf-8")
    except UnicodeDecodeError as e:
      raise JSONError(f"not UTF-8 text (bad byte at offset {e.start})") from None
  depth = _nesting(text)
  if depth > max_depth:
    raise JSONError(f"not usable JSON: arrays/objects nested {depth} deep "
                    f"(at most {max_depth})")
  try:
    return json.loads(text, parse_float=_finite_float,
                      parse_constant=_no_constant)
  except json.JSONDecodeError as e:
    at = (f"column {e.colno}" if e.lineno == 1
          else f"line {e.lineno} column {e.colno}")
    raise JSONError(f"not valid JSON ({e.msg} at {at})") from None
  except JSONError as e:
    raise JSONError(f"not usable JSON: {e}") from None
  except (ValueError, RecursionError) as e:  # E.g. an int of 5000 digits.
    raise JSONError(f"not usable JSON: {_first_line(e)}") from None


def read(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES,
         max_depth: int = MAX_DEPTH, schema: Mapping[str, Any] | None = None
         ) -> Any:
  """Reads and parses a JSON file, checked against ``schema`` if given.

  Args:
    path: The file.
    max_bytes: Longest file accepted; no more than this is read.
    max_depth: Deepest nesting accepted.
    schema: A JSON Schema (draft 2020-12) the value must satisfy.

  Returns:
    The value.

  Raises:
    JSONError: ``PATH is not valid JSON (...)``, ``PATH: KEY: ...`` (a
      value the schema refuses), or ``PATH is larger than ...``.
    OSError: If the file cannot be read.
  """
  name = os.fspath(path)
  with open(name, "rb") as f:
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:
    raise JSONError(f"{name} is larger than {max_bytes:,} bytes; it is not "
                    "the JSON file expected here")
  try:
    value = loads(data, max_depth=max_depth)
  except JSONError as e:
    text = str(e)
    raise JSONError(f"{name} is {text}" if text.startswith("not ")
                    else f"{name}: {text}") from None
  if schema is not None:
    check(value, schema, name)
  return value


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str):
  import jsonschema  # pylint: disable=import-outside-toplevel
  schema = json.loads(schema_json)
  cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
  cls.check_schema(schema)
  return cls(schema)


def check(value: Any, schema: Mapping[str, Any], where: str) -> None:
  """Checks ``value`` against a JSON Schema.

  Raises:
    JSONError: ``WHERE: KEY: what is wrong`` (one line; the value quoted
      shortened), for the error ``jsonschema`` ranks most relevant.
  """
  import jsonschema  # pylint: disable=import-outside-toplevel
  validator = _validator(json.dumps(schema, sort_keys=True))
  error = jsonschema.exceptions.best_match(validator.iter_errors(value))
  if error is None:
    return
  key = "/".join(str(p) for p in error.absolute_path)
  message = _first_line(error.message)
  if len(message) > 2 * _QUOTE:
    message = message[:2 * _QUOTE - 3] + "..."
  raise JSONError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _first_line(error: BaseException | str) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__
