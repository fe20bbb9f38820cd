"""lmjax.optim: schedules against hand-written closed forms; the optax chain against a float64 numpy AdamW."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax import errors, optim, phases as phases_lib

PEAK = 3e-4
L, D, V = 3, 4, 5


# ---------------------------------------------------------------------------------------------- schedules

def _schedule(entries, peak, total):
  """optim.make_schedule of config.phases {p0: ..., p1: ...} written as flat dicts: the length keys
  (steps, fraction) and the lr keys (shape, warmup_steps, ...) side by side."""
  cfg = {'order': tuple(f'p{i}' for i in range(len(entries)))}
  for i, e in enumerate(entries):
    e = dict(e)
    cfg[f'p{i}'] = dict(steps=e.pop('steps', None), fraction=e.pop('fraction', None), lr=e)
  return optim.make_schedule(phases_lib.resolve(cfg, total, []), peak)


def _cos(u):
  return 0.5 * (1 + np.cos(np.pi * np.clip(u, 0, 1)))


def _wsd(form):
  """Closed form: warmup 10, stable to 70, decay over 30 steps (0.3 of 100) from 1 to 0.01 of peak."""
  decays = {
      'linear': lambda u: 1 - 0.99 * u,
      'cosine': lambda u: 0.01 + 0.99 * _cos(u),
      'exponential': lambda u: 0.01 ** u,
      '1-sqrt': lambda u: 0.01 + 0.99 * (1 - np.sqrt(u)),
  }
  def lr(t):
    u = np.clip((t - 70) / 30, 0, 1)
    return PEAK * (t / 10 if t < 10 else 1.0 if t < 70 else decays[form](u))
  return ([dict(shape='wsd', fraction=1.0, warmup_steps=10, decay=form, decay_fraction=0.3, end=0.01)],
          100, lr)


def _rewarm(t):
  """Closed form of the joined case: warmup+stable 600 steps, linear anneal 100, re-warmup + cosine 300."""
  if t < 600:
    return PEAK * min(t / 50, 1.0)
  if t < 700:
    return PEAK * (1 - 0.9 * (t - 600) / 100)
  s = t - 700
  return PEAK * (0.1 + 0.4 * s / 30 if s < 30 else 0.5 * _cos((s - 30) / 270))


CASES = {
    # name: (phases, total_steps, closed form of step)
    'default': ([dict(fraction=1.0, warmup_fraction=0.01)], 200,
                lambda t: PEAK * (t / 2 if t < 2 else 0.1 + 0.9 * _cos((t - 2) / 198))),
    'constant': ([dict(shape='constant', warmup_steps=10, init=0.2, peak=0.8)], 100,
                 lambda t: PEAK * (0.2 + 0.6 * t / 10 if t < 10 else 0.8)),
    'linear': ([dict(shape='linear', steps=100, warmup_steps=20, end=0.0)], 100,
               lambda t: PEAK * (t / 20 if t < 20 else max(1 - (t - 20) / 80, 0.0))),
    'cosine': ([dict(shape='cosine', fraction=1.0, end=0.05)], 100,
               lambda t: PEAK * (0.05 + 0.95 * _cos(t / 100))),
    'anneal': ([dict(shape='linear', fraction=1.0, peak=0.1, end=0.0)], 100,
               lambda t: PEAK * 0.1 * max(1 - t / 100, 0.0)),
    **{f'wsd-{f}': _wsd(f) for f in phases_lib.DECAY_FORMS},
    'joined': ([dict(shape='wsd', fraction=0.6, warmup_steps=50, decay_fraction=0.0),
                dict(shape='linear', steps=100, end=0.1),
                dict(shape='cosine', warmup_fraction=0.1, init=0.1, peak=0.5, end=0.0)],  # the rest: 300
               1000, _rewarm),
}
STEPS = {
    'default': [0, 1, 2, 3, 100, 199, 200, 250],
    'joined': [0, 25, 49, 50, 599, 600, 650, 699, 700, 715, 729, 730, 850, 999, 1000, 1200],
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_schedule_matches_closed_form(case):
  phases, total, closed_form = CASES[case]
  steps = STEPS.get(case, [0, 5, 9, 10, 11, 19, 20, 21, 50, 69, 70, 71, 85, 99, 100, 130])
  schedule = _schedule(phases, PEAK, total)
  got = jax.jit(schedule)(jnp.asarray(steps, jnp.int32))
  assert got.dtype == jnp.float32
  want = np.array([closed_form(t) for t in steps])
  # f32 rounding: relative near the peak, absolute (a tiny fraction of the peak) near zero.
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6, atol=1e-7 * PEAK)


def test_fraction_phases_round_cumulatively():
  # Thirds of 100 steps: boundaries at round(33.3)=33 and round(66.7)=67, the last phase ends at exactly 100.
  phases = [dict(shape='constant', fraction=1 / 3, peak=p) for p in (1.0, 0.5, 0.25)]
  schedule = _schedule(phases, 1.0, 100)
  got = [float(schedule(t)) for t in (0, 32, 33, 66, 67, 99)]
  assert got == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


# ---------------------------------------------------------------------------------------------- optimizer

def _params(seed=0):
  """A small stacked-layer tree shaped like the model's `nnx.to_pure_dict` (plus a bias leaf)."""
  rng = np.random.default_rng(seed)
  shapes = {
      'embed': {'embedding': (V, D)},
      'layers': {'attn_norm': {'scale': (L, D)},
                 'attn': {'q': {'kernel': (L, D, D), 'bias': (L, D)}, 'o': {'kernel': (L, D, D)}},
                 'mlp_norm': {'scale': (L, D)},
                 'mlp': {'up': {'kernel': (L, D, 2 * D)}, 'down': {'kernel': (L, 2 * D, D)}}},
      'final_norm': {'scale': (D,)},
      'lm_head': {'kernel': (D, V)},
  }
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _config(**overrides):
  c = optim.defaults()
  c.update(dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=None), **overrides)
  return c


CONSTANT = _schedule([dict(shape='constant', fraction=1.0)], 1e-2, 10)


def _run(config, params, grads_list):
  """Applies the optimizer for len(grads_list) steps (jitted update); returns the final params (numpy)."""
  tx = optim.make_optimizer(config, CONSTANT, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads in grads_list:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, params), state


def _numpy_adamw(params, grads_list, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, decayed=lambda p: True,
                 lr_scale=lambda p: 1.0, clip=None):
  """Float64 AdamW (decoupled decay, bias-corrected moments) with global-norm clipping, on '/'-paths.

  lr_scale(path) may return an array broadcasting against the leaf (per-layer scales).
  """
  flat = {'/'.join(k.key for k in kp): np.float64(v) for kp, v in jax.tree_util.tree_leaves_with_path(params)}
  mu = {k: np.zeros_like(v) for k, v in flat.items()}
  nu = {k: np.zeros_like(v) for k, v in flat.items()}
  for t, grads in enumerate(grads_list, start=1):
    g = {'/'.join(k.key for k in kp): np.float64(v) for kp, v in jax.tree_util.tree_leaves_with_path(grads)}
    g = {k: v for k, v in g.items() if k in flat}
    if clip:
      norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
      g = {k: v * min(1.0, clip / norm) for k, v in g.items()}
    for k in flat:
      mu[k] = b1 * mu[k] + (1 - b1) * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
      step = (mu[k] / (1 - b1 ** t)) / (np.sqrt(nu[k] / (1 - b2 ** t)) + eps)
      step = step + (wd * flat[k] if decayed(k) else 0.0)
      flat[k] = flat[k] - lr * lr_scale(k) * step
  return flat


def _decayed(path):
  """The default optim.weight_decay_exclude: no decay when a path component contains norm, bias or embed."""
  return not any(s in c for c in path.split('/') for s in ('norm', 'bias', 'embed'))


def _flat(tree):
  return {'/'.join(str(k.key) for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def _unflatten(flat):
  tree = {}
  for path, v in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _grads(n, seed=1, scale=1.0):
  return [jax.tree.map(lambda x: x * scale, _params(seed + i)) for i in range(n)]


def _assert_close(got_tree, want_flat, rtol=1e-5):
  got = _flat(got_tree)
  assert set(got) >= set(want_flat)
  for k, want in want_flat.items():
    np.testing.assert_allclose(got[k], want, rtol=rtol, atol=1e-6, err_msg=k)


def test_adamw_weight_decay_mask_matches_numpy():
  params, grads = _params(), _grads(2)
  got, _ = _run(_config(), params, grads)
  want = _numpy_adamw(params, grads, decayed=_decayed)
  _assert_close(got, want)
  # The mask matters here: decaying everything gives a different result for the excluded leaves.
  decay_all = _numpy_adamw(params, grads)
  assert not np.allclose(decay_all['layers/attn_norm/scale'], got['layers']['attn_norm']['scale'], rtol=1e-5)
  got_all, _ = _run(_config(weight_decay_exclude=()), params, grads)
  _assert_close(got_all, decay_all)


def test_global_norm_clipping_matches_numpy():
  # Step 1's gradient is clipped (norm >> 1), step 2's is not; Adam's second step sees their ratio.
  params = _params()
  grads = _grads(1, seed=1, scale=50.0) + _grads(1, seed=2, scale=0.01)
  got, _ = _run(_config(clip_norm=1.0), params, grads)
  _assert_close(got, _numpy_adamw(params, grads, decayed=_decayed, clip=1.0))
  unclipped = _numpy_adamw(params, grads, decayed=_decayed)
  for off in (None, 0):
    got_off, _ = _run(_config(clip_norm=off), params, grads)
    _assert_close(got_off, unclipped)
  assert not np.allclose(got['lm_head']['kernel'], unclipped['lm_head/kernel'], rtol=1e-4)


def test_frozen_params_unchanged_and_stateless():
  params = _params()
  grads = _grads(3)
  config = _config(clip_norm=1.0, freeze=('embed/.*', 'layers/attn/.*'))
  got, state = _run(config, params, grads)
  frozen = lambda k: k.startswith('embed/') or k.startswith('layers/attn/')
  for k, v in _flat(got).items():
    if frozen(k):
      np.testing.assert_array_equal(v, _flat(params)[k], err_msg=k)
  # The rest train as if the frozen leaves did not exist (they do not count in the clipping norm either).
  trained = {k: v for k, v in _flat(params).items() if not frozen(k)}
  want = _numpy_adamw(_unflatten(trained), grads, decayed=_decayed, clip=1.0)
  _assert_close(got, want)
  # No Adam moments for frozen leaves: the state holds exactly 2 moments per trained leaf (+ step counts).
  moment_sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moment_sizes == sorted(2 * [v.size for v in trained.values()])


def test_progressive_unfreezing_by_phase():
  """Phase 1 (steps 0-1) freezes the layers and the embedding, phase 2 (step 2) only the embedding,
  phase 3 nothing: a leaf moves exactly in the phases that leave it free, and the free leaves train
  as the float64 AdamW would on the gradients it sees (frozen gradients never reach the moments)."""
  params = _params()
  grads = _grads(4)
  timeline = phases_lib.resolve(phases_lib.timeline(
      a=phases_lib.phase(steps=2, shape='constant', freeze=('layers/.*', 'embed/.*')),
      b=phases_lib.phase(steps=1, shape='constant', freeze=('embed/.*',)),
      c=phases_lib.phase(shape='constant')), 10, [])
  tx = optim.make_optimizer(_config(), optim.make_schedule(timeline, 1e-2), params, timeline)
  state, update, history = tx.init(params), jax.jit(tx.update), [_flat(jax.tree.map(np.asarray, params))]
  current = params
  for g in grads:
    updates, state = update(g, state, current)
    current = optax.apply_updates(current, updates)
    history.append(_flat(jax.tree.map(np.asarray, current)))
  for k in history[0]:
    moved = [not np.array_equal(history[i + 1][k], history[i][k]) for i in range(4)]
    want = {'embed': [False, False, False, True], 'layer': [False, False, True, True]}.get(k[:5], [True] * 4)
    assert moved == want, (k, moved)
  # The head trains from step 0 as plain AdamW. A layer's moments stay zero while it is frozen and the
  # step count (bias correction) runs on, so its first update is float64 AdamW's third step on the
  # gradients (0, 0, g_2), with neither update nor decay before it.
  head = _numpy_adamw(_unflatten({'lm_head/kernel': history[0]['lm_head/kernel']}), grads)
  np.testing.assert_allclose(history[4]['lm_head/kernel'], head['lm_head/kernel'], rtol=1e-5)
  layer = 'layers/mlp/up/kernel'
  p, g = history[0][layer].astype(np.float64), _flat(grads[2])[layer].astype(np.float64)
  m, v = (1 - 0.9) * g, (1 - 0.95) * g * g
  p = p - 1e-2 * ((m / (1 - 0.9 ** 3)) / (np.sqrt(v / (1 - 0.95 ** 3)) + 1e-8) + 0.1 * p)
  np.testing.assert_allclose(history[3][layer], p, rtol=1e-5)


def test_freeze_with_int_keys():
  params = {'blocks': {0: {'w': np.ones((2,), np.float32)}, 1: {'w': np.ones((2,), np.float32)}}}
  grads = [jax.tree.map(np.ones_like, params)]
  got, _ = _run(_config(freeze=('blocks/0/.*',), weight_decay_exclude=()), params, grads)
  np.testing.assert_array_equal(got['blocks'][0]['w'], params['blocks'][0]['w'])
  assert np.all(got['blocks'][1]['w'] < 1)


def test_layerwise_lr_matches_numpy():
  gamma = 0.5
  params, grads = _params(), _grads(2)
  got, _ = _run(_config(layerwise_lr_decay=gamma), params, grads)

  def lr_scale(k):
    if k.startswith('layers/'):
      per_layer = gamma ** (L - 1 - np.arange(L))  # last layer 1, first layer gamma**(L-1)
      return per_layer.reshape((L,) + (1,) * (_flat(params)[k].ndim - 1))
    return gamma ** L if k.startswith('embed/') else 1.0

  _assert_close(got, _numpy_adamw(params, grads, decayed=_decayed, lr_scale=lr_scale))


@pytest.mark.parametrize('freeze', ['config', 'phases'])
def test_fused_adamw_equals_optax_adamw(freeze):
  """Six steps of a warmup + cosine schedule with clipping (step 1's gradient clipped), the decay
  mask, layer-wise LR and frozen leaves (config.optim.freeze, or a phase freezing the layers for two
  steps): params and moments as optax.adamw's chain makes them (bit-equal on CPU; 1e-6 allowed)."""
  params = _params()
  grads = _grads(1, seed=1, scale=50.0) + _grads(5, seed=2, scale=0.1)
  if freeze == 'config':
    config, timeline = _config(clip_norm=1.0, layerwise_lr_decay=0.5, freeze=('layers/attn/.*',)), []
    schedule = _schedule([dict(shape='cosine', fraction=1.0, warmup_steps=2, end=0.1)], 1e-2, 6)
  else:
    config = _config(clip_norm=1.0, layerwise_lr_decay=0.5)
    timeline = phases_lib.resolve(phases_lib.timeline(
        a=phases_lib.phase(steps=2, shape='constant', warmup_steps=1, freeze=('layers/.*',)),
        b=phases_lib.phase(shape='cosine', end=0.1)), 6, [])
    schedule = optim.make_schedule(timeline, 1e-2)
  runs = []
  for tx in (optim.make_optimizer(config, schedule, params, timeline, fused=True),
             optim.make_optimizer(config, schedule, params, timeline)):  # optax.adamw's chain
    state, update, current, history = tx.init(params), jax.jit(tx.update), params, []
    for g in grads:
      updates, state = update(g, state, current)
      current = optax.apply_updates(current, updates)
      history.append(_flat(jax.tree.map(np.asarray, current)))
    runs.append((history, [optax.tree_utils.tree_get(state, k) for k in ('mu', 'nu')]))
  (got, got_moments), (want, want_moments) = runs
  for step, (g, w) in enumerate(zip(got, want)):
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=0, err_msg=f'step {step}: {k}')
  for g, w in zip(jax.tree.leaves(got_moments), jax.tree.leaves(want_moments)):
    assert g.dtype == w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=0)
  assert len(jax.tree.leaves(got_moments)) == len(jax.tree.leaves(want_moments)) > 0


# ------------------------------------------------------------------------------------------------ errors

BAD_SCHEDULES = [
    ([dict(shape='cosinus')], r"phases\.p0\.lr\.shape='cosinus': expected one of \('constant'"),
    ([dict(shape='wsd', decay='step')], r"phases\.p0\.lr\.decay='step': expected one of"),
    ([dict(steps=-5)], r'phases\.p0\.steps=-5: expected an integer >= 0'),
    ([dict(fraction=1.5)], r'phases\.p0\.fraction=1\.5: expected a number in \[0, 1\]'),
    ([dict(end=2.0)], r'phases\.p0\.lr\.end=2\.0: expected a number in \[0, 1\]'),
    ([dict(warmup_fraction=-0.1)], r'phases\.p0\.lr\.warmup_fraction=-0\.1'),
    ([dict(steps=60), dict(steps=30)], r'sum to 90 steps; expected config\.train\.steps=100'),
    ([dict(), dict()], r'phases\.p1: at most one phase may leave both steps and fraction unset'),
    ([dict(steps=200), dict()], r'take 200 steps, more than config\.train\.steps=100'),
    ([dict(warmup_steps=101)], r'warmup_steps=101: expected at most the phase length 100'),
    ([dict(shape='wsd', warmup_steps=90, decay_fraction=0.2)], r'exceed the phase length 100'),
    ([dict(shape='wsd', decay='exponential', end=0.0)], r'exponential decay needs .* end > 0'),
    ([dict(nmae='cosine')], r"phases\.p0\.lr: unknown keys \['nmae'\]"),
]


@pytest.mark.parametrize('entries,match', BAD_SCHEDULES)
def test_bad_schedule_config_errors(entries, match):
  with pytest.raises(errors.ConfigError, match=match):
    _schedule(entries, PEAK, 100)


def test_bad_phases_and_total_steps_errors():
  with pytest.raises(errors.ConfigError, match=r'config\.phases=\{\}: expected lmjax\.phases\.timeline'):
    phases_lib.resolve({}, 100, [])
  two = phases_lib.timeline(a=phases_lib.phase(), b=phases_lib.phase(steps=5))
  two.order = ('b', 'c')
  with pytest.raises(ValueError, match=r"config\.phases\.order=\('b', 'c'\): expected each phase of \['a', 'b'\] once"):
    phases_lib.resolve(two, 10, [])
  with pytest.raises(ValueError, match=r'config\.train\.steps=0: expected an integer >= 1'):
    phases_lib.resolve(phases_lib.defaults(), 0, [])
  with pytest.raises(errors.ConfigError, match=r'config\.optim\.lr=-1: expected a number >= 0'):
    optim.make_schedule(phases_lib.resolve(phases_lib.defaults(), 10, []), -1)


def test_steps_win_over_fraction_and_warmup_steps_over_warmup_fraction():
  """So a length given as a fraction can be overridden in steps by a flag (a float flag cannot
  be set to None)."""
  got = _schedule([dict(steps=60, fraction=0.4, shape='constant', warmup_steps=10, warmup_fraction=0.5),
                   dict(shape='constant', peak=0.5)], 1.0, 100)
  assert [float(got(t)) for t in (0, 5, 10, 59, 60, 99)] == [0.0, 0.5, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize('overrides,match', [
    (dict(b2=1.0), r'optim\.b2=1\.0: expected a number in \[0\.0, 1\.0\)'),
    (dict(eps=0.0), r'optim\.eps=0\.0: expected a number > 0'),
    (dict(weight_decay=-0.1), r'optim\.weight_decay=-0\.1'),
    (dict(clip_norm=-1.0), r'optim\.clip_norm=-1\.0'),
    (dict(layerwise_lr_decay=0.0), r'optim\.layerwise_lr_decay=0\.0: expected a number in \(0, 1\]'),
    (dict(freeze=('embedding/.*',)), r"optim\.freeze pattern 'embedding/\.\*' matches no parameter path"),
    (dict(freeze=('embed/(',)), r"optim\.freeze pattern 'embed/\(': not a valid regex"),
    (dict(moments_dtype='bf16'),
     r"config\.optim\.moments_dtype='bf16': expected one of \('float32', 'bfloat16'\)"),
    (dict(moments_dtype='bfloat16', b2=0.999),
     r"config\.optim\.b2=0\.999 with config\.optim\.moments_dtype='bfloat16': expected b2 <= 1 - 2\*\*-8"),
])
def test_bad_optimizer_config_errors(overrides, match):
  with pytest.raises(errors.ConfigError, match=match):
    optim.make_optimizer(_config(**overrides), CONSTANT, _params())
