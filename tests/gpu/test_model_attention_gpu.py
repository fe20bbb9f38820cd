"""Model integration on a GPU: a training step's loss and gradients with attention='pallas' (the
Mosaic GPU flash kernel) and 'cudnn' match attention='xla' (plain jnp attention) on packed rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import batch as batch_lib, losses, model, steps
from pallas_kernels.flash_attention import api

pytestmark = pytest.mark.skipif(not api._is_hopper(), reason='needs a Hopper GPU (sm_90)')


@pytest.mark.parametrize('attention', ['pallas', 'cudnn'])
def test_train_step_loss_and_grads_match_xla(attention):
  cfg = model.defaults()
  cfg.update(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=1024, vocab_size=1024)
  ref_args = model.resolve(cfg)
  graphdef_ref, params = model.create(ref_args, seed=0)
  cfg.attention = attention
  graphdef, _ = model.create(model.resolve(cfg), seed=0)
  seed = np.random.SeedSequence().entropy % 2**31
  batch = jax.tree.map(jnp.asarray, batch_lib.synthetic(2, 1024, 1024, seed, docs_per_row=4))
  loss_args = losses.resolve(losses.defaults(), ref_args.vocab_size)

  def loss(g, p):
    loss_sum, weight_sum, _, _ = steps.loss_sums(g, p, batch, loss_args, 1)
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
