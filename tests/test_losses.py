"""The loss seam: cross-entropy against a float64 numpy reference, the chunked implementation equal to
the materialising one (values and gradients, tied and untied heads, padded vocabulary rows), and its
memory from the compiler's own analysis."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import losses

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
  cfg.name = 'kd'
  with pytest.raises(ValueError, match=r"config\.loss\.name='kd'"):
    losses.validate(cfg)
