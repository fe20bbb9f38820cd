"""Llama-family decoder in Flax NNX.

Embedding -> L x [RMSNorm -> GQA attention (RoPE) -> + ; RMSNorm -> SwiGLU MLP -> +] -> RMSNorm -> head,
optionally with q/k/v projection biases (Qwen2) and Llama-3.1 rope scaling (`lmjax.convert` maps
Hugging Face Llama, Qwen2 and Mistral checkpoints onto it).
Parameters are f32, compute in `compute_dtype` (bf16 by default); with `matmul_precision='fp8'` the
layers' dense projections run in FP8 (lmjax/fp8.py). Layers are stacked: one `Block`
holds every layer's weights with a leading layer axis and the forward pass scans over it, so compile
time does not grow with depth. Every parameter carries logical axis names (`axes` metadata) that
`lmjax.sharding` maps to mesh axes.

Shape letters: B batch, T length (queries), S length (keys), D d_model, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim, F MLP hidden, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmjax import errors, fp8, sharding

# Named sizes (gemma / MaxText style). `1b` has Llama-3.2-1B's shapes, `8b` Llama-3-8B's, `70b` Llama-3-70B's, so
# throughput and parameter counts compare with published and peer figures.
# Rope scaling is off unless a variant sets `rope_scaling_factor`; `1b` has Llama-3.2's (factor 32,
# low/high frequency factors 1 and 4, original context 8192; Llama-3.1 uses factor 8).
VARIANTS = {
    'tiny': dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=2048,
                 tie_embeddings=True, rope_theta=10_000.0),
    '150m': dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, vocab_size=32_000,
                 tie_embeddings=True, rope_theta=10_000.0),
    '1b': dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, vocab_size=128_256,
               tie_embeddings=True, rope_theta=500_000.0, rope_scaling_factor=32.0,
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192),
    '8b': dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14_336, vocab_size=128_256,
               tie_embeddings=False, rope_theta=500_000.0),
    # Llama-3-70B's shapes: for planning what a slice holds (python -m lmjax.aot --topology=...).
    '70b': dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28_672, vocab_size=128_256,
                tie_embeddings=False, rope_theta=500_000.0),
}
ATTENTION = ('xla', 'cudnn', 'pallas')
REMAT = ('none', 'full', 'dots', 'dots_no_batch')
MATMUL_PRECISION = ('bf16', 'fp8')


def defaults() -> ml_collections.ConfigDict:
  """config.model: a named variant, with any field overridable (None = the variant's value)."""
  def unset(field_type):  # None, but typed, so `--config.model.d_model=512` can override it
    return ml_collections.FieldReference(None, field_type=field_type)

  return ml_collections.ConfigDict(dict(
      variant='tiny',
      d_model=unset(int), n_layers=unset(int), n_heads=unset(int), n_kv_heads=unset(int),
      d_ff=unset(int), vocab_size=unset(int), tie_embeddings=unset(bool), rope_theta=unset(float),
      rope_scaling_factor=unset(float), rope_low_freq_factor=unset(float),
      rope_high_freq_factor=unset(float), rope_original_max_position=unset(int),
      d_head=unset(int), qkv_bias=unset(bool),
      norm_eps=1e-5,
      attention='xla',          # xla | cudnn | pallas (pallas_kernels.flash_attention)
      remat='none',             # none | full | dots | dots_no_batch (jax.checkpoint_policies)
      matmul_precision='bf16',  # bf16 (the compute dtype) | fp8: the layers' dense projections in FP8 (lmjax/fp8.py)
      # Layers per iteration of the layer scan; n_layers: no loop, so no stacked residuals to copy (on
      # an H100, 1b without remat: -28 ms a step). 1 by default: with remat, unrolled steps can need far
      # more memory (8b on a v5p-32, full remat: 793.8 GiB a chip, not 67.8; benchmarks/RESULTS.md).
      scan_unroll=1,
      compute_dtype='bfloat16',
      param_dtype='float32',
  ))


@dataclasses.dataclass(frozen=True)
class Args:
  """Resolved model hyperparameters (variant + overrides)."""
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  vocab_size: int
  tie_embeddings: bool
  rope_theta: float
  # Llama-3.1 rope scaling (HF rope_type 'llama3'); a factor of 0 or 1 turns it off.
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  d_head: int | None = None  # None: d_model // n_heads (Mistral-Nemo and Qwen3 set their own)
  qkv_bias: bool = False     # biases on the q, k, v projections (Qwen2)
  norm_eps: float = 1e-5
  attention: str = 'xla'
  remat: str = 'none'
  matmul_precision: str = 'bf16'
  scan_unroll: int = 1
  compute_dtype: str = 'bfloat16'
  param_dtype: str = 'float32'

  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  @property
  def rope_scaled(self) -> bool:
    return bool(self.rope_scaling_factor) and self.rope_scaling_factor != 1


def validate(cfg: ml_collections.ConfigDict) -> None:
  if cfg.variant not in VARIANTS:
    raise errors.ConfigError(f'config.model.variant={cfg.variant!r}: expected one of {sorted(VARIANTS)}')
  if cfg.attention not in ATTENTION:
    raise errors.ConfigError(f'config.model.attention={cfg.attention!r}: expected one of {ATTENTION}')
  if cfg.remat not in REMAT:
    raise errors.ConfigError(f'config.model.remat={cfg.remat!r}: expected one of {REMAT}')
  if cfg.matmul_precision not in MATMUL_PRECISION:
    raise errors.ConfigError(f'config.model.matmul_precision={cfg.matmul_precision!r}: expected one of '
                             f'{MATMUL_PRECISION}')
  for field in ('compute_dtype', 'param_dtype'):
    if cfg[field] not in ('float32', 'bfloat16'):
      raise errors.ConfigError(f'config.model.{field}={cfg[field]!r}: expected float32 or bfloat16')
  args = resolve(cfg)
  for field in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'vocab_size', 'scan_unroll'):
    if getattr(args, field) <= 0:
      raise errors.ConfigError(f'config.model.{field}={getattr(args, field)}: expected a positive integer')
  if args.n_heads % args.n_kv_heads:
    raise errors.ConfigError(f'config.model.n_kv_heads={args.n_kv_heads} must divide n_heads={args.n_heads}')
  if args.d_head is None and args.d_model % args.n_heads:
    raise errors.ConfigError(f'config.model.d_model={args.d_model} must be a multiple of '
                             f'n_heads={args.n_heads} (or set d_head)')
  if args.head_dim <= 0 or args.head_dim % 2:
    raise errors.ConfigError(f'config.model.d_head: head dim {args.head_dim} must be positive and even')
  if args.rope_scaling_factor and args.rope_scaling_factor < 1:
    raise errors.ConfigError(f'config.model.rope_scaling_factor={args.rope_scaling_factor}: expected 0 or 1 '
                             f'(off) or a factor > 1')
  if args.rope_scaled and not 0 < args.rope_low_freq_factor < args.rope_high_freq_factor:
    raise errors.ConfigError(f'config.model.rope_low_freq_factor={args.rope_low_freq_factor} and '
                             f'rope_high_freq_factor={args.rope_high_freq_factor}: expected 0 < low < high')


def resolve(cfg: ml_collections.ConfigDict) -> Args:
  """Variant values overridden by every non-None field of `cfg`.

  `vocab_size` is the number of embedding rows. The tokenizer's vocabulary must not exceed it; rows
  past the tokenizer's (padding up to a multiple of 128 keeps the head matmul fast) are never
  predicted: the loss masks them (lmjax/losses.py).
  """
  fields = dict(VARIANTS[cfg.variant])
  for name in [f.name for f in dataclasses.fields(Args)]:
    if name in cfg and cfg[name] is not None:
      fields[name] = cfg[name]
  return Args(**fields)


def param_count(args: Args) -> int:
  """Exact number of parameters (embedding counted once when tied)."""
  d, dh = args.d_model, args.head_dim
  attn = d * args.n_heads * dh * 2 + d * args.n_kv_heads * dh * 2 + _qkv_bias_count(args)
  layer = attn + 3 * d * args.d_ff + 2 * d
  head = 0 if args.tie_embeddings else d * args.vocab_size
  return args.vocab_size * d + args.n_layers * layer + d + head


def _qkv_bias_count(args: Args) -> int:
  """Bias parameters of one layer's q, k, v projections."""
  return (args.n_heads + 2 * args.n_kv_heads) * args.head_dim if args.qkv_bias else 0


def flops_per_token(args: Args, seq_len: int) -> float:
  """Training FLOPs per token: 6N over the matmul weights (embedding lookup excluded, the head
  matmul included) plus causal attention 6 * L * H * Dh * T (PaLM appendix B's 12*L*H*Dh*T, halved
  because a causal mask skips half the score matrix, as in the peer benchmark)."""
  n_matmul = param_count(args) - (args.vocab_size * args.d_model if not args.tie_embeddings else 0)
  # norm scales and biases do no matmul
  n_matmul -= (2 * args.n_layers + 1) * args.d_model + args.n_layers * _qkv_bias_count(args)
  return 6 * n_matmul + 6 * args.n_layers * args.n_heads * args.head_dim * seq_len


def executed_flops_per_token(args: Args, seq_len: int) -> float:
  """flops_per_token plus the layer forward that the backward pass recomputes under `args.remat` (the
  remat wraps the scanned layer body only). `full` recomputes the forward up to what the backward
  reads: every projection but the MLP's down projection (its output is the layer's, which the scan
  saves), and causal attention (2 * L * H * Dh * T). `dots_no_batch` saves the projections but not
  the batched attention matmuls; `dots` saves every matmul, except attention computed by a
  kernel (cudnn, pallas), which is no dot to save. MFU is at most flops_per_token / this.
  tests/test_aot.py holds it against the compiler's count."""
  attention_forward = 2 * args.n_layers * args.n_heads * args.head_dim * seq_len
  d = args.d_model
  projections = args.n_layers * d * (2 * (args.n_heads + args.n_kv_heads) * args.head_dim + 2 * args.d_ff)
  recomputed = {
      'none': 0, 'full': 2 * projections + attention_forward, 'dots_no_batch': attention_forward,
      'dots': attention_forward if args.attention != 'xla' else 0}[args.remat]
  return flops_per_token(args, seq_len) + recomputed


# ----------------------------------------------------------------------------- layers


def _param(rngs: nnx.Rngs, shape, axes, dtype, fan_in: int | None) -> nnx.Param:
  """A parameter with logical axis names; normal(0, 1/sqrt(fan_in)) init, ones when fan_in is None."""
  if fan_in is None:
    value = jnp.ones(shape, dtype)
  else:
    value = jax.random.normal(rngs.params(), shape, dtype) / math.sqrt(fan_in)
  return nnx.Param(value, axes=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_btd: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale over the last axis, f32 math, in x's dtype. A custom VJP saves x (compute
  dtype) and 1/rms (one f32 a row) for the backward, where autodiff would keep f32 copies of the
  whole activation; the backward recomputes x / rms in one fused pass."""
  return _rms_norm_forward(x_btd, scale_d, eps)[0]


def _rms_norm_forward(x_btd, scale_d, eps):
  x = x_btd.astype(jnp.float32)
  rstd_bt1 = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * rstd_bt1 * scale_d.astype(jnp.float32)).astype(x_btd.dtype), (x_btd, scale_d, rstd_bt1)


def _rms_norm_backward(eps, residuals, g_btd):
  """d/dx of x * r(x) * s with r = (mean(x^2) + eps)^-1/2: r * (g s - x_hat * mean(g s x_hat)),
  x_hat = x r; d/ds = sum of g * x_hat over every axis but the last."""
  x_btd, scale_d, rstd_bt1 = residuals
  x_hat, g = x_btd.astype(jnp.float32) * rstd_bt1, g_btd.astype(jnp.float32)
  gs = g * scale_d.astype(jnp.float32)
  dx = rstd_bt1 * (gs - x_hat * jnp.mean(gs * x_hat, axis=-1, keepdims=True))
  d_scale = jnp.sum(g * x_hat, axis=tuple(range(x_btd.ndim - 1)))
  return dx.astype(x_btd.dtype), d_scale.reshape(scale_d.shape).astype(scale_d.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


@jax.custom_vjp
def swiglu(gate_btf: jax.Array, up_btf: jax.Array) -> jax.Array:
  """silu(gate) * up, f32 math, in gate's dtype. A custom VJP saves only its two inputs (which the
  projections wrote anyway) and recomputes the sigmoid in the backward's one fused pass; autodiff
  would also keep silu(gate) and sigmoid(gate), each as large as the MLP's hidden activation."""
  return _swiglu_forward(gate_btf, up_btf)[0]


def _swiglu_forward(gate_btf, up_btf):
  gate = gate_btf.astype(jnp.float32)
  out = gate * jax.nn.sigmoid(gate) * up_btf.astype(jnp.float32)
  return out.astype(gate_btf.dtype), (gate_btf, up_btf)


def _swiglu_backward(residuals, g_btf):
  """d/d gate of gate sigmoid(gate) up = up * sigmoid * (1 + gate (1 - sigmoid)); d/d up = silu(gate)."""
  gate_btf, up_btf = residuals
  gate, g = gate_btf.astype(jnp.float32), g_btf.astype(jnp.float32)
  sig = jax.nn.sigmoid(gate)
  d_gate = g * up_btf.astype(jnp.float32) * sig * (1 + gate * (1 - sig))
  return d_gate.astype(gate_btf.dtype), (g * gate * sig).astype(up_btf.dtype)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def rope_frequencies(args: Args) -> jax.Array:
  """Inverse frequencies [Dh/2]; with a rope scaling factor, Llama-3.1's long-context scaling:
  wavelengths above original/low are divided by the factor, those below original/high kept, and
  those between interpolated (HF rope_type 'llama3')."""
  dh = args.head_dim
  inv = 1.0 / (args.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  if not args.rope_scaled:
    return inv
  factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
  old_ctx = float(args.rope_original_max_position)
  wavelen = 2 * jnp.pi / inv
  smooth = (old_ctx / wavelen - low) / (high - low)
  scaled = jnp.where(wavelen > old_ctx / low, inv / factor, inv)
  mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
  return jnp.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + Dh/2]) by position * inv_freq[i]: the half-split layout
  of Hugging Face checkpoints (`rotate_half`), so their q/k weights load without a permutation
  (Meta's original checkpoints pair adjacent dims instead and need one; lmjax/convert.py)."""
  angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_bth)[:, :, None], jnp.cos(angles_bth)[:, :, None]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_btnh.dtype)


def masked_attention(q_bthd, k_bskd, v_bskd, mask_bts) -> jax.Array:
  """GQA attention in plain jnp where query t sees key s iff mask_bts[b, t, s]; f32 softmax. K/V
  heads are shared by G query heads through a reshape (BTKGD), never repeated in memory."""
  b, t, h, dh = q_bthd.shape
  k_heads = k_bskd.shape[2]
  q_btkgd = q_bthd.reshape(b, t, k_heads, h // k_heads, dh)
  logits = jnp.einsum('btkgd,bskd->bkgts', q_btkgd, k_bskd, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(dh)
  logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bskd.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v_bskd)
  return out.reshape(b, t, h, dh)


def xla_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt) -> jax.Array:
  """Causal attention in plain jnp; documents of a packed row (different segment ids) never
  attend to each other."""
  t = q_bthd.shape[1]
  causal_ts = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  same_doc_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  return masked_attention(q_bthd, k_bskd, v_bskd, causal_ts[None] & same_doc_bts)


def cudnn_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt) -> jax.Array:
  """cuDNN fused attention (GPU only). Packed rows pass a segment mask."""
  same_doc = segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]
  return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=same_doc, is_causal=True,
                                      implementation='cudnn')


def pallas_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt) -> jax.Array:
  """pallas_kernels.flash_attention. XLA cannot partition a Pallas kernel, so under a mesh with an
  axis of more than one device the kernel runs inside jax.shard_map: batch split as the batch is,
  query and K/V heads split over 'tensor' by the same factor (both whole when either does not divide,
  so every shard keeps its query heads' K/V heads), T and head_dim whole."""
  from pallas_kernels.flash_attention import flash_attention
  attend = lambda q, k, v, seg: flash_attention(q, k, v, causal=True, segment_ids=seg)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(size == 1 for axis, size in mesh.shape.items() if axis not in mesh.manual_axes):
    return attend(q_bthd, k_bskd, v_bskd, segment_ids_bt)
  batch = sharding.spec(('batch',), q_bthd.shape[:1], mesh)[0]
  heads = sharding.spec(('heads',), q_bthd.shape[2:3], mesh)[0]
  kv_heads = sharding.spec(('kv_heads',), k_bskd.shape[2:3], mesh)[0]
  heads = heads if heads == kv_heads else None
  q_spec, seg_spec = P(batch, None, heads, None), P(batch, None)
  return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, q_spec, q_spec, seg_spec),
                       out_specs=q_spec)(q_bthd, k_bskd, v_bskd, segment_ids_bt)


ATTENTION_FNS: dict[str, Callable] = {
    'xla': xla_attention, 'cudnn': cudnn_attention, 'pallas': pallas_attention}


class Block(nnx.Module):
  """All L decoder layers, weights stacked on a leading layer axis (`layers`)."""

  def __init__(self, args: Args, *, rngs: nnx.Rngs):
    L, d, h, k, dh, f = (args.n_layers, args.d_model, args.n_heads, args.n_kv_heads,
                         args.head_dim, args.d_ff)
    dt = jnp.dtype(args.param_dtype)
    self.attn_norm = _param(rngs, (L, d), ('layers', 'norm'), dt, None)
    self.wq_ldhe = _param(rngs, (L, d, h, dh), ('layers', 'embed', 'heads', 'head_dim'), dt, d)
    self.wk_ldke = _param(rngs, (L, d, k, dh), ('layers', 'embed', 'kv_heads', 'head_dim'), dt, d)
    self.wv_ldke = _param(rngs, (L, d, k, dh), ('layers', 'embed', 'kv_heads', 'head_dim'), dt, d)
    self.wo_lhed = _param(rngs, (L, h, dh, d), ('layers', 'heads', 'head_dim', 'embed'), dt, h * dh)
    if args.qkv_bias:  # zero init, as transformers' Linear biases
      self.bq_lhe = nnx.Param(jnp.zeros((L, h, dh), dt), axes=('layers', 'heads', 'head_dim'))
      self.bk_lke = nnx.Param(jnp.zeros((L, k, dh), dt), axes=('layers', 'kv_heads', 'head_dim'))
      self.bv_lke = nnx.Param(jnp.zeros((L, k, dh), dt), axes=('layers', 'kv_heads', 'head_dim'))
    self.mlp_norm = _param(rngs, (L, d), ('layers', 'norm'), dt, None)
    self.w_gate_ldf = _param(rngs, (L, d, f), ('layers', 'embed', 'mlp'), dt, d)
    self.w_up_ldf = _param(rngs, (L, d, f), ('layers', 'embed', 'mlp'), dt, d)
    self.w_down_lfd = _param(rngs, (L, f, d), ('layers', 'mlp', 'embed'), dt, f)


def layer_forward(p: dict, x_btd, positions_bt, segment_ids_bt, inv_freq, args: Args, mask_btt=None):
  """One decoder layer on its un-stacked weights `p` (the Block's fields without the layer axis);
  attention by args.attention, or `masked_attention` by `mask_btt` when one is given."""
  q_bthe, k_btke, v_btke = attention_inputs(p, x_btd, positions_bt, inv_freq, args)
  if mask_btt is None:
    attn_bthe = ATTENTION_FNS[args.attention](q_bthe, k_btke, v_btke, segment_ids_bt)
  else:
    attn_bthe = masked_attention(q_bthe, k_btke, v_btke, mask_btt)
  return layer_output(p, x_btd, attn_bthe, args)


def attention_inputs(p: dict, x_btd, positions_bt, inv_freq, args: Args):
  """(q_bthe, k_btke, v_btke) of one layer: RMSNorm, projections (+ biases), RoPE on q and k."""
  w = _cast(p, ('wq_ldhe', 'wk_ldke', 'wv_ldke'), args)
  project = PROJECTIONS[args.matmul_precision]
  h_btd = rms_norm(x_btd, p['attn_norm'], args.norm_eps)
  q = project('btd,dhe->bthe', h_btd, w['wq_ldhe'])
  k = project('btd,dke->btke', h_btd, w['wk_ldke'])
  v = project('btd,dke->btke', h_btd, w['wv_ldke'])
  if args.qkv_bias:
    b = _cast(p, ('bq_lhe', 'bk_lke', 'bv_lke'), args)
    q, k, v = q + b['bq_lhe'], k + b['bk_lke'], v + b['bv_lke']
  return apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq), v


def layer_output(p: dict, x_btd, attn_bthe, args: Args):
  """The rest of one layer after attention: output projection, residual, RMSNorm, SwiGLU MLP."""
  w = _cast(p, ('wo_lhed', 'w_gate_ldf', 'w_up_ldf', 'w_down_lfd'), args)
  project = PROJECTIONS[args.matmul_precision]
  x_btd = x_btd + project('bthe,hed->btd', attn_bthe, w['wo_lhed'])
  x_btd = sharding.constrain(x_btd, ('batch', 'length', 'act_embed'))
  h_btd = rms_norm(x_btd, p['mlp_norm'], args.norm_eps)
  gate_btf = project('btd,df->btf', h_btd, w['w_gate_ldf'])
  up_btf = project('btd,df->btf', h_btd, w['w_up_ldf'])
  x_btd = x_btd + project('btf,fd->btd', swiglu(gate_btf, up_btf), w['w_down_lfd'])
  return sharding.constrain(x_btd, ('batch', 'length', 'act_embed'))


# The layers' dense projections by config.model.matmul_precision (attention, norms, embedding and head
# stay in the compute dtype).
PROJECTIONS: dict[str, Callable] = {'bf16': jnp.einsum, 'fp8': fp8.einsum}


def _cast(p: dict, names: tuple, args: Args) -> dict:
  return {name: p[name].astype(jnp.dtype(args.compute_dtype)) for name in names}


REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """Llama-family causal LM. `hidden(...) -> x_btd` and `head() -> w_dv` are the loss seam;
  `__call__(tokens_bt, positions_bt, segment_ids_bt) -> logits_btv` (f32) is their product."""

  def __init__(self, args: Args, *, rngs: nnx.Rngs):
    self.args = args
    dt = jnp.dtype(args.param_dtype)
    self.embed_vd = _param(rngs, (args.vocab_size, args.d_model), ('vocab', 'embed'), dt,
                           args.d_model)
    self.layers = Block(args, rngs=rngs)
    self.final_norm = _param(rngs, (args.d_model,), ('norm',), dt, None)
    if not args.tie_embeddings:
      self.head_dv = _param(rngs, (args.d_model, args.vocab_size), ('embed', 'vocab'), dt,
                            args.d_model)

  def hidden(self, tokens_bt, positions_bt, segment_ids_bt, mask_btt=None) -> jax.Array:
    """Final normalised hidden states x_btd in compute dtype: what the head and the loss read.
    Query t attends to key s by the causal same-segment rule, or iff mask_btt[b, t, s] when a mask
    [B, T, T] bool is given (a row of several continuations of one context: lmjax/eval/choice.py)."""
    args, cdt = self.args, jnp.dtype(self.args.compute_dtype)
    x_btd = jnp.take(self.embed_vd[...], tokens_bt, axis=0).astype(cdt)
    x_btd = sharding.constrain(x_btd, ('batch', 'length', 'act_embed'))
    inv_freq = rope_frequencies(args)

    def body(x, p):
      return layer_forward(p, x, positions_bt, segment_ids_bt, inv_freq, args, mask_btt), None

    if args.remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[args.remat], prevent_cse=False)
    stacked = {name: var[...] for name, var in vars(self.layers).items()
               if isinstance(var, nnx.Param)}
    x_btd, _ = jax.lax.scan(body, x_btd, stacked, unroll=args.scan_unroll)
    return rms_norm(x_btd, self.final_norm[...], args.norm_eps)

  def head(self) -> jax.Array:
    """The output projection w_dv in parameter dtype: the embedding transposed when tied."""
    return self.embed_vd[...].T if self.args.tie_embeddings else self.head_dv[...]

  def __call__(self, tokens_bt, positions_bt, segment_ids_bt) -> jax.Array:
    x_btd = self.hidden(tokens_bt, positions_bt, segment_ids_bt)
    # Logits in f32 for a stable softmax (the matmul itself runs in compute dtype).
    return jnp.einsum('btd,dv->btv', x_btd, self.head().astype(x_btd.dtype),
                      preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- functional view


def create(args: Args, seed: int) -> tuple[nnx.GraphDef, dict]:
  """Builds the model; returns (graphdef, params) with params a nested dict of arrays."""
  graphdef, state = nnx.split(Transformer(args, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def abstract(args: Args) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, params as ShapeDtypeStructs, logical axes per param) without allocating weights."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(args, rngs=nnx.Rngs(0))))

  def axes(node):
    if isinstance(node, nnx.Variable):
      return node.get_metadata()['axes']
    return {key: axes(child) for key, child in node.items()}

  return graphdef, nnx.to_pure_dict(state), axes(state)


def apply(graphdef: nnx.GraphDef, params: dict, batch: dict) -> jax.Array:
  """Logits [B, T, V] (f32) for a batch dict with 'inputs', 'positions', 'segment_ids' [B, T]."""
  model = nnx.merge(graphdef, params)
  return model(batch['inputs'], batch['positions'], batch['segment_ids'])


def hidden_and_head(graphdef: nnx.GraphDef, params: dict, batch: dict, mask_btt=None
                    ) -> tuple[jax.Array, jax.Array]:
  """(x_btd, w_dv): the final normalised hidden states and the head weight, the loss seam's inputs
  (`mask_btt`: see Transformer.hidden)."""
  model = nnx.merge(graphdef, params)
  return model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'], mask_btt), model.head()
