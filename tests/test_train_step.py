"""Train-step tests without the data pipeline: sharded == single device, gradient accumulation ==
one big batch, ahead-of-time compilation of the 1b step for 8 devices."""
import functools

import jax
import numpy as np
import pytest

from lmjax import aot, batch as batch_lib, config as config_lib, losses, model, sharding, steps as steps_lib


def tiny_config(**train_overrides):
  c = config_lib.base()
  c.model.compute_dtype = 'float32'
  c.train.batch_size = 8
  c.train.seq_len = 32
  c.train.steps = 10
  c.optim.lr = 1e-2
  c.train.update(train_overrides)
  return c


def random_batch(seed, batch_size, seq_len, vocab):
  """Rows of 2 packed documents each, as the pipeline produces them (lmjax.batch's spec)."""
  return batch_lib.synthetic(batch_size, seq_len, vocab, seed, docs_per_row=2)


def run_steps(config, devices, n_steps=3):
  mesh = sharding.make_mesh(config.mesh, devices)
  built = steps_lib.build(config, mesh, model.resolve(config.model).vocab_size)
  state = built.init(0)
  losses = []
  with jax.set_mesh(mesh):
    for i in range(n_steps):
      batch = sharding.global_batch(random_batch(0, config.train.batch_size,
                                                 config.train.seq_len, built.args.vocab_size), mesh)
      state, metrics = built.train_step(state, batch)
      losses.append(float(metrics['loss']))
  return np.array(losses), state


@functools.cache
def one_device_losses():
  single = tiny_config()
  single.mesh.update(data=1, fsdp=1, tensor=1)
  return run_steps(single, jax.devices()[:1])[0]


def test_sharded_mesh_matches_one_device():
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 fake CPU devices'
  single = tiny_config()
  single.mesh.update(data=1, fsdp=1, tensor=1)
  losses_1, state_1 = run_steps(single, jax.devices()[:1])
  sharded = tiny_config()
  sharded.mesh.update(data=2, fsdp=2, tensor=2)
  losses_8, state_8 = run_steps(sharded, jax.devices())
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  assert losses_1[2] < losses_1[0]
  # parameters really are split: the embedding's 'vocab' axis over tensor, 'embed' over fsdp
  emb = state_8['params']['embed_vd']
  assert emb.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
  assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)
  # Adam's first steps are ~lr * sign(grad): elements whose gradient is ~0 may differ by rounding,
  # so compare parameters by relative norm.
  for a, b in zip(jax.tree.leaves(state_8['params']), jax.tree.leaves(state_1['params'])):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


@pytest.mark.parametrize('mesh', [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                                  dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=1, tensor=4)],
                         ids=['data', 'fsdp', 'fsdp_x_tensor', 'data_x_tensor'])
def test_every_mesh_matches_one_device(mesh):
  """The meshes the multi-GPU runs use (1b: data, fsdp; 8b: fsdp, fsdp x tensor): three steps, f32."""
  losses_1 = one_device_losses()
  sharded = tiny_config()
  sharded.mesh.update(mesh)
  losses_8, _ = run_steps(sharded, jax.devices())
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)


@pytest.mark.parametrize('implementation', ['chunked', 'pallas'])
def test_loss_implementations_train_like_materialize_on_a_sharded_mesh(implementation):
  """The memory-lean losses (chunked; the fused head + CE of pallas_kernels/linear_cross_entropy,
  whose gradients are made in the forward pass) give the losses and parameters of `materialize`, one
  device, with the batch on `data` and the head's vocabulary on `tensor` (2x2x2), microbatched."""
  losses_1, state_1 = run_steps(tiny_config(microbatches=2), jax.devices()[:1])
  lean = tiny_config(microbatches=2)
  lean.loss.update(implementation=implementation, chunk_tokens=48)
  lean.mesh.update(data=2, fsdp=2, tensor=2)
  losses_8, state_8 = run_steps(lean, jax.devices())
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_8['params']), jax.tree.leaves(state_1['params'])):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


def test_gradient_accumulation_equals_one_large_batch():
  one = tiny_config(microbatches=1)
  one.mesh.update(data=1)
  four = tiny_config(microbatches=4)
  four.mesh.update(data=1)
  losses_1, state_1 = run_steps(one, jax.devices()[:1])
  losses_4, state_4 = run_steps(four, jax.devices()[:1])
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_4['params']), jax.tree.leaves(state_1['params'])):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


def test_loss_is_token_weighted_cross_entropy():
  """The reported loss equals a numpy cross-entropy over the weighted targets."""
  config = tiny_config()
  args = model.resolve(config.model)
  graphdef, params = model.create(args, 0)
  batch = random_batch(0, 4, 32, args.vocab_size)
  loss_args = losses.resolve(config.loss, args.vocab_size)
  loss_sum, weight_sum, _, _ = steps_lib.loss_sums(graphdef, params, batch, loss_args, 1)
  logits = np.asarray(model.apply(graphdef, params, batch), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss_sum / weight_sum),
                             (nll * batch['weights']).sum() / batch['weights'].sum(), rtol=1e-5)


def test_a_batch_of_only_padding_leaves_params_and_optimizer_state_bit_identical():
  """Targets all weighted 0: the parameters and AdamW's state stay bit-identical and finite (were NaN:
  the gradients were divided by the weight sum; then moved by momentum and decay), loss 0 over 0
  target tokens, the step counts on and empty_batches counts the batch; the next real batch trains."""
  config = tiny_config()
  config.mesh.update(data=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  built = steps_lib.build(config, mesh, model.resolve(config.model).vocab_size)
  state = built.init(0)
  with jax.set_mesh(mesh):
    real = sharding.global_batch(random_batch(0, 8, 32, built.args.vocab_size), mesh)
    state, _ = built.train_step(state, real)
    before = [np.asarray(leaf) for leaf in jax.tree.leaves((state['params'], state['opt_state']))]
    padding = dict(random_batch(1, 8, 32, built.args.vocab_size))
    padding['weights'] = np.zeros_like(padding['weights'])
    new, metrics = built.train_step(state, sharding.global_batch(padding, mesh))
    after = [np.asarray(leaf) for leaf in jax.tree.leaves((new['params'], new['opt_state']))]
    assert float(metrics['target_tokens']) == 0 and float(metrics['loss']) == 0
    assert int(metrics['empty_batches']) == 1 and int(new['step']) == 2
    assert all(np.isfinite(a).all() and np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    last, metrics = built.train_step(new, sharding.global_batch(random_batch(2, 8, 32, built.args.vocab_size), mesh))
  assert int(metrics['empty_batches']) == 1 and float(metrics['grad_norm']) > 0
  moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(last['params']), after)]
  assert max(moved) > 0


@pytest.mark.slow
def test_1b_train_step_compiles_ahead_of_time_for_8_devices():
  config = config_lib.load('configs/pretrain.py', 'size=1b,batch_size=8')
  config.unlock()
  config.mesh.update(data=1, fsdp=4, tensor=2)
  compiled = aot.compile_train_step(config, jax.devices())
  memory = compiled.memory_analysis()
  # 1.24B f32 params + 2 Adam moments, split over 8 devices: ~2.3 GiB of arguments per device
  # (replicated norms add a little). Nothing near the 14.8 GB an unsharded copy would need.
  n = model.param_count(model.resolve(config.model))
  assert memory.argument_size_in_bytes < 1.2 * 3 * 4 * n / 8
