"""Model tests: shapes, causality, packing, GQA, parameter counts, and logits against a float64 numpy
implementation of the Llama forward pass written independently here."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmjax import model


def tiny_args(**overrides):
  cfg = model.defaults()
  cfg.compute_dtype = 'float32'
  cfg.update(overrides)
  return model.resolve(cfg)


def make_batch(tokens_bt, segment_ids_bt=None):
  tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
  b, t = tokens_bt.shape
  if segment_ids_bt is None:
    segment_ids_bt = np.ones((b, t), np.int32)
  segment_ids_bt = np.asarray(segment_ids_bt)
  positions = np.zeros((b, t), np.int32)
  for i in range(b):
    for j in range(1, t):
      positions[i, j] = positions[i, j - 1] + 1 if segment_ids_bt[i, j] == segment_ids_bt[i, j - 1] else 0
  return dict(inputs=tokens_bt, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids_bt))


def random_tokens(key, b, t, vocab):
  return jax.random.randint(jax.random.key(key), (b, t), 0, vocab)


def numpy_llama(params, tokens, args):
  """float64 Llama forward (HF LlamaModel semantics: rotate_half RoPE, GQA by repeat_kv, SwiGLU)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  t = tokens.shape[0]
  x = p['embed_vd'][tokens]
  inv = 1.0 / args.rope_theta ** (np.arange(0, args.head_dim, 2) / args.head_dim)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(v):  # [T, N, Dh]
    half = v.shape[-1] // 2
    rotated = np.concatenate([-v[..., half:], v[..., :half]], -1)
    return v * cos[:, None] + rotated * sin[:, None]

  def norm(v, scale):
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + args.norm_eps) * scale

  L = p['layers']
  for l in range(args.n_layers):
    h = norm(x, L['attn_norm'][l])
    q = rope(np.einsum('td,dhe->the', h, L['wq_ldhe'][l]))
    k = rope(np.einsum('td,dke->tke', h, L['wk_ldke'][l]))
    v = np.einsum('td,dke->tke', h, L['wv_ldke'][l])
    group = args.n_heads // args.n_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum('the,she->hts', q, k) / np.sqrt(args.head_dim)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum('hts,she,hed->td', a, v, L['wo_lhed'][l])
    h = norm(x, L['mlp_norm'][l])
    g = h @ L['w_gate_ldf'][l]
    x = x + ((g / (1 + np.exp(-g))) * (h @ L['w_up_ldf'][l])) @ L['w_down_lfd'][l]
  x = norm(x, p['final_norm'])
  head = p['embed_vd'].T if args.tie_embeddings else p['head_dv']
  return x @ head


@pytest.mark.parametrize('tied', [True, False])
def test_logits_match_float64_numpy_llama(tied):
  args = tiny_args(tie_embeddings=tied)
  graphdef, params = model.create(args, seed=0)
  tokens = random_tokens(1, 1, 24, args.vocab_size)
  logits = model.apply(graphdef, params, make_batch(tokens))
  assert logits.shape == (1, 24, args.vocab_size) and logits.dtype == jnp.float32
  ref = numpy_llama(params, np.asarray(tokens[0]), args)
  np.testing.assert_allclose(np.asarray(logits[0]), ref, rtol=2e-4, atol=2e-4)


def test_causality_future_tokens_never_change_past_logits():
  args = tiny_args()
  graphdef, params = model.create(args, seed=0)
  tokens = random_tokens(2, 2, 32, args.vocab_size)
  base = model.apply(graphdef, params, make_batch(tokens))
  for t in (0, 10, 30):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % args.vocab_size)
    out = model.apply(graphdef, params, make_batch(changed))
    np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(base[:, :t + 1]))
    assert not np.allclose(np.asarray(out[:, t + 1]), np.asarray(base[:, t + 1]))


def test_packed_documents_equal_each_document_alone():
  args = tiny_args()
  graphdef, params = model.create(args, seed=0)
  doc_a, doc_b = random_tokens(3, 1, 11, args.vocab_size), random_tokens(4, 1, 21, args.vocab_size)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segments = np.array([[1] * 11 + [2] * 21])
  out = model.apply(graphdef, params, make_batch(packed, segments))
  alone_a = model.apply(graphdef, params, make_batch(doc_a))
  alone_b = model.apply(graphdef, params, make_batch(doc_b))
  np.testing.assert_allclose(np.asarray(out[:, :11]), np.asarray(alone_a), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[:, 11:]), np.asarray(alone_b), rtol=1e-4, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = tiny_args(n_heads=4, n_kv_heads=2)
  mha = tiny_args(n_heads=4, n_kv_heads=4)
  graphdef, params = model.create(gqa, seed=0)
  mha_graphdef, _ = model.create(mha, seed=1)
  mha_params = jax.tree.map(lambda x: x, params)
  for name in ('wk_ldke', 'wv_ldke'):
    mha_params['layers'][name] = jnp.repeat(params['layers'][name], 2, axis=2)
  batch = make_batch(random_tokens(5, 2, 16, gqa.vocab_size))
  np.testing.assert_allclose(np.asarray(model.apply(graphdef, params, batch)),
                             np.asarray(model.apply(mha_graphdef, mha_params, batch)),
                             rtol=1e-4, atol=1e-5)


def test_llama3_8b_parameter_count():
  # Meta's Llama-3-8B has 8,030,261,248 parameters (sum over its safetensors; the model card's 8.03B).
  args = model.resolve(ml_collections.ConfigDict(dict(model.defaults(), variant='8b')))
  assert model.param_count(args) == 8_030_261_248
  # Llama-3.2-1B: 1,235,814,400 (tied embeddings; its model card rounds to 1.23B).
  args = model.resolve(ml_collections.ConfigDict(dict(model.defaults(), variant='1b')))
  assert model.param_count(args) == 1_235_814_400


@pytest.mark.parametrize('overrides', [dict(), dict(qkv_bias=True, d_head=48)])
def test_param_count_matches_created_params(overrides):
  args = tiny_args(tie_embeddings=False, n_layers=3, d_ff=200, **overrides)
  _, params = model.create(args, seed=0)
  assert model.param_count(args) == sum(x.size for x in jax.tree.leaves(params))


def test_flops_per_token_closed_form():
  args = tiny_args()
  n = model.param_count(args) - (2 * args.n_layers + 1) * args.d_model
  expected = 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * 64 / 2
  assert model.flops_per_token(args, 64) == expected


def test_bf16_compute_close_to_f32():
  args32 = tiny_args()
  args16 = tiny_args(compute_dtype='bfloat16')
  graphdef, params = model.create(args32, seed=0)
  graphdef16, _ = model.create(args16, seed=0)
  batch = make_batch(random_tokens(6, 2, 16, args32.vocab_size))
  a = np.asarray(model.apply(graphdef, params, batch))
  b = np.asarray(model.apply(graphdef16, params, batch))
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 3e-2


def test_llama3_rope_scaling_frequencies():
  # Llama-3.1 rope scaling (HF `_compute_llama3_parameters`): wavelengths above 8192/1 are divided by
  # 32, below 8192/4 kept, and interpolated in between.
  args = model.resolve(ml_collections.ConfigDict(dict(model.defaults(), variant='1b')))
  inv = np.asarray(model.rope_frequencies(args), np.float64)
  base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
  wavelen = 2 * np.pi / base
  expected = np.where(wavelen < 8192 / 4, base, base / 32)
  mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
  smooth = (8192 / wavelen[mid] - 1) / (4 - 1)
  expected[mid] = (1 - smooth) * base[mid] / 32 + smooth * base[mid]
  np.testing.assert_allclose(inv, expected, rtol=1e-5)


def test_bad_model_config_names_the_field():
  cfg = model.defaults()
  cfg.n_kv_heads = 3
  with pytest.raises(ValueError, match='n_kv_heads=3'):
    model.validate(cfg)
  cfg = model.defaults()
  cfg.attention = 'flash'
  with pytest.raises(ValueError, match='config.model.attention'):
    model.validate(cfg)
  cfg = model.defaults()
  cfg.rope_scaling_factor = 0.5
  with pytest.raises(ValueError, match='config.model.rope_scaling_factor=0.5'):
    model.validate(cfg)
  cfg = model.defaults()
  cfg.d_head = 33
  with pytest.raises(ValueError, match='config.model.d_head'):
    model.validate(cfg)
  cfg = model.defaults()
  cfg.matmul_precision = 'int8'
  with pytest.raises(ValueError, match='config.model.matmul_precision'):
    model.validate(cfg)


def _rel(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def plain_rms_norm(x, scale, eps):
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def plain_swiglu(gate, up):
  return gate / (1 + jnp.exp(-gate)) * up


@pytest.mark.parametrize('name,fused,plain,shapes', [
    ('rms_norm', lambda x, s: model.rms_norm(x, s, 1e-5), lambda x, s: plain_rms_norm(x, s, 1e-5),
     ((2, 12, 64), (64,))),
    ('swiglu', model.swiglu, plain_swiglu, ((2, 12, 96), (2, 12, 96)))])
def test_fused_elementwise_value_and_gradients_match_float64(name, fused, plain, shapes):
  """The custom-VJP RMSNorm and SwiGLU against autodiff of their plain formulas in float64 (f32
  inputs: 1e-5), and in bf16 they keep bf16 in and out."""
  keys = jax.random.split(jax.random.key(7), 3)
  a, b = (1 + jax.random.normal(k, shape) for k, shape in zip(keys, shapes))
  y, vjp = jax.vjp(fused, a, b)
  g = jax.random.normal(keys[2], y.shape)
  grads = vjp(g)
  with jax.enable_x64(True):
    y64, vjp64 = jax.vjp(plain, *(jnp.asarray(v, jnp.float64) for v in (a, b)))
    grads64 = vjp64(jnp.asarray(g, jnp.float64))
  assert _rel(y, y64) < 1e-5, name
  for got, ref in zip(grads, grads64):
    assert got.dtype == jnp.float32 and _rel(got, ref) < 1e-5, name
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16 if name == 'swiglu' else jnp.float32)
  y16, vjp16 = jax.vjp(fused, a16, b16)
  assert y16.dtype == jnp.bfloat16 and [v.dtype for v in vjp16(y16)] == [a16.dtype, b16.dtype]
  assert _rel(y16, y64) < 1e-2


def test_scan_unroll_does_not_change_the_model():
  args, unrolled = tiny_args(), tiny_args(scan_unroll=4)
  graphdef, params = model.create(args, seed=0)
  graphdef_unrolled, _ = model.create(unrolled, seed=0)
  batch = make_batch(random_tokens(8, 2, 16, args.vocab_size))
  np.testing.assert_allclose(np.asarray(model.apply(graphdef_unrolled, params, batch)),
                             np.asarray(model.apply(graphdef, params, batch)), rtol=1e-5, atol=1e-5)


def plain_model_ops(monkeypatch):
  """The model with autodiff through the plain RMSNorm and SwiGLU formulas (no custom VJPs)."""
  monkeypatch.setattr(model, 'rms_norm', lambda x, s, eps: plain_rms_norm(
      x.astype(jnp.float32), s.astype(jnp.float32), eps).astype(x.dtype))
  monkeypatch.setattr(model, 'swiglu', lambda g, u: plain_swiglu(
      g.astype(jnp.float32), u.astype(jnp.float32)).astype(g.dtype))


def test_model_loss_and_gradients_with_fused_ops_equal_plain_autodiff(monkeypatch):
  args = tiny_args()
  graphdef, params = model.create(args, seed=0)
  batch = make_batch(random_tokens(9, 2, 16, args.vocab_size))
  loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply(graphdef, p, batch))[..., 3])
  fused_loss, fused_grads = jax.value_and_grad(loss)(params)
  plain_model_ops(monkeypatch)
  plain_loss, plain_grads = jax.value_and_grad(loss)(params)
  assert abs(float(fused_loss) / float(plain_loss) - 1) < 1e-6
  for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(plain_grads)):
    assert _rel(a, b) < 1e-5
