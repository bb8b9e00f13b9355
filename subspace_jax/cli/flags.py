"""The command-line flags of the model and the optimizer, shared by the
pretraining example and the benchmarks.

:func:`add_model_flags` and :func:`add_optimizer_flags` declare them on an
``argparse`` parser (or argument group); :func:`optimizer_config` turns the
parsed flags into a :class:`~subspace_jax.train.step.OptimizerConfig`,
and :func:`check_optimizer_flags` refuses, naming the flags, what the
config would refuse in its own terms.
"""

from __future__ import annotations

import argparse
from typing import Any

from subspace_jax import models
from subspace_jax.models import llama
from subspace_jax.train import step as train

__all__ = [
    "WARMUP",
    "HelpFormatter",
    "add_model_flags",
    "add_optimizer_flags",
    "check_optimizer_flags",
    "optimizer_config",
]

WARMUP = 50
"""Default warm-up steps (a tenth of a schedule that is not longer:
:func:`default_warmup`)."""



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each default once, and none for on/off flags."""

  def _get_help_string(self, action):
    if "default" in (action.help or "") or action.nargs == 0:
      return action.help
    return super()._get_help_string(action)


def add_model_flags(group: Any, *, model: str = "tiny") -> None:
  """Declares ``--model --scan-layers --remat --dtype --param-dtype``.

  Args:
    group: An ``argparse`` parser or argument group.
    model: The default of ``--model``.
  """
  add = group.add_argument
  add("--model", default=model, help="model size: " + ", ".join(models.CONFIGS))
  add("--scan-layers", action="store_true",
      help="stack the layers and run them with a scan (faster compiles)")
  add("--remat", nargs="?", const="full", default="none",
      choices=list(llama.REMAT_POLICIES), metavar="POLICY",
      help="what the backward pass keeps of each block: none (everything, "
           "the default), full (only its input: the least memory; the flag "
           "alone), dots (the projections' outputs), names (the attention "
           "output and the MLP's hidden product)")
  add("--dtype", default="float32", help="compute dtype: bfloat16 or float32")
  add("--param-dtype", default="float32",
      help="dtype of the stored (master) weights: float32 or bfloat16")


def add_optimizer_flags(group: Any, *, update_gap: int = 200,
                        omit: tuple[str, ...] = ()) -> None:
  """Declares the optimizer's flags (``--optimizer --lr --warmup ...``).

  Args:
    group: An ``argparse`` parser or argument group.
    update_gap: The default of ``--update-gap``.
    omit: Flags not to declare (e.g. ``("--optimizer",)`` where the caller
      sets the optimizer itself); :func:`optimizer_config` then takes their
      fields from its ``fields``.
  """
  def add(flag, **kwargs):
    if flag not in omit:
      group.add_argument(flag, **kwargs)

  add("--optimizer", default="golore",
      help="optimizer: " + ", ".join(train.OPTIMIZERS))
  add("--lr", type=float, default=0.01, help="peak learning rate")
  add("--warmup", type=int, default=None,
      help="linear warm-up steps; at most the schedule's length (default: "
           f"{WARMUP}, or a tenth of a schedule of {WARMUP} steps or fewer)")
  add("--schedule-steps", type=int, default=None,
      help="length of the warm-up + cosine schedule (default: --steps); keep "
           "it fixed to extend a run in several parts")
  add("--min-lr-ratio", type=float, default=0.1,
      help="final learning rate as a fraction of the peak")
  add("--weight-decay", type=float, default=0.0,
      help="decoupled weight decay of the matrices")
  add("--clip", type=float, default=1.0,
      help="clip the global gradient norm to this (0: no clipping)")
  add("--rank", type=int, default=None,
      help="rank of the projected gradients (default: hidden size / 4, as in "
           "the GaLore paper)")
  add("--update-gap", type=int, default=update_gap,
      help="steps between projection changes")
  add("--scale", type=float, default=0.25,
      help="factor on the low-rank updates (GaLore's alpha)")
  add("--proj-seed", type=int, default=0, help="seed of the random projections")
  add("--svd-steps", type=int, default=0,
      help="GoLore: use SVD projections for the first this many steps")
  add("--eta", type=float, default=None,
      help="RSO: proximal coefficient of each subproblem (default: none)")
  add("--side", default=None,
      help="projected side of each matrix: lean, std, left or right "
           "(default: lean; in model mode left keeps B on the input side of "
           "every layer, which keeps every activation saving)")
  add("--subspace-mode", default="transform",
      help="transform: an optax transform of full gradients (any optimizer); "
           "model: golore/rso layers compute x·W + (x·P)·B and only B is "
           "differentiated (no full weight gradients, smaller activations)")
  add("--svd", default="exact",
      help="GaLore's SVD: exact or randomized")
  add("--moment-dtype", default=None,
      help="dtype of the low-rank moments (default: the gradients')")


def default_warmup(total_steps: int) -> int:
  """The warm-up of ``--warmup``'s default: :data:`WARMUP` steps, or a
  tenth of a schedule no longer than that (a warm-up as long as the run
  would leave no step at the peak learning rate)."""
  return WARMUP if total_steps > WARMUP else total_steps // 10


def warmup_note(args: argparse.Namespace, total_steps: int) -> str | None:
  """The line that says the default warm-up was shortened (None when it
  was not, or ``--warmup`` was given)."""
  if args.warmup is not None or total_steps > WARMUP or total_steps < 2:
    return None
  return (f"--warmup: {default_warmup(total_steps)} steps, a tenth of the "
          f"{total_steps}-step schedule (the default {WARMUP} would warm up "
          "the whole run; give --warmup to choose)")


# Flag (argparse dest) -> OptimizerConfig field, for the flags taken as is.
_FIELDS = {
    "optimizer": "name", "lr": "learning_rate",
    "min_lr_ratio": "min_lr_ratio", "weight_decay": "weight_decay",
    "update_gap": "update_gap", "scale": "scale", "proj_seed": "seed",
    "svd_steps": "svd_steps", "eta": "eta", "side": "side", "svd": "svd",
    "moment_dtype": "moment_dtype", "subspace_mode": "subspace_mode",
}


def optimizer_config(args: argparse.Namespace, total_steps: int,
                     **fields: Any) -> train.OptimizerConfig:
  """The :class:`~subspace_jax.train.step.OptimizerConfig` of parsed
  flags.

  Args:
    args: Flags declared by :func:`add_model_flags` (``--model``, for the
      default rank) and :func:`add_optimizer_flags`.
    total_steps: The schedule's length (``--schedule-steps``, else the run's
      steps).
    **fields: OptimizerConfig fields that replace the flags' values.

  Raises:
    ValueError: On a value the config refuses.
  """
  warmup = args.warmup
  if warmup is None:
    warmup = default_warmup(total_steps)
  rank = args.rank
  if rank is None:
    rank = max(1, models.get_config(args.model).hidden_size // 4)
  kwargs = {field: getattr(args, dest) for dest, field in _FIELDS.items()
            if hasattr(args, dest)}
  kwargs.update(warmup_steps=warmup, total_steps=total_steps,
                clip_norm=args.clip or None, rank=rank)
  kwargs.update(fields)
  return train.OptimizerConfig(**kwargs)


def check_optimizer_flags(args: argparse.Namespace) -> None:
  """Refuses, naming the flags, what :class:`OptimizerConfig
  <subspace_jax.train.step.OptimizerConfig>` would refuse in its own
  (Python) terms.

  Raises:
    ValueError: On the first bad value.
  """
  if args.optimizer not in train.OPTIMIZERS:
    raise ValueError(f"--optimizer: unknown optimizer {args.optimizer!r}; "
                     f"choose one of {', '.join(train.OPTIMIZERS)}")
  for flag in ("steps", "schedule_steps", "warmup", "svd_steps"):
    least = 0 if flag in ("warmup", "svd_steps", "steps") else 1
    value = getattr(args, flag, None)  # --steps: the caller's run flag.
    if value is not None and value < least:
      raise ValueError(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
  if args.subspace_mode not in train.SUBSPACE_MODES:
    raise ValueError(f"--subspace-mode must be one of "
                     f"{', '.join(train.SUBSPACE_MODES)}, got {args.subspace_mode!r}")
  if args.subspace_mode == "model":
    if args.optimizer not in train._model_mode_methods():
      raise ValueError(
          f"--subspace-mode model supports --optimizer "
          f"{' and '.join(train._model_mode_methods())}, not {args.optimizer}"
          + (": GaLore's SVD needs the full gradient, which model mode never "
             "builds" if args.optimizer == "galore" else "")
          + "; use --subspace-mode transform")
    if args.svd_steps:
      raise ValueError("--svd-steps needs the full gradient for its SVD phase, "
                       "which --subspace-mode model never builds; drop it or "
                       "use --subspace-mode transform")
