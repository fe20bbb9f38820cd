"""The fused AdamW (lmjax.optim.fused_adamw) and bf16 moments: the update against a float64 numpy
AdamW whose stored moments are rounded as the dtype rounds them; the state's bytes; a checkpoint round
trip; and the tiny model trained with f32 and with bf16 moments on the same data, whose loss curves
must agree."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from test_optim import _flat  # tests/test_optim.py

from lmjax import (batch as batch_lib, checkpoint, config as config_lib, model, optim, phases, sharding,
                   steps as steps_lib)

B1, B2, EPS, WD, LR = 0.9, 0.95, 1e-8, 0.1, 1e-2
WARMUP = 3


def _schedule(t):
  """Linear warmup over WARMUP steps, then LR: in f32 as lmjax's schedules are."""
  t = jnp.asarray(t, jnp.float32)
  return (LR * jnp.minimum(t / WARMUP, 1.0)).astype(jnp.float32)


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = {'layers': {'mlp': {'kernel': (3, 8, 16)}, 'norm': {'scale': (3, 8)}}, 'head': {'kernel': (8, 32)}}
  return jax.tree.map(lambda s: (scale * rng.normal(size=s)).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _decayed(path):
  return 'norm' not in path


def _layer_scale(path, u):
  return jnp.asarray([0.25, 0.5, 1.0], u.dtype).reshape(3, 1, 1) if path == 'layers/mlp/kernel' else None


def _numpy_adamw(p, g, m, v, t, moments_dtype, decayed, scale):
  """One float64 AdamW step (t = 1, 2, ...) on one leaf; returns (p, m, v) with m and v rounded to
  nearest in `moments_dtype` as stored, the update made from the unrounded ones."""
  lr = LR * min((t - 1) / WARMUP, 1.0)
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  u = (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS) + (WD * p if decayed else 0.0)
  p = p - lr * scale * u
  store = lambda x: np.asarray(x).astype(moments_dtype).astype(np.float64)
  return p, store(m), store(v)


@pytest.mark.parametrize('moments_dtype', ['float32', 'bfloat16'])
def test_fused_adamw_matches_float64_numpy(moments_dtype):
  """Five steps with warmup, a decay mask and a per-layer scale; gradients of norm ~1 to ~1e-3."""
  tx = optim.fused_adamw(_schedule, B1, B2, EPS, WD, decayed=_decayed, lr_scale=_layer_scale,
                         moments_dtype=moments_dtype)
  params = _tree(0)
  grads = [_tree(s, scale) for s, scale in zip(range(1, 6), (1.0, 0.1, 3.0, 1e-3, 1.0))]
  state, update = tx.init(params), jax.jit(tx.update)
  got = params
  for g in grads:
    updates, state = update(g, state, got)
    got = optax.apply_updates(got, updates)
  assert {x.dtype for x in jax.tree.leaves((state.mu, state.nu))} == {jnp.dtype(moments_dtype)}
  assert int(state.count) == len(grads)

  store_dtype = np.float64 if moments_dtype == 'float32' else jnp.bfloat16
  for (kp, p0), mu, nu, p in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(state.mu),
                                 jax.tree.leaves(state.nu), jax.tree.leaves(got)):
    path = optim._path(kp)
    scale = np.asarray(_layer_scale(path, jnp.zeros(p0.shape)) if path == 'layers/mlp/kernel' else 1.0)
    want_p, want_m, want_v = np.float64(p0), np.zeros(p0.shape), np.zeros(p0.shape)
    for t, g in enumerate(grads, start=1):
      g = np.float64(_flat(g)[path])
      want_p, want_m, want_v = _numpy_adamw(want_p, g, want_m, want_v, t, store_dtype, _decayed(path), scale)
    # f32 rounding only (absolute near zero, where m is a difference of gradients)...
    close = [np.isclose(np.asarray(p), want_p, rtol=1e-6, atol=1e-6),
             np.isclose(np.float64(mu), want_m, rtol=1e-5, atol=1e-7),
             np.isclose(np.float64(nu), want_v, rtol=1e-5, atol=1e-7)]
    if moments_dtype == 'float32':
      assert all(c.all() for c in close), path
    else:
      # ... except where a moment is near a tie between two bf16 values, which f32 and float64 may
      # round apart: a few elements, off by about one bf16 ulp (2**-8) of a moment, and the params by
      # that much of an update (lr 1e-2 x ~1).
      assert all(c.mean() >= 0.98 for c in close), (path, [c.mean() for c in close])
      np.testing.assert_allclose(np.asarray(p), want_p, atol=LR * 2 ** -6, err_msg=path)
      np.testing.assert_allclose(np.float64(mu), want_m, rtol=2 ** -7, atol=1e-7, err_msg=path)
      np.testing.assert_allclose(np.float64(nu), want_v, rtol=2 ** -7, atol=1e-7, err_msg=path)


def test_bf16_moments_change_the_update_by_rounding_only():
  """Against the f32 moments: the first update is the same (its moments are made in f32 from zero),
  the later ones differ by about a bf16 rounding of the moments (relative 2**-8), not more."""
  params, grads = _tree(0), [_tree(s) for s in range(1, 5)]
  out = {}
  for dtype in ('float32', 'bfloat16'):
    tx = optim.fused_adamw(lambda t: jnp.float32(LR), B1, B2, EPS, WD, decayed=_decayed, moments_dtype=dtype)
    state, p, deltas = tx.init(params), params, []
    for g in grads:
      u, state = jax.jit(tx.update)(g, state, p)
      p = optax.apply_updates(p, u)
      deltas.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(u)]))
    out[dtype] = deltas
  rel = [np.max(np.abs(a - b)) / np.max(np.abs(a)) for a, b in zip(out['float32'], out['bfloat16'])]
  assert rel[0] == 0 and 0 < max(rel[1:]) <= 2 ** -7, rel


# ------------------------------------------------------------------------------------------- the model

B, T, VOCAB, STEPS = 8, 64, 64, 80


def _config(moments_dtype):
  c = config_lib.base()
  c.model.compute_dtype = 'float32'
  c.train.update(batch_size=B, seq_len=T, steps=STEPS)
  c.optim.update(lr=1e-2, moments_dtype=moments_dtype)
  c.phases = phases.timeline(main=phases.phase(fraction=1.0, shape='cosine', warmup_fraction=0.1, end=0.1))
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def _markov_batch(step, seed=0):
  """Rows of a Markov chain on VOCAB tokens: the next token is perm[token] with probability 0.9, else
  uniform; so the loss can fall from ln(2048) to ~0.75 nats (0.1 ln 64 + the coin's entropy)."""
  perm = np.random.default_rng(seed).permutation(VOCAB)
  rng = np.random.default_rng([seed, step])
  tokens = np.empty((B, T + 1), np.int32)
  tokens[:, 0] = rng.integers(0, VOCAB, B)
  noise, uniform = rng.random((B, T)) < 0.1, rng.integers(0, VOCAB, (B, T))
  for t in range(T):
    tokens[:, t + 1] = np.where(noise[:, t], uniform[:, t], perm[tokens[:, t]])
  return {**batch_lib.synthetic(B, T, VOCAB, step), 'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def _built(moments_dtype):
  config = _config(moments_dtype)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  return steps_lib.build(config, mesh, model.resolve(config.model).vocab_size), mesh


def _train(moments_dtype):
  built, mesh = _built(moments_dtype)
  state, losses = built.init(0), []
  with jax.set_mesh(mesh):
    for i in range(STEPS):
      state, metrics = built.train_step(state, sharding.global_batch(_markov_batch(i), mesh))
      losses.append(float(metrics['loss']))
  return np.array(losses), state


def test_bf16_moments_hold_the_loss_curve():
  """The tiny model, 80 steps (warmup + cosine, peak LR 1e-2), same seed and batches. Measured on CPU:
  the curves differ by at most 0.003 nats at any step and 1e-5 in the mean of the last 10 steps.
  Tolerances: 0.05 nats a step, 1% of the final loss."""
  f32, state_f32 = _train('float32')
  bf16, state_bf16 = _train('bfloat16')
  assert np.all(np.isfinite(bf16)) and np.all(np.isfinite(f32))
  assert f32[-10:].mean() < 1.0 < 7.0 < f32[0]  # it learned the chain
  np.testing.assert_allclose(bf16, f32, atol=0.05)
  assert abs(bf16[-10:].mean() - f32[-10:].mean()) < 0.01 * f32[-10:].mean()
  moments = lambda s: jax.tree.leaves((optax.tree_utils.tree_get(s['opt_state'], 'mu'),
                                       optax.tree_utils.tree_get(s['opt_state'], 'nu')))
  assert {x.dtype for x in moments(state_bf16)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in moments(state_f32)} == {jnp.dtype(jnp.float32)}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state_bf16['params']))  # the master copy


def _bytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_bf16_moments_halve_the_moment_bytes():
  """The tiny model's abstract train state (steps.build): m and v take half the bytes; the params
  are unchanged, and the rest of the optimizer state is step counts."""
  f32, bf16 = _built('float32')[0].abstract_state, _built('bfloat16')[0].abstract_state
  n_params = _bytes(f32['params'])
  assert _bytes(bf16['params']) == n_params
  for name in ('mu', 'nu'):
    get = lambda s: optax.tree_utils.tree_get(s['opt_state'], name)
    assert _bytes(get(bf16)) * 2 == _bytes(get(f32)) == n_params
  assert _bytes(bf16['opt_state']) - n_params <= 16  # counts


def test_bf16_moments_checkpoint_round_trip(tmp_path):
  """The state with bf16 moments saves and restores through orbax (lmjax.checkpoint) as it is."""
  built, mesh = _built('bfloat16')
  state = built.init(0)
  with jax.set_mesh(mesh):
    state, _ = built.train_step(state, sharding.global_batch(_markov_batch(0), mesh))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  ckpt.save(1, state, {'step': 1})
  ckpt.wait()
  step, restored, data = ckpt.restore_latest(built.abstract_state)
  ckpt.close()
  assert step == 1 and data == {'step': 1}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_bf16_moments_with_default_betas_validate():
  c = optim.defaults()
  c.moments_dtype = 'bfloat16'
  optim.validate(c)  # b1=0.9, b2=0.95
  c.b2 = optim.BF16_MAX_BETA
  optim.validate(c)
