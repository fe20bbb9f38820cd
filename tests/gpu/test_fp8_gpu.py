"""FP8 projections and the custom-VJP RMSNorm/SwiGLU on a Hopper GPU: the FP8 einsum runs as
cuBLASLt's FP8 GEMM and matches a float64 quantize-dequantize reference; the model's loss and
gradients with FP8 stay near bf16's, and with the custom VJPs equal plain autodiff's."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lmjax import fp8, model
from pallas_kernels.flash_attention import api

pytestmark = pytest.mark.skipif(not api._is_hopper(), reason='needs a Hopper GPU (sm_90)')


def qdq_f64(x, dtype):
  x = np.asarray(x, np.float64)
  amax = np.abs(x).max()
  scale = 2.0 ** np.ceil(np.log2(amax / float(ml_dtypes.finfo(dtype).max)))
  return (x / scale).astype(dtype).astype(np.float64) * scale


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_fp8_einsum_is_an_fp8_gemm_and_matches_float64():
  seed = np.random.SeedSequence().entropy % 2**31
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (4, 256, 512), jnp.bfloat16)
  w = jax.random.normal(kw, (512, 1024)) / np.sqrt(512)
  fwd_bwd = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: fp8.einsum('btd,df->btf', x, w), x, w)[1](g))
  g = (1e-3 * jax.random.normal(kg, (4, 256, 1024))).astype(jnp.bfloat16)
  assert '__cublas$lt$matmul$f8' in fwd_bwd.lower(x, w, g).compile().as_text()
  y = jax.jit(lambda x, w: fp8.einsum('btd,df->btf', x, w))(x, w)
  dx, dw = fwd_bwd(x, w, g)
  qx, qw, qg = qdq_f64(x, ml_dtypes.float8_e4m3fn), qdq_f64(w.astype(jnp.bfloat16), ml_dtypes.float8_e4m3fn), \
      qdq_f64(g, ml_dtypes.float8_e5m2)
  assert rel(y, np.einsum('btd,df->btf', qx, qw)) < 1e-2
  assert rel(dx, np.einsum('btf,df->btd', qg, qw)) < 1e-2
  assert rel(dw, np.einsum('btd,btf->df', qx, qg)) < 1e-2


def small_model(**overrides):
  cfg = model.defaults()
  cfg.update(d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=1024, vocab_size=1024, **overrides)
  return model.create(model.resolve(cfg), seed=0)


def loss_and_grads(graphdef, params):
  seed = 1234
  tokens = jax.random.randint(jax.random.key(seed), (2, 1024), 0, 1024)
  batch = dict(inputs=tokens, positions=jnp.broadcast_to(jnp.arange(1024), (2, 1024)),
               segment_ids=jnp.ones((2, 1024), jnp.int32))

  def loss(p):
    logits = model.apply(graphdef, p, batch)[:, :-1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
  return jax.jit(jax.value_and_grad(loss))(params)


def test_model_in_fp8_close_to_bf16():
  graphdef, params = small_model()
  graphdef8, _ = small_model(matmul_precision='fp8')
  loss16, grads16 = loss_and_grads(graphdef, params)
  loss8, grads8 = loss_and_grads(graphdef8, params)
  assert abs(float(loss8) / float(loss16) - 1) < 1e-2
  for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads16)):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    assert np.isfinite(a).all() and a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95


def test_model_with_custom_vjps_equals_plain_autodiff(monkeypatch):
  graphdef, params = small_model()
  fused_loss, fused_grads = loss_and_grads(graphdef, params)
  monkeypatch.setattr(model, 'rms_norm', lambda x, s, eps: (
      x.astype(jnp.float32) * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + eps)
      * s.astype(jnp.float32)).astype(x.dtype))
  monkeypatch.setattr(model, 'swiglu', lambda g, u: (jax.nn.silu(g.astype(jnp.float32)) * u).astype(g.dtype))
  plain_loss, plain_grads = loss_and_grads(graphdef, params)
  assert abs(float(fused_loss) / float(plain_loss) - 1) < 1e-3
  for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(plain_grads)):
    assert rel(a, b) < 2e-2


def test_fp8_model_unrolled_equals_scanned():
  """The layer scan unrolled (no stacked residuals) computes what the loop does, FP8 included."""
  graphdef, params = small_model(matmul_precision='fp8')
  graphdef_unrolled, _ = small_model(matmul_precision='fp8', scan_unroll=2)
  loss, grads = loss_and_grads(graphdef, params)
  loss_unrolled, grads_unrolled = loss_and_grads(graphdef_unrolled, params)
  assert abs(float(loss_unrolled) / float(loss) - 1) < 1e-3
  for a, b in zip(jax.tree.leaves(grads_unrolled), jax.tree.leaves(grads)):
    assert rel(a, b) < 2e-2
