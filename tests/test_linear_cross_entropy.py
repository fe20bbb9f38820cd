"""The fused LM-head loss on CPU: the XLA backend and the TPU kernels in interpret mode, value and
gradients (input and weight) against a float64 oracle, for hard labels, soft labels (both tails,
temperature), both mixed, z-loss, ignored positions, a vocabulary that is not a multiple of any tile, and
tied and untied heads. The H200 checks are in tests/gpu/test_linear_cross_entropy_gpu.py.

Oracles: the loss value in float64 numpy, written from api.py's formulas; the gradients by autodiff of
the materialised reference in float64 (independent of terms.py's hand-derived gradient).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_cross_entropy import api, reference

N, D, V_PAD, VOCAB, K = 40, 128, 300, 290, 8   # 40 tokens: not a multiple of the 16-token block


def _np_logsumexp(a, axis=-1):
  m = a.max(axis, keepdims=True)
  return (m + np.log(np.exp(a - m).sum(axis, keepdims=True))).squeeze(axis)


def _np_loss(x, w, t, wt, z_loss, ids, lp, tail, temp, alpha, teacher_tail=None):
  """Per-token loss in float64 numpy, from the formulas of api.py's docstring: the soft term is the KL
  from the teacher over its valid slots (log-prob > -inf) and, for 'bucket', the tail."""
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)[:, :VOCAB]
  lse = _np_logsumexp(z)
  hard = lse - z[np.arange(N), t]
  loss = hard
  if ids is not None:
    lp = np.asarray(lp, np.float64)
    soft = np.zeros(N)
    for n in range(N):
      valid = np.isfinite(lp[n])
      if not valid.any() and tail == 'renormalize':
        continue
      u = z[n, ids[n][valid]] / temp
      a = lp[n][valid]
      if tail == 'renormalize':
        log_q = u - _np_logsumexp(u)
      else:
        mass = 1 - np.exp(a).sum() if teacher_tail is None else float(teacher_tail[n])
        a = np.append(a, np.log(max(mass, 1e-9)))
        log_q = u - _np_logsumexp(z[n] / temp)
        log_q = np.append(log_q, np.log(1 - np.exp(log_q).sum()))
      log_p = a / temp - _np_logsumexp(a / temp)
      soft[n] = (np.exp(log_p) * (log_p - log_q)).sum()
    loss = alpha * temp ** 2 * soft + (1 - alpha) * hard
  return np.where(wt != 0, loss + z_loss * lse ** 2, 0.0)


def _inputs(seed):
  ks = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(ks[0], (N, D))
  w = 0.2 * jax.random.normal(ks[1], (D, V_PAD))
  t = jax.random.randint(ks[2], (N,), 0, VOCAB)
  ids = jax.vmap(lambda k: jax.random.permutation(k, VOCAB)[:K])(jax.random.split(ks[3], N))
  teacher = jax.nn.log_softmax(3 * jax.random.normal(ks[4], (N, VOCAB)))
  lp = jnp.take_along_axis(teacher, ids, axis=-1)
  wt = (jax.random.uniform(ks[5], (N,)) > 0.25).astype(jnp.float32)
  return x, w, t, wt, ids, lp


CASES = {
    'hard': dict(),
    'hard_zloss': dict(z_loss=1e-2),
    'soft_renormalize_T2': dict(soft=True, tail='renormalize', temperature=2.0, alpha=1.0),
    'mixed_bucket_T1.5_zloss': dict(soft=True, tail='bucket', temperature=1.5, alpha=0.6, z_loss=1e-3),
    'mixed_renormalize_T1': dict(soft=True, tail='renormalize', temperature=1.0, alpha=0.3),
    'soft_bucket_T1': dict(soft=True, tail='bucket', temperature=1.0, alpha=1.0),
    # slots without mass (-inf; a row with none), and the teacher's own tail mass
    'renormalize_empty_slots_T2': dict(soft=True, tail='renormalize', temperature=2.0, alpha=0.7, holes=True),
    'bucket_empty_slots_given_tail': dict(soft=True, tail='bucket', temperature=1.5, alpha=0.8, holes=True,
                                          given_tail=True),
}


def _kwargs(case, ids, lp):
  kw = dict(CASES[case])
  holes, given_tail = kw.pop('holes', False), kw.pop('given_tail', False)
  if holes:  # the last 3 slots of every third row have no mass; row 1 has none at all
    cut = (np.arange(N)[:, None] % 3 == 0) & (np.arange(K)[None] >= K - 3)
    cut[1] = True
    lp = jnp.where(cut, -jnp.inf, lp)
  if given_tail:  # the teacher's tail, not 1 - its top-k (as a compact store's rounding would leave it)
    kw['teacher_tail_n'] = 0.9 * jnp.clip(1 - jnp.where(lp > -jnp.inf, jnp.exp(lp), 0).sum(-1), 0, 1)
  if kw.pop('soft', False):
    kw.update(teacher_ids_nk=ids, teacher_logprobs_nk=lp)
  return kw


def _weighted_sum(x, w, t, wt, kw, **impl):
  return jnp.sum(wt * api.linear_cross_entropy(x, w, t, weights_n=wt, vocab_size=VOCAB, **kw, **impl))


def _rel(a, ref):
  a = np.asarray(a, np.float64)
  assert np.isfinite(a).all()
  return np.linalg.norm(a - ref) / np.linalg.norm(ref)


IMPLS = {'xla': dict(implementation='xla', block_tokens=16),
         'mosaic_tpu_interpret': dict(implementation='mosaic_tpu', block_tokens=16, interpret=True)}


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('case', CASES)
def test_value_and_grads_match_float64(case, impl):
  x, w, t, wt, ids, lp = _inputs(seed=hash(case) % 1000)
  kw = _kwargs(case, ids, lp)
  per_token = api.linear_cross_entropy(x, w, t, weights_n=wt, vocab_size=VOCAB, **kw, **IMPLS[impl])
  soft = kw.get('teacher_ids_nk') is not None
  oracle = _np_loss(x, w, np.asarray(t), np.asarray(wt), kw.get('z_loss', 0.0), np.asarray(ids) if soft else None,
                    kw.get('teacher_logprobs_nk'), kw.get('tail'), kw.get('temperature', 1.0),
                    kw.get('alpha', 1.0), kw.get('teacher_tail_n'))
  assert _rel(per_token, oracle) < 1e-5
  assert np.all(np.asarray(per_token)[np.asarray(wt) == 0] == 0)
  dx, dw = jax.grad(_weighted_sum, argnums=(0, 1))(x, w, t, wt, kw, **IMPLS[impl])
  with jax.enable_x64(True):
    kw64 = {k: (v.astype(jnp.float64) if k in ('teacher_logprobs_nk', 'teacher_tail_n') else v)
            for k, v in kw.items()}
    dx64, dw64 = jax.grad(_weighted_sum, argnums=(0, 1))(
        jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64), t, wt.astype(jnp.float64), kw64,
        implementation='reference')
    dx64, dw64 = np.asarray(dx64), np.asarray(dw64)
  assert _rel(dx, dx64) < 1e-5 and _rel(dw, dw64) < 1e-5
  assert np.all(np.asarray(dw)[:, VOCAB:] == 0)   # padded vocabulary rows get no gradient


@pytest.mark.parametrize('impl', IMPLS)
def test_tied_head_gradient_reaches_the_embedding_through_both_paths(impl):
  """w = embedding^T, and the hidden states are a function of the same embedding (lookup + tanh)."""
  x, w, t, wt, ids, lp = _inputs(seed=7)
  tokens = t[::-1]
  kw = dict(teacher_ids_nk=ids, teacher_logprobs_nk=lp, tail='bucket', alpha=0.5, z_loss=1e-3)

  def loss(emb_vd, **impl_kw):
    x_nd = jnp.tanh(emb_vd[tokens] * 3.0)
    return _weighted_sum(x_nd, emb_vd.T, t, wt, {**kw, 'teacher_logprobs_nk': lp.astype(emb_vd.dtype)},
                         **impl_kw)

  emb = w.T
  g = jax.grad(loss)(emb, **IMPLS[impl])
  with jax.enable_x64(True):
    g64 = np.asarray(jax.grad(loss)(jnp.asarray(emb, jnp.float64), implementation='reference'))
  assert _rel(g, g64) < 1e-5


def test_weight_gradient_is_nan_not_wrong_for_a_cotangent_not_proportional_to_the_weights():
  x, w, t, wt, _, _ = _inputs(seed=3)
  loss = lambda w, impl: jnp.sum(jnp.arange(N) * api.linear_cross_entropy(x, w, t, weights_n=wt,
                                                                           implementation=impl))
  assert np.isnan(np.asarray(jax.grad(loss)(w, 'xla'))).all()
  assert np.isfinite(np.asarray(jax.grad(loss)(w, 'reference'))).all()
  # dx is exact for any cotangent: row by row.
  dx = jax.grad(lambda x: jnp.sum(jnp.arange(N) * api.linear_cross_entropy(x, w, t, weights_n=wt)))(x)
  dx_ref = jax.grad(lambda x: jnp.sum(jnp.arange(N) * api.linear_cross_entropy(
      x, w, t, weights_n=wt, implementation='reference')))(x)
  assert _rel(dx, np.asarray(dx_ref, np.float64)) < 1e-5


def test_xla_backend_never_holds_the_logits():
  """Compiled (not run) at N=4096, V=32768: the f32 logits would be 512 MiB; the fused backward's
  temporaries are a few 512-token blocks of them (64 MiB each: 182 MiB on the CPU compiler), the
  reference's hold them whole."""
  n, d, v = 4096, 256, 32768
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))

  def temp_bytes(impl):
    f = lambda x, w, t: jnp.sum(api.linear_cross_entropy(x, w, t, implementation=impl, block_tokens=512))
    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = n * v * 4
  assert temp_bytes('xla') < logits_bytes / 2 < logits_bytes <= temp_bytes('reference')


@pytest.mark.parametrize('kwargs,match', [
    (dict(tail='top'), r"tail='top': expected one of \('renormalize', 'bucket'\)"),
    (dict(temperature=0.0), r'temperature=0.0: expected > 0'),
    (dict(alpha=1.5), r'alpha=1.5: expected 0 <= alpha <= 1'),
    (dict(vocab_size=301), r'vocab_size=301: expected 1..300'),
    (dict(implementation='triton'), r"implementation must be None or one of .*'triton'"),
    (dict(implementation='mosaic_tpu'), r"mosaic_tpu needs a TPU, the target platform is 'cpu'"),
    (dict(teacher_tail_n=jnp.ones(N)), r"teacher_tail_n: a \[40\] array with tail='bucket', got \(40,\) with "
                                        r"tail='renormalize'"),
])
def test_bad_arguments_name_the_field(kwargs, match):
  x, w, t, _, _, _ = _inputs(seed=1)
  with pytest.raises(ValueError, match=match):
    api.linear_cross_entropy(x, w, t, **kwargs)
