"""The fused LM-head loss on a GPU (skipped elsewhere; run with JAX_PLATFORMS=cuda): bf16 inputs,
value and gradients against the f32 materialised reference within 1e-2, and a model's training loss and
gradients with the fused loss ('pallas' on the seam, lmjax.losses.ce_pallas) matching
'materialize'. Fresh random inputs each run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import batch as batch_lib, losses, model, steps
from lmjax.distill import kd
from pallas_kernels.linear_cross_entropy import api

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU (JAX_PLATFORMS=cuda)')
TOL = 1e-2


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.isfinite(a).all()
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize('soft', [None, 'renormalize', 'bucket'])
def test_bf16_value_and_grads_match_the_f32_reference(soft):
  n, d, v, vocab, k = 4096, 1024, 32000, 31900, 16
  ks = jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31), 6)
  x = jax.random.normal(ks[0], (n, d), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (d, v)) * d ** -0.5).astype(jnp.bfloat16)
  t = jax.random.randint(ks[2], (n,), 0, vocab)
  wt = (jax.random.uniform(ks[3], (n,)) > 0.1).astype(jnp.float32)
  kw = dict(z_loss=1e-4, vocab_size=vocab)
  if soft:
    ids = (jax.random.randint(ks[4], (n, 1), 0, vocab) + 1013 * jnp.arange(k)) % vocab
    lp = jax.nn.log_softmax(jax.random.normal(ks[5], (n, k))) + jnp.log(0.8)
    kw.update(teacher_ids_nk=ids, teacher_logprobs_nk=lp, tail=soft, temperature=1.5, alpha=0.5)
  f = lambda x, w, impl: jnp.sum(wt * api.linear_cross_entropy(x, w, t, weights_n=wt, implementation=impl, **kw))
  val, (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(x, w, 'xla')
  ref, (dx32, dw32) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(
      x.astype(jnp.float32), w.astype(jnp.float32), 'reference')
  assert abs(float(val) - float(ref)) / abs(float(ref)) < TOL
  assert _rel(dx, dx32) < TOL and _rel(dw, dw32) < TOL


def test_train_step_loss_and_grads_with_the_fused_loss_match_materialize():
  cfg = model.defaults()
  cfg.update(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=1024, vocab_size=8192)
  args = model.resolve(cfg)
  graphdef, params = model.create(args, seed=0)
  seed = np.random.SeedSequence().entropy % 2**31
  batch = jax.tree.map(jnp.asarray, batch_lib.synthetic(4, 1024, 8000, seed, docs_per_row=4))

  def loss(p, implementation):
    loss_cfg = losses.defaults()
    loss_cfg.implementation, loss_cfg.z_loss = implementation, 1e-4
    loss_args = losses.resolve(loss_cfg, 8000)
    loss_sum, weight_sum, _, _ = steps.loss_sums(graphdef, p, batch, loss_args, 1)
    return loss_sum / weight_sum

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grads = grad(params, 'materialize')
  out_loss, out_grads = grad(params, 'pallas')
  assert abs(float(out_loss) - float(ref_loss)) / float(ref_loss) < 1e-3
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out_grads), jax.tree.leaves(ref_grads)):
    assert _rel(a, b) < TOL, (jax.tree_util.keystr(path), _rel(a, b), seed)


@pytest.mark.parametrize('tail', kd.TAILS)
def test_kd_pallas_in_bf16_matches_chunked(tail):
  """lmjax's kd loss through the fused kernel's top-k path (implementation='pallas') against chunked,
  bf16 hidden states and head, f32 loss: the weighted sum and its gradients within 1e-2, with slots
  without mass and the teacher's own tail mass."""
  b, t, d, v, vocab, k = 4, 1024, 1024, 32000, 31900, 16
  ks = jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31), 7)
  x = jax.random.normal(ks[0], (b, t, d), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (d, v)) * d ** -0.5).astype(jnp.bfloat16)
  teacher = jax.nn.log_softmax(2 * jax.random.normal(ks[2], (b, t, vocab)))
  lp, ids = jax.lax.top_k(teacher, k)
  lp = jnp.where(jnp.arange(k) >= k - 3, -jnp.inf, lp).at[0, :8].set(-jnp.inf)  # holes; no mass at all
  batch = {'targets': jax.random.randint(ks[3], (b, t), 0, vocab),
           'weights': (jax.random.uniform(ks[4], (b, t)) > 0.1).astype(jnp.float32),
           'teacher_ids': ids.astype(jnp.int32), 'teacher_logprobs': lp,
           'teacher_tail': 0.9 * jnp.clip(1 - jnp.where(lp > -jnp.inf, jnp.exp(lp), 0).sum(-1), 0, 1)}

  def f(x, w, implementation):
    args = losses.Args('kd', implementation, 1e-4, 2048, vocab, kd.Options(0.6, 1.5, 'forward', tail))
    return jnp.sum(losses.per_token(x, w, batch, args) * batch['weights'])

  grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
  val, (dx, dw) = grad(x, w, 'pallas')
  ref, (dx_ref, dw_ref) = grad(x, w, 'chunked')
  assert abs(float(val) - float(ref)) / abs(float(ref)) < TOL
  assert _rel(dx, dx_ref) < TOL and _rel(dw, dw_ref) < TOL
