"""Pure-jnp attention with the same signature as `api.flash_attention` (f32 softmax).

It is the CPU path of the model, the `implementation='xla'` backend and the oracle the kernels are
tested against. It materialises the [B, Hkv, G, T, S] logits, so it is for small T or for reference.
"""
import jax
import jax.numpy as jnp


def attention_mask(t: int, s: int, causal: bool, segment_ids_bt: jax.Array | None) -> jax.Array | None:
  """Boolean mask [B or 1, T, S]: True where query t may attend key s.

  Causal is top-left aligned (key index <= query index), as `jax.nn.dot_product_attention(is_causal=True)`.
  Segment ids (self-attention, T == S) allow only keys with the query's id.
  """
  mask = None
  if causal:
    mask = (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]
  if segment_ids_bt is not None:
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    mask = same if mask is None else mask & same
  return mask


def check_inputs(q, k, v, segment_ids) -> None:
  """Raises ValueError naming the bad argument when shapes or dtypes do not fit together."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4D [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
  b, t, hq, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k and v must be [B={b}, S, Hkv, D={d}]; got k{k.shape} v{v.shape}")
  if hq % k.shape[2]:
    raise ValueError(f"Hkv={k.shape[2]} must divide Hq={hq} (GQA)")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if segment_ids is not None:
    if segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be int [B={b}, T={t}]; got {segment_ids.dtype}{segment_ids.shape}")
    if k.shape[1] != t:
      raise ValueError(f"segment_ids need self-attention (S == T); got T={t}, S={k.shape[1]}")


def flash_attention(q_btnh, k_bsnh, v_bsnh, *, causal=True, segment_ids=None, softmax_scale=None,
                    implementation=None):
  """Softmax(q k^T * scale + mask) v with GQA, computed in f32, returned in q.dtype.

  Args:
    q_btnh: [B, T, Hq, D]; k_bsnh, v_bsnh: [B, S, Hkv, D] with Hkv dividing Hq.
    segment_ids: int [B, T] or None; a query attends only keys with its id (needs S == T).
    softmax_scale: defaults to D ** -0.5.
    implementation: None or 'xla' (accepted so the signature matches the api).
  Returns:
    [B, T, Hq, D] in q.dtype.
  """
  if implementation not in (None, "xla"):
    raise ValueError(f"reference.flash_attention is the 'xla' backend; got implementation={implementation!r}")
  check_inputs(q_btnh, k_bsnh, v_bsnh, segment_ids)
  b, t, hq, d = q_btnh.shape
  s, hkv = k_bsnh.shape[1], k_bsnh.shape[2]
  scale = d ** -0.5 if softmax_scale is None else softmax_scale
  q = q_btnh.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
  logits_bkgts = jnp.einsum("btkgd,bskd->bkgts", q, k_bsnh.astype(jnp.float32)) * scale
  mask = attention_mask(t, s, causal, segment_ids)
  if mask is not None:
    # finfo.min, not -inf: a fully masked row then gives a finite (uniform) softmax instead of NaN.
    logits_bkgts = jnp.where(mask[:, None, None], logits_bkgts, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_bkgts, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bsnh.astype(jnp.float32))
  return out.reshape(b, t, hq, d).astype(q_btnh.dtype)
