"""Losses on the head/loss seam: a named loss maps the model's final hidden states and head weight to a
per-token loss, `(x_btd, w_dv, batch, args) -> loss_bt` (f32); the train step weights and sums it.

The loss, not the model, makes the logits, so an implementation may avoid ever holding them whole
(Levanter's `activations()` + `get_lm_head()`, Cut Cross-Entropy, Liger's fused linear CE):

  materialize  logits [B, T, V] in f32, then the loss (the reference; 8.4 GB at 1b x B4 x T4096)
  chunked      a scan over chunks of positions, each computing its [B, c, V] block of logits and
               recomputing it in the backward pass (jax.checkpoint): at most one block is live

Rows of w_dv at or past `Args.vocab_size` (the tokenizer's vocabulary; the model may pad its head to
a multiple of 128) are padding: their logits are masked to -inf, so they are never predicted.

config.loss: name (LOSSES), implementation, z_loss, chunk_tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections


def defaults() -> ml_collections.ConfigDict:
  """config.loss."""
  return ml_collections.ConfigDict(dict(
      name='ce',                   # one of LOSSES
      # materialize | chunked. Materialize is the default: faster at 1b on an H200 (46.7k vs 41.2k
      # tokens/s at B4 x T4096, benchmarks/RESULTS.md); chunked saves [tokens, vocab] f32 of memory.
      implementation='materialize',
      z_loss=0.0,                  # PaLM's z-loss coefficient (section 5): z * logsumexp^2 per token
      chunk_tokens=1024,           # chunked: tokens (batch rows x positions) per block of logits
  ))


@dataclasses.dataclass(frozen=True)
class Args:
  """Resolved loss settings (hashable: the step builder closes over them)."""
  name: str
  implementation: str
  z_loss: float
  chunk_tokens: int
  vocab_size: int  # rows of w_dv that can be predicted (the tokenizer's vocabulary)


def resolve(cfg: ml_collections.ConfigDict, vocab_size: int) -> Args:
  validate(cfg)
  return Args(cfg.name, cfg.implementation, float(cfg.z_loss), int(cfg.chunk_tokens), int(vocab_size))


def validate(cfg: ml_collections.ConfigDict) -> None:
  if cfg.name not in LOSSES:
    raise ValueError(f'config.loss.name={cfg.name!r}: expected one of {sorted(LOSSES)}')
  if cfg.implementation not in LOSSES[cfg.name]:
    raise ValueError(f'config.loss.implementation={cfg.implementation!r}: expected one of '
                     f'{sorted(LOSSES[cfg.name])} for loss {cfg.name!r}')
  if not cfg.z_loss >= 0:
    raise ValueError(f'config.loss.z_loss={cfg.z_loss!r}: expected a number >= 0')
  if not cfg.chunk_tokens >= 1:
    raise ValueError(f'config.loss.chunk_tokens={cfg.chunk_tokens!r}: expected a positive integer')


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float = 0.0,
                  vocab_size: int | None = None) -> jax.Array:
  """Next-token cross-entropy -log softmax(logits)[target] per token, in f32, plus
  z_loss * logsumexp^2 (PaLM section 5: keeps the softmax normaliser near 1 for stability).
  Logits at or past `vocab_size` (padding rows of the head) are masked out."""
  logits = logits_btv.astype(jnp.float32)
  if vocab_size is not None and vocab_size < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return lse_bt - target_logit_bt + z_loss * jnp.square(lse_bt)


def logits(x_btd: jax.Array, w_dv: jax.Array) -> jax.Array:
  """x_btd @ w_dv in the hidden states' dtype (bf16 on accelerators), accumulated and returned in f32."""
  return jnp.einsum('btd,dv->btv', x_btd, w_dv.astype(x_btd.dtype), preferred_element_type=jnp.float32)


def ce_materialize(x_btd, w_dv, batch, args: Args) -> jax.Array:
  return cross_entropy(logits(x_btd, w_dv), batch['targets'], args.z_loss, args.vocab_size)


def ce_chunked(x_btd, w_dv, batch, args: Args) -> jax.Array:
  """`ce_materialize` a block of positions at a time: blocks [B, c, V] with B * c ~ chunk_tokens.

  The scan keeps the batch axis (and its sharding) and walks the positions; `jax.checkpoint` makes
  the backward pass recompute each block's logits instead of storing them. The weight gradient is
  summed over blocks in f32 (w_dv is cast inside the block)."""
  b, t, d = x_btd.shape
  c = max(1, min(t, args.chunk_tokens // b))
  n = -(-t // c)
  pad = n * c - t
  x_nbcd = jnp.pad(x_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
  targets_nbc = jnp.pad(batch['targets'], ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

  @jax.checkpoint
  def block(x_bcd, targets_bc):
    return cross_entropy(logits(x_bcd, w_dv), targets_bc, args.z_loss, args.vocab_size)

  loss_nbc = jax.lax.map(lambda xs: block(*xs), (x_nbcd, targets_nbc))
  return loss_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]


# name -> implementation -> fn(x_btd, w_dv, batch, args) -> loss_bt
LOSSES: dict[str, dict[str, Callable]] = {
    'ce': {'materialize': ce_materialize, 'chunked': ce_chunked},
}


def per_token(x_btd: jax.Array, w_dv: jax.Array, batch: dict, args: Args) -> jax.Array:
  """The configured loss per token [B, T] (f32)."""
  return LOSSES[args.name][args.implementation](x_btd, w_dv, batch, args)
