"""`flash_attention`: one entry point that picks the backend for the device, or the one asked for.

implementation=None picks 'mosaic_tpu' when the call targets TPUs (the current mesh's devices, else
the inputs' mesh, else the default backend: compiling for lmjax.topology devices from a CPU host picks
it), 'mosaic_gpu' on Hopper GPUs, and 'xla' (the pure-jnp reference) elsewhere or, with a warning,
when the inputs are outside the kernel's constraints. An explicitly named backend that cannot run
here, or cannot take these inputs, raises ValueError naming the constraint and the fallback, so a
config that asks for a kernel never silently runs something else.
"""
import warnings

import jax

from pallas_kernels.flash_attention import gpu_mosaic, reference, tpu_mosaic

IMPLEMENTATIONS = ("mosaic_gpu", "mosaic_tpu", "xla")


def _is_hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def _target_platform(x) -> str:
  """The platform this call compiles for: the current mesh's (jax.set_mesh, shard_map), else that of
  the mesh `x` is placed on, else the default backend's. A mesh of compile-only TPU devices
  (lmjax.topology) on a CPU host gives 'tpu'."""
  for mesh in (jax.sharding.get_abstract_mesh(), jax.typeof(x).sharding.mesh):
    if not mesh.empty and mesh.abstract_device is not None:
      return mesh.abstract_device.platform
  return jax.default_backend()


def _unavailable(implementation: str, platform: str) -> str | None:
  """Why `implementation` cannot run on `platform` (this process's devices for the GPU), or None."""
  if implementation == "mosaic_gpu" and not _is_hopper():
    return f"mosaic_gpu needs a Hopper GPU (sm_90), this device is {jax.devices()[0].device_kind!r}"
  if implementation == "mosaic_tpu" and platform != "tpu":
    return f"mosaic_tpu needs a TPU, the target platform is {platform!r}"
  return None


def flash_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale=None, implementation=None):
  """Multi-head attention softmax(q k^T * scale + mask) v, differentiable.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hkv dividing Hq (GQA without repeating K/V).
    causal: key index <= query index (top-left aligned, as jax.nn.dot_product_attention).
    segment_ids: int32 [B, T] or None; packed documents, a query attends only keys with its id (S == T).
    softmax_scale: defaults to D ** -0.5.
    implementation: None (best for the device), 'mosaic_gpu', 'mosaic_tpu' or 'xla'.
  Returns:
    [B, T, Hq, D] in q.dtype.
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
  reference.check_inputs(q, k, v, segment_ids)
  backends = {"mosaic_gpu": gpu_mosaic, "mosaic_tpu": tpu_mosaic}
  platform = _target_platform(q)
  if implementation is None:
    implementation = "mosaic_tpu" if platform == "tpu" else "mosaic_gpu" if _is_hopper() else "xla"
    why = implementation != "xla" and backends[implementation].check_supported(q, k, v, segment_ids)
    if why:
      warnings.warn(f"flash_attention: {why}; falling back to the XLA reference (slower)", stacklevel=2)
      implementation = "xla"
  elif implementation != "xla":
    why = (_unavailable(implementation, platform)
           or backends[implementation].check_supported(q, k, v, segment_ids))
    if why is not None:
      raise ValueError(f"{why}; use implementation='xla' (the pure-JAX reference) instead")
  kwargs = dict(causal=causal, segment_ids=segment_ids, softmax_scale=softmax_scale)
  if implementation == "xla":
    return reference.flash_attention(q, k, v, **kwargs)
  return backends[implementation].flash_attention(q, k, v, **kwargs)
