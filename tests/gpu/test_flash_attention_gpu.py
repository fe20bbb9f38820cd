"""Mosaic GPU flash attention: outputs and gradients vs the f32 reference on a Hopper GPU, and every
kernel variant lowered for CUDA on any machine (CPU too).

The numeric tests skip where there is no Hopper GPU (CI). Fresh random inputs each run (seed printed
on failure); the output buffers are poisoned first: a NaN-filled buffer of the output's size is
allocated and freed just before the call, so the allocator is likely (not guaranteed) to hand that
memory to the kernel's outputs; every element must be finite and the whole close to the reference.
Run on the GPU machine with:
  python -m pytest tests/gpu
Each gradient test takes about 6 s on the H200 (compiles included), so the 44 take ~5 min; select a
variant with -k (e.g. -k "gradients and default", -k persistent).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import api, gpu_mosaic, reference

hopper = pytest.mark.skipif(not api._is_hopper(), reason="needs a Hopper GPU (sm_90)")

TOL = 1e-2  # issue 4: relative error vs the f32 reference for bf16 outputs and gradients.

# Kernel variants (gpu_mosaic.Config); None is gpu_mosaic.default_config's choice for the case.
CONFIGS = {
    "default": None,  # gpu_mosaic.default_config per case: fused or split, named barriers, 256-key blocks.
    "split": gpu_mosaic.Config(),
    "fused": gpu_mosaic.Config(backward="fused"),
}


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(x).all():
    return np.inf  # unwritten or NaN
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _inputs(seed, b, t, hq, hkv, d, packed):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.bfloat16)
  do = jax.random.normal(ks[3], (b, t, hq, d), jnp.bfloat16)
  seg = None
  if packed:  # documents of random length, boundaries not aligned to any block.
    seg = jnp.cumsum(jax.random.uniform(ks[4], (b, t)) < 4.0 / t, axis=1).astype(jnp.int32)
  return q, k, v, do, seg


def _poison(*shapes_dtypes):
  bufs = [jnp.full(s, jnp.nan, dt) for s, dt in shapes_dtypes]
  jax.block_until_ready(bufs)
  del bufs


SHAPES = pytest.mark.parametrize("shape", [(2, 512, 4, 4, 128), (1, 768, 8, 2, 64), (1, 1024, 4, 1, 128)],
                                 ids=["mha_d128", "gqa_d64", "mqa_d128"])
CASES = pytest.mark.parametrize("causal,packed", [(True, False), (False, False), (True, True), (False, True)])


def _check(shape, causal, packed, with_grads, config):
  seed = time.time_ns() % 2**31
  q, k, v, do, seg = _inputs(seed, *shape, packed)
  scale = 0.1 if packed else None  # one non-default scale

  def run(attn, q, k, v, do):
    fn = lambda q, k, v: attn(q, k, v, causal=causal, segment_ids=seg, softmax_scale=scale)
    if not with_grads:
      return (fn(q, k, v),)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))

  kernel = jax.jit(functools.partial(run, functools.partial(gpu_mosaic.flash_attention, config=config)))
  f32 = lambda x: x.astype(jnp.float32)
  want = run(reference.flash_attention, f32(q), f32(k), f32(v), f32(do))
  kernel.lower(q, k, v, do).compile()
  _poison(*[(x.shape, x.dtype) for x in (q, k, v, q)])
  got = kernel(q, k, v, do)
  errors = {name: _rel(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
  assert all(g.dtype == jnp.bfloat16 for g in got)
  assert max(errors.values()) <= TOL, f"rel errors {errors} > {TOL} (seed {seed})"


@hopper
@SHAPES
@CASES
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_gradients_match_reference(config, shape, causal, packed):
  _check(shape, causal, packed, with_grads=True, config=CONFIGS[config])


@hopper
@CASES
def test_forward_with_256_key_blocks_for_head_dim_64(causal, packed):
  _check((1, 768, 8, 2, 64), causal, packed, with_grads=False, config=gpu_mosaic.Config(block_kv=256))


@hopper
@pytest.mark.parametrize("shape", [(2, 2048, 16, 4, 128), (2, 2048, 16, 2, 64)], ids=["gqa_d128", "gqa_d64"])
@CASES
def test_persistent_forward_matches_reference(shape, causal, packed):
  """Persistent forward: 512 work tiles over the SMs (132 on the H200), so each CTA runs ~4 tiles
  back to back; outputs and the gradients (which use its lse) against the f32 reference."""
  _, t, hq, hkv, d = shape
  config = gpu_mosaic.default_config(d, t, causal, hq // hkv)._replace(persistent=True)
  _check(shape, causal, packed, with_grads=True, config=config)


@hopper
def test_default_implementation_is_the_kernel_on_hopper():
  q, k, v, _, _ = _inputs(time.time_ns() % 2**31, 1, 256, 4, 2, 128, False)
  np.testing.assert_array_equal(api.flash_attention(q, k, v), gpu_mosaic.flash_attention(q, k, v))


@hopper
def test_unsupported_shape_names_constraint_and_fallback():
  q, kv = jnp.zeros((1, 200, 4, 128), jnp.bfloat16), jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"multiples of 128 \(or T == S, padded\).*implementation='xla'"):
    api.flash_attention(q, kv, kv, implementation="mosaic_gpu")
  out = api.flash_attention(q, kv, kv)  # default falls back to the reference.
  assert out.shape == q.shape


@hopper
@pytest.mark.parametrize("causal,packed", [(True, False), (False, True)])
def test_sequence_off_the_block_multiple_is_padded_not_a_fallback(causal, packed):
  """T=1000 runs the kernel (padded to 1024, masked inside), matching the f32 reference."""
  q, k, v, do, seg = _inputs(time.time_ns() % 2**31, 2, 1000, 4, 2, 128, packed)
  kwargs = dict(causal=causal, segment_ids=seg)
  step = jax.jit(lambda q, k, v: api.flash_attention(q, k, v, **kwargs))
  assert "mosaic_gpu" in step.lower(q, k, v).as_text()
  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grads(fn, *xs):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kwargs), *xs[:3])
    return (out, *vjp(xs[3]))

  got = out_and_grads(api.flash_attention, q, k, v, do)
  want = out_and_grads(reference.flash_attention, *(x.astype(jnp.float32) for x in (q, k, v, do)))
  for g, w in zip(got, want):
    assert _rel(g, w) <= TOL


@pytest.mark.parametrize("config,seq,causal,hkv", [
    (gpu_mosaic.Config(), 512, True, 2),
    (gpu_mosaic.Config(backward="fused", q_descending=True), 512, True, 2),
    (gpu_mosaic.Config(block_kv=256, named_barriers=True, q_descending=True), 512, True, 2),
    (gpu_mosaic.Config(persistent=True), 512, False, 1),
    (None, 384, True, 2),  # default: split backward (causal GQA); 384 keys: 128-key blocks.
    (None, 512, False, 4),  # default: fused backward, 256-key blocks.
])
def test_every_variant_lowers_for_cuda(config, seq, causal, hkv):
  """'Compile before you rent': the Pallas -> Mosaic GPU lowering (shapes, layouts, shared memory
  budget) runs without a GPU, for the forward and backward kernels, head_dim 64 with packed documents."""
  q = jax.ShapeDtypeStruct((1, seq, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, seq, hkv, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)

  def fwd_bwd(q, k, v, do, seg):
    attn = lambda q, k, v: gpu_mosaic.flash_attention(q, k, v, causal=causal, segment_ids=seg, config=config)
    out, vjp = jax.vjp(attn, q, k, v)
    return out, *vjp(do)

  text = jax.jit(fwd_bwd).trace(q, kv, kv, q, seg).lower(lowering_platforms=("cuda",)).as_text()
  used = config or gpu_mosaic.default_config(64, seq, causal, 4 // hkv)
  assert text.count("custom_call @mosaic_gpu") == (2 if used.backward == "fused" else 3)


def test_bad_config_names_the_field():
  q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="config.block_kv"):
    gpu_mosaic.flash_attention(q, q, q, config=gpu_mosaic.Config(block_kv=256))
  with pytest.raises(ValueError, match="config.backward"):
    gpu_mosaic.flash_attention(q, q, q, config=gpu_mosaic.Config(backward="dq_first"))
