"""Device mesh, logical-axis rules, and placing parameters and batches on the mesh.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded over it, ZeRO-3 style) and `tensor` (Megatron-style model parallel over heads / MLP / vocab).
Model code names axes logically ('embed', 'heads', ...); `RULES` maps them to mesh axes in one place.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax import errors

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or tuple of axes, or None = replicated)
RULES = {
    'batch': ('data', 'fsdp'),
    'length': None,
    'act_embed': None,
    'vocab': 'tensor',
    'embed': 'fsdp',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'mlp': 'tensor',
    'head_dim': None,
    'layers': None,
    'norm': None,
}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh over `devices` (default: all) with axis sizes from config; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise errors.ConfigError(f'config.mesh={dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not '
                               f'divisible by the fixed axes product {known}')
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise errors.ConfigError(f'config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                             f'found {len(devices)}')
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec(logical_axes: tuple, shape: tuple, mesh: Mesh) -> P:
  """PartitionSpec for an array; a dimension not divisible by its mesh axes stays replicated."""
  out = []
  for name, dim in zip(logical_axes, shape):
    mesh_axes = RULES[name]
    size = math.prod(mesh.shape[a] for a in np.atleast_1d(mesh_axes)) if mesh_axes else 1
    out.append(mesh_axes if mesh_axes and dim % size == 0 else None)
  return P(*out)


def param_shardings(shapes: dict, axes: dict, mesh: Mesh) -> dict:
  """NamedSharding per parameter, from its logical axes (same nested-dict structure)."""
  return jax.tree.map(lambda s, a: NamedSharding(mesh, spec(a, s.shape, mesh)), shapes, axes,
                      is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [B, T] are split over data x fsdp, replicated over tensor."""
  return NamedSharding(mesh, P(RULES['batch']))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Builds global jax.Arrays from this process's slice of the batch (rows [B_local, ...])."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """Sharding hint for an activation when tracing under `jax.set_mesh(mesh)`; no-op otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(logical_axes, x.shape, mesh))
