"""Model integration on a GPU: a training step's loss and gradients with attention='pallas' (the
Mosaic GPU flash kernel) and 'cudnn' match attention='xla' (plain jnp attention) on packed rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import model, train
from pallas_kernels.flash_attention import api

pytestmark = pytest.mark.skipif(not api._is_hopper(), reason='needs a Hopper GPU (sm_90)')


def packed_batch(seed, b, t, vocab):
  rng = np.random.default_rng(seed)
  seg = np.cumsum(rng.random((b, t + 1)) < 3.0 / t, axis=1).astype(np.int32) + 1
  pos = np.zeros_like(seg)
  for j in range(1, t + 1):
    pos[:, j] = np.where(seg[:, j] == seg[:, j - 1], pos[:, j - 1] + 1, 0)
  tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg[:, :-1],
              positions=pos[:, :-1], weights=(seg[:, 1:] == seg[:, :-1]).astype(np.float32))


@pytest.mark.parametrize('attention', ['pallas', 'cudnn'])
def test_train_step_loss_and_grads_match_xla(attention):
  cfg = model.defaults()
  cfg.update(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=1024, vocab_size=1024)
  ref_args = model.resolve(cfg)
  graphdef_ref, params = model.create(ref_args, seed=0)
  cfg.attention = attention
  graphdef, _ = model.create(model.resolve(cfg), seed=0)
  batch = jax.tree.map(jnp.asarray, packed_batch(np.random.SeedSequence().entropy % 2**31, 2, 1024, 1024))

  def loss(g, p):
    loss_sum, weight_sum = train.loss_sums(g, p, batch, 0.0)
    return loss_sum / weight_sum

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(graphdef_ref, p)))(params)
  step = jax.jit(jax.value_and_grad(lambda p: loss(graphdef, p)))
  if attention == 'pallas':  # the kernel really runs (no silent fallback to the jnp reference)
    assert 'mosaic_gpu' in step.lower(params).as_text()
  out_loss, out_grads = step(params)
  assert abs(float(out_loss) - float(ref_loss)) / float(ref_loss) < 1e-2
  for a, b in zip(jax.tree.leaves(out_grads), jax.tree.leaves(ref_grads)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2
