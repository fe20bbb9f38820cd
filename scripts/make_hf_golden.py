"""Golden Hugging Face assets for the parity tests; runs where torch and transformers are installed.

  python scripts/make_hf_golden.py --out /tmp/hf_golden --tar $OUT/hf_golden.tar.gz
  # then, in the repository: mkdir -p tests/assets/hf && tar -xzf hf_golden.tar.gz -C tests/assets/hf

CI has neither torch nor transformers, so transformers' outputs are recorded here once. For each
family of `FAMILIES` a tiny model with random weights (every tensor random, norms and biases too, so
a swapped tensor shows) is saved with `save_pretrained` into `<out>/<family>/` (the untied Llama in
shards with an index), beside `golden.npz`:
  ids [B, T], logits [B, T, V]                      no padding
  left_ids, left_mask, left_logits                  left padding (attention_mask; position_ids
  right_ids, right_mask, right_logits               from the mask, as generate computes them)
  prompt [B, P], generated [B, N]                   greedy generate, no EOS
  ragged_prompt, ragged_mask, ragged_generated      the same on left-padded prompts of two lengths
  margin                                            the smallest top-1 - top-2 logit gap of any step
Pad positions' logits are not compared.

Then the export round trip (needs lmjax's requirements; jax runs on the CPU): lmjax.convert imports
each checkpoint, exports it in both RoPE spellings (in shards with an index for one family), and
transformers loads each export: its tensors and logits must equal the original's. And the export of a
run: `python -m lmjax.export` writes a run's checkpoint (random params, norms too, untied, Llama-3.1
RoPE scaling) with its tokenizer (one trained by lmjax's sentencepiece trainer, and a Hugging Face
tokenizer.json), and transformers' AutoTokenizer and AutoModelForCausalLM load the directory: its ids
(bos first for sentencepiece) and decoded texts must be lmjax's, its logits within 1e-4 of lmjax's on
the checkpoint's params. Results, lmjax's own logit difference, whether generate equals the argmax of
the forward recomputed each step, and the versions used go to `<out>/manifest.json`; the script exits
non-zero when a check fails (after packing, so the assets still come back).

--hf_1b DIR writes a random Llama-3.2-1B-shaped bfloat16 checkpoint (not packed) for the H200
acceptance run of importing, training and exporting a 1B model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

os.environ['JAX_PLATFORMS'] = 'cpu'  # f32 as on CI (no TF32 matmuls), and the GPU left to torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Llama-3.1-style scaling with a small original context, so that positions below 16 already reach
# the scaled and interpolated frequencies.
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
FAMILIES = {
    'llama_tied': ('llama', dict(tie_word_embeddings=True), 10_000.0, None),
    'llama_untied_llama3': ('llama', dict(tie_word_embeddings=False), 10_000.0, LLAMA3),
    'qwen2': ('qwen2', dict(tie_word_embeddings=True, use_sliding_window=False), 1_000_000.0, None),
    'mistral': ('mistral', dict(tie_word_embeddings=False, sliding_window=None), 10_000.0, None),
}
SHARDED = 'llama_untied_llama3'
B, T, PAD, P, N = 2, 12, 3, 6, 8


V5 = int(transformers.__version__.split('.')[0]) >= 5


def rope_kwargs(theta: float, scaling: dict | None) -> dict:
  if V5:
    return dict(rope_parameters=dict(scaling or dict(rope_type='default'), rope_theta=theta))
  return dict(rope_theta=theta, rope_scaling=scaling)


def make_model(model_type: str, extra: dict, theta: float, scaling: dict | None, seed: int):
  config = transformers.AutoConfig.for_model(model_type, **TINY, **extra, **rope_kwargs(theta, scaling))
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith('bias'):
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / p.shape[-1] ** 0.5)
  model.generation_config.eos_token_id = None  # generate exactly N tokens
  return model.float().eval()


def positions(mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(mask, -1) - 1, 0)


def logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions(mask))).logits
  return out.float().numpy()


def greedy(model, prompt: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, bool]:
  """(N new tokens of generate, the smallest top-2 logit gap, whether they equal the argmax of
  the full forward recomputed each step)."""
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(prompt), attention_mask=torch.tensor(mask),
                         max_new_tokens=N, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
  top2 = torch.stack(out.scores).topk(2, dim=-1).values
  new = out.sequences[:, prompt.shape[1]:].numpy()
  assert new.shape == (len(prompt), N), new.shape
  ids, m = prompt, mask
  for _ in range(N):
    token = logits(model, ids, m)[:, -1].argmax(-1)
    ids, m = np.concatenate([ids, token[:, None]], 1), np.concatenate([m, np.ones_like(m[:, :1])], 1)
  return new, float((top2[..., 0] - top2[..., 1]).min()), bool(np.array_equal(ids[:, -N:], new))


def golden(model, rng) -> dict:
  g = {}
  g['ids'] = rng.integers(3, TINY['vocab_size'], (B, T))
  g['logits'] = logits(model, g['ids'], np.ones((B, T), np.int64))
  for side in ('left', 'right'):
    mask = np.ones((B, T), np.int64)
    if side == 'left':
      mask[0, :PAD] = 0
    else:
      mask[0, T - PAD:] = 0
    g[f'{side}_ids'] = np.where(mask == 1, g['ids'], 0)
    g[f'{side}_mask'] = mask
    g[f'{side}_logits'] = logits(model, g[f'{side}_ids'], mask)
  g['prompt'] = rng.integers(3, TINY['vocab_size'], (B, P))
  g['generated'], margin, same = greedy(model, g['prompt'], np.ones((B, P), np.int64))
  g['ragged_mask'] = np.ones((B, P), np.int64)
  g['ragged_mask'][1, :2] = 0
  g['ragged_prompt'] = np.where(g['ragged_mask'] == 1, g['prompt'][::-1], 0)
  g['ragged_generated'], ragged_margin, ragged_same = greedy(model, g['ragged_prompt'], g['ragged_mask'])
  g['margin'] = np.float32(min(margin, ragged_margin))
  for k, v in g.items():
    assert np.all(np.isfinite(v)), k
  return g, same and ragged_same


def lmjax_check(directory: str, g: dict) -> float:
  """Max |lmjax - transformers| over the unpadded logits (what tests/test_convert.py asserts)."""
  import jax.numpy as jnp
  from lmjax import convert, model
  args, params = convert.load(directory, compute_dtype='float32')
  batch = dict(inputs=jnp.asarray(g['ids']), positions=jnp.asarray(positions(np.ones((B, T), np.int64))),
               segment_ids=jnp.ones((B, T), jnp.int32))
  lmjax_logits = np.asarray(model.apply(model.abstract(args)[0], params, batch))
  return float(np.abs(lmjax_logits - g['logits']).max())


def export_check(directory: str, family: str, hf_model, g: dict, scratch: str) -> dict:
  """lmjax import -> export (each RoPE spelling) -> transformers: tensors and logits unchanged."""
  from lmjax import convert
  args, params = convert.load(directory, compute_dtype='float32')
  result = {}
  for spelling in convert.ROPE_SPELLINGS:
    out = os.path.join(scratch, f'{family}-{spelling}')
    convert.save(out, args, params, hf_config=convert.read_config(directory), rope_spelling=spelling,
                 max_shard_bytes=100_000 if family == SHARDED else 2 << 30)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
    want, got = hf_model.state_dict(), back.state_dict()
    same = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # Equal weights: the logits differ only if the RoPE read from config.json does.
    diff = float(np.abs(logits(back, g['ids'], np.ones((B, T), np.int64)) - g['logits']).max())
    result[spelling] = dict(tensors_equal=bool(same), logits_max_diff=diff, ok=bool(same and diff <= 1e-6),
                            rope=str(getattr(back.config, 'rope_parameters', None)))
  return result


TEXTS = ['Permission is hereby granted, free of charge, to any person obtaining a copy.',
         'def f(x, *args):\n\tif x:\n        return {"a": [1, 2.5e-3]}  # comment 12345',
         '床前明月光，疑是地上霜。 naïve café — “quoted” 😀 beyond the vocabulary', '  two  spaces  ']


def run_tokenizer(kind: str, directory: str):
  """A tokenizer of TEXTS as a run would have it: lmjax's sentencepiece trainer, or a Hugging Face
  byte-level BPE (tokenizer.json, with a tokenizer_config.json naming bos and eos)."""
  from lmjax.data import tokenizer as tokenizer_lib
  rng = np.random.default_rng(0)
  lines = [line for t in TEXTS for line in t.split('\n')] + [
      ' '.join(rng.choice(TEXTS[0].split(), 12)) for _ in range(200)]
  if kind == 'sentencepiece':
    return tokenizer_lib.train(lines, os.path.join(directory, 'tokenizer.model'), vocab_size=400,
                               character_coverage=0.98)
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(lines, trainer=trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<s>', '</s>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(dict(bos_token='<s>', eos_token='</s>'), f)
  return tokenizer_lib.load(directory)


def export_run_check(kind: str, scratch: str) -> dict:
  """A run with a `kind` tokenizer exported by `python -m lmjax.export`, then loaded by transformers'
  AutoTokenizer and AutoModelForCausalLM: ids, decoded texts and logits against lmjax's."""
  import jax
  import jax.numpy as jnp
  from lmjax import checkpoint, model
  run, out = os.path.join(scratch, f'run-{kind}'), os.path.join(scratch, f'export-{kind}')
  tok = run_tokenizer(kind, os.path.join(run, 'tokenizer'))
  cfg = model.defaults()
  cfg.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512, tie_embeddings=False,
             rope_scaling_factor=8.0, rope_original_max_position=32, compute_dtype='float32')
  args = model.resolve(cfg)
  graphdef, params = model.create(args, seed=0)
  keys = iter(jax.random.split(jax.random.key(1), 8))
  params = jax.tree_util.tree_map_with_path(  # random norms: a swapped one shows in the logits
      lambda path, x: x + 0.2 * jax.random.normal(next(keys), x.shape) if 'norm' in str(path) else x, params)
  saver = checkpoint.Checkpointer(os.path.join(run, 'checkpoints'), async_save=False)
  saver.save(7, dict(params=params, step=jnp.int32(7)), {})
  saver.close()
  with open(os.path.join(run, 'config.json'), 'w') as f:
    json.dump(dict(model=cfg.to_dict()), f)
  with open(os.path.join(run, 'provenance.json'), 'w') as f:
    json.dump(dict(tokenizer=tok.path), f)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  exported = subprocess.run([sys.executable, '-m', 'lmjax.export', f'--workdir={run}', f'--out={out}'],
                            cwd=root, capture_output=True, text=True)
  if exported.returncode:
    return dict(ok=False, export=exported.stderr[-2000:])
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  bos = [tok.bos_id] if kind == 'sentencepiece' else []  # the sentencepiece tokenizer.json adds bos
  ids_equal = all(hf_tok(t).input_ids == bos + tok.encode(t) for t in TEXTS)
  decoded_equal = all(hf_tok.decode(tok.encode(t)) == t for t in TEXTS)
  diff = 0.0
  for t in TEXTS:
    ids = np.array([[tok.bos_id] + tok.encode(t)])
    batch = dict(inputs=jnp.asarray(ids), positions=jnp.asarray(positions(np.ones_like(ids))),
                 segment_ids=jnp.ones(ids.shape, jnp.int32))
    want = np.asarray(model.apply(graphdef, params, batch))
    diff = max(diff, float(np.abs(logits(hf_model, ids, np.ones_like(ids)) - want).max()))
  return dict(tokenizer_class=type(hf_tok).__name__, ids_equal=ids_equal, decoded_equal=decoded_equal,
              logits_max_diff=diff, files=sorted(os.listdir(out)),
              ok=bool(ids_equal and decoded_equal and diff <= 1e-4))


def write_1b(directory: str) -> None:
  config = transformers.AutoConfig.for_model(
      'llama', vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
      max_position_embeddings=131_072, tie_word_embeddings=True, bos_token_id=128_000,
      eos_token_id=128_001, **rope_kwargs(500_000.0, dict(
          rope_type='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192)))
  torch.manual_seed(0)
  dtype = dict(dtype=torch.bfloat16) if V5 else dict(torch_dtype=torch.bfloat16)
  model = transformers.AutoModelForCausalLM.from_config(config, **dtype)
  model.save_pretrained(directory, max_shard_size='1GB')
  print(f'wrote a Llama-3.2-1B-shaped checkpoint to {directory}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/hf_golden', help='assets directory (created)')
  parser.add_argument('--tar', default=None, help='packed assets (default: <out>.tar.gz)')
  parser.add_argument('--skip_export_check', action='store_true', help='golden files only')
  parser.add_argument('--hf_1b', default=None, help='also write a random 1B checkpoint here')
  flags = parser.parse_args()
  torch.manual_seed(0)
  os.makedirs(flags.out, exist_ok=True)
  versions = dict(torch=torch.__version__, transformers=transformers.__version__)
  manifest = dict(versions=versions, families={})
  failed = []
  for k, (family, (model_type, extra, theta, scaling)) in enumerate(FAMILIES.items()):
    directory = os.path.join(flags.out, family)
    hf_model = make_model(model_type, extra, theta, scaling, seed=k)
    hf_model.save_pretrained(directory, max_shard_size='100KB' if family == SHARDED else '50MB')
    g, generate_is_argmax = golden(hf_model, np.random.default_rng(k))
    np.savez(os.path.join(directory, 'golden.npz'), **g)
    info = dict(margin=float(g['margin']), generate_equals_forward_argmax=generate_is_argmax,
                files=sorted(os.listdir(directory)))
    if not flags.skip_export_check:
      try:
        import jax
        versions['jax'] = jax.__version__
        info['lmjax_logits_max_diff'] = lmjax_check(directory, g)
        with tempfile.TemporaryDirectory() as scratch:
          info['export'] = export_check(directory, family, hf_model, g, scratch)
      except ImportError as e:
        info['export'] = f'not run: {e} (install lmjax\'s requirements, or pass --skip_export_check)'
        failed.append(family)
      else:
        if info['lmjax_logits_max_diff'] > 1e-4 or not all(r['ok'] for r in info['export'].values()):
          failed.append(family)
    manifest['families'][family] = info
    print(family, json.dumps(info))
  if not flags.skip_export_check:
    manifest['export_run'] = {}
    for kind in ('sentencepiece', 'hugging_face'):
      try:
        with tempfile.TemporaryDirectory() as scratch:
          info = export_run_check(kind, scratch)
      except ImportError as e:
        info = dict(ok=False, export=f'not run: {e} (install lmjax\'s requirements, or pass '
                                     '--skip_export_check)')
      manifest['export_run'][kind] = info
      print(f'export_run {kind}', json.dumps(info))
      if not info['ok']:
        failed.append(f'export_run {kind}')
  with open(os.path.join(flags.out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  tar = flags.tar or flags.out.rstrip('/') + '.tar.gz'
  with tarfile.open(tar, 'w:gz') as t:
    for name in sorted(os.listdir(flags.out)):
      t.add(os.path.join(flags.out, name), arcname=name)
  print(f'packed {tar}: {os.path.getsize(tar) / 1e6:.2f} MB')
  if flags.hf_1b:
    write_1b(flags.hf_1b)
  if failed:
    sys.exit(f'checks failed for {failed}; see {os.path.join(flags.out, "manifest.json")}')


if __name__ == '__main__':
  main()
