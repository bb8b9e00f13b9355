"""Logits of this package's LLaMA against ``transformers``' on the same weights.

In: a random ``transformers.LlamaForCausalLM`` is built from a
``LlamaConfig`` (no download), saved with ``save_pretrained``, loaded here
with :func:`subspace_jax.models.io.hf.load`, and both compute the logits of the
same random tokens in float32.

Out: the loaded model is trained here for a few steps (AdamW in transform
mode; RSO in model mode, whose export is the merged ``W + P·B``), written
with :func:`subspace_jax.models.io.hf.save`, and loaded back by
``LlamaForCausalLM.from_pretrained`` (its loading report must list no
missing, unexpected or mismatched key, and it must log no warning); its
logits are compared with this package's on the trained weights (in model
mode, with the factored model the train step runs).

Needs torch and transformers (the ``bench`` extra, or ``pip install
torch==2.13.0 transformers``); the default test suite checks the same
mapping without them (tests/test_hf.py, against a NumPy LLaMA).

  python -m benchmarks.hf_parity
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from subspace_jax.models import llama
from subspace_jax.models.io import hf
from subspace_jax import sharding as shd
from subspace_jax.train import step as train


def _imports():
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("hf_parity needs torch and transformers: "
             "pip install torch==2.13.0 transformers")
  return torch, transformers


class _Warnings(logging.Handler):
  """Collects the warnings transformers logs."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.records: list[str] = []

  def emit(self, record):
    self.records.append(record.getMessage().splitlines()[0])


def _torch_logits(torch, model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _ours(config, params, tokens) -> np.ndarray:
  return np.asarray(jax.jit(lambda p, t: llama.forward(config, p, t))(
      params, tokens))


def _random_hf_model(torch, transformers, args, tied: bool, kv_heads: int):
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden,
      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=kv_heads,
      max_position_embeddings=args.seq_len, rms_norm_eps=1e-5,
      rope_theta=10000.0, tie_word_embeddings=tied,
      initializer_range=args.init_std)
  torch.manual_seed(args.seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # Norm scales away from 1, so they matter too.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
  return model


def load_direction(torch, transformers, args, tokens) -> list[dict]:
  """transformers -> here: max |Δ logits| per variant."""
  rows = []
  for tied, kv, scan in ((False, args.kv_heads, False),
                         (True, args.heads, True)):
    model = _random_hf_model(torch, transformers, args, tied, kv)
    with tempfile.TemporaryDirectory() as d:
      model.save_pretrained(d)
      config, params = hf.load(d, scan_layers=scan)
    ref = _torch_logits(torch, model, tokens)
    diff = np.abs(_ours(config, params, tokens) - ref).max()
    rows.append({"direction": "transformers → here",
                 "model": f"{'tied' if tied else 'untied'}, {kv} kv heads of "
                          f"{args.heads}{', scanned' if scan else ''}",
                 "max_abs": float(diff), "scale": float(np.abs(ref).max()),
                 "report": "—"})
  return rows


def _train(config, params, opt_cfg, steps: int, tokens_seed: int):
  """``steps`` train steps here on random token batches; the final state
  and its Setup."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = train.setup(config, opt_cfg, mesh)
  state = setup.init_from(params)
  rng = np.random.default_rng(tokens_seed)
  for _ in range(steps):
    t = rng.integers(0, config.vocab_size, (4, 33)).astype(np.int32)
    state, metrics = setup.train_step(
        state, {"inputs": jnp.asarray(t[:, :-1]),
                "targets": jnp.asarray(t[:, 1:])})
  assert bool(metrics["finite"])
  return setup, state


def save_direction(torch, transformers, args, tokens) -> list[dict]:
  """here (after training) -> transformers."""
  model = _random_hf_model(torch, transformers, args, False, args.kv_heads)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    for name, mode in (("adamw", "transform"), ("rso", "model")):
      config, params = hf.load(d, scan_layers=True)
      opt = train.OptimizerConfig(
          name=name, subspace_mode=mode, learning_rate=1e-2, warmup_steps=0,
          total_steps=args.steps, rank=8, update_gap=3, clip_norm=None)
      setup, state = _train(config, params, opt, args.steps, args.seed)
      if mode == "model":  # What the train step computes: x·W + (x·P)·B.
        sub = setup.subspace
        keys = sub.keys(state.opt_state)
        applied = sub.factored(state.params, sub.trainable(state.params), keys)
        ours = np.asarray(jax.jit(setup.model.apply)(applied, tokens))
      else:
        ours = _ours(config, state.params, tokens)
      with tempfile.TemporaryDirectory() as out:
        hf.save(out, config, state.params, subspace=setup.subspace,
                opt_state=state.opt_state)
        handler = _Warnings()
        logger = logging.getLogger("transformers")
        logger.addHandler(handler)
        try:
          loaded, info = transformers.LlamaForCausalLM.from_pretrained(
              out, output_loading_info=True)
        finally:
          logger.removeHandler(handler)
      keys_seen = {k: sorted(v) for k, v in info.items() if v}
      ref = _torch_logits(torch, loaded.eval(), tokens)
      moved = float(np.abs(ref - _torch_logits(torch, model, tokens)).max())
      rows.append({
          "direction": "here → transformers",
          "model": f"{args.steps} steps of {name} ({mode} mode), untied, "
                   f"{args.kv_heads} kv heads, scanned",
          "max_abs": float(np.abs(ours - ref).max()),
          "scale": float(np.abs(ref).max()), "moved": moved,
          "report": ("no missing/unexpected/mismatched keys"
                     if not keys_seen else str(keys_seen))
                    + (f"; warnings: {handler.records}" if handler.records
                       else "; no warning")})
  return rows


def readme_text(rows: list[dict]) -> str:
  """The README's paragraph from the table's rows."""
  worst = max(r["max_abs"] for r in rows)
  scale = max(r["scale"] for r in rows)
  exported = [r for r in rows if "moved" in r]
  quiet = bool(exported) and all("no warning" in r["report"] for r in exported)
  return (
      "On the same weights this model's float32 logits match "
      f"`transformers.LlamaForCausalLM`'s to {worst:.1e} (logits up to "
      f"{scale:.1f}), in both directions: a random transformers model loaded "
      "here, and a model trained here for a few steps (AdamW, and RSO in "
      "model mode, exported merged) loaded by transformers"
      + (" with no warning" if quiet else " (see its loading report)")
      + " ([results/hf_parity.md](hf_parity.md); `python -m "
      "benchmarks.hf_parity` needs torch and transformers).")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--intermediate", type=int, default=344)
  p.add_argument("--layers", type=int, default=3)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--init-std", type=float, default=0.1,
                 help="initializer_range of the random model (logits of "
                      "order 1 and more)")
  p.add_argument("--steps", type=int, default=6,
                 help="training steps here before the export")
  p.add_argument("--seed", type=int, default=0)
  common.add_output_flags(p, "hf_parity.md")
  args = p.parse_args(argv)
  code = common.commit()  # before the run: later edits do not count
  torch, transformers = _imports()
  torch.set_num_threads(2)
  tokens = np.random.default_rng(args.seed + 1).integers(
      0, args.vocab, (2, args.seq_len))
  rows = load_direction(torch, transformers, args, tokens)
  rows += save_direction(torch, transformers, args, tokens)
  lines = [
      "# Logits against transformers' LlamaForCausalLM", "",
      common.provenance(common.command_line("benchmarks.hf_parity", argv),
                        commit_id=code),
      f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"numpy {np.__version__}.", "",
      *([args.note, ""] if args.note else []),
      f"Random `LlamaForCausalLM`: vocab {args.vocab}, hidden {args.hidden}, "
      f"MLP {args.intermediate}, {args.layers} layers, {args.heads} heads, "
      f"initializer_range {args.init_std}, norm scales 1 + 0.2·N(0, 1); "
      f"logits of 2 × {args.seq_len} random tokens, float32 on both sides "
      "(CPU).", "",
      "| direction | model | max abs Δ logits | max abs logit | transformers' "
      "loading report |",
      "|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['direction']} | {r['model']} | {r['max_abs']:.2e} | "
                 f"{r['scale']:.2f} | {r['report']} |")
  moved = [r["moved"] for r in rows if "moved" in r]
  lines += ["", "Training here moved the logits by up to "
            f"{max(moved):.2f} from the random model's before the export, so "
            "the exported weights are not the loaded ones.", "",
            common.readme_block("hf_parity", readme_text(rows))]
  print("\n".join(lines))
  common.write(args.out, "\n".join(lines))


if __name__ == "__main__":
  main()
