"""FP8 dense projections for Hopper: `einsum(spec, x, w)` with both operands in float8.

The recipe of torchtitan's Float8 "tensorwise" training and Transformer Engine's current scaling:
forward operands in e4m3 (more mantissa), the output gradient in e5m2 (more range), each tensor
scaled by its own amax so that it fills the format (scale ~ amax / format max), recomputed every call
("current" scaling: no amax history to carry in the train state). The matmuls take f8 operands and
write the output dtype (`jax.lax.dot_general` with `preferred_element_type`, which XLA lowers to
cuBLASLt's FP8 GEMM on Hopper); the product of the two scales is applied to the output. The backward
saves the f8 operands (half the bytes of bf16 residuals) and runs both gradient GEMMs in FP8 too.
On a chip without FP8 units (a CPU) XLA computes the same products by upcasting (slow). On an H100
the `1b` step's matmul time falls from 164.8 to 104.3 ms (benchmarks/RESULTS.md, issue 30);
`jax.nn.scaled_matmul` (block-scaled MX formats, Blackwell) was not measured.

  y = einsum('btd,df->btf', x_btd, w_df)      # x, w in the compute dtype; y in x's dtype
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn   # activations and weights
GRADIENT_DTYPE = jnp.float8_e5m2    # the output's cotangent


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """(x / scale in `dtype`, scale): scale the power of two at or above amax(|x|) / dtype's max, in
  f32 (1 for an all-zero x). A power of two keeps x / scale and the output's rescaling exact in any
  float format (torchao's `round_scales_to_power_of_2`, MX formats' E8M0 scales): the only rounding
  is the cast to f8, and the format's range is used to within a factor of two."""
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32))
  scale = jnp.exp2(jnp.ceil(jnp.log2(amax / float(jnp.finfo(dtype).max))))
  scale = jnp.where(amax > 0, scale, 1.0)
  return (x32 / scale).astype(dtype), scale


def _terms(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(' ', '').split('->')
  x, w = inputs.split(',')
  return x, w, out


def _scaled_einsum(spec: str, a, b, scale, out_dtype) -> jax.Array:
  """einsum of f8 operands, written in out_dtype, times the product of their scales."""
  y = jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
  return y * scale.astype(out_dtype)


def einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, x, w)` with both operands quantized to e4m3 (per-tensor current scaling), in
  x's dtype (w is cast to it). `spec` is two operands to one output ('btd,df->btf'), every index of x
  in the output or in w and every index of w in x or in the output (a projection, so that both of
  its transposes are einsums of the same form)."""
  return _einsum(spec, x, w.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec, x, w):
  return _forward(spec, x, w)[0]


def _forward(spec, x, w):
  qx, sx = quantize(x, FORWARD_DTYPE)
  qw, sw = quantize(w, FORWARD_DTYPE)
  return _scaled_einsum(spec, qx, qw, sx * sw, x.dtype), (qx, sx, qw, sw)


def _backward(spec, residuals, g_out):
  qx, sx, qw, sw = residuals
  x_terms, w_terms, out_terms = _terms(spec)
  qg, sg = quantize(g_out, GRADIENT_DTYPE)
  dx = _scaled_einsum(f'{out_terms},{w_terms}->{x_terms}', qg, qw, sg * sw, g_out.dtype)
  dw = _scaled_einsum(f'{x_terms},{out_terms}->{w_terms}', qx, qg, sx * sg, g_out.dtype)
  return dx, dw


_einsum.defvjp(_forward, _backward)
