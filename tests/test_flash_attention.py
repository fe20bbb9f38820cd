"""Flash attention on CPU: the reference vs a float64 oracle, the TPU kernel in interpret mode vs the
reference (outputs and gradients), and the api's backend choice and errors.

The GPU kernel's checks are in tests/gpu/test_flash_attention_gpu.py (they need a Hopper GPU).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import api, reference, tpu_mosaic


def _oracle_f64(q, k, v, do, causal, seg, scale):
  """Output and (dq, dk, dv) in float64 numpy: per head, K/V repeated explicitly, textbook formulas."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  b, t, hq, d = q.shape
  s, group = k.shape[1], hq // k.shape[2]
  out, dq = np.zeros_like(q), np.zeros_like(q)
  dk, dv = np.zeros_like(k), np.zeros_like(v)
  allowed = np.ones((b, t, s), bool)
  if causal:
    allowed &= np.tril(np.ones((t, s), bool))[None]
  if seg is not None:
    seg = np.asarray(seg)
    allowed &= seg[:, :, None] == seg[:, None, :]
  for bi in range(b):
    for h in range(hq):
      kh, vh = k[bi, :, h // group], v[bi, :, h // group]
      logits = np.where(allowed[bi], q[bi, :, h] @ kh.T * scale, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, h] = p @ vh
      dp = do[bi, :, h] @ vh.T
      ds = p * (dp - (dp * p).sum(-1, keepdims=True))  # softmax Jacobian-vector product
      dq[bi, :, h] = ds @ kh * scale
      dk[bi, :, h // group] += ds.T @ q[bi, :, h] * scale
      dv[bi, :, h // group] += p.T @ do[bi, :, h]
  return out, (dq, dk, dv)


def _rel(x, ref):
  x = np.asarray(x, np.float64)
  assert np.isfinite(x).all(), "non-finite element (unwritten or NaN)"
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _inputs(seed, b, t, hq, hkv, d, packed, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
  k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
  do = jax.random.normal(ks[3], (b, t, hq, d), dtype)
  # Packed documents of random lengths; boundaries fall anywhere, not on block edges.
  seg = jnp.cumsum(jax.random.uniform(ks[4], (b, t)) < 3.0 / t, axis=1).astype(jnp.int32) if packed else None
  return q, k, v, do, seg


def _out_and_grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(do)


@pytest.mark.parametrize("causal,packed,hkv", [(True, False, 4), (False, True, 2), (True, True, 1)])
def test_reference_matches_f64_oracle(causal, packed, hkv):
  seed = time.time_ns() % 2**31
  q, k, v, do, seg = _inputs(seed, 2, 40, 4, hkv, 16, packed)
  scale = 0.3
  out, grads = _out_and_grads(
      lambda q, k, v: reference.flash_attention(q, k, v, causal=causal, segment_ids=seg, softmax_scale=scale),
      q, k, v, do)
  want_out, want_grads = _oracle_f64(q, k, v, do, causal, seg, scale)
  assert _rel(out, want_out) < 1e-5, seed
  for g, w in zip(grads, want_grads):
    assert _rel(g, w) < 1e-5, seed


def test_reference_default_scale_is_inverse_sqrt_head_dim():
  q, k, v, do, _ = _inputs(time.time_ns() % 2**31, 1, 24, 2, 2, 32, False)
  out = reference.flash_attention(q, k, v, causal=False)
  want, _ = _oracle_f64(q, k, v, do, False, None, 32 ** -0.5)
  assert _rel(out, want) < 1e-5


# T=384 is three 128-row blocks: the online softmax, causal block skipping and the GQA reduction
# over (head, q block) all cross block edges. Interpret params poison uninitialised memory with NaN.
@pytest.mark.slow
@pytest.mark.parametrize("dtype,causal,packed,hkv,d", [
    (jnp.float32, True, False, 2, 64),
    (jnp.float32, False, True, 4, 128),
    (jnp.bfloat16, True, True, 1, 64),
    (jnp.bfloat16, False, False, 2, 128),
])
def test_tpu_kernel_interpret_matches_reference(dtype, causal, packed, hkv, d):
  seed = time.time_ns() % 2**31
  q, k, v, do, seg = _inputs(seed, 1, 384, 4, hkv, d, packed, dtype)
  kwargs = dict(causal=causal, segment_ids=seg)
  out, grads = _out_and_grads(
      lambda q, k, v: tpu_mosaic.flash_attention(q, k, v, interpret=pltpu.InterpretParams(), **kwargs),
      q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  want_out, want_grads = _out_and_grads(
      lambda q, k, v: reference.flash_attention(q, k, v, **kwargs), f32(q), f32(k), f32(v), f32(do))
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the acceptance bound
  assert out.dtype == dtype
  for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads)):
    assert _rel(g, np.asarray(w, np.float64)) <= tol, f"{name} seed {seed}"


# T=200 is padded to 256 inside: causal (the padding is in every real query's future) and not causal
# with packed segments (the padding gets its own segment id), outputs and gradients of the real rows.
@pytest.mark.parametrize("causal,packed", [(True, False), (False, True), (False, False)])
def test_tpu_kernel_pads_a_sequence_off_the_block_multiple(causal, packed):
  seed = time.time_ns() % 2**31
  q, k, v, do, seg = _inputs(seed, 1, 200, 2, 1, 64, packed)
  kwargs = dict(causal=causal, segment_ids=seg)
  out, grads = _out_and_grads(
      lambda q, k, v: tpu_mosaic.flash_attention(q, k, v, interpret=pltpu.InterpretParams(), **kwargs),
      q, k, v, do)
  want, want_grads = _oracle_f64(q, k, v, do, causal, seg, 64 ** -0.5)
  assert out.shape == q.shape
  for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
    assert _rel(g, w) <= 1e-5, f"{name} seed {seed}"


def test_tpu_kernel_rejects_unaligned_cross_attention():
  q, kv = jnp.ones((1, 200, 2, 64), jnp.float32), jnp.ones((1, 256, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"multiples of 128 \(or T == S, padded\).*implementation='xla'"):
    tpu_mosaic.flash_attention(q, kv, kv, interpret=True)


def test_api_default_on_cpu_is_reference():
  q, k, v, _, seg = _inputs(time.time_ns() % 2**31, 1, 32, 4, 2, 16, True)
  np.testing.assert_array_equal(api.flash_attention(q, k, v, segment_ids=seg),
                                reference.flash_attention(q, k, v, segment_ids=seg))


@pytest.mark.parametrize("implementation,message", [
    ("mosaic_gpu", r"needs a Hopper GPU.*implementation='xla'"),
    ("mosaic_tpu", r"needs a TPU.*implementation='xla'"),
    ("triton", r"implementation must be None or one of"),
])
def test_api_rejects_backend_that_cannot_run_here(implementation, message):
  q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=message):
    api.flash_attention(q, q, q, implementation=implementation)


@pytest.mark.parametrize("k_shape,seg_shape,message", [
    ((1, 32, 3, 16), None, r"Hkv=3 must divide Hq=4"),
    ((1, 32, 2, 8), None, r"k and v must be"),
    ((1, 32, 2, 16), (1, 31), r"segment_ids must be int \[B=1, T=32\]"),
    ((1, 16, 2, 16), (1, 32), r"segment_ids need self-attention"),
])
def test_bad_inputs_name_the_argument(k_shape, seg_shape, message):
  q = jnp.ones((1, 32, 4, 16))
  k = jnp.ones(k_shape)
  seg = None if seg_shape is None else jnp.zeros(seg_shape, jnp.int32)
  with pytest.raises(ValueError, match=message):
    api.flash_attention(q, k, k, segment_ids=seg)
