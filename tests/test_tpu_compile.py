"""The TPU compiler on this CPU host (libtpu): slice names to devices, the Mosaic flash attention
compiled for v5e and v5p slices, and the compiler's memory verdict, fitting or not.

Nothing runs on a TPU: `topology.devices(name)` gives compile-only devices, programs are lowered from
ShapeDtypeStructs placed on a mesh of them and compiled. Skipped without libtpu.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax import errors, topology
from pallas_kernels.flash_attention import api, tpu_mosaic
from pallas_kernels.linear_cross_entropy import api as lce_api

pytest.importorskip('libtpu', reason="the TPU compiler needs libtpu: pip install -e '.[tpu]'")


def _mesh(name, shape, axes):
  return Mesh(np.array(topology.devices(name)).reshape(shape), axes)


def _abstract(shape, dtype, mesh, spec):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


@pytest.mark.parametrize('name,topology_name,n_devices,device_kind', [
    ('v4-8', 'v4:2x2x1', 4, 'TPU v4'),
    ('v4-1536', 'v4:8x8x12', 768, 'TPU v4'),
    ('v5e-1', 'v5e:1x1', 1, 'TPU v5 lite'),
    ('v5e-8', 'v5e:2x4', 8, 'TPU v5 lite'),
    ('v5litepod-32', 'v5e:4x8', 32, 'TPU v5 lite'),
    ('v5p-8', 'v5p:2x2x1', 4, 'TPU v5'),
    ('v5p-640', 'v5p:4x4x20', 320, 'TPU v5'),
    ('v6e-256', 'v6e:16x16', 256, 'TPU v6 lite'),
    ('2xv5p-128', 'v5p:4x4x4', 128, 'TPU v5'),
])
def test_slice_names_give_their_devices(name, topology_name, n_devices, device_kind):
  spec = topology.slice_spec(name)
  devices = topology.devices(name)
  assert spec.topology_name == topology_name and spec.num_devices == n_devices == len(devices)
  assert {(d.platform, d.device_kind) for d in devices} == {('tpu', device_kind)}
  # One device per chip: v4 and v5p devices drive both TensorCores (megacore).
  assert {d.num_cores for d in devices} == {spec.generation.cores_per_chip}
  if spec.num_slices > 1:
    assert sorted({d.slice_index for d in devices}) == list(range(spec.num_slices))


@pytest.mark.parametrize('name', ['v5e-3', 'v5e-512', 'v5p-12', 'v5p-136', 'v4-8192', 'v3-8', 'tpu7x-8',
                                  'v5e8', 'V5E-8', '0xv5e-8'])
def test_unknown_slice_names_list_the_valid_forms(name):
  with pytest.raises(errors.ConfigError, match=re.escape(repr(name)) + r'.*expected \[<slices>x\]<generation>-<N>'):
    topology.devices(name)


def _attention_loss(mesh, causal):
  """Mean of the Mosaic flash attention's output, per shard: batch over 'data', heads over 'tensor'."""
  qkv = P('data', None, 'tensor', None)

  def per_shard(q, k, v, seg):
    return tpu_mosaic.flash_attention(q, k, v, causal=causal, segment_ids=seg)

  attention = jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv, qkv, qkv, P('data', None)), out_specs=qkv)
  return lambda q, k, v, seg: attention(q, k, v, seg).astype(jnp.float32).mean()


# GQA (4 query heads on 2 K/V heads, both split over 'tensor'), packed segments, T = 512 = one block.
@pytest.mark.parametrize('name,causal', [('v5e-4', True), ('v5p-8', True), ('v5p-8', False)])
def test_mosaic_flash_attention_forward_and_gradients_compile(name, causal):
  mesh = _mesh(name, (2, 2), ('data', 'tensor'))
  b, t, hq, hkv, d = 4, 512, 4, 2, 128
  q = _abstract((b, t, hq, d), jnp.bfloat16, mesh, P('data', None, 'tensor'))
  kv = _abstract((b, t, hkv, d), jnp.bfloat16, mesh, P('data', None, 'tensor'))
  seg = _abstract((b, t), jnp.int32, mesh, P('data'))
  step = jax.jit(jax.value_and_grad(_attention_loss(mesh, causal), argnums=(0, 1, 2)))
  compiled, report = topology.try_compile(step.lower(q, kv, kv, seg))
  assert report.fits, report
  # The forward, dK/dV and dQ kernels, as Mosaic custom calls (not the XLA reference).
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3


# Tokens split over 4 devices, the head whole; soft labels with a bucket tail and temperature, z-loss,
# a vocabulary (1000) that is not a multiple of the 128-wide tile.
@pytest.mark.parametrize('name', ['v5e-4', 'v5p-8'])
def test_mosaic_linear_cross_entropy_forward_and_gradients_compile(name):
  mesh = _mesh(name, (4,), ('data',))
  n, d, v, k = 2048, 256, 1000, 8
  x = _abstract((n, d), jnp.bfloat16, mesh, P('data'))
  w = _abstract((d, v), jnp.float32, mesh, P())
  t, wt = _abstract((n,), jnp.int32, mesh, P('data')), _abstract((n,), jnp.float32, mesh, P('data'))
  ids, lp = _abstract((n, k), jnp.int32, mesh, P('data')), _abstract((n, k), jnp.float32, mesh, P('data'))

  def per_shard(x, w, t, wt, ids, lp):
    loss = lce_api.linear_cross_entropy(x, w, t, weights_n=wt, z_loss=1e-4, teacher_ids_nk=ids,
                                        teacher_logprobs_nk=lp, tail='bucket', temperature=2.0, alpha=0.5)
    return jax.lax.psum(jnp.sum(wt * loss), 'data')

  spec = (P('data'), P(), P('data'), P('data'), P('data'), P('data'))
  loss = jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=P())
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled, report = topology.try_compile(step.lower(x, w, t, wt, ids, lp))
  assert report.fits, report
  # The statistics, dx and dw kernels as Mosaic custom calls; the head's gradient summed over 'data'.
  hlo = compiled.as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 3 and 'all-reduce' in hlo


# The tiny step with attention='pallas' on 8 devices: the kernel runs inside the model's shard_map
# (batch over fsdp; on v5p-8's 2x2 mesh heads and K/V heads split over 'tensor' too).
@pytest.mark.parametrize('name,mesh', [('v5e-8', dict(data=1, fsdp=-1, tensor=1)),
                                       ('v5p-8', dict(data=1, fsdp=2, tensor=2))])
def test_tiny_step_with_pallas_attention_compiles(name, mesh):
  from lmjax import aot, config as config_lib
  config = config_lib.load('configs/pretrain.py', 'runlocal=True')
  config.model.update(attention='pallas', d_head=64)   # the TPU kernel takes head_dim 64 or 128
  config.mesh.update(mesh)
  lowered, _ = aot.lower_train_step(config, topology.devices(name))
  compiled, report = topology.try_compile(lowered)
  assert report.fits, report
  # Forward, dK/dV and dQ kernels (the layer scan holds one copy of each, the backward re-runs none).
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') >= 3


@pytest.mark.parametrize('name', ['v5e-1', 'v5e-8'])
def test_tiny_step_with_the_fused_loss_compiles(name):
  """config.loss.implementation='pallas': the Pallas TPU kernels on one chip; on a mesh of several
  the fused XLA scan, partitioned by the compiler (no Mosaic call outside a shard_map)."""
  from lmjax import aot, config as config_lib
  config = config_lib.load('configs/pretrain.py', 'runlocal=True')
  config.loss.implementation = 'pallas'
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  lowered, _ = aot.lower_train_step(config, topology.devices(name))
  compiled, report = topology.try_compile(lowered)
  assert report.fits, report
  assert (compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3) == (name == 'v5e-1')


def test_api_picks_mosaic_for_inputs_on_a_one_device_tpu_mesh():
  """No mesh set and no shard_map: the inputs' own sharding names the chip for the backend choice
  and for lowering (this failed with "Unsupported TPU device kind: cpu")."""
  mesh = _mesh('v5e-1', (1,), ('data',))
  x = _abstract((1, 256, 2, 128), jnp.bfloat16, mesh, P())
  compiled = jax.jit(lambda q, k, v: api.flash_attention(q, k, v, causal=True)).lower(x, x, x).compile()
  assert 'tpu_custom_call' in compiled.as_text()


def test_mosaic_on_a_split_mesh_outside_shard_map_names_the_fix():
  mesh = _mesh('v5e-4', (4,), ('data',))
  x = _abstract((4, 256, 2, 128), jnp.bfloat16, mesh, P('data'))
  with pytest.raises(ValueError, match=r"mesh with axes \{'data': 4\} outside jax.shard_map"):
    jax.jit(lambda q: tpu_mosaic.flash_attention(q, q, q)).lower(x)


def _sgd_step(w, x):
  loss = lambda w: jnp.mean(jnp.square(x @ w.astype(x.dtype)))
  return w - 0.1 * jax.grad(loss)(w)


def test_sharded_matmul_step_fits_with_its_parts_counted():
  mesh = _mesh('v5e-8', (2, 4), ('data', 'fsdp'))
  w = _abstract((4096, 4096), jnp.float32, mesh, P('fsdp'))          # 64 MiB, 16 MiB a device
  x = _abstract((256, 4096), jnp.bfloat16, mesh, P(('data', 'fsdp')))
  compiled, report = topology.try_compile(jax.jit(_sgd_step, donate_argnums=0).lower(w, x))
  parts = report.parts_bytes
  assert compiled is not None and report.fits and str(report).startswith('fits: ')
  assert parts['arguments'] == 16 * 2 ** 20 + 256 // 8 * 4096 * 2 and parts['aliased'] == 16 * 2 ** 20
  assert report.needed_bytes == sum(parts.values()) - 2 * parts['aliased']
  assert report.available_bytes == topology.GENERATIONS['v5e'].hbm_available_bytes
  assert report.headroom_bytes == report.available_bytes - report.needed_bytes > 15 * 2 ** 30


def test_oversized_step_does_not_fit_on_v5e_but_fits_on_v5p():
  """A replicated 20 GiB parameter and its updated copy: 40 GiB a device, over v5e's 15.75 GiB."""
  def lowered(name):
    mesh = _mesh(name, (4,), ('data',))
    w = _abstract((5 * 2 ** 10, 2 ** 20), jnp.float32, mesh, P())
    return jax.jit(lambda w: w * 0.5).lower(w)

  compiled, too_big = topology.try_compile(lowered('v5e-4'))
  assert compiled is None and not too_big.fits and too_big.parts_bytes == {}
  assert too_big.needed_bytes == 40 * 2 ** 30 and too_big.available_bytes == round(15.75 * 2 ** 30)
  assert str(too_big).startswith('does not fit') and str(too_big).endswith('short by 24.25 GiB')
  compiled, fits = topology.try_compile(lowered('v5p-8'))
  assert compiled is not None and fits.fits
  assert abs(fits.needed_bytes - too_big.needed_bytes) < 0.01 * 2 ** 30   # the error's total = ours


def test_memory_report_needs_a_tpu_program_or_an_out_of_hbm_error():
  with pytest.raises(ValueError, match=r"its devices are \(device_kind, num_cores\) \[\('cpu'"):
    topology.memory_report(jax.jit(jnp.sin).lower(jnp.ones(4)).compile())
  with pytest.raises(ValueError, match='not an out-of-HBM error'):
    topology.memory_report(RuntimeError('INTERNAL: something else'))
