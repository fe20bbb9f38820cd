"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling.

One compiled function per (model, prompt shape, max_new_tokens): a prefill writes the prompt's keys
and values into the cache and yields the first new token, then a `lax.while_loop` feeds one token
per step until max_new_tokens or until every row has produced `eos_id`. The layers run through
`model.attention_inputs` and `model.layer_output`, the same code as training, with attention over
the cache (`model.masked_attention`).

Prompts of different lengths are left-padded; a padded row is the same as its prompt alone: pad
slots carry segment id 0 (the prompt 1), so no real token attends to them, and positions start at 0
on each row's first real token (as transformers' generate does from the attention mask).

Cache: k and v [L, B, S, K, Dh] in compute dtype, S = prompt length + max_new_tokens, slot s of row
b holding the token at column s of the padded prompt followed by the generated tokens.

`python -m lmjax.sample` is its command line; the harness adapter (lmjax/eval/harness.py) and
sequence-level distillation (lmjax/distill/sequences.py) generate through it too.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax import errors, model


def generate(graphdef_or_args, params: dict, prompt_ids, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> np.ndarray:
  """New tokens [B, max_new_tokens] (int32) after each prompt.

  Args:
    graphdef_or_args: the model's `nnx.GraphDef` (from `model.create`) or its `model.Args`.
    params: the nested params dict (trained, or from `lmjax.convert`).
    prompt_ids: [B, P] ints, or B sequences of different (non-zero) lengths.
    max_new_tokens: tokens generated per row.
    temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
    top_p: sample only from the smallest set of most likely tokens whose probability reaches top_p.
    seed: the sampling key.
    eos_id: a row stops at this token; later positions are filled with it.
  """
  if isinstance(graphdef_or_args, model.Args):
    graphdef = model.abstract(graphdef_or_args)[0]
  else:
    graphdef = graphdef_or_args
  prompts = [np.asarray(p, np.int32) for p in prompt_ids]
  if prompts and all(p.ndim == 0 for p in prompts):
    raise errors.ConfigError('prompt_ids: expected [B, P] or B sequences, got one sequence (wrap it in a list)')
  if not prompts or any(p.ndim != 1 or p.size == 0 for p in prompts):
    raise errors.ConfigError('prompt_ids: expected [B, P] or B sequences, each of at least one token')
  if max_new_tokens < 1:
    raise errors.ConfigError(f'max_new_tokens={max_new_tokens}: expected at least 1')
  width = max(len(p) for p in prompts)
  tokens_bp = np.zeros((len(prompts), width), np.int32)
  lengths_b = np.array([len(p) for p in prompts], np.int32)
  for b, p in enumerate(prompts):
    tokens_bp[b, width - len(p):] = p
  out = _generate(graphdef, max_new_tokens, params, tokens_bp, lengths_b, jnp.float32(temperature),
                  jnp.float32(top_p), jax.random.key(seed), jnp.int32(-1 if eos_id is None else eos_id))
  return np.asarray(out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(graphdef, max_new_tokens, params, tokens_bp, lengths_b, temperature, top_p, key, eos_id):
  transformer = nnx.merge(graphdef, params)
  args = transformer.args
  b, width = tokens_bp.shape
  slots = width + max_new_tokens
  cdt = jnp.dtype(args.compute_dtype)
  cache_shape = (args.n_layers, b, slots, args.n_kv_heads, args.head_dim)
  cache = (jnp.zeros(cache_shape, cdt), jnp.zeros(cache_shape, cdt))
  pad_bp = width - lengths_b[:, None]
  column_p = jnp.arange(width)[None]
  segment_bs = jnp.concatenate([(column_p >= pad_bp).astype(jnp.int32),
                                jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
  positions_bp = jnp.maximum(column_p - pad_bp, 0)
  logits_bv, cache = _forward(transformer, cache, tokens_bp, positions_bp, 0, segment_bs)
  key, step_key = jax.random.split(key)
  first_b = _pick(logits_bv, temperature, top_p, step_key)
  # Positions a row never reaches (it stopped, or all did and the loop ended) keep eos_id.
  out_bn = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_b)

  def cond(state):
    i, _, done_b, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done_b)

  def body(state):
    i, out_bn, done_b, cache, key = state
    slot = width + i - 1  # the previous token's slot
    positions_b1 = (lengths_b + i - 1)[:, None]
    previous_b1 = jax.lax.dynamic_slice_in_dim(out_bn, i - 1, 1, axis=1)
    logits_bv, cache = _forward(transformer, cache, previous_b1, positions_b1, slot, segment_bs)
    key, step_key = jax.random.split(key)
    token_b = jnp.where(done_b, eos_id, _pick(logits_bv, temperature, top_p, step_key))
    return i + 1, out_bn.at[:, i].set(token_b), done_b | (token_b == eos_id), cache, key

  state = (1, out_bn, first_b == eos_id, cache, key)
  return jax.lax.while_loop(cond, body, state)[1]


def _forward(transformer, cache, tokens_bt, positions_bt, slot, segment_bs):
  """Logits [B, V] (f32) after the last of `tokens_bt`, written into cache slots slot..slot+T-1."""
  args = transformer.args
  cdt = jnp.dtype(args.compute_dtype)
  t, slots = tokens_bt.shape[1], segment_bs.shape[1]
  query_slot_t = slot + jnp.arange(t)
  query_segment_bt = jax.lax.dynamic_slice_in_dim(segment_bs, slot, t, axis=1)
  mask_bts = ((jnp.arange(slots)[None, None] <= query_slot_t[None, :, None])
              & (segment_bs[:, None, :] == query_segment_bt[:, :, None]))
  inv_freq = model.rope_frequencies(args)
  layers = {name: var[...] for name, var in vars(transformer.layers).items()
            if isinstance(var, nnx.Param)}

  def body(x_btd, layer):
    p, k_cache_bske, v_cache_bske = layer
    q_bthe, k_btke, v_btke = model.attention_inputs(p, x_btd, positions_bt, inv_freq, args)
    k_cache_bske = jax.lax.dynamic_update_slice_in_dim(k_cache_bske, k_btke.astype(cdt), slot, axis=1)
    v_cache_bske = jax.lax.dynamic_update_slice_in_dim(v_cache_bske, v_btke.astype(cdt), slot, axis=1)
    attn_bthe = model.masked_attention(q_bthe, k_cache_bske, v_cache_bske, mask_bts)
    return model.layer_output(p, x_btd, attn_bthe, args), (k_cache_bske, v_cache_bske)

  x_btd = jnp.take(transformer.embed_vd[...], tokens_bt, axis=0).astype(cdt)
  x_btd, cache = jax.lax.scan(body, x_btd, (layers, *cache))
  x_bd = model.rms_norm(x_btd[:, -1], transformer.final_norm[...], args.norm_eps)
  logits_bv = jnp.einsum('bd,dv->bv', x_bd, transformer.head().astype(cdt),
                         preferred_element_type=jnp.float32)
  return logits_bv, cache


def _pick(logits_bv, temperature, top_p, key):
  """Next tokens [B]: argmax when temperature is 0, else a top-p sample of softmax(logits / T)."""
  scaled_bv = logits_bv / jnp.maximum(temperature, 1e-6)
  sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  # Keep a token while the mass before it is below top_p (the most likely one always).
  keep_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p
  threshold_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1)
  sampled_b = jax.random.categorical(key, jnp.where(scaled_bv >= threshold_b[:, None], scaled_bv, -jnp.inf))
  return jnp.where(temperature > 0, sampled_b, jnp.argmax(logits_bv, axis=-1)).astype(jnp.int32)


def text_tokens(new: list[int], eos_id: int, vocab_size: int) -> list[int]:
  """The generated tokens up to EOS or to the first padding row of the model's vocabulary (an id past
  the tokenizer's `vocab_size`: no text)."""
  end = next((i for i, t in enumerate(new) if t == eos_id or t >= vocab_size), len(new))
  return new[:end]
