"""The loss seam: cross-entropy against a float64 numpy reference, the chunked implementation equal to
the materialising one (values and gradients, tied and untied heads, padded vocabulary rows), and its
memory from the compiler's own analysis. Distillation: every KD variant (forward/reverse KL, tail
renormalised or one bucket, temperature, alpha) against a float64 numpy reference, its gradients
against central differences of that reference, with padded positions and k past the teacher's support;
the teacher's top-k against numpy's sort."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import losses
from lmjax.distill import kd

B, T, D, V, VALID = 3, 37, 16, 200, 190  # T not a multiple of the chunk; 10 padded head rows


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  w = rng.normal(size=(D, V)).astype(np.float32) / 2
  targets = rng.integers(0, VALID, (B, T)).astype(np.int32)
  weights = (rng.random((B, T)) > 0.2).astype(np.float32)
  return x, w, targets, weights


def _args(implementation, z_loss=1e-3, chunk_tokens=24):
  return losses.Args('ce', implementation, z_loss, chunk_tokens, VALID)


def _numpy_ce(x, w, targets, z_loss):
  logits = np.einsum('btd,dv->btv', x.astype(np.float64), w.astype(np.float64))[..., :VALID]
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0] + z_loss * lse ** 2


def _loss(args):
  """jit(value_and_grad) of the weighted loss sum, with respect to x_btd and w_dv."""
  def f(x, w, targets, weights):
    return jnp.sum(losses.per_token(x, w, {'targets': targets}, args) * weights)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


@pytest.mark.parametrize('implementation', ['materialize', 'chunked'])
def test_ce_matches_float64_reference_and_masks_padded_rows(implementation):
  x, w, targets, weights = _inputs()
  got = losses.per_token(jnp.asarray(x), jnp.asarray(w), {'targets': targets}, _args(implementation))
  np.testing.assert_allclose(np.asarray(got), _numpy_ce(x, w, targets, 1e-3), rtol=1e-5)
  _, (_, dw) = _loss(_args(implementation))(x, w, targets, weights)
  assert np.all(np.asarray(dw)[:, VALID:] == 0)  # padded rows are never predicted: no gradient


@pytest.mark.parametrize('tied', [True, False])
@pytest.mark.parametrize('chunk_tokens', [1, 24, 10_000])
def test_chunked_equals_materialize(tied, chunk_tokens):
  x, w, targets, weights = _inputs(1)
  if tied:  # the model's tied head: w_dv = embed_vd.T, gradients flow into the embedding
    embed = w.T.copy()
    fn = lambda args: jax.jit(jax.value_and_grad(
        lambda x, e: jnp.sum(losses.per_token(x, e.T, {'targets': targets}, args) * weights),
        argnums=(0, 1)))(x, embed)
  else:
    fn = lambda args: _loss(args)(x, w, targets, weights)
  (v0, (dx0, dw0)) = fn(_args('materialize'))
  (v1, (dx1, dw1)) = fn(_args('chunked', chunk_tokens=chunk_tokens))
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dw1), np.asarray(dw0), rtol=1e-5, atol=1e-6)


def test_chunked_holds_a_quarter_of_the_memory_or_less():
  """N = 8192 tokens, d = 512, V = 32,000: the compiled value-and-grad's temporaries (XLA's memory
  analysis on CPU) with the default chunk are at most 1/4 of the materialising loss's."""
  n_rows, d, v = 4, 512, 32_000
  shapes = (jax.ShapeDtypeStruct((n_rows, 8192 // n_rows, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n_rows, 8192 // n_rows), jnp.int32),
            jax.ShapeDtypeStruct((n_rows, 8192 // n_rows), jnp.float32))
  default = losses.resolve(losses.defaults(), v)
  temps = {}
  for implementation in ('materialize', 'chunked'):
    args = dataclasses.replace(default, implementation=implementation)
    temps[implementation] = _loss(args).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  # The materialising loss holds [N, V] f32 logits (1.05 GB) and more.
  assert temps['materialize'] > 8192 * v * 4
  assert temps['chunked'] <= temps['materialize'] / 4, temps


def test_bad_loss_config_names_the_field():
  cfg = losses.defaults()
  cfg.implementation = 'fused'
  with pytest.raises(ValueError, match=r"config\.loss\.implementation='fused': expected one of"):
    losses.validate(cfg)
  cfg = losses.defaults()
  cfg.name = 'dpo'
  with pytest.raises(ValueError, match=r"config\.loss\.name='dpo'"):
    losses.validate(cfg)
  cfg = losses.defaults()
  cfg.name = 'kd'
  cfg.kd.update(teacher='lmjax:/t', store='/s', tail='spline')
  with pytest.raises(ValueError, match=r"config\.loss\.kd\.tail='spline': expected one of"):
    losses.validate(cfg)
  cfg = losses.defaults()
  cfg.name = 'kd'
  with pytest.raises(ValueError, match=r"config\.loss\.kd\.teacher=''"):
    losses.validate(cfg)


# ----------------------------------------------------------------------------- distillation

KD_K = 8


def _kd_inputs(seed=0):
  """Student x, w; the teacher's top-k from random f64 logits over VALID rows, with
  - row 0, positions 0-3: a teacher whose support is 5 tokens (slots 5..k-1 are -inf);
  - row 1, positions T-4..: padding (weight 0; every slot -inf, tail 0)."""
  x, w, targets, weights = _inputs(seed)
  rng = np.random.default_rng(seed + 100)
  t_logits = rng.normal(size=(B, T, VALID)) * 2.0
  t_logits[0, :4, :] = -np.inf
  t_logits[0, :4, rng.choice(VALID, 5, replace=False)] = rng.normal(size=(5, 1))
  m = t_logits.max(-1, keepdims=True)
  logp = t_logits - m - np.log(np.exp(t_logits - m).sum(-1, keepdims=True))
  order = np.argsort(-logp, axis=-1, kind='stable')[..., :KD_K]
  ids = order.astype(np.int32)
  lp = np.take_along_axis(logp, order, -1)
  tail = np.clip(1 - np.exp(lp).sum(-1), 0, 1)
  ids[1, -4:], lp[1, -4:], tail[1, -4:], weights[1, -4:] = 0, -np.inf, 0.0, 0.0
  batch = {'targets': targets, 'teacher_ids': ids, 'teacher_logprobs': lp.astype(np.float32),
           'teacher_tail': tail.astype(np.float32)}
  return x, w, batch, weights


def _numpy_kd_from_logits(z, batch, alpha, temperature, divergence, tail_mode, z_loss):
  """The float64 reference: for each position, the outcome of every vocabulary id (its slot among
  the valid top-k, or the tail), then the teacher's and student's outcome distributions."""
  z = z[..., :VALID].astype(np.float64)
  ids, lp = batch['teacher_ids'], batch['teacher_logprobs'].astype(np.float64)
  tail = batch['teacher_tail'].astype(np.float64)
  out = np.zeros(z.shape[:2])
  for b in range(z.shape[0]):
    for t in range(z.shape[1]):
      zz = z[b, t]
      lse = np.log(np.sum(np.exp(zz - zz.max()))) + zz.max()
      ce = lse - zz[batch['targets'][b, t]]
      valid = np.flatnonzero(lp[b, t] > -np.inf)
      s = np.exp(zz / temperature - np.max(zz / temperature))
      s /= s.sum()
      q = s[ids[b, t, valid]]
      a = lp[b, t, valid] / temperature
      if tail_mode == 'bucket' and len(valid) < VALID:
        rest = np.ones(VALID, bool)
        rest[ids[b, t, valid]] = False
        q = np.append(q, s[rest].sum())
        a = np.append(a, np.log(max(tail[b, t], kd.TAIL_FLOOR)) / temperature)
      if len(q) == 0:
        kd_term = 0.0
      else:
        q = q / q.sum()  # bucket: sums to 1 already
        p = np.exp(a - a.max())
        p /= p.sum()
        kd_term = np.sum(p * (np.log(p) - np.log(q))) if divergence == 'forward' else \
            np.sum(q * (np.log(q) - np.log(p)))
      out[b, t] = alpha * temperature ** 2 * kd_term + (1 - alpha) * ce + z_loss * lse ** 2
  return out


KD_VARIANTS = [(d, tail) for d in kd.DIVERGENCES for tail in kd.TAILS]


@pytest.mark.parametrize('implementation', ['materialize', 'chunked'])
@pytest.mark.parametrize('divergence,tail', KD_VARIANTS)
def test_kd_matches_float64_reference_values_and_gradients(divergence, tail, implementation):
  x, w, batch, weights = _kd_inputs()
  alpha, temperature, z_loss = 0.7, 2.0 if divergence == 'forward' else 0.5, 1e-3
  args = losses.Args('kd', implementation, z_loss, 24, VALID, kd.Options(alpha, temperature, divergence, tail))
  ref = lambda z: _numpy_kd_from_logits(z, batch, alpha, temperature, divergence, tail, z_loss)
  z64 = np.einsum('btd,dv->btv', x.astype(np.float64), w.astype(np.float64))
  want = ref(z64)
  got = losses.per_token(jnp.asarray(x), jnp.asarray(w), batch, args)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # d(sum weights * loss)/d logits by central differences of the reference (each position's loss
  # reads only its own logits, so one vocabulary column is perturbed at every position at once).
  eps, dz = 1e-5, np.zeros_like(z64)
  for v in range(VALID):
    up, down = z64.copy(), z64.copy()
    up[..., v] += eps
    down[..., v] -= eps
    dz[..., v] = weights * (ref(up) - ref(down)) / (2 * eps)
  dx_want, dw_want = np.einsum('btv,dv->btd', dz, w), np.einsum('btv,btd->dv', dz, x)

  def f(x, w):
    return jnp.sum(losses.per_token(x, w, batch, args) * weights)
  value, (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
  assert np.isfinite(float(value))
  np.testing.assert_allclose(float(value), np.sum(want * weights), rtol=1e-5)
  for got_g, want_g in ((dx, dx_want), (dw, dw_want)):
    np.testing.assert_allclose(np.asarray(got_g), want_g, rtol=1e-5, atol=1e-5 * np.abs(want_g).max())
  # Padded positions give no gradient and no NaN; padded head rows are never predicted.
  assert np.all(np.asarray(dx)[1, -4:] == 0) and np.all(np.asarray(dw)[:, VALID:] == 0)


@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('tail', kd.TAILS)
def test_kd_pallas_equals_chunked_in_value_and_gradients(tail, tied):
  """The fused kernel's top-k path (implementation='pallas') against chunked, f32: the weighted loss
  and its gradients, with slots without mass, padded positions, padded head rows, the teacher's own
  tail mass (bucket), and a tied head whose embedding also makes the hidden states."""
  x, w, batch, weights = _kd_inputs(3)
  batch = {**batch, 'weights': weights}
  tokens = batch['targets']

  def loss(params, implementation):
    args = losses.Args('kd', implementation, 1e-3, 24, VALID, kd.Options(0.7, 1.5, 'forward', tail))
    if tied:
      emb_vd = params
      x_btd, w_dv = jnp.tanh(emb_vd[tokens] @ jnp.ones((D, D)) / D * 3.0), emb_vd.T
    else:
      x_btd, w_dv = params
    return jnp.sum(losses.per_token(x_btd, w_dv, batch, args) * weights)

  params = jnp.asarray(w.T) if tied else (jnp.asarray(x), jnp.asarray(w))
  want, want_g = jax.value_and_grad(loss)(params, 'chunked')
  got, got_g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 'pallas')
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for g, h in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(h)).max())
  if not tied:
    assert np.all(np.asarray(got_g[1])[:, VALID:] == 0)  # padded head rows are never predicted


def test_kd_pallas_follows_the_phase_values_of_a_traced_alpha_and_temperature():
  """In a step alpha and temperature are traced (they change by phase): the kernel is compiled for
  each of the run's pairs (Options.pairs) and the step's (the traced Options.pair) runs; a phase
  timeline maps each step to its phase's pair (kd.at_step)."""
  x, w, batch, weights = _kd_inputs(4)
  batch = {**batch, 'weights': weights}
  values = ((0.7, 2.0), (0.3, 1.0), (1.0, 1.0))
  options = kd.Options(tail='bucket', pairs=values, phase_pairs=(0, 1, 2, 1), phase_starts=(0, 3, 5, 9))
  base = losses.Args('kd', 'pallas', 0.0, 24, VALID, options)

  @jax.jit
  def traced(step):
    args = kd.at_step(base, step)
    return jnp.sum(losses.per_token(jnp.asarray(x), jnp.asarray(w), batch, args) * weights)

  for step, pair in ((0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (9, 1), (20, 1)):
    alpha, temperature = values[pair]
    args = losses.Args('kd', 'chunked', 0.0, 24, VALID, kd.Options(alpha, temperature, tail='bucket'))
    want = jnp.sum(losses.per_token(jnp.asarray(x), jnp.asarray(w), batch, args) * weights)
    np.testing.assert_allclose(float(traced(jnp.int32(step))), float(want), rtol=1e-5)


def test_kd_pallas_refuses_the_reverse_divergence():
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.base().loss
  cfg.update(name='kd', implementation='pallas')
  cfg.kd.update(teacher='lmjax:/t', store='/s', divergence='reverse')
  with pytest.raises(ValueError, match=r"config\.loss\.kd\.divergence='reverse': the pallas implementation"):
    losses.validate(cfg)


def test_kd_alpha_zero_is_ce_and_teacher_equal_to_student_has_zero_kd():
  x, w, batch, _ = _kd_inputs(2)
  ce = losses.per_token(x, w, batch, _args('materialize'))
  kd0 = losses.per_token(x, w, batch, losses.Args('kd', 'materialize', 1e-3, 24, VALID, kd.Options(0.0)))
  np.testing.assert_allclose(np.asarray(kd0), np.asarray(ce), rtol=1e-6)
  # The student's own full distribution as the teacher (k = VALID): every KD variant is 0.
  z = np.asarray(losses.logits(jnp.asarray(x), jnp.asarray(w)))[..., :VALID]
  teacher = kd.teacher_topk(jnp.asarray(z), VALID, VALID)
  for divergence, tail in KD_VARIANTS:
    args = losses.Args('kd', 'materialize', 0.0, 24, VALID, kd.Options(1.0, 1.0, divergence, tail))
    got = losses.per_token(x, w, {**batch, **teacher}, args)
    np.testing.assert_allclose(np.asarray(got), 0.0, atol=1e-5)


@pytest.mark.parametrize('chunk_tokens', [7, 10_000])
def test_teacher_topk_matches_numpy_and_chunked(chunk_tokens):
  x, w, _, _ = _inputs(3)
  z = np.einsum('btd,dv->btv', x.astype(np.float64), w.astype(np.float64))[..., :VALID]
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  order = np.argsort(-logp, axis=-1)[..., :KD_K]
  got = kd.teacher_topk_chunked(jnp.asarray(x), jnp.asarray(w), KD_K, VALID, chunk_tokens)
  np.testing.assert_array_equal(np.asarray(got['teacher_ids']), order)
  np.testing.assert_allclose(np.asarray(got['teacher_logprobs']),
                             np.take_along_axis(logp, order, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got['teacher_tail']),
                             1 - np.exp(np.take_along_axis(logp, order, -1)).sum(-1), rtol=1e-4)
