"""Text generation with a key/value cache for the LLaMA of
:mod:`subspace_jax.models.llama` (``llama.generate`` is :func:`generate`).

The prompts are run through the model once (the prefill), which fills a
cache of every layer's keys and values; each new token then runs the model
on that one token, attending to the cache, so the prefix is never
recomputed. The whole loop (prefill, sampling, the stop at EOS) is one
jitted function, compiled once per batch size, padded prompt length and
cache length (both rounded up to multiples of :data:`BUCKET`, so prompts
of similar lengths share a compilation).

The computation is the model's, layer for layer (RMSNorm in float32,
rotate-half RoPE, grouped-query attention with the softmax in float32,
SwiGLU, the lm_head's float32 logits), on the trainer's plain-dict
parameters, scanned (``(layers, ...)`` leaves, run with ``lax.scan``) or
not. A kernel may be a :class:`~subspace_jax.factored.Factored` (model
mode's ``W`` and ``B``: the projection is drawn where it is used), though
merged weights (``W + P·B``, what :meth:`Subspace.merged_weights
<subspace_jax.factored.Subspace.merged_weights>` gives) generate faster.

Prompts of several lengths go in one batch: each row is padded after its
prompt and has its own position, so its first new token is predicted from
its last prompt token and written over the padding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import factored

__all__ = ["generate", "BUCKET"]

BUCKET = 32
"""Prompt and cache lengths are rounded up to a multiple of this."""


def _round_up(n: int, k: int = BUCKET) -> int:
  return -(-n // k) * k


def _acc(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _rms(x, scale, eps, dtype):
  acc = _acc(x.dtype)
  x32 = x.astype(acc)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * inv * scale.astype(acc)).astype(dtype)


def _rope(x, positions, theta):
  """Rotate-half RoPE of ``x`` ``[batch, seq, heads, head_dim]`` at
  per-row ``positions`` ``[batch, seq]``."""
  acc = _acc(x.dtype)
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=acc) / head_dim))
  angles = positions.astype(acc)[..., None] * inv_freq  # [b, s, half]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)


def _block(config, p, x, positions, k_cache, v_cache):
  """One decoder block on new tokens ``x`` at ``positions``; their keys and
  values are written into the caches ``[batch, cache_len, kv, head_dim]``
  first, then every query attends to the cache up to its position."""
  dtype = config.dtype
  batch, seq, _ = x.shape
  heads, kv, hd = config.num_heads, config.kv_heads, config.head_dim
  dense = lambda h, kernel: factored.dense(h, kernel, dtype=dtype)
  h = _rms(x, p["attn_norm"]["scale"], config.norm_eps, dtype)
  attn = p["attn"]
  q = _rope(dense(h, attn["q_proj"]["kernel"]).reshape(batch, seq, heads, hd),
            positions, config.rope_theta)
  k = _rope(dense(h, attn["k_proj"]["kernel"]).reshape(batch, seq, kv, hd),
            positions, config.rope_theta)
  v = dense(h, attn["v_proj"]["kernel"]).reshape(batch, seq, kv, hd)
  rows = jnp.arange(batch)[:, None]
  k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype))
  v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype))
  acc = _acc(dtype)
  groups = heads // kv
  qg = q.reshape(batch, seq, kv, groups, hd).astype(acc)
  scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_cache.astype(acc))
  scores = scores / jnp.sqrt(jnp.asarray(hd, acc))
  allowed = (jnp.arange(k_cache.shape[1])[None, None, :]
             <= positions[:, :, None])  # [b, t, s]
  scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_cache.astype(acc))
  out = out.reshape(batch, seq, heads * hd).astype(dtype)
  x = x + dense(out, attn["o_proj"]["kernel"]).astype(x.dtype)
  h = _rms(x, p["mlp_norm"]["scale"], config.norm_eps, dtype)
  mlp = p["mlp"]
  hidden = jax.nn.silu(dense(h, mlp["gate_proj"]["kernel"])) * dense(
      h, mlp["up_proj"]["kernel"])
  x = x + dense(hidden, mlp["down_proj"]["kernel"]).astype(x.dtype)
  return x, k_cache, v_cache


def _layers(config, params, x, positions, caches):
  """Every block; ``caches`` is ``(k, v)``, each ``[layers, batch,
  cache_len, kv, head_dim]``."""
  k_all, v_all = caches
  if config.scan_layers:
    def body(h, layer):
      p, kc, vc = layer
      h, kc, vc = _block(config, p, h, positions, kc, vc)
      return h, (kc, vc)
    x, (k_all, v_all) = jax.lax.scan(body, x, (params["layers"], k_all, v_all))
    return x, (k_all, v_all)
  layers = params["layers"]
  for i in range(config.num_layers):
    p = layers[i] if i in layers else layers[str(i)]
    x, kc, vc = _block(config, p, x, positions, k_all[i], v_all[i])
    k_all, v_all = k_all.at[i].set(kc), v_all.at[i].set(vc)
  return x, (k_all, v_all)


def _logits(config, params, x):
  """float32 (at least) logits of hidden states ``[..., embed]``."""
  x = _rms(x, params["final_norm"]["scale"], config.norm_eps, config.dtype)
  acc = _acc(config.dtype)
  if config.tie_embeddings:
    kernel = params["embed"]["embedding"].T
  else:
    kernel = params["lm_head"]["kernel"]
  return factored.dense(x, kernel, dtype=config.dtype,
                        preferred_element_type=acc).astype(acc)


def _embed(config, params, tokens):
  return jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(
      config.dtype)


def _choose(logits, key, temperature, top_p, sample: bool):
  """The next token of each row: the argmax, or a draw at ``temperature``
  from the smallest set of tokens whose probability reaches ``top_p``."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the better ones.
  keep_sorted = before < top_p  # Always keeps the best token.
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  masked = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "sample",
                                             "use_cache"))
def _run(config, params, tokens, lengths, steps, stop_ids, temperature, top_p,
         key, *, cache_len: int, sample: bool, use_cache: bool):
  """Generates into a ``[batch, cache_len]`` buffer; returns it and each
  row's final length."""
  batch, prompt_len = tokens.shape
  buffer = jnp.zeros((batch, cache_len), jnp.int32).at[:, :prompt_len].set(
      tokens)
  rows = jnp.arange(batch)
  cache_dtype = config.dtype
  shape = (config.num_layers, batch, cache_len, config.kv_heads,
           config.head_dim)

  def is_stop(tok):
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

  def full_logits(buf, pos):
    """Without the cache: the model on the whole buffer, the logits at
    ``pos`` (the baseline the cache is measured against)."""
    from subspace_jax.models import llama  # pylint: disable=import-outside-toplevel
    logits = llama.forward(config, params, buf)
    return logits[rows, pos]

  if use_cache:
    caches = (jnp.zeros(shape, cache_dtype), jnp.zeros(shape, cache_dtype))
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    x, caches = _layers(config, params, _embed(config, params, tokens),
                        positions, caches)
    last = _logits(config, params, x[rows, lengths - 1])
  else:
    caches = None
    last = full_logits(buffer, lengths - 1)
  key, sub = jax.random.split(key)
  tok = _choose(last, sub, temperature, top_p, sample)
  done = jnp.zeros((batch,), bool)

  def cond(state):
    i, _, _, _, done, _, _ = state
    return (i < steps) & ~jnp.all(done)

  def body(state):
    i, buf, pos, tok, done, caches, key = state
    tok = jnp.where(done, stop_ids[0], tok)
    buf = buf.at[rows, pos].set(jnp.where(done, buf[rows, pos], tok))
    done_now = done | is_stop(tok)
    new_pos = jnp.where(done, pos, pos + 1)
    key, sub = jax.random.split(key)
    if use_cache:
      x = _embed(config, params, tok[:, None])
      x, caches = _layers(config, params, x, pos[:, None], caches)
      logits = _logits(config, params, x[:, 0])
    else:
      logits = full_logits(buf, pos)
    nxt = _choose(logits, sub, temperature, top_p, sample)
    return i + 1, buf, new_pos, nxt, done_now, caches, key

  state = (jnp.zeros([], jnp.int32), buffer, lengths, tok, done, caches, key)
  _, buffer, ends, _, _, _, _ = jax.lax.while_loop(cond, body, state)
  return buffer, ends


def generate(config, params, prompt_tokens, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None,
             stop_ids: int | Sequence[int] | None = None,
             use_cache: bool = True):
  """Continues prompts with the model: the prompt followed by the new
  tokens.

  Args:
    config: The model's :class:`~subspace_jax.models.llama.LlamaConfig`.
    params: Its parameters, the trainer's plain nested dict (scanned or
      not; a kernel may be a :class:`~subspace_jax.factored.Factored`).
    prompt_tokens: One prompt (a sequence of ids), or several (a list of
      sequences, of any lengths, or a 2-D array): one batch.
    max_new_tokens: The most tokens added to each prompt.
    temperature: 0 picks the most likely token (greedy); above 0 tokens
      are drawn from the softmax of ``logits / temperature``.
    top_p: With ``temperature > 0``, draw from the smallest set of most
      likely tokens whose probabilities sum to ``top_p`` or more.
    key: A ``jax.random`` key; needed when ``temperature > 0``.
    stop_ids: Ids that end a row (EOS; it is kept in the result): an int
      or several (None: no stop, ``max_new_tokens`` for every row).
    use_cache: Keep every layer's keys and values (the default); False
      runs the whole sequence through the model for each new token (the
      baseline of the benchmarks; same tokens).

  Returns:
    For one prompt, a 1-D int32 NumPy array: the prompt, then the new
    tokens up to and including the first stop id. For several, a list of
    them.

  Raises:
    ValueError: On an empty prompt, a bad ``max_new_tokens``,
      ``temperature`` or ``top_p``, a sampling run without ``key``, or
      prompts that with the new tokens exceed ``config.max_seq_len``.
  """
  single = (len(prompt_tokens) == 0
            or np.ndim(prompt_tokens[0]) == 0)
  prompts = [prompt_tokens] if single else list(prompt_tokens)
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs non-empty prompts (at least one token "
                     "each)")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got "
                     f"{max_new_tokens!r}")
  if not (temperature >= 0 and np.isfinite(temperature)):
    raise ValueError(f"temperature must be a finite number >= 0, got "
                     f"{temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  sample = temperature > 0
  if sample and key is None:
    raise ValueError("sampling (temperature > 0) needs a key: "
                     "key=jax.random.key(seed)")
  for p in prompts:
    if p.min() < 0 or p.max() >= config.vocab_size:
      raise ValueError(f"prompt ids must be in [0, {config.vocab_size}), got "
                       f"{p.min()}..{p.max()}")
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > config.max_seq_len:
    raise ValueError(f"a prompt of {longest} tokens and {max_new_tokens} new "
                     f"ones exceed the model's max_seq_len "
                     f"{config.max_seq_len}")
  prompt_len = _round_up(longest)
  cache_len = _round_up(prompt_len + max_new_tokens)
  if not use_cache:  # The model runs on the whole buffer: a legal length.
    cache_len = min(cache_len, config.max_seq_len)
    prompt_len = min(prompt_len, cache_len)
  tokens = np.zeros((len(prompts), prompt_len), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  stops = ([] if stop_ids is None else
           [stop_ids] if np.ndim(stop_ids) == 0 else list(stop_ids))
  # No stop: an id that never comes (-1), so every row runs to the end.
  stops = np.asarray([int(s) for s in stops] or [-1], np.int32)
  key = key if key is not None else jax.random.key(0)
  buffer, ends = _run(
      config, params, jnp.asarray(tokens), jnp.asarray(lengths),
      jnp.asarray(max_new_tokens, jnp.int32), jnp.asarray(stops),
      jnp.asarray(max(temperature, 1e-6), jnp.float32),
      jnp.asarray(top_p, jnp.float32), key, cache_len=cache_len,
      sample=sample, use_cache=use_cache)
  buffer, ends = np.asarray(buffer), np.asarray(ends)
  out = [buffer[i, :ends[i]] for i in range(len(prompts))]
  return out[0] if single else out
