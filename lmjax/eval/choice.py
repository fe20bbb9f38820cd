"""Log-likelihood multiple-choice tasks from jsonl files (lm-eval-harness's log-likelihood scoring).

A task is a jsonl file the user writes, an example a line: {"context": str, "choices": [str, ...],
"answer": index of the right choice}. A choice's score is the sum of log p(choice tokens | BOS,
context tokens), the tokens split as lm-eval-harness splits them: the context's trailing whitespace
moves to the choice, and the choice's tokens are those of encode(context + choice) past
encode(context); a context too long for a row loses its start. acc: the best-scoring choice is the
answer; acc_norm: the same after dividing each score by the choice's UTF-8 length in bytes
(lm-eval-harness's length-normalised accuracy). scripts/make_legal_cloze.py builds such a task from
documents (lmjax/eval/tasks/legal_cloze.jsonl).

The scoring is in two parts: `choice_pairs` turns examples into (context ids, continuation ids)
pairs, and `score_pairs` scores any such pairs (`continuation_loglikelihoods`: on a run's params); the
lm-evaluation-harness adapter (lmjax/eval/harness.py) scores its loglikelihood requests with it too.
The continuations of one context share a row (`plan_rows`, `scores`): the context is computed once
for all its choices, not once a choice as the harness's Hugging Face backend computes it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import errors, losses, model, sharding
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.eval import heldout

Pair = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)


def read_task(path: str) -> list[dict]:
  """The examples of a task file (see the module docstring); an error names the line and field."""
  if not os.path.isfile(path):
    raise errors.MissingFile(f'task file {path!r} does not exist')
  examples = []
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{i}'
      try:
        ex = json.loads(line)
      except ValueError as e:
        raise errors.DataError(f'{where}: not JSON ({e})') from None
      if not isinstance(ex, dict) or not isinstance(ex.get('context'), str):
        raise errors.DataError(f'{where}: expected an object with "context" (a string), "choices", "answer"')
      choices = ex.get('choices')
      if (not isinstance(choices, list) or len(choices) < 2
          or not all(isinstance(c, str) and c for c in choices)):
        raise errors.DataError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
      answer = ex.get('answer')
      if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise errors.DataError(f'{where}: "answer"={answer!r}: expected the index of a choice, '
                               f'0..{len(choices) - 1}')
      examples.append(dict(context=ex['context'], choices=choices, answer=answer))
  if not examples:
    raise errors.DataError(f'{path}: no examples')
  return examples


def task_name(path: str) -> str:
  """The name a task's scores are recorded under: its file name without the extension."""
  return os.path.splitext(os.path.basename(path))[0]


# ----------------------------------------------------------------------------- examples -> pairs


def split_choice(tok: tokenizer_lib.Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
  """(context ids, choice ids) as lm-eval-harness splits them (see the module docstring)."""
  stripped = context.rstrip()
  context, choice = stripped, context[len(stripped):] + choice
  context_ids = tok.encode(context)
  return context_ids, tok.encode(context + choice)[len(context_ids):]


def choice_pairs(tok: tokenizer_lib.Tokenizer, examples: Sequence[dict], seq_len: int) -> list[Pair]:
  """One pair per (example, choice), in order: ([BOS] + context ids, choice ids) (`split_choice`).
  An error names the example and choice whose choice has no tokens of its own or more than a row's
  `seq_len`."""
  pairs = []
  for n, ex in enumerate(examples):
    for c, choice in enumerate(ex['choices']):
      context_ids, choice_ids = split_choice(tok, ex['context'], choice)
      if not choice_ids:
        raise errors.DataError(f'example {n} choice {c} ({choice!r}): no tokens of its own after the context')
      if len(choice_ids) > seq_len:
        raise errors.DataError(f'example {n} choice {c}: {len(choice_ids)} tokens, more than a row of '
                               f'config.train.seq_len={seq_len}')
      pairs.append(([tok.bos_id, *context_ids], choice_ids))
  return pairs


# ----------------------------------------------------------------------------- pairs -> log-likelihoods


def bucket(n: int) -> int:
  """`n` rounded up to a power of two from 16 to 256, then to a multiple of 256: a few compiled
  shapes, little padding."""
  return max(16, 1 << (n - 1).bit_length()) if n <= 256 else -(-n // 256) * 256


def row_width(tokens: int, seq_len: int) -> int:
  """The width of a batch whose longest row has `tokens` inputs: `bucket`, at most seq_len."""
  return min(seq_len, bucket(tokens))


@dataclasses.dataclass
class Row:
  """A context and continuations of it, scored in one row: the context's tokens, then each
  continuation's tokens but its last, each continuation seeing the context and itself only (`scores`
  masks the rest), its positions following the context's. The first token of every continuation is
  predicted from the context's last token."""
  context: list[int]
  continuations: list[tuple[int, list[int]]]  # (index of the pair, continuation ids)

  def __len__(self) -> int:
    return len(self.context) + sum(len(ids) - 1 for _, ids in self.continuations)


def plan_rows(pairs: Sequence[Pair], seq_len: int) -> list[Row]:
  """The rows of `pairs`, longest first: the pairs of one context share a row while it holds at
  most seq_len inputs, where the context is at least as long as the continuation (the choices of a
  question; a rolling window, one token of context, gains nothing); a pair longer than seq_len + 1
  tokens has a row of its own, cut from the left to seq_len + 1 tokens (as lm-eval-harness's Hugging
  Face backend cuts it). A pair needs a context token and a continuation of 1..seq_len tokens."""
  rows, shared = [], {}
  for i, (context, ids) in enumerate(pairs):
    if not context or not 0 < len(ids) <= seq_len:
      raise errors.DataError(f'pair {i}: {len(context)} context and {len(ids)} continuation tokens; '
                             f'expected at least 1 and 1..{seq_len} (the row length)')
    if len(context) + len(ids) - 1 > seq_len:
      seq = [*context, *ids][-(seq_len + 1):]
      rows.append(Row(seq[:-len(ids)], [(i, list(ids))]))
      continue
    if len(context) < len(ids):
      rows.append(Row(list(context), [(i, list(ids))]))
      continue
    row = shared.get(tuple(context))
    if row is None or len(row) + len(ids) - 1 > seq_len:
      row = shared[tuple(context)] = Row(list(context), [])
      rows.append(row)
    row.continuations.append((i, list(ids)))
  return sorted(rows, key=len, reverse=True)


def row_batch(rows: Sequence[Row], seq_len: int, batch_size: int
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[int], bool]:
  """(batch, slots, order, shared) of at most `batch_size` rows (the rest zero: segment 0, no slots).

  batch: 'inputs', 'positions', 'segment_ids' [batch_size, T] (T: `row_width` of the longest row);
  shared (some row holds several continuations): a row's context is segment 1, its continuations
  segments 2, 3, ...; else every row is one segment, 1 (the model's own attention applies).
  slots: per scored token [batch_size, S] (S: `bucket` of the most a row scores): 'position' (the
  row position whose hidden state predicts it), 'target' (the token) and 'request' (which of the
  batch's continuations it belongs to, in `order`; `bucket(len(order))` for an empty slot).
  order: the pair index of each of the batch's continuations."""
  width = row_width(max(map(len, rows)), seq_len)
  order = [i for row in rows for i, _ in row.continuations]
  n_slots = bucket(max(sum(len(ids) for _, ids in row.continuations) for row in rows))
  batch = {name: np.zeros((batch_size, width), np.int32) for name in ('inputs', 'positions', 'segment_ids')}
  slots = {name: np.zeros((batch_size, n_slots), np.int32) for name in ('position', 'target')}
  slots['request'] = np.full((batch_size, n_slots), bucket(len(order)), np.int32)
  request, shared = 0, any(len(row.continuations) > 1 for row in rows)
  for b, row in enumerate(rows):
    c = len(row.context)
    batch['inputs'][b, :c], batch['positions'][b, :c], batch['segment_ids'][b, :c] = row.context, range(c), 1
    at, s = c, 0
    for j, (_, ids) in enumerate(row.continuations):
      m = len(ids) - 1
      batch['inputs'][b, at:at + m], batch['positions'][b, at:at + m] = ids[:-1], range(c, c + m)
      batch['segment_ids'][b, at:at + m] = 2 + j if shared else 1
      slots['position'][b, s:s + m + 1] = [c - 1, *range(at, at + m)]
      slots['target'][b, s:s + m + 1] = ids
      slots['request'][b, s:s + m + 1] = request
      request, at, s = request + 1, at + m, s + m + 1
  return batch, slots, order, shared


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def scores(graphdef, params: dict, batch: dict, slots: dict, n_requests: int, loss_args: losses.Args,
           shared: bool) -> tuple[jax.Array, jax.Array]:
  """Per continuation of a `row_batch`: the nats of its tokens [n_requests] f32, and whether each of
  them is the argmax [n_requests] bool, both replicated on the mesh. Shared rows: a query sees the
  keys before it of its own segment and of the context (segment 1), by an explicit mask (plain-jnp
  attention, [rows, heads, T, T] f32 a layer: lower the batch size for long few-shot contexts);
  otherwise the model's attention (config.model.attention). The head runs on the slots only."""
  mask_btt = None
  if shared:
    segment_bt = batch['segment_ids']
    t = segment_bt.shape[1]
    causal_tt = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    mask_btt = causal_tt[None] & ((segment_bt[:, :, None] == segment_bt[:, None, :])
                                  | (segment_bt[:, None, :] == 1))
  x_btd, w_dv = model.hidden_and_head(graphdef, params, batch, mask_btt)
  x_bsd = jnp.take_along_axis(x_btd, slots['position'][..., None], axis=1)
  nats_bs, greedy_bs = losses.target_scores(x_bsd, w_dv, slots['target'], loss_args)
  request_n = slots['request'].reshape(-1)  # an empty slot's id, n_requests, is dropped by segment_sum
  nats_r = jax.ops.segment_sum(nats_bs.reshape(-1), request_n, num_segments=n_requests)
  missed_r = jax.ops.segment_sum((~greedy_bs).reshape(-1).astype(jnp.int32), request_n,
                                 num_segments=n_requests)
  return sharding.constrain(nats_r, ()), sharding.constrain(missed_r == 0, ())


def score_pairs(graphdef, params: dict, mesh: jax.sharding.Mesh, loss_args: losses.Args,
                pairs: Sequence[Pair], seq_len: int, batch_size: int) -> list[tuple[float, bool]]:
  """Per (context ids, continuation ids) pair, in order: (the sum over the continuation's tokens of
  log p(token | the tokens before it), whether each continuation token is the most likely one)
  (lm-eval-harness's loglikelihood and is_greedy). The context is used as given: add BOS to it where
  the model expects one.

  The pairs go into rows (`plan_rows`: the continuations of one context share its row; a pair too
  long loses the start of its context), `batch_size` rows at a time (`row_batch`: each batch as wide
  as its longest row needs) on `mesh`: each process places its share of a batch's rows
  (`sharding.global_batch`: rows over the data x fsdp axes); every batch is dispatched before any
  result is read (the scores come back replicated). The per-token scores are `losses.target_scores`
  by loss_args (its implementation and vocabulary); the sums are of f32 per-token values."""
  local = batch_size // jax.process_count()
  first = jax.process_index() * local
  rows = plan_rows(pairs, seq_len)
  pending = []
  with jax.set_mesh(mesh):
    for start in range(0, len(rows), batch_size):
      batch, slots, order, shared = row_batch(rows[start:start + batch_size], seq_len, batch_size)
      batch, slots = (sharding.global_batch({k: v[first:first + local] for k, v in x.items()}, mesh)
                      for x in (batch, slots))
      pending.append((order, scores(graphdef, params, batch, slots, bucket(len(order)), loss_args, shared)))
  out = [None] * len(pairs)
  for order, (nats, greedy) in pending:
    nats, greedy = np.asarray(nats), np.asarray(greedy)
    for r, i in enumerate(order):
      out[i] = (-float(nats[r]), bool(greedy[r]))
  return out


def continuation_loglikelihoods(ev: heldout.Evaluator, params: dict, pairs: Sequence[Pair]
                                ) -> list[tuple[float, bool]]:
  """`score_pairs` on a run's model, mesh, config.train.seq_len and config.train.batch_size, with
  plain cross-entropy over the tokenizer's vocabulary by config.loss.implementation."""
  return score_pairs(ev.steps.graphdef, params, ev.mesh, scoring_loss(ev), pairs,
                     ev.config.train.seq_len, ev.config.train.batch_size)


def scoring_loss(ev: heldout.Evaluator) -> losses.Args:
  """The run's loss settings for scoring: plain cross-entropy (no z-loss, no distillation) over the
  tokenizer's vocabulary, by config.loss.implementation."""
  return dataclasses.replace(ev.steps.loss, name='ce', z_loss=0.0)


def choice_loglikelihoods(ev: heldout.Evaluator, params: dict, examples: Sequence[dict]
                          ) -> list[np.ndarray]:
  """Per example, the log-likelihood of each choice given its context (float64 [choices])."""
  pairs = choice_pairs(ev.tokenizer, examples, ev.config.train.seq_len)
  ll = np.array([x for x, _ in continuation_loglikelihoods(ev, params, pairs)], np.float64)
  out, at = [], 0
  for ex in examples:
    out.append(ll[at:at + len(ex['choices'])])
    at += len(ex['choices'])
  return out


def accuracy(loglikelihoods: Sequence[np.ndarray], examples: Sequence[dict]) -> dict[str, float]:
  """acc and acc_norm (see the module docstring) of the choices' log-likelihoods; ties go to the
  first choice."""
  acc = norm = 0
  for ll, ex in zip(loglikelihoods, examples, strict=True):
    length = np.array([len(c.encode('utf-8')) for c in ex['choices']], np.float64)
    acc += int(np.argmax(ll) == ex['answer'])
    norm += int(np.argmax(np.asarray(ll) / length) == ex['answer'])
  return dict(acc=acc / len(examples), acc_norm=norm / len(examples))


def score_task(ev: heldout.Evaluator, params: dict, path: str) -> dict[str, float]:
  """acc and acc_norm of the task file at `path`, and its number of examples `n`."""
  examples = read_task(path)
  try:
    loglikelihoods = choice_loglikelihoods(ev, params, examples)
  except errors.DataError as e:
    raise errors.DataError(f'{path}: {e}') from None
  return dict(accuracy(loglikelihoods, examples), n=len(examples))
