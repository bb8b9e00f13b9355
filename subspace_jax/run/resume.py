"""A resumed run's settings against its checkpoint's.

A resumed run compares its :meth:`RunConfig.to_dict
<subspace_jax.run.config.RunConfig.to_dict>` with the one saved in the
checkpoint: settings of :data:`~subspace_jax.run.config.RESUME_SAFE_FIELDS`
may change (one line says which did), the others only with
``allow_changes`` (:func:`check_resume` names each with its saved and new
value).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from subspace_jax.naming import setting
from subspace_jax.run.config import RESUME_SAFE_FIELDS, RunConfig

__all__ = ["check_resume", "same_model"]


def _show(value: Any) -> str:
  """A saved or new value, as a message shows it."""
  if value is None:
    return "none"
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  if isinstance(value, dict):
    return json.dumps(value, sort_keys=True)
  return str(value)


def _flat_settings(run: Mapping[str, Any]) -> dict[str, Any]:
  """``run`` with the optimizer's fields as "optimizer.NAME" entries."""
  flat = {}
  for key, value in run.items():
    if key == "optimizer" and isinstance(value, Mapping):
      flat.update({f"optimizer.{k}": v for k, v in value.items()})
    else:
      flat[key] = value
  # What older versions saved: a model named beside a checkpoint to start
  # from (it was ignored), and no side for the projection's default (then
  # "lean" for every method).
  if flat.get("init_from") is not None:
    flat["model"] = None
  if flat.get("optimizer.side", "") is None and flat.get("optimizer.name") != "adamw":
    flat["optimizer.side"] = "lean"
  if flat.get("tokenizer") == "byte" or flat.get("tokenizer_model"):
    flat.pop("vocab_size", None)  # The tokenizer has its own.
  return flat


def _settings_changes(saved_run: Mapping[str, Any], run: Mapping[str, Any]
                     ) -> list[tuple[str, Any, Any, bool]]:
  """How the ``"run"`` entries of two :meth:`RunConfig.to_dict` differ.

  Args:
    saved_run: The checkpoint's entry.
    run: This run's entry.

  Returns:
    ``(field path, saved value, new value, safe)`` of every field that
    differs, in field order; optimizer fields are ``"optimizer.NAME"``.
    Fields that one of them lacks (an older version's checkpoint) and
    ``allow_changes`` are left out.
  """
  saved, now = _flat_settings(saved_run), _flat_settings(run)
  return [(path, saved[path], value, path in RESUME_SAFE_FIELDS)
          for path, value in now.items()
          if path in saved and saved[path] != value
          and path != "allow_changes"]  # Only says how to resume.


def same_model(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
  """Whether the checkpointer would accept ``saved``'s model entry."""
  model = saved.get("model")
  return model is None or model == json.loads(json.dumps(expected["model"]))


def check_resume(cfg: RunConfig, saved: Mapping[str, Any] | None, step: int,
                  directory: str) -> str:
  """Compares the settings saved at ``step`` with ``cfg``'s.

  Returns:
    The info line listing the accepted changes ("" if none).

  Raises:
    ValueError: If a setting that alters the run changed and
      ``cfg.allow_changes`` is off, naming each such flag.
  """
  if not isinstance(saved, Mapping) or not isinstance(saved.get("run"), Mapping):
    return ""
  changes = _settings_changes(saved["run"], cfg.to_dict()["run"])

  def listed(items):
    parts = []
    for path, old, new, _ in items:
      text = f"{setting(path)} {_show(old)} -> {_show(new)}"
      if path == "optimizer.total_steps":
        text += (f" (give {setting(path)} {_show(old)} to keep the saved "
                 "schedule)")
      parts.append(text)
    return ", ".join(parts)

  safe = [c for c in changes if c[3]]
  altering = [c for c in changes if not c[3]]
  if altering and not cfg.allow_changes:
    raise ValueError(
        f"checkpoint step {step} in {directory} was made with other settings "
        f"(saved -> now: {listed(altering)}); use another "
        f"{setting('checkpoint_dir')} for a new run, or "
        f"{setting('allow_changes', True)} to resume with the new settings")
  parts = []
  if safe:
    parts.append(f"changed since step {step} (saved -> now): {listed(safe)}")
  if altering:
    parts.append(f"allowed by {setting('allow_changes', True)}: "
                 f"{listed(altering)}")
  return "; ".join(parts)
