"""The fused loss in plain XLA: a scan over blocks of tokens, each block's [bn, V] logits live only
inside its step, and the gradients are made in the same step (the loss is the last op, so nothing is
recomputed): per block, three matmuls

  z = x_b @ w    ->  lse, the gathered target / teacher logits, the loss, dz (terms.py)
  dx_b = dz @ w^T,   dw += x_b^T @ dz

Memory: one block of f32 logits and its dz (bn x V), plus the dw accumulator, which is the weight
gradient itself, kept in w's dtype (f32 for the model's f32 parameters; bf16 weights accumulate in bf16
as Liger's fused linear CE does). Blocks are strided (block j holds tokens j, j + nb, j + 2 nb, ...), so
tokens split over a mesh axis stay split evenly inside every block.
"""
import jax
import jax.numpy as jnp

from pallas_kernels.linear_cross_entropy import reference, terms

DEFAULT_BLOCK_TOKENS = 1024


def _blocks(n, block_tokens):
  bn = min(block_tokens, n)
  nb = -(-n // bn)
  return bn, nb


def _to_blocks(a, bn, nb):
  """[N, ...] -> [nb, bn, ...], padded with zeros, token a * nb + j in block j."""
  a = jnp.pad(a, [(0, bn * nb - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
  return a.reshape(bn, nb, *a.shape[1:]).swapaxes(0, 1)


def _from_blocks(a, n):
  return a.swapaxes(0, 1).reshape(-1, *a.shape[2:])[:n]


def _block_terms(x_b, wc, t_b, wt_b, ids_b, lp_b, cfg):
  z = reference.logits(x_b, wc, cfg.vocab_size)
  lse = jax.nn.logsumexp(z, axis=-1)
  lse_t = lse if cfg.temperature == 1.0 else jax.nn.logsumexp(z / cfg.temperature, axis=-1)
  z_t = jnp.take_along_axis(z, t_b[:, None], axis=-1)[:, 0]
  z_ids = None if ids_b is None else jnp.take_along_axis(z, ids_b, axis=-1)
  out = terms.row_terms(lse, lse_t, z_t, z_ids, wt_b, lp_b, z_loss=cfg.z_loss, tail=cfg.tail,
                        temperature=cfg.temperature, alpha=cfg.alpha)
  return z, lse, lse_t, out


def _scan(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg, grads):
  n = x_nd.shape[0]
  bn, nb = _blocks(n, cfg.block_tokens)
  soft = ids_nk is not None
  xs = tuple(_to_blocks(a, bn, nb) for a in (x_nd, targets_n, weights_n) + ((ids_nk, lps_nk) if soft else ()))
  wc = w_dv.astype(x_nd.dtype)

  def step(dw, blk):
    x_b, t_b, wt_b, ids_b, lp_b = blk if soft else (*blk, None, None)
    z, lse, lse_t, (loss, a, b, ct, c_nk) = _block_terms(x_b, wc, t_b, wt_b, ids_b, lp_b, cfg)
    if not grads:
      return dw, loss
    dz = a[:, None] * jnp.exp(z - lse[:, None])
    if b is not None:
      dz = dz + b[:, None] * jnp.exp(z / cfg.temperature - lse_t[:, None])
    dz = dz.astype(x_b.dtype)
    rows = jnp.arange(bn)
    dz = dz.at[rows, t_b].add(ct.astype(dz.dtype))
    if c_nk is not None:
      dz = dz.at[rows[:, None], ids_b].add(c_nk.astype(dz.dtype))
    dx_b = jnp.dot(dz, wc.T, preferred_element_type=jnp.float32).astype(x_b.dtype)
    dw = dw + jnp.dot(x_b.T, dz, preferred_element_type=jnp.float32).astype(dw.dtype)
    return dw, (loss, dx_b)

  dw0 = jnp.zeros(w_dv.shape, w_dv.dtype) if grads else None
  dw, out = jax.lax.scan(step, dw0, xs)
  if not grads:
    return _from_blocks(out, n)
  loss, dx = out
  return _from_blocks(loss, n), _from_blocks(dx, n), dw


def loss(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg):
  """Per-token loss [N] f32 (no gradients made)."""
  return _scan(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg, grads=False)


def loss_and_grads(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg):
  """(loss_n, dx_nd, dw_dv): the loss and the gradients of sum_n weights_n loss_n."""
  return _scan(x_nd, w_dv, targets_n, weights_n, ids_nk, lps_nk, cfg, grads=True)
