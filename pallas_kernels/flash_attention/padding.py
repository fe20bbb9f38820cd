"""Any sequence length on the kernels: pad T (= S) up to the kernel's block multiple and mask the padding
inside the kernel, instead of falling back to the XLA reference.

Causal: a padded key (position >= T) is in the future of every real query, so the causal mask already
hides it. Not causal: the padded positions get a segment id no real position has, so the segment mask
hides them from real queries. The id is one past the largest, so ids stay non-decreasing along T (the
GPU kernel's block skipping for packed rows relies on that). Padded query rows are sliced off; their zero cotangent adds nothing to
dK/dV (dS = P * (dO V^T - rowsum(dO * O)) = 0 on those rows).
"""
import jax.numpy as jnp


def pad(q, k, v, segment_ids, causal, multiple):
  """(q, k, v, segment_ids) with T padded to a multiple of `multiple` (S == T only)."""
  t = q.shape[1]
  extra = -t % multiple
  if not extra:
    return q, k, v, segment_ids
  if k.shape[1] != t:
    raise ValueError(f"padding needs S == T, got T={t}, S={k.shape[1]}")
  widths = ((0, 0), (0, extra), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  if segment_ids is not None or not causal:
    seg = jnp.zeros(q.shape[:1] + (t,), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad_id = jnp.max(seg) + 1
    segment_ids = jnp.concatenate([seg, jnp.broadcast_to(pad_id, (seg.shape[0], extra))], axis=1)
  return q, k, v, segment_ids
