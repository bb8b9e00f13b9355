"""Peak host memory of loading a Hugging Face LLaMA checkpoint.

For each model shape a random checkpoint is written to disk in the Hugging
Face layout (bfloat16, one ``model.safetensors``, written a tensor at a
time), then a fresh process loads it with
:func:`subspace_jax.models.io.hf.load` onto one device and reports its peak
resident memory (``VmHWM``). On a CPU the loaded weights themselves live in
host memory, so what loading costs beyond them is

    overhead = peak RSS − RSS before loading − bytes of the loaded arrays

(on a GPU or TPU the arrays are in device memory and the host peak is
``RSS before loading + overhead``). The overhead is bounded by the largest
tensor read at once (the embedding or lm_head, ``vocab × hidden``), not by
the model: the table shows it for two sizes. The checkpoint is deleted
afterwards.

  python -m benchmarks.hf_load_memory --models llama_1b,llama_7b --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from subspace_jax.models import llama
from subspace_jax.models.io import hf
from subspace_jax.models.io import safetensors as stf

GiB = 2**30


def _status(field: str) -> int:
  """A /proc/self/status memory field, in bytes."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def write_random_checkpoint(directory: pathlib.Path, config: llama.LlamaConfig,
                            seed: int = 0) -> int:
  """A random bfloat16 checkpoint of ``config``'s shapes (each tensor tiles
  one random block, so that writing it is fast); returns its bytes."""
  block = (np.random.default_rng(seed).standard_normal(1 << 20) * 0.02).astype(
      jnp.bfloat16)

  def make(shape):
    size = int(np.prod(shape))
    return lambda: np.resize(block, size).reshape(shape)

  params = jax.eval_shape(lambda: llama.ModelDef(config).init(0))
  tensors = [(name, np.dtype(jnp.bfloat16), shape, make(shape))
             for name, _, shape, _ in hf._tensors(config, params, jnp.bfloat16)]  # pylint: disable=protected-access
  directory.mkdir(parents=True, exist_ok=True)
  size = stf.write(directory / hf.WEIGHTS_FILE, tensors, {"format": "pt"})
  (directory / hf.CONFIG_FILE).write_text(json.dumps(
      hf.hf_config(config, jnp.bfloat16)))
  return size


def measure(path: str, scan_layers: bool, param_dtype: str) -> dict:
  """In this process: load ``path`` and report the memory figures."""
  jax.devices()  # Start the backend before the baseline.
  before = _status("VmRSS")
  start = time.perf_counter()
  config, params = hf.load(path, scan_layers=scan_layers,
                           param_dtype=param_dtype)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  arrays = sum(x.nbytes for x in jax.tree.leaves(params))
  peak = _status("VmHWM")
  largest = config.vocab_size * config.hidden_size * np.dtype(
      config.param_dtype).itemsize
  return {"before": before, "peak": peak, "arrays": arrays,
          "overhead": peak - before - arrays, "seconds": seconds,
          "largest_tensor": largest, "params": llama.param_count(config)}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="llama_1b,llama_7b",
                 help="named configs whose shapes are written and loaded")
  p.add_argument("--dir", default=None,
                 help="where the temporary checkpoint goes (default: the "
                      "system's temporary directory); it needs the model's "
                      "bfloat16 size free (13.5 GB for llama_7b)")
  p.add_argument("--param-dtype", default="bfloat16",
                 help="dtype the weights are loaded in")
  p.add_argument("--scan-layers", action="store_true",
                 help=argparse.SUPPRESS)  # The child: the stacked layout.
  p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
  common.add_output_flags(p, "hf_load_memory.md")
  args = p.parse_args(argv)
  if args.measure:  # The child process.
    print(json.dumps(measure(args.measure, args.scan_layers, args.param_dtype)))
    return
  code = common.commit()  # before the run: later edits do not count
  rows = []
  for name in args.models.split(","):
    config = llama.get_config(name, param_dtype=jnp.bfloat16)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
      t0 = time.perf_counter()
      size = write_random_checkpoint(pathlib.Path(d), config)
      print(f"{name}: wrote {size / GiB:.2f} GiB in "
            f"{time.perf_counter() - t0:.0f} s", flush=True)
      for scan in (False, True):
        cmd = [sys.executable, "-m", "benchmarks.hf_load_memory", "--measure",
               d, "--param-dtype", args.param_dtype]
        if scan:
          cmd.append("--scan-layers")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env=env).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row.update(name=name, file=size, scan=scan)
        print(row, flush=True)
        rows.append(row)
  g = lambda b: f"{b / GiB:.2f}"
  lines = [
      "# Host memory of loading a Hugging Face LLaMA checkpoint", "",
      common.provenance(common.command_line("benchmarks.hf_load_memory",
                                            argv), commit_id=code),
      *([args.note, ""] if args.note else []),
      f"Random bfloat16 checkpoints (one `model.safetensors` each), loaded by "
      f"`hf.load` in a fresh process onto one CPU device as "
      f"{args.param_dtype}, per layer (unscanned) and stacked (scanned: each "
      "stacked leaf filled one layer at a time on the device). "
      "On a CPU the loaded arrays are host memory themselves; the overhead "
      "is what loading needs beyond them (on a GPU or TPU the host peak is "
      "the RSS before loading plus this overhead). GiB:", "",
      "| shape | layers | parameters | file | RSS before | peak RSS | "
      "loaded arrays | overhead | largest tensor | load time |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['name']} | {'scanned' if r['scan'] else 'unscanned'} | "
        f"{r['params'] / 1e9:.2f}B | {g(r['file'])} | "
        f"{g(r['before'])} | {g(r['peak'])} | {g(r['arrays'])} | "
        f"{g(r['overhead'])} | {g(r['largest_tensor'])} | "
        f"{r['seconds']:.0f} s |")
  lines += ["", common.readme_block("hf_load_memory", readme_text(rows))]
  common.write(args.out, "\n".join(lines))


def readme_text(rows: list[dict]) -> str:
  """The README's sentence: the largest model's overhead, then the others'."""
  g = lambda b: f"{b / GiB:.2f}"
  by_name: dict[str, dict[bool, dict]] = {}
  for r in rows:
    by_name.setdefault(r["name"], {})[r["scan"]] = r
  names = sorted(by_name, key=lambda n: by_name[n][False]["params"])
  big = by_name[names[-1]]
  text = (
      f"`hf.load` of a random {names[-1]}-shaped bfloat16 checkpoint "
      f"({big[False]['params'] / 1e9:.2f}B parameters) needs "
      f"{g(big[False]['overhead'])} GiB of host memory beyond the weights "
      f"themselves ({g(big[True]['overhead'])} GiB with stacked layers; on a "
      f"CPU, where the weights are host memory too, a peak of "
      f"{g(big[False]['peak'])} GiB for {g(big[False]['arrays'])} GiB of "
      "weights)")
  for name in names[:-1]:
    text += (f", about what {name} needs ({g(by_name[name][False]['overhead'])}"
             f" / {g(by_name[name][True]['overhead'])} GiB)")
  link = " ([results/hf_load_memory.md](hf_load_memory.md))."
  largest = g(big[False]["largest_tensor"])
  if len(names) == 1:  # One size: nothing shows what the overhead follows.
    return text + f"; its largest tensor (the embedding) is {largest} GiB" + link
  return text + (f": it follows the largest tensor (the {largest} GiB "
                 "embedding), not the model" + link)


if __name__ == "__main__":
  main()
