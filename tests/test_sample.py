"""Generation with a KV cache: greedy equals the argmax of the full forward recomputed each step,
padded prompts equal each prompt alone, EOS stops a row, sampling follows softmax(logits / T) within
the top-p nucleus, and (when tests/assets/hf holds them) transformers' greedy tokens."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import convert, decode, model

ASSETS = os.path.join(os.path.dirname(__file__), 'assets', 'hf')
GOLDEN = sorted(d for d in os.listdir(ASSETS) if os.path.isfile(os.path.join(ASSETS, d, 'golden.npz'))
                ) if os.path.isdir(ASSETS) else []
NO_GOLDEN = pytest.param('none', marks=pytest.mark.skip(
    reason='no golden assets in tests/assets/hf: run scripts/make_hf_golden.py where torch and '
           'transformers are installed and unpack its tar there (see the script\'s docstring)'))


def tiny(**overrides):
  return _tiny(tuple(sorted(overrides.items())))


@functools.lru_cache
def _tiny(overrides):
  cfg = model.defaults()
  cfg.update(dict(compute_dtype='float32', d_model=64, n_layers=2, d_ff=128, vocab_size=256))
  cfg.update(dict(overrides))
  args = model.resolve(cfg)
  graphdef, params = model.create(args, seed=0)
  if args.qkv_bias:  # created as zeros; random biases show if they are dropped anywhere
    keys = iter(jax.random.split(jax.random.key(1), 3))
    for name in ('bq_lhe', 'bk_lke', 'bv_lke'):
      params['layers'][name] = 0.5 * jax.random.normal(next(keys), params['layers'][name].shape)
  return args, graphdef, params


def greedy_by_full_forward(graphdef, params, prompt_bp, n, width=24):
  """Each step runs the whole sequence through model.apply and takes the argmax at its end. The
  sequence sits at the start of a zero buffer of `width` tokens: causal attention keeps the
  trailing zeros out of the logits read, and one compiled shape serves every step."""
  b, p = np.shape(prompt_bp)
  seq = np.zeros((b, width), np.int32)
  seq[:, :p] = prompt_bp
  batch = dict(positions=jnp.broadcast_to(jnp.arange(width), (b, width)),
               segment_ids=jnp.ones((b, width), jnp.int32))
  apply = jax.jit(model.apply, static_argnums=0)
  for t in range(p, p + n):
    logits = apply(graphdef, params, dict(batch, inputs=jnp.asarray(seq)))[:, t - 1]
    seq[:, t] = np.asarray(jnp.argmax(logits, -1))
  return seq[:, p:p + n]


@pytest.mark.parametrize('overrides', [
    {}, dict(qkv_bias=True, tie_embeddings=False, rope_scaling_factor=8.0, rope_original_max_position=16,
             d_head=32)])
def test_greedy_with_cache_equals_argmax_of_full_forward(overrides):
  args, graphdef, params = tiny(**overrides)
  prompt = np.random.default_rng(0).integers(0, args.vocab_size, (2, 7))
  out = decode.generate(graphdef, params, prompt, 10)
  assert out.shape == (2, 10) and out.dtype == np.int32
  np.testing.assert_array_equal(out, greedy_by_full_forward(graphdef, params, prompt, 10))


def test_padded_prompts_equal_each_prompt_alone():
  args, graphdef, params = tiny()
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, args.vocab_size, n) for n in (9, 3, 6)]
  together = decode.generate(args, params, prompts, 8)
  for row, prompt in zip(together, prompts):
    np.testing.assert_array_equal(row, greedy_by_full_forward(graphdef, params, prompt[None], 8)[0])


def test_eos_stops_a_row_and_fills_it():
  args, graphdef, params = tiny()
  prompt = np.random.default_rng(2).integers(0, args.vocab_size, (2, 5))
  free = decode.generate(graphdef, params, prompt, 8)
  eos = int(free[0, 2])
  stopped = decode.generate(graphdef, params, prompt, 8, eos_id=eos)
  first = int(np.argmax(free[0] == eos))
  np.testing.assert_array_equal(stopped[0, :first + 1], free[0, :first + 1])
  assert np.all(stopped[0, first:] == eos)
  row1_end = int(np.argmax(free[1] == eos)) if eos in free[1] else 8
  np.testing.assert_array_equal(stopped[1, :row1_end], free[1, :row1_end])


def test_sampling_follows_softmax_within_the_top_p_nucleus():
  args, graphdef, params = tiny()
  prompt = np.random.default_rng(3).integers(0, args.vocab_size, 5)
  batch = dict(inputs=jnp.asarray(prompt[None]), positions=jnp.arange(5)[None],
               segment_ids=jnp.ones((1, 5), jnp.int32))
  logits = np.asarray(model.apply(graphdef, params, batch)[0, -1], np.float64)
  temperature, rows = 0.5, 2048
  probs = np.exp((logits - logits.max()) / temperature)
  probs /= probs.sum()

  def draw(**kwargs):  # one compiled shape for every draw
    return decode.generate(graphdef, params, [prompt] * rows, 1, temperature=temperature, **kwargs)[:, 0]

  drawn = draw(seed=0)
  freq = np.bincount(drawn, minlength=args.vocab_size) / rows
  likely = probs > 0.01
  assert np.all(np.abs(freq - probs)[likely] < 4 * np.sqrt(probs * (1 - probs) / rows)[likely])
  np.testing.assert_array_equal(draw(seed=0), drawn)
  assert np.any(draw(seed=1) != drawn)
  order = np.argsort(-probs)
  nucleus = order[:int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1]
  in_top_p = set(draw(top_p=0.5).tolist())
  assert in_top_p <= set(nucleus.tolist()) and len(in_top_p) > 1
  np.testing.assert_array_equal(draw(top_p=1e-6), np.full(rows, np.argmax(logits)))


def test_bad_prompts_are_errors():
  args, _, params = tiny()
  with pytest.raises(ValueError, match='prompt_ids'):
    decode.generate(args, params, [[1, 2], []], 4)
  with pytest.raises(ValueError, match='got one sequence'):
    decode.generate(args, params, [1, 2, 3], 4)
  with pytest.raises(ValueError, match='max_new_tokens=0'):
    decode.generate(args, params, [[1, 2]], 0)


@pytest.mark.parametrize('family', GOLDEN or [NO_GOLDEN])
def test_greedy_matches_transformers_generate(family):
  directory = os.path.join(ASSETS, family)
  golden = np.load(os.path.join(directory, 'golden.npz'))
  args, params = convert.load(directory, compute_dtype='float32')
  n = golden['generated'].shape[1]
  hint = f'(smallest top-2 logit gap in transformers\' steps: {float(golden["margin"]):.1e})'
  np.testing.assert_array_equal(decode.generate(args, params, golden['prompt'], n), golden['generated'],
                                err_msg=hint)
  ragged = [row[mask == 1] for row, mask in zip(golden['ragged_prompt'], golden['ragged_mask'])]
  np.testing.assert_array_equal(decode.generate(args, params, ragged, n), golden['ragged_generated'],
                                err_msg=hint)
