"""An independent float64 NumPy LLaMA, the reference the model tests
compare with (it shares no code with subspace_jax.models.llama)."""

import jax
import numpy as np
from flax import nnx


def numpy_rope(x: np.ndarray, positions: np.ndarray,
               theta: float) -> np.ndarray:
  """Reference RoPE: the pair (i, i + d/2) as a complex number, rotated."""
  half = x.shape[-1] // 2
  freqs = theta ** (-2.0 * np.arange(half) / x.shape[-1])
  phase = np.exp(1j * np.outer(positions, freqs))  # [seq, half]
  z = (x[..., :half] + 1j * x[..., half:]) * phase[None, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def numpy_forward(params, tokens: np.ndarray, cfg,
                  segment_ids: np.ndarray | None = None) -> np.ndarray:
  """Independent float64 NumPy LLaMA forward pass (unscanned or scanned
  parameters, grouped-query attention, packed segments, tied embeddings)."""
  if not isinstance(params, dict):
    params = nnx.to_pure_dict(params)
  w = jax.tree.map(lambda v: np.asarray(v, np.float64), params)

  def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  seq = tokens.shape[1]
  heads, hd = cfg.num_heads, cfg.head_dim
  kv_heads = cfg.num_kv_heads or heads
  # Query head n reads key/value head n // (heads / kv_heads).
  kv_of_head = np.arange(heads) // (heads // kv_heads)
  positions = np.arange(seq)
  allowed = np.tril(np.ones((seq, seq), bool))[None]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
  x = w["embed"]["embedding"][tokens]
  for i in range(cfg.num_layers):
    if cfg.scan_layers:
      b = jax.tree.map(lambda a: a[i], w["layers"])
    else:
      b = w["layers"][i]
    h = rms_norm(x, b["attn_norm"]["scale"])
    split = lambda y: y.reshape(*y.shape[:2], -1, hd)
    q = numpy_rope(split(h @ b["attn"]["q_proj"]["kernel"]), positions,
                    cfg.rope_theta)
    k = numpy_rope(split(h @ b["attn"]["k_proj"]["kernel"]), positions,
                    cfg.rope_theta)[:, :, kv_of_head]
    v = split(h @ b["attn"]["v_proj"]["kernel"])[:, :, kv_of_head]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    x = x + attn @ b["attn"]["o_proj"]["kernel"]
    h = rms_norm(x, b["mlp_norm"]["scale"])
    gate = h @ b["mlp"]["gate_proj"]["kernel"]
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ b["mlp"]["up_proj"]["kernel"])
             ) @ b["mlp"]["down_proj"]["kernel"]
  x = rms_norm(x, w["final_norm"]["scale"])
  if cfg.tie_embeddings:
    return x @ w["embed"]["embedding"].T
  return x @ w["lm_head"]["kernel"]
