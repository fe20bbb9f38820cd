"""Hugging Face import/export: logits of imported random checkpoints against a float64 numpy forward
written here in HF's own layout and names, bit-identical export round trips, sharded checkpoints on a
mesh, config.json spellings, errors of the project's types naming the culprit, exported files with a
new file's mode, and (when tests/assets/hf holds them) transformers' own logits."""
import json
import os
import stat

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from lmjax import convert, errors, model, sharding

ASSETS = os.path.join(os.path.dirname(__file__), 'assets', 'hf')
GOLDEN = sorted(d for d in os.listdir(ASSETS) if os.path.isfile(os.path.join(ASSETS, d, 'golden.npz'))
                ) if os.path.isdir(ASSETS) else []
NO_GOLDEN = pytest.param('none', marks=pytest.mark.skip(
    reason='no golden assets in tests/assets/hf: run scripts/make_hf_golden.py where torch and '
           'transformers are installed and unpack its tar there (see the script\'s docstring)'))
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


def hf_config(model_type='llama', **changes):
  cfg = dict(model_type=model_type, vocab_size=256, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             rope_theta=10_000.0, tie_word_embeddings=True, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2)
  cfg.update(changes)
  return cfg


CONFIGS = {
    'llama_tied': hf_config(),
    'llama_untied_llama3': hf_config(tie_word_embeddings=False, rope_scaling=LLAMA3),
    'qwen2_tied': hf_config('qwen2', rope_theta=1e6, rms_norm_eps=1e-6),
    'qwen2_untied_v5': hf_config('qwen2', tie_word_embeddings=False, rope_theta=None,
                                 rope_parameters=dict(rope_type='default', rope_theta=1e6)),
    # head_dim != hidden / heads, as in Mistral-Nemo
    'mistral_head_dim': hf_config('mistral', tie_word_embeddings=False, sliding_window=None, head_dim=32),
}


def hf_tensors(cfg, seed=0, dtype=np.float32):
  """Random tensors under HF names and shapes (Linear weights [out, in]); norms and biases random."""
  rng = np.random.default_rng(seed)
  d, f, v, n = cfg['hidden_size'], cfg['intermediate_size'], cfg['vocab_size'], cfg['num_hidden_layers']
  h, k = cfg['num_attention_heads'], cfg['num_key_value_heads']
  e = cfg.get('head_dim') or d // h

  def w(*shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)

  def noise(size, scale, mean=0.0):
    return (mean + scale * rng.standard_normal(size)).astype(dtype)

  t = {'model.embed_tokens.weight': w(v, d), 'model.norm.weight': noise(d, 0.2, 1.0)}
  if not cfg['tie_word_embeddings']:
    t['lm_head.weight'] = w(v, d)
  for i in range(n):
    p = f'model.layers.{i}.'
    t[p + 'input_layernorm.weight'] = noise(d, 0.2, 1.0)
    t[p + 'post_attention_layernorm.weight'] = noise(d, 0.2, 1.0)
    t[p + 'self_attn.q_proj.weight'] = w(h * e, d)
    t[p + 'self_attn.k_proj.weight'] = w(k * e, d)
    t[p + 'self_attn.v_proj.weight'] = w(k * e, d)
    t[p + 'self_attn.o_proj.weight'] = w(d, h * e)
    t[p + 'mlp.gate_proj.weight'] = w(f, d)
    t[p + 'mlp.up_proj.weight'] = w(f, d)
    t[p + 'mlp.down_proj.weight'] = w(d, f)
    if cfg['model_type'] == 'qwen2':
      for name, size in (('q', h * e), ('k', k * e), ('v', k * e)):
        t[p + f'self_attn.{name}_proj.bias'] = noise(size, 0.5)
  return t


def write_checkpoint(directory, cfg, tensors, files=1):
  """config.json and the tensors in one model.safetensors, or round-robin over `files` shards."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  if files == 1:
    save_file(tensors, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
    return
  names = [f'model-{j + 1:05d}-of-{files:05d}.safetensors' for j in range(files)]
  weight_map = {name: names[j % files] for j, name in enumerate(tensors)}
  for file in names:
    save_file({k: v for k, v in tensors.items() if weight_map[k] == file},
              os.path.join(directory, file), metadata={'format': 'pt'})
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump(dict(metadata={}, weight_map=weight_map), f)


def hf_reference_logits(tensors, cfg, ids):
  """float64 forward on HF names in HF semantics: x @ W.T + b, rotate_half RoPE (Llama-3.1 scaled
  frequencies when configured), repeat_kv GQA, SwiGLU."""
  p = {k: v.astype(np.float64) for k, v in tensors.items()}
  d, h, k = cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_key_value_heads']
  e, t = cfg.get('head_dim') or d // h, len(ids)
  rope = cfg.get('rope_parameters') or dict(cfg.get('rope_scaling') or {}, rope_theta=cfg['rope_theta'])
  inv = 1.0 / rope['rope_theta'] ** (np.arange(0, e, 2) / e)
  if rope.get('rope_type') == 'llama3':
    wavelen = 2 * np.pi / inv
    old, lo, hi = rope['original_max_position_embeddings'], rope['low_freq_factor'], rope['high_freq_factor']
    scaled = np.where(wavelen > old / lo, inv / rope['factor'], inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    inv = np.where(mid, (1 - smooth) * inv / rope['factor'] + smooth * inv, scaled)
  angles = np.arange(t)[:, None] * np.concatenate([inv, inv])[None]
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

  def rotary(x):  # [T, N, E]
    return x * cos + np.concatenate([-x[..., e // 2:], x[..., :e // 2]], -1) * sin

  def rms(x, name):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg['rms_norm_eps']) * p[name]

  def linear(x, name):
    return x @ p[name + '.weight'].T + p.get(name + '.bias', 0.0)

  x = p['model.embed_tokens.weight'][ids]
  for i in range(cfg['num_hidden_layers']):
    a = f'model.layers.{i}.'
    y = rms(x, a + 'input_layernorm.weight')
    q = rotary(linear(y, a + 'self_attn.q_proj').reshape(t, h, e))
    kk = np.repeat(rotary(linear(y, a + 'self_attn.k_proj').reshape(t, k, e)), h // k, axis=1)
    vv = np.repeat(linear(y, a + 'self_attn.v_proj').reshape(t, k, e), h // k, axis=1)
    s = np.einsum('the,she->hts', q, kk) / np.sqrt(e)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum('hts,she->the', s / s.sum(-1, keepdims=True), vv).reshape(t, h * e)
    x = x + linear(o, a + 'self_attn.o_proj')
    y = rms(x, a + 'post_attention_layernorm.weight')
    g = linear(y, a + 'mlp.gate_proj')
    x = x + linear(g / (1 + np.exp(-g)) * linear(y, a + 'mlp.up_proj'), a + 'mlp.down_proj')
  x = rms(x, 'model.norm.weight')
  return x @ p.get('lm_head.weight', p['model.embed_tokens.weight']).T


def padded_batch(ids_bt, mask_bt):
  """lmjax's fields for HF's attention_mask: pad tokens form segment 0 (no real token sees them),
  positions count real tokens from 0 (HF's position_ids from the mask)."""
  mask_bt = np.asarray(mask_bt, np.int32)
  return dict(inputs=jnp.asarray(ids_bt, jnp.int32), segment_ids=jnp.asarray(mask_bt),
              positions=jnp.asarray(np.maximum(np.cumsum(mask_bt, -1) - 1, 0)))


def logits_of(args, params, ids_bt, mask_bt=None):
  mask_bt = np.ones(np.shape(ids_bt), np.int32) if mask_bt is None else mask_bt
  return np.asarray(model.apply(model.abstract(args)[0], params, padded_batch(ids_bt, mask_bt)))


@pytest.mark.parametrize('family', sorted(CONFIGS))
def test_import_matches_an_independent_hf_layout_forward(family, tmp_path):
  cfg = CONFIGS[family]
  tensors = hf_tensors(cfg)
  write_checkpoint(tmp_path, cfg, tensors)
  args, params = convert.load(str(tmp_path), compute_dtype='float32')
  assert args.qkv_bias == (cfg['model_type'] == 'qwen2')
  ids = np.random.default_rng(1).integers(0, cfg['vocab_size'], 16)
  np.testing.assert_allclose(logits_of(args, params, ids[None])[0],
                             hf_reference_logits(tensors, cfg, ids), rtol=2e-4, atol=2e-4)


def test_imported_params_have_model_create_structure(tmp_path):
  cfg = CONFIGS['qwen2_untied_v5']
  write_checkpoint(tmp_path, cfg, hf_tensors(cfg))
  args, params = convert.load(str(tmp_path))
  _, expected, _ = model.abstract(args)
  assert jax_structure(params) == jax_structure(expected)
  assert model.param_count(args) == sum(x.size for x in jax_leaves(params))


def jax_structure(tree):
  return {k: jax_structure(v) if isinstance(v, dict) else (v.shape, str(v.dtype)) for k, v in tree.items()}


def jax_leaves(tree):
  return [x for v in tree.values() for x in (jax_leaves(v) if isinstance(v, dict) else [v])]


@pytest.mark.parametrize('family,dtype', [('llama_untied_llama3', 'float32'), ('qwen2_tied', 'bfloat16'),
                                          ('mistral_head_dim', 'float32')])
def test_export_round_trip_is_bit_identical(family, dtype, tmp_path):
  cfg = CONFIGS[family]
  src, dst = str(tmp_path / 'src'), str(tmp_path / 'dst')
  np_dtype = np.float32 if dtype == 'float32' else ml_dtypes.bfloat16
  write_checkpoint(src, cfg, hf_tensors(cfg, dtype=np_dtype))
  args, params = convert.load(src)
  convert.save(dst, args, params, hf_config=convert.read_config(src), dtype=dtype)
  before, after = convert.checkpoint_tensors(src), convert.checkpoint_tensors(dst)
  assert sorted(before) == sorted(after)
  for name, (_, x) in before.items():
    y = after[name][1]
    assert (x.dtype, x.shape) == (y.dtype, y.shape), name
    assert x.tobytes() == y.tobytes(), name
  exported = convert.read_config(dst)
  assert convert.model_fields(exported) == convert.model_fields(cfg)
  kept = (exported['bos_token_id'], exported['eos_token_id'], exported['model_type'])
  assert kept == (1, 2, cfg['model_type'])


def test_sharded_checkpoint_loads_onto_a_mesh_and_exports_in_shards(tmp_path):
  cfg = CONFIGS['qwen2_untied_v5']
  tensors = hf_tensors(cfg)
  write_checkpoint(tmp_path / 'one', cfg, tensors)
  write_checkpoint(tmp_path / 'three', cfg, tensors, files=3)
  args, single = convert.load(str(tmp_path / 'one'))
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  _, sharded = convert.load(str(tmp_path / 'three'), mesh=mesh)
  assert sharded['layers']['wq_ldhe'].sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert sharded['layers']['bk_lke'].sharding.spec == P(None, 'tensor', None)
  assert sharded['head_dv'].sharding.spec == P('fsdp', 'tensor')
  for a, b in zip(jax_leaves(single), jax_leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = str(tmp_path / 'exported')
  convert.save(out, args, sharded, max_shard_bytes=100_000)
  with open(os.path.join(out, 'model.safetensors.index.json')) as f:
    files = set(json.load(f)['weight_map'].values())
  assert len(files) > 2 and not os.path.exists(os.path.join(out, 'model.safetensors'))
  again = convert.checkpoint_tensors(out)
  for name, x in tensors.items():
    np.testing.assert_array_equal(again[name][1], x)


def test_config_json_in_both_rope_spellings():
  cfg = CONFIGS['llama_untied_llama3']
  args = model.Args(**convert.model_fields(cfg))
  assert (args.rope_scaling_factor, args.rope_original_max_position) == (8.0, 32)
  t4 = convert.config_dict(args, rope_spelling='transformers4')
  t5 = convert.config_dict(args, rope_spelling='transformers5')
  assert t4['rope_theta'] == 10_000.0 and t4['rope_scaling'] == LLAMA3 and 'rope_parameters' not in t4
  assert t5['rope_parameters'] == dict(LLAMA3, rope_theta=10_000.0)
  assert 'rope_theta' not in t5 and 'rope_scaling' not in t5
  for written in (t4, t5, dict(cfg, rope_scaling=dict(LLAMA3, type='llama3'))):
    assert convert.model_fields(written) == convert.model_fields(cfg)
  plain = model.Args(**convert.model_fields(CONFIGS['llama_tied']))
  assert convert.config_dict(plain)['rope_scaling'] is None
  assert convert.config_dict(plain, rope_spelling='transformers5')['rope_parameters'] == dict(
      rope_type='default', rope_theta=10_000.0)
  # The 1b variant exports as Llama-3.2-1B: rope scaling 32 / 1 / 4 / 8192, tied, 128256 rows.
  cfg_1b = model.defaults()
  cfg_1b.variant = '1b'
  args_1b = model.resolve(cfg_1b)
  fields = convert.model_fields(convert.config_dict(args_1b, rope_spelling='transformers5'))
  assert model.Args(**fields) == args_1b
  assert convert.config_dict(args_1b)['rope_scaling'] == dict(
      rope_type='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192)


@pytest.mark.parametrize('change,match', [
    (dict(model_type='gpt2'), "model_type='gpt2'"),
    (dict(model_type='mistral', sliding_window=128), 'sliding_window=128'),
    (dict(model_type='qwen2', use_sliding_window=True), 'use_sliding_window'),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(rope_scaling=dict(rope_type='yarn', factor=4.0)), "rope_scaling.rope_type='yarn'"),
    (dict(rope_parameters=dict(rope_type='linear', factor=2.0)), "rope_parameters.rope_type='linear'"),
    (dict(rope_scaling=dict(rope_type='llama3', factor=8.0)), 'rope_scaling.low_freq_factor'),
    (dict(num_hidden_layers=None), 'num_hidden_layers'),
])
def test_unsupported_configs_name_the_field(change, match):
  with pytest.raises(errors.CheckpointError, match=match):
    convert.model_fields(hf_config(**change))


def test_mistral_window_longer_than_the_context_is_full_attention():
  fields = convert.model_fields(hf_config('mistral', sliding_window=256, max_position_embeddings=256))
  assert fields['d_model'] == 64


def test_checkpoint_mismatches_name_the_first_tensor(tmp_path):
  cfg = CONFIGS['llama_untied_llama3']
  args = model.Args(**convert.model_fields(cfg))

  def load_with(tensors, name):
    write_checkpoint(tmp_path / name, cfg, tensors)
    return convert.load_params(str(tmp_path / name), args)

  tensors = hf_tensors(cfg)
  del tensors['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(errors.CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
    load_with(tensors, 'missing')
  tensors = hf_tensors(cfg)
  k_proj = 'model.layers.0.self_attn.k_proj.weight'
  tensors[k_proj] = tensors[k_proj].T.copy()
  with pytest.raises(errors.CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                                  r'\(64, 32\), expected \(32, 64\)'):
    load_with(tensors, 'shape')
  tensors = hf_tensors(cfg)
  tensors['model.layers.0.self_attn.o_proj.bias'] = np.zeros(64, np.float32)
  with pytest.raises(errors.CheckpointError,
                     match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
    load_with(tensors, 'extra')
  write_checkpoint(tmp_path / 'ok', cfg, hf_tensors(cfg))
  other = model.Args(**dict(convert.model_fields(cfg), rope_theta=500_000.0))
  with pytest.raises(errors.CheckpointError,
                     match=r'config.model.rope_theta=500000.0 but .*config.json gives 10000.0'):
    convert.load_params(str(tmp_path / 'ok'), other)
  with pytest.raises(errors.MissingFile, match='no model.safetensors'):
    convert.load_params(str(tmp_path), args)
  _, params = convert.load(str(tmp_path / 'ok'))
  with pytest.raises(FileExistsError, match='already holds a checkpoint'):
    convert.save(str(tmp_path / 'ok'), args, params)


def test_export_copies_the_tokenizer_files_all_with_a_new_files_mode(tmp_path):
  """0666 less the umask, as any new file (safetensors' own writer makes its files 0600)."""
  cfg = CONFIGS['llama_tied']
  write_checkpoint(tmp_path / 'src', cfg, hf_tensors(cfg))
  for file in ('tokenizer.json', 'tokenizer_config.json'):
    (tmp_path / 'src' / file).write_text('{}')
    (tmp_path / 'src' / file).chmod(0o600)  # the mode is the new file's, not the source's
  args, params = convert.load(str(tmp_path / 'src'))
  umask = os.umask(0o022)
  try:
    convert.save(str(tmp_path / 'dst'), args, params, tokenizer_from=str(tmp_path / 'src'))
    convert.save(str(tmp_path / 'shards'), args, params, max_shard_bytes=100_000)
  finally:
    os.umask(umask)
  assert sorted(os.listdir(tmp_path / 'dst')) == ['config.json', 'model.safetensors', 'tokenizer.json',
                                                  'tokenizer_config.json']
  assert len(os.listdir(tmp_path / 'shards')) > 3  # several shards, the index and config.json
  for directory in ('dst', 'shards'):
    for name in os.listdir(tmp_path / directory):
      assert stat.S_IMODE((tmp_path / directory / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize('family', GOLDEN or [NO_GOLDEN])
def test_logits_match_transformers_golden(family):
  """transformers' float32 logits, without padding and with left / right padding (pad positions
  are not compared)."""
  directory = os.path.join(ASSETS, family)
  golden = np.load(os.path.join(directory, 'golden.npz'))
  args, params = convert.load(directory, compute_dtype='float32')
  for prefix in ('', 'left_', 'right_'):
    ids = golden[f'{prefix}ids']
    mask = golden[f'{prefix}mask'] if prefix else np.ones(ids.shape, np.int32)
    diff = np.abs(logits_of(args, params, ids, mask) - golden[f'{prefix}logits'])[mask == 1]
    assert diff.max() <= 1e-4, f'{family} {prefix or "unpadded "}logits differ by {diff.max():.2e}'
