"""Reference losses in jnp. Each returns per-token values [B, T]; callers weight and reduce them."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float = 0.0) -> jax.Array:
  """Next-token cross-entropy -log softmax(logits)[target] per token, in f32, plus
  z_loss * logsumexp^2 (PaLM section 5: keeps the softmax normaliser near 1 for stability)."""
  logits = logits_btv.astype(jnp.float32)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return lse_bt - target_logit_bt + z_loss * jnp.square(lse_bt)
