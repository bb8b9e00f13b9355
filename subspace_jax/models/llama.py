"""A LLaMA decoder-only language model written with Flax NNX.

The architecture follows the models trained in the GaLore paper
(arXiv 2403.03507): pre-norm decoder blocks with RMSNorm, rotary position
embeddings (RoPE), causal multi-head self-attention without biases, a SwiGLU
MLP, a final RMSNorm and an lm_head that is *not* tied to the token embedding.

Parameter layout. Every kernel is stored ``(in, out)`` as in Flax, and every
weight carries logical axis names in its ``out_sharding`` metadata (read them
with ``nnx.get_partition_spec`` or :func:`param_logical_axes`):

========================  ====================  =========================
weight                    shape                 logical axes
========================  ====================  =========================
embed.embedding           (vocab, embed)        ('vocab', 'embed')
attn.q_proj.kernel        (embed, heads*kv)     ('embed', 'heads')
attn.{k,v}_proj.kernel    (embed, kv_heads*kv)  ('embed', 'heads')
attn.o_proj.kernel        (heads*kv, embed)     ('heads', 'embed')
mlp.{gate,up}_proj.kernel (embed, mlp)          ('embed', 'mlp')
mlp.down_proj.kernel      (mlp, embed)          ('mlp', 'embed')
*_norm.scale              (embed,)              ('norm',)
lm_head.kernel            (embed, vocab)        ('embed', 'vocab')
========================  ====================  =========================

With ``num_kv_heads < num_heads`` (grouped-query attention) the keys and
values have fewer heads than the queries, and query head ``n`` reads
key/value head ``n // (num_heads // num_kv_heads)``, as in the Hugging Face
LLaMA. With ``tie_embeddings`` there is no lm_head: the logits are
``x @ embed.embedding.T``.

The attention projections are deliberately plain 2-D matrices (the head axis
is folded into the 'heads' dimension), so that a low-rank optimizer can treat
every weight of a block as an ordinary matrix. The 'kv' name (the per-head
dimension) is reserved for activations and is not used by any weight.

With ``scan_layers=True`` the blocks are created with ``nnx.vmap`` and run with
``nnx.scan``: every block weight gains a leading axis of size ``num_layers``
named 'layers' (e.g. an MLP kernel is ``(layers, embed, mlp)``). With a
``remat`` policy other than ``"none"`` each block is wrapped in
``nnx.remat`` (``jax.checkpoint``) and the backward pass recomputes what the
policy does not save (:data:`REMAT_POLICIES`).

Sharding metadata is attached lazily (``eager_sharding=False``): the logical
names are only annotations, to be mapped onto a device mesh by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from subspace_jax import factored
from subspace_jax.models.constraints import constrain
from subspace_jax import matrix_view as mv

Array = jax.Array
Dtype = Any

LOGICAL_AXIS_NAMES: tuple[str, ...] = (
    "vocab", "embed", "mlp", "heads", "kv", "layers", "norm")
"""Every logical axis name used by this module."""


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA model.

  Attributes:
    vocab_size: Number of token ids.
    hidden_size: Model width (the 'embed' axis).
    intermediate_size: Width of the SwiGLU MLP (the 'mlp' axis).
    num_heads: Number of attention heads; must divide ``hidden_size``.
    num_layers: Number of decoder blocks.
    max_seq_len: Longest sequence the model accepts.
    rope_theta: Base of the RoPE frequencies.
    norm_eps: Epsilon of every RMSNorm.
    dtype: Compute dtype of activations and matmuls (e.g. ``jnp.bfloat16``).
    param_dtype: Storage dtype of the weights (``float32`` master weights or
      ``bfloat16``).
    scan_layers: Stack the blocks' weights on a leading 'layers' axis and run
      them with ``nnx.scan``.
    remat: What the backward pass keeps of each block, a key of
      :data:`REMAT_POLICIES` (``True`` is ``"full"``, ``False`` ``"none"``).
    init_std: Standard deviation of the normal initializer of every matrix
      (norm scales start at one).
    num_kv_heads: Number of key/value heads (grouped-query attention); must
      divide ``num_heads``. None: ``num_heads`` (multi-head attention).
    tie_embeddings: Compute the logits with the token embedding
      (``x @ embedding.T``) instead of a separate lm_head.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_layers: int
  max_seq_len: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: bool | str = "none"
  init_std: float = 0.02
  num_kv_heads: int | None = None
  tie_embeddings: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_heads", "num_layers", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, "
                         f"got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
          f"num_heads={self.num_heads}")
    kv = self.num_kv_heads
    if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool)
                           or kv <= 0 or self.num_heads % kv):
      raise ValueError(f"LlamaConfig.num_kv_heads={kv!r} must be a positive "
                       f"int that divides num_heads={self.num_heads}")
    if (self.hidden_size // self.num_heads) % 2:
      raise ValueError(
          f"head dim {self.hidden_size // self.num_heads} must be even for "
          "rotary embeddings")
    remat = {True: "full", False: "none"}.get(self.remat, self.remat)
    if remat not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat must be one of "
                       f"{', '.join(REMAT_POLICIES)}, got {self.remat!r}")
    object.__setattr__(self, "remat", remat)
    for name in ("dtype", "param_dtype"):
      dt = jnp.dtype(getattr(self, name))
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"LlamaConfig.{name} must be a float dtype, got {dt}")
      object.__setattr__(self, name, dt)

  @property
  def head_dim(self) -> int:
    """Size of one attention head (the 'kv' axis)."""
    return self.hidden_size // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (``num_kv_heads``, else ``num_heads``)."""
    return self.num_kv_heads or self.num_heads


# What the backward pass keeps of a block (jax.checkpoint policies); the rest
# is recomputed from the block's input.
REMAT_POLICIES: dict[str, Any] = {
    # Everything: no recomputation, the most memory.
    "none": None,
    # Only the block's input: the least memory, a second forward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
    # The projections' outputs (q, k, v, o, gate, up, down: matmuls with no
    # batch dimension); attention and the elementwise parts are recomputed.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The attention output and the MLP's hidden product (the tensors named
    # with checkpoint_name in Attention and MLP): the two large matmul
    # chains are recomputed only in part.
    "names": jax.checkpoint_policies.save_only_these_names(
        "attention", "mlp_hidden"),
}
"""Rematerialization policies of :attr:`LlamaConfig.remat`."""


def _named(hidden: int, mlp: int, heads: int, layers: int) -> LlamaConfig:
  return LlamaConfig(vocab_size=32000, hidden_size=hidden,
                     intermediate_size=mlp, num_heads=heads,
                     num_layers=layers, max_seq_len=1024)


CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176,
                        num_heads=4, num_layers=2, max_seq_len=64),
    # Twice as wide and deep (0.87M parameters with byte tokens): the
    # quality study's larger model that a 2-core CPU trains in minutes.
    "small": LlamaConfig(vocab_size=256, hidden_size=128,
                         intermediate_size=352, num_heads=4, num_layers=4,
                         max_seq_len=128),
    "llama_60m": _named(512, 1376, 8, 8),
    "llama_130m": _named(768, 2048, 12, 12),
    "llama_350m": _named(1024, 2736, 16, 24),
    "llama_1b": _named(2048, 5461, 32, 24),
    "llama_7b": _named(4096, 11008, 32, 32),
    # GPT-3 175B's width and depth (12288 wide, 96 layers of 96 heads) with
    # LLaMA's SwiGLU MLP: three 12288 x 32768 matrices hold the parameters
    # of GPT-3's two 12288 x 49152 ones. 174.7B parameters in all.
    "llama_175b": _named(12288, 32768, 96, 96),
}
"""Named configurations: the GaLore paper's model sizes, a GPT-3-sized one
(``llama_175b``, for planning memory), ``tiny`` and ``small``."""


def get_config(name: str, **overrides: Any) -> LlamaConfig:
  """Returns the named config, with any fields replaced by ``overrides``.

  Args:
    name: A key of :data:`CONFIGS`.
    **overrides: ``LlamaConfig`` fields to change (e.g. ``scan_layers=True``).

  Raises:
    ValueError: If ``name`` is unknown.
  """
  if name not in CONFIGS:
    raise ValueError(f"unknown LLaMA config {name!r}; known configs: "
                     f"{', '.join(CONFIGS)}")
  return dataclasses.replace(CONFIGS[name], **overrides)


def param_count(config: LlamaConfig) -> int:
  """Number of parameters of a model built from ``config``, from the config.

  Args:
    config: Model configuration.

  Returns:
    Embedding + lm_head + blocks + final norm parameter count.
  """
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  attention = 2 * d * d + 2 * d * config.kv_heads * config.head_dim
  mlp = 3 * d * f
  norms = 2 * d
  embeddings = (1 if config.tie_embeddings else 2) * v * d
  return embeddings + config.num_layers * (attention + mlp + norms) + d


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def _matrix_init(config: LlamaConfig, names: tuple[str, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(config.init_std),
                               names, eager_sharding=False)


class Linear(nnx.Module):
  """Bias-free dense layer ``y = x @ kernel``, kernel stored ``(in, out)``.

  In model-level subspace mode (:mod:`subspace_jax.factored`) the kernel's
  value is a :class:`~subspace_jax.factored.Factored` (``W``, ``B`` and the
  projection's key) and the layer computes ``x·W + (x·P)·B`` or, with ``B``
  on its output side, ``x·W + (x·Bᵀ)·Qᵀ``, drawing ``P`` (``Q``) itself: in
  a scanned model, inside the layer loop.
  """

  def __init__(self, config: LlamaConfig, d_in: int, d_out: int,
               names: tuple[str, str], rngs: nnx.Rngs,
               preferred_element_type: Dtype | None = None):
    self.dtype = config.dtype
    self.preferred_element_type = preferred_element_type
    init = _matrix_init(config, names)
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out),
                                 config.param_dtype))

  def __call__(self, x: Array) -> Array:
    kernel = self.kernel.get_value()
    if (self.preferred_element_type is not None
        and not isinstance(kernel, factored.Factored)):
      return _wide_output_matmul(x.astype(self.dtype), kernel.astype(self.dtype),
                                 jnp.dtype(self.preferred_element_type))
    return factored.dense(x, kernel, dtype=self.dtype,
                          preferred_element_type=self.preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _wide_output_matmul(x: Array, kernel: Array, out_dtype) -> Array:
  """``x @ kernel`` with a wider result (the lm_head's float32 logits from
  bfloat16 operands), whose backward pass works in the operands' dtype.

  Plain autodiff would carry the float32 cotangent into both backward
  matmuls and form the kernel's gradient in float32 before rounding it to
  the kernel's dtype: a float32 ``embed × vocab`` temporary (0.5 GiB at 7B,
  the largest buffer of a model-mode step after the weights). Here the
  cotangent is rounded to the operands' dtype first, as every other layer's
  is (their outputs are in that dtype), and the products come out in it.
  With float32 (or float64) operands nothing is rounded: the same result
  as autodiff.
  """
  return jnp.matmul(x, kernel, preferred_element_type=out_dtype)


def _wide_output_matmul_fwd(x, kernel, out_dtype):
  return _wide_output_matmul(x, kernel, out_dtype), (x, kernel)


def _wide_output_matmul_bwd(out_dtype, residuals, ct):
  del out_dtype
  x, kernel = residuals
  ct = ct.astype(x.dtype)
  dx = jnp.matmul(ct, kernel.T)
  dkernel = jnp.einsum("...i,...o->io", x, ct)
  return dx, dkernel.astype(kernel.dtype)


_wide_output_matmul.defvjp(_wide_output_matmul_fwd, _wide_output_matmul_bwd)


def _linear(config: LlamaConfig, d_in: int, d_out: int,
            names: tuple[str, str], rngs: nnx.Rngs, **kwargs) -> Linear:
  return Linear(config, d_in, d_out, names, rngs, **kwargs)


def _at_least_f32(dtype: Dtype) -> jnp.dtype:
  """The dtype norms, RoPE, logits and the loss are computed in: float32,
  or float64 for a float64 model (so that a float64 run has no float32
  rounding anywhere)."""
  return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned scale, computed in float32
  (at least)."""

  def __init__(self, dim: int, *, eps: float, dtype: Dtype,
               param_dtype: Dtype):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype),
                           out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x: Array) -> Array:
    acc = _at_least_f32(x.dtype)
    x32 = x.astype(acc)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                            + self.eps)
    return (x32 * inv_rms * self.scale[...].astype(acc)).astype(self.dtype)


class Embedding(nnx.Module):
  """Token embedding table; looks rows up, then casts them to ``dtype``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.dtype = config.dtype
    init = _matrix_init(config, ("vocab", "embed"))
    self.embedding = nnx.Param(init(
        rngs.params(), (config.vocab_size, config.hidden_size),
        config.param_dtype))

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


def rope_cos_sin(positions: Array, head_dim: int, theta: float,
                 dtype: Dtype = jnp.float32) -> tuple[Array, Array]:
  """Rotary-embedding angles for ``positions``.

  Args:
    positions: Integer positions, shape ``[seq]``.
    head_dim: Per-head size (even).
    theta: Frequency base.
    dtype: Float dtype of the angles (float32, or float64 for a float64
      model).

  Returns:
    ``(cos, sin)``, each of shape ``[seq, head_dim // 2]``.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim
  inv_freq = 1.0 / (theta ** exponents)
  angles = positions.astype(dtype)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates ``x`` by the RoPE angles (half-split, "rotate_half" layout).

  Feature ``i`` is paired with feature ``i + head_dim // 2`` and the pair is
  rotated by the ``i``-th angle, as in the Hugging Face / GaLore LLaMA.

  Args:
    x: Queries or keys, shape ``[batch, seq, heads, head_dim]``.
    cos: From :func:`rope_cos_sin`, shape ``[seq, head_dim // 2]``.
    sin: Same shape as ``cos``.

  Returns:
    The rotated array, same shape and dtype as ``x``.
  """
  x1, x2 = jnp.split(x.astype(_at_least_f32(x.dtype)), 2, axis=-1)
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                            axis=-1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """Causal self-attention with RoPE and 2-D projection kernels; grouped-query
  when the config has fewer key/value heads than query heads."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d = config.hidden_size
    kv = config.kv_heads * config.head_dim
    self.num_heads = config.num_heads
    self.kv_heads = config.kv_heads
    self.head_dim = config.head_dim
    self.q_proj = _linear(config, d, d, ("embed", "heads"), rngs)
    self.k_proj = _linear(config, d, kv, ("embed", "heads"), rngs)
    self.v_proj = _linear(config, d, kv, ("embed", "heads"), rngs)
    self.o_proj = _linear(config, d, d, ("heads", "embed"), rngs)

  def __call__(self, x: Array, cos: Array, sin: Array,
               segment_ids: Array | None = None) -> Array:
    batch, seq, _ = x.shape
    split = lambda y, heads: constrain(
        y.reshape(batch, seq, heads, self.head_dim),
        ("batch", None, "heads", None))
    # The barrier keeps the projections' outputs in their own layout, so
    # the attention's preferred layout of q, k and v (sequence-minor on a
    # TPU) is made by transposing these activations, not by the matmuls:
    # without it the TPU compiler wrote a transposed copy of every stacked
    # q/k/v kernel (and B) before the remat forward loop (+3.75 GiB at 7B).
    q, k, v = jax.lax.optimization_barrier(
        (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
    q = apply_rope(split(q, self.num_heads), cos, sin)
    k = apply_rope(split(k, self.kv_heads), cos, sin)
    v = split(v, self.kv_heads)
    # Packed sequences: a token attends to the earlier tokens of its own
    # segment only. RoPE scores depend on relative positions alone, so the
    # positions need not restart at each segment.
    mask = None
    if segment_ids is not None:
      mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if q.dtype == jnp.float64:
      out = _attention_f64(q, k, v, mask)
    else:
      out = _dot_product_attention(q, k, v, mask)
    out = constrain(checkpoint_name(out, "attention"),
                    ("batch", None, "heads", None))
    return self.o_proj(out.reshape(batch, seq, -1))


def attention_implementation(dtype: Dtype, head_dim: int, masked: bool,
                             platform: str) -> str | None:
  """The ``implementation`` of ``jax.nn.dot_product_attention`` for causal
  attention on ``platform``: ``"cudnn"`` (cuDNN's fused flash attention) on
  a GPU for bfloat16 or float16 heads of at most 128 features, a multiple
  of 8, with no mask but the causal one; None (XLA's) elsewhere (packed
  segments, float32, CPU, TPU)."""
  if platform != "gpu" or masked:
    return None
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return None
  return "cudnn" if head_dim <= 128 and head_dim % 8 == 0 else None


def _dot_product_attention(q: Array, k: Array, v: Array,
                           mask: Array | None) -> Array:
  """Causal attention by the fastest implementation the backend has
  (:func:`attention_implementation`). The cuDNN kernel is lowered only for
  CUDA (``lax.platform_dependent``), so a step traced on a GPU host still
  compiles for another target; where cuDNN refuses the shapes (its checks
  run while tracing), XLA's implementation is used."""
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask,
                                                      is_causal=True)
  impl = attention_implementation(q.dtype, q.shape[-1], mask is not None,
                                  jax.default_backend())
  if impl is None:
    return xla(q, k, v)
  fused = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl)
  try:
    return jax.lax.platform_dependent(q, k, v, cuda=fused, default=xla)
  except (ValueError, NotImplementedError, RuntimeError):
    return xla(q, k, v)


def _attention_f64(q: Array, k: Array, v: Array,
                   mask: Array | None = None) -> Array:
  """Causal (grouped-query) attention entirely in float64.

  ``jax.nn.dot_product_attention`` always takes its softmax in float32; a
  float64 model (used to compare computations without float32 rounding)
  needs every step in float64.
  """
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(q.shape[-1])
  seq = q.shape[1]
  allowed = jnp.tril(jnp.ones((seq, seq), bool))
  if mask is not None:
    allowed = allowed & mask
  logits = jnp.where(allowed, logits, -jnp.inf)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(config, d, f, ("embed", "mlp"), rngs)
    self.up_proj = _linear(config, d, f, ("embed", "mlp"), rngs)
    self.down_proj = _linear(config, f, d, ("mlp", "embed"), rngs)

  def __call__(self, x: Array) -> Array:
    hidden = nnx.silu(self.gate_proj(x)) * self.up_proj(x)
    hidden = constrain(checkpoint_name(hidden, "mlp_hidden"),
                       ("batch", None, "mlp"))
    return self.down_proj(hidden)


class Block(nnx.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(config.hidden_size, eps=config.norm_eps,
                           dtype=config.dtype, param_dtype=config.param_dtype)
    self.attn_norm = norm()
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: Array, cos: Array, sin: Array,
               segment_ids: Array | None = None) -> Array:
    x = x + self.attn(self.attn_norm(x), cos, sin, segment_ids)
    return x + self.mlp(self.mlp_norm(x))


def _run_block(block: Block, x: Array, cos: Array, sin: Array,
               segment_ids: Array | None) -> Array:
  return block(x, cos, sin, segment_ids)


_SCAN_METADATA = {nnx.PARTITION_NAME: "layers"}
# Logical names of the hidden state between blocks: split by batch only (its
# features whole on every device, as the weights are gathered for the
# matmuls under FSDP).
_HIDDEN = ("batch", None, None)


class Llama(nnx.Module):
  """LLaMA causal language model.

  Example:
    >>> model = Llama(get_config("tiny"), rngs=nnx.Rngs(0))
    >>> logits = model(jnp.zeros((2, 16), jnp.int32))  # [2, 16, 256] float32
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embedding(config, rngs=rngs)
    if config.scan_layers:
      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
      def make_blocks(layer_rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=layer_rngs)

      self.layers = make_blocks(rngs)
    else:
      self.layers = nnx.List(
          [Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, eps=config.norm_eps,
                              dtype=config.dtype,
                              param_dtype=config.param_dtype)
    if not config.tie_embeddings:
      self.lm_head = _linear(
          config, config.hidden_size, config.vocab_size, ("embed", "vocab"),
          rngs, preferred_element_type=_at_least_f32(config.dtype))

  def _check_tokens(self, tokens: Any) -> Array:
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      got = f"dtype {dtype}" if dtype is not None else type(tokens).__name__
      raise TypeError(f"tokens must be an integer array, got {got}")
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [batch, seq], got "
                       f"{tuple(tokens.shape)}")
    if tokens.shape[1] > self.config.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds "
                       f"max_seq_len={self.config.max_seq_len}")
    return jnp.asarray(tokens)

  def _check_segments(self, segment_ids: Any, tokens: Array) -> Array | None:
    if segment_ids is None:
      return None
    dtype = getattr(segment_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(f"segment_ids must be an integer array, got "
                      f"{dtype or type(segment_ids).__name__}")
    if tuple(segment_ids.shape) != tuple(tokens.shape):
      raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} does "
                       f"not match tokens shape {tuple(tokens.shape)}")
    return jnp.asarray(segment_ids)

  def __call__(self, tokens: Array, segment_ids: Array | None = None
               ) -> Array:
    """Computes next-token logits.

    Args:
      tokens: int32 token ids, shape ``[batch, seq]``.
      segment_ids: Optional integer ids, shape ``[batch, seq]``, of the
        packed examples the tokens belong to: a token attends only to the
        tokens before it with the same id. None: one sequence per row.

    Returns:
      float32 logits (float64 for a float64 model), shape ``[batch, seq, vocab]``.

    Raises:
      TypeError: If ``tokens`` (or ``segment_ids``) is not an integer array.
      ValueError: If ``tokens`` is not 2-D or longer than ``max_seq_len``,
        or ``segment_ids`` is not of its shape.
    """
    cfg = self.config
    tokens = self._check_tokens(tokens)
    segment_ids = self._check_segments(segment_ids, tokens)
    x = constrain(self.embed(tokens), _HIDDEN)
    cos, sin = rope_cos_sin(jnp.arange(tokens.shape[1]), cfg.head_dim,
                            cfg.rope_theta, _at_least_f32(cfg.dtype))
    block_fn = _run_block
    if cfg.remat != "none":
      # Inside a scan the loop already blocks CSE, so it need not be prevented.
      block_fn = nnx.remat(_run_block, prevent_cse=not cfg.scan_layers,
                           policy=REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      def body(block: Block, h: Array, c: Array, s: Array, seg) -> Array:
        return constrain(block_fn(block, h, c, s, seg), _HIDDEN)

      scan = nnx.scan(body, in_axes=(0, nnx.Carry, None, None, None),
                      out_axes=nnx.Carry, transform_metadata=_SCAN_METADATA)
      x = scan(self.layers, x, cos, sin, segment_ids)
    else:
      for block in self.layers:
        x = constrain(block_fn(block, x, cos, sin, segment_ids), _HIDDEN)
    x = self.final_norm(x)
    acc = _at_least_f32(cfg.dtype)
    if cfg.tie_embeddings:
      logits = _wide_output_matmul(
          x.astype(cfg.dtype), self.embed.embedding[...].T.astype(cfg.dtype),
          acc)
    else:
      logits = self.lm_head(x)
    logits = constrain(logits, ("batch", None, "vocab"))
    return logits.astype(acc)


# --------------------------------------------------------------------------
# Functional helpers
# --------------------------------------------------------------------------


def init(config: LlamaConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds a model and splits it into ``(graphdef, params)``.

  The model holds only ``nnx.Param`` state, so ``params`` is all of it.
  """
  return nnx.split(Llama(config, rngs=nnx.Rngs(seed)), nnx.Param)


def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array,
          segment_ids: Array | None = None) -> Array:
  """Pure forward pass: logits of ``nnx.merge(graphdef, params)(tokens)``.

  Args:
    graphdef: From ``nnx.split(model, nnx.Param)``.
    params: The matching ``nnx.Param`` state (may be a traced pytree).
    tokens: int32 token ids, shape ``[batch, seq]``.
    segment_ids: Optional packed-example ids (see :meth:`Llama.__call__`).

  Returns:
    float32 logits (float64 for a float64 model), shape ``[batch, seq, vocab]``.
  """
  return nnx.merge(graphdef, params)(tokens, segment_ids)


def cross_entropy_loss(logits: Array, targets: Array,
                       mask: Array | None = None) -> Array:
  """Mean token cross-entropy, in float32 (float64 for float64 logits).

  Args:
    logits: ``[..., vocab]`` unnormalized scores.
    targets: Integer ids with shape ``logits.shape[:-1]``.
    mask: Optional weights (1 = count the token) with the shape of
      ``targets``; the mean is over the masked tokens.

  Returns:
    Scalar loss (float32, or float64 for float64 logits).
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"targets shape {targets.shape} does not match logits "
                     f"shape {logits.shape}[:-1]")
  acc = _at_least_f32(logits.dtype)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(acc), targets)
  if mask is None:
    return jnp.mean(losses)
  if mask.shape != targets.shape:
    raise ValueError(f"mask shape {mask.shape} does not match targets shape "
                     f"{targets.shape}")
  mask = mask.astype(acc)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def param_logical_axes(params: nnx.State) -> dict[str, tuple[str, ...]]:
  """Maps each parameter's '/'-joined path to its logical axis names.

  Args:
    params: State from ``nnx.split(model, nnx.Param)`` or ``nnx.state``.

  Returns:
    E.g. ``{'layers/0/mlp/up_proj/kernel': ('embed', 'mlp'), ...}``.
  """
  return {
      mv.path_str(path): tuple(var.get_metadata("out_sharding"))
      for path, var in nnx.to_flat_state(params)
  }


# --------------------------------------------------------------------------
# Optimizer rules, from the logical axes
# --------------------------------------------------------------------------

FULL_RANK_AXES: tuple[str, ...] = ("vocab", "norm")
"""Weights with one of these logical axes are never projected: the token
embedding and lm_head ('vocab') and the norm scales ('norm') go to the inner
optimizer in full, as in the GaLore and RSO papers."""

NO_DECAY_AXES: tuple[str, ...] = ("norm",)
"""Weights with one of these logical axes get no weight decay."""


def _weight_name(path: str) -> str:
  """A '/'-joined parameter path without its layer indices."""
  return "/".join(k for k in path.split("/") if not k.isdigit())


@functools.cache
def _axes_by_name() -> dict[str, tuple[str, ...]]:
  """The logical axes of every weight of an unrolled model, by
  :func:`_weight_name` (the same for every config)."""
  abstract = nnx.eval_shape(
      lambda: nnx.state(Llama(CONFIGS["tiny"], rngs=nnx.Rngs(0)), nnx.Param))
  return {_weight_name(path): axes
          for path, axes in param_logical_axes(abstract).items()}


@functools.cache
def _axes_of_name(name: str) -> tuple[str, ...] | None:
  known = _axes_by_name()
  if name in known:
    return known[name]
  found = {axes for weight, axes in known.items()
           if weight.endswith("/" + name)}
  return found.pop() if len(found) == 1 else None


def weight_axes(path: Any) -> tuple[str, ...] | None:
  """The logical axes of the weight at ``path``, whatever the config.

  A path into a part of the model names the weights whose paths end with
  it (``attn_norm/scale`` is every block's attention norm scale).

  Args:
    path: A key path into the parameters (a plain dict or an ``nnx.State``)
      or a part of them, e.g. of ``layers/0/mlp/up_proj/kernel``.

  Returns:
    The weight's axis names without a scanned model's leading 'layers'
    (e.g. ``('embed', 'mlp')``), or None if ``path`` names no LLaMA weight
    (or weights with different axes).
  """
  return _axes_of_name(_weight_name(mv.path_str(path)))


def _has_axis(path: Any, names: tuple[str, ...]) -> bool:
  return any(name in names for name in weight_axes(path) or ())


def views() -> mv.ViewFn:
  """The ``views`` rule of this model's parameters for the subspace
  optimizers: weights with a :data:`FULL_RANK_AXES` axis stay full, every
  other weight is a (stack of) matrices (:func:`subspace_jax.default_view`).
  """
  def view(path: Any, leaf: Array) -> mv.MatrixView | None:
    if _has_axis(path, FULL_RANK_AXES):
      return None
    return mv.default_view(path, leaf)

  return view


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices, not on weights with a :data:`NO_DECAY_AXES`
  axis (the norm scales; stacked ones are 2-D): an ``optax`` mask."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and not _has_axis(path, NO_DECAY_AXES),
      params,
  )


# --------------------------------------------------------------------------
# The trainer's adapter
# --------------------------------------------------------------------------


class ModelDef:
  """A LLaMA's structure, applied to plain-dict parameters.

  Parameters are a plain nested dict of arrays (``nnx.to_pure_dict`` of the
  model's ``nnx.Param`` state); the model is rebuilt from them in
  :meth:`apply`.

  Attributes:
    config: The model's :class:`LlamaConfig`.
    graphdef: The model's ``nnx.GraphDef``.
    logical_axes: ``{path: logical axis names}`` of every weight
      (:func:`param_logical_axes`).
  """

  def __init__(self, config: LlamaConfig):
    self.config = config
    graphdef, abstract = nnx.eval_shape(
        lambda: nnx.split(Llama(config, rngs=nnx.Rngs(0)), nnx.Param)
    )
    self.graphdef = graphdef
    self._treedef = jax.tree.structure(abstract)
    self.logical_axes = param_logical_axes(abstract)

  def init(self, seed: int) -> dict:
    """Fresh parameters (a plain nested dict)."""
    return nnx.to_pure_dict(init(self.config, seed)[1])

  def apply(self, params: dict, tokens: Array,
            segment_ids: Array | None = None) -> Array:
    """Logits; a leaf of ``params`` may be a
    :class:`~subspace_jax.factored.Factored` kernel (model mode)."""
    leaves = jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, factored.Factored))
    state = jax.tree.unflatten(self._treedef, leaves)
    return apply(self.graphdef, state, tokens, segment_ids)

  def loss(self, params: dict, batch: dict) -> Array:
    """Mean next-token cross-entropy of ``batch["inputs"]`` against
    ``batch["targets"]``.

    Optional entries of ``batch`` (all ``[batch, seq]``):
    ``"segment_ids"`` (packed examples; no attention across them) and
    ``"loss_mask"`` (weights of the targets, e.g. 1 on response tokens and
    0 on prompt tokens; the mean is over the masked targets).
    """
    logits = self.apply(params, batch["inputs"], batch.get("segment_ids"))
    return cross_entropy_loss(logits, batch["targets"],
                              batch.get("loss_mask"))


@functools.lru_cache(maxsize=8)
def _model_def(config: LlamaConfig) -> ModelDef:
  return ModelDef(config)


def forward(config: LlamaConfig, params: Any, tokens: Array,
            segment_ids: Array | None = None) -> Array:
  """Logits of the model of ``config`` with the trainer's parameters.

  Args:
    config: The model's configuration.
    params: A plain nested dict of arrays, as the trainer holds them (in
      transform mode; :func:`subspace_jax.models.io.hf.load` returns one); a
      leaf may be a :class:`~subspace_jax.factored.Factored` kernel.
    tokens: int32 token ids, shape ``[batch, seq]``.
    segment_ids: Optional packed-example ids (see :meth:`Llama.__call__`).

  Returns:
    float32 logits (float64 for a float64 model), shape
    ``[batch, seq, vocab]``.

  Example:
    >>> cfg = get_config("tiny")
    >>> params = ModelDef(cfg).init(0)
    >>> forward(cfg, params, jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 256)
  """
  return _model_def(config).apply(params, tokens, segment_ids)
