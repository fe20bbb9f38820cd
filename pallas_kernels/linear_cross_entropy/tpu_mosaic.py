"""The fused loss on TPU (Pallas Mosaic TPU): three kernels over (token block, vocabulary block) tiles,
the [N, V] logits only ever a [bn, bv] tile in VMEM.

  stats  grid (N/bn, V/bv), vocabulary innermost: online logsumexp of z and of z / T (one matmul)
  dx     grid (N/bn, V/bv): recompute z, dz = a softmax(z) + b softmax(z / T), dx += dz @ w^T
  dw     grid (V/bv, N/bn): recompute z, dz, dw += x^T @ dz
Five matmuls against the XLA backend's three (a kernel cannot keep both the dx and the dw accumulator
in VMEM, and [bn, V] rows do not fit it), so memory is only the tiles. The sparse parts, the target's
and the teacher ids' logits and their gradient terms (terms.py), are gathers and scatters of k + 1
columns of w per token, done in XLA over token chunks.

Placement: as the flash attention kernel (pallas_kernels/flash_attention/tpu_mosaic.py): XLA cannot
split a Mosaic kernel, so on a TPU mesh call this inside jax.shard_map (tokens split, w whole); lowering
reads the chip from the current mesh (tests/test_tpu_compile.py compiles it for v5e and v5p that way).
The sparse gathers and scatters work on one token block at a time: [d, bn * (k + 1)] columns of w.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_cross_entropy import terms

DEFAULT_BLOCK_TOKENS = 256
_VOCAB_BLOCKS = (512, 256, 128)
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _round_up(n, m):
  return -(-n // m) * m


def _struct(shape, dtype, like):
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _logits(x_ref, w_ref, v_start, block_v, vocab_size):
  z = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  cols = v_start + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  return z, cols < vocab_size


def _stats_kernel(x_ref, w_ref, lse_ref, lse_t_ref, m_scr, l_scr, mt_scr, lt_scr, *, block_v, vocab_size,
                  temperature):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    for m, l in ((m_scr, l_scr), (mt_scr, lt_scr)):
      m[...] = jnp.full(m.shape, _MASK_VALUE, jnp.float32)
      l[...] = jnp.zeros(l.shape, jnp.float32)

  z, valid = _logits(x_ref, w_ref, j * block_v, block_v, vocab_size)
  for zz, m, l in ((z, m_scr, l_scr), (z / temperature, mt_scr, lt_scr)):
    zz = jnp.where(valid, zz, _MASK_VALUE)
    m_new = jnp.maximum(m[...], zz.max(axis=1, keepdims=True))
    l[...] = l[...] * jnp.exp(m[...] - m_new) + jnp.exp(zz - m_new).sum(axis=1, keepdims=True)
    m[...] = m_new

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    lse_ref[...] = m_scr[...] + jnp.log(l_scr[...])
    lse_t_ref[...] = mt_scr[...] + jnp.log(lt_scr[...])


def _dz(z, valid, lse_ref, lse_t_ref, a_ref, b_ref, temperature):
  dz = a_ref[...] * jnp.exp(z - lse_ref[...]) + b_ref[...] * jnp.exp(z / temperature - lse_t_ref[...])
  return jnp.where(valid, dz, 0.0)


def _dx_kernel(x_ref, w_ref, lse_ref, lse_t_ref, a_ref, b_ref, dx_ref, acc, *, block_v, vocab_size,
               temperature):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc[...] = jnp.zeros(acc.shape, jnp.float32)

  z, valid = _logits(x_ref, w_ref, j * block_v, block_v, vocab_size)
  dz = _dz(z, valid, lse_ref, lse_t_ref, a_ref, b_ref, temperature).astype(w_ref.dtype)
  acc[...] += jax.lax.dot_general(dz, w_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    dx_ref[...] = acc[...]


def _dw_kernel(x_ref, w_ref, lse_ref, lse_t_ref, a_ref, b_ref, dw_ref, acc, *, block_v, vocab_size,
               temperature):
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc[...] = jnp.zeros(acc.shape, jnp.float32)

  z, valid = _logits(x_ref, w_ref, j * block_v, block_v, vocab_size)
  dz = _dz(z, valid, lse_ref, lse_t_ref, a_ref, b_ref, temperature).astype(x_ref.dtype)
  acc[...] += jax.lax.dot_general(x_ref[...], dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    dw_ref[...] = acc[...]


def _stats(x, w, bn, bv, cfg):
  n, d = x.shape
  grid = (n // bn, w.shape[1] // bv)
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  return pl.pallas_call(
      functools.partial(_stats_kernel, block_v=bv, vocab_size=cfg.vocab_size, temperature=cfg.temperature),
      grid=grid,
      in_specs=[pl.BlockSpec((bn, d), lambda i, j: (i, 0)), pl.BlockSpec((d, bv), lambda i, j: (0, j))],
      out_specs=[row, row],
      out_shape=[_struct((n, 1), jnp.float32, x)] * 2,
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 4,
      compiler_params=_params(),
      interpret=cfg.interpret,
  )(x, w)


def _dense_grads(x, w, rows, bn, bv, cfg):
  """dx [N, d] f32 and dw [d, V] f32 of the dense part a softmax(z) + b softmax(z / T)."""
  n, d = x.shape
  v = w.shape[1]
  kw = dict(block_v=bv, vocab_size=cfg.vocab_size, temperature=cfg.temperature)
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  dx = pl.pallas_call(
      functools.partial(_dx_kernel, **kw),
      grid=(n // bn, v // bv),
      in_specs=[pl.BlockSpec((bn, d), lambda i, j: (i, 0)), pl.BlockSpec((d, bv), lambda i, j: (0, j))]
      + [row] * 4,
      out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
      out_shape=_struct((n, d), jnp.float32, x),
      scratch_shapes=[pltpu.VMEM((bn, d), jnp.float32)],
      compiler_params=_params(),
      interpret=cfg.interpret,
  )(x, w, *rows)
  row_t = pl.BlockSpec((bn, 1), lambda j, i: (i, 0))
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, **kw),
      grid=(v // bv, n // bn),
      in_specs=[pl.BlockSpec((bn, d), lambda j, i: (i, 0)), pl.BlockSpec((d, bv), lambda j, i: (0, j))]
      + [row_t] * 4,
      out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
      out_shape=_struct((d, v), jnp.float32, x),
      scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
      compiler_params=_params(),
      interpret=cfg.interpret,
  )(x, w, *rows)
  return dx, dw


def _chunks(a, c):
  return a.reshape(-1, c, *a.shape[1:])


def _gather_logits(x, w, cols_nk, c):
  """z[n, cols_nk[n, i]] = x_n . w[:, cols_nk[n, i]], c tokens at a time."""

  def chunk(args):
    x_c, cols_c = args
    w_dck = jnp.take(w, cols_c.reshape(-1), axis=1).reshape(w.shape[0], *cols_c.shape)
    return jnp.einsum("cd,dck->ck", x_c, w_dck, preferred_element_type=jnp.float32)

  return jax.lax.map(chunk, (_chunks(x, c), _chunks(cols_nk, c))).reshape(cols_nk.shape)


def _sparse_grads(x, w, cols_nk, coef_nk, dw, c):
  """dx_n = sum_i coef_ni w[:, cols_ni] ([N, d] f32), and dw[:, cols_ni] += coef_ni x_n (f32), c tokens
  at a time."""
  d = w.shape[0]

  def chunk(dw, args):
    x_c, cols_c, coef_c = args
    w_dck = jnp.take(w, cols_c.reshape(-1), axis=1).reshape(d, *cols_c.shape)
    dx_c = jnp.einsum("ck,dck->cd", coef_c.astype(w.dtype), w_dck, preferred_element_type=jnp.float32)
    upd = jnp.einsum("cd,ck->dck", x_c.astype(jnp.float32), coef_c).reshape(d, -1)
    return dw.at[:, cols_c.reshape(-1)].add(upd), dx_c

  dw, dx = jax.lax.scan(chunk, dw, (_chunks(x, c), _chunks(cols_nk, c), _chunks(coef_nk, c)))
  return dx.reshape(x.shape), dw


def _prepare(x, w, targets, weights, ids, lps, cfg):
  """Pads N to the token block and V to the vocabulary block (padded rows have weight 0)."""
  n = x.shape[0]
  bn = min(cfg.block_tokens, _round_up(n, 16))
  n_pad = _round_up(n, bn)
  v_pad = _round_up(w.shape[1], 128)
  bv = next(b for b in _VOCAB_BLOCKS if v_pad % b == 0)
  pad_n = lambda a: jnp.pad(a, [(0, n_pad - n)] + [(0, 0)] * (a.ndim - 1))
  wc = jnp.pad(w.astype(x.dtype), ((0, 0), (0, v_pad - w.shape[1])))
  cols = targets[:, None] if ids is None else jnp.concatenate([targets[:, None], ids], axis=1)
  return bn, bv, pad_n(x), wc, pad_n(cols), pad_n(weights), None if lps is None else pad_n(lps)


def _forward(x, w, targets, weights, ids, lps, cfg):
  bn, bv, xp, wc, cols, wts, lps_p = _prepare(x, w, targets, weights, ids, lps, cfg)
  lse, lse_t = _stats(xp, wc, bn, bv, cfg)
  z_cols = _gather_logits(xp, wc, cols, bn)
  out = terms.row_terms(lse[:, 0], lse_t[:, 0], z_cols[:, 0], None if ids is None else z_cols[:, 1:], wts,
                        lps_p, z_loss=cfg.z_loss, tail=cfg.tail, temperature=cfg.temperature, alpha=cfg.alpha)
  return (bn, bv, xp, wc, cols, lse, lse_t), out


def loss(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg):
  """Per-token loss [N] f32 (no gradients made)."""
  return _forward(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg)[1][0][:x_nd.shape[0]]


def loss_and_grads(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg):
  """(loss_n, dx_nd, dw_dv): the loss and the gradients of sum_n weights_n loss_n."""
  n, v = x_nd.shape[0], w_dv.shape[1]
  (bn, bv, xp, wc, cols, lse, lse_t), (loss_n, a, b, ct, c_nk) = _forward(
      x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg)
  b = jnp.zeros_like(a) if b is None else b
  rows = (lse, lse_t, a[:, None], b[:, None])
  dx, dw = _dense_grads(xp, wc, rows, bn, bv, cfg)
  coef = ct[:, None] if c_nk is None else jnp.concatenate([ct[:, None], c_nk], axis=1)
  dx_sparse, dw = _sparse_grads(xp, wc, cols, coef, dw, bn)
  dx = (dx + dx_sparse)[:n].astype(x_nd.dtype)
  return loss_n[:n], dx, dw[:, :v].astype(w_dv.dtype)
