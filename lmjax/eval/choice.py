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
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmjax import batch as batch_lib, errors, losses, model, sharding
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


def row_width(tokens: int, seq_len: int) -> int:
  """The width of a batch whose longest row has `tokens` inputs: a power of two up to 256, then a
  multiple of 256, at most seq_len; a few compiled shapes per task, little padding."""
  width = max(16, 1 << (tokens - 1).bit_length()) if tokens <= 256 else -(-tokens // 256) * 256
  return min(seq_len, width)


def continuation_rows(pairs: Sequence[Pair], seq_len: int, rows: int | None = None
                      ) -> dict[str, np.ndarray]:
  """One row per pair, in order, as a batch (lmjax/batch.py) of `rows` (default: one per pair; the
  rest zero) rows of T tokens (T: `row_width` of the longest): context then continuation, cut from the
  left to seq_len + 1 tokens, zero-padded on the right; the targets of the continuation's tokens
  weighted 1, every other weight 0. A pair needs a context token and a continuation of 1..seq_len
  tokens."""
  seqs = []
  for i, (context_ids, ids) in enumerate(pairs):
    if not context_ids or not 0 < len(ids) <= seq_len:
      raise errors.DataError(f'pair {i}: {len(context_ids)} context and {len(ids)} continuation tokens; '
                             f'expected at least 1 and 1..{seq_len} (the row length)')
    seqs.append(([*context_ids, *ids][-(seq_len + 1):], len(ids)))
  width = row_width(max(len(seq) - 1 for seq, _ in seqs), seq_len)
  out = {k: np.zeros((rows or len(seqs), width), dtype) for k, (dtype, axes) in batch_lib.FIELDS.items()
         if axes == ('B', 'T')}
  for r, (seq, n_continuation) in enumerate(seqs):
    t = len(seq) - 1
    out['inputs'][r, :t], out['targets'][r, :t] = seq[:-1], seq[1:]
    out['weights'][r, t - n_continuation:t] = 1.0
    out['segment_ids'][r, :t] = 1
    out['positions'][r, :t] = np.arange(t)
  out['source_id'] = np.zeros(rows or len(seqs), np.int32)
  return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def _row_scores(graphdef, params: dict, batch: dict, loss_args: losses.Args
                ) -> tuple[jax.Array, jax.Array]:
  """Per row: the weighted nats [B] f32, and whether every weighted target is the argmax [B] bool."""
  x_btd, w_dv = model.hidden_and_head(graphdef, params, batch)
  nats_bt, greedy_bt = losses.target_scores(x_btd, w_dv, batch['targets'], loss_args)
  scored_bt = batch['weights'] > 0
  return (nats_bt * batch['weights']).sum(-1), (greedy_bt | ~scored_bt).all(-1)


def score_pairs(graphdef, params: dict, mesh: jax.sharding.Mesh, loss_args: losses.Args,
                pairs: Sequence[Pair], seq_len: int, batch_size: int) -> list[tuple[float, bool]]:
  """Per (context ids, continuation ids) pair, in order: (the sum over the continuation's tokens of
  log p(token | the tokens before it), whether each continuation token is the most likely one)
  (lm-eval-harness's loglikelihood and is_greedy). The context is used as given: add BOS to it where
  the model expects one.

  Pairs go `batch_size` at a time (the last batch filled with zero rows) into `continuation_rows` of
  seq_len (a context too long loses its start; each batch as wide as its longest row needs, so pairs
  sorted by length pad little) on `mesh`: each process places its share of a batch's rows
  (`sharding.global_batch`: rows over the data x fsdp axes) and gathers every row's result. The
  per-token scores are `losses.target_scores` by loss_args (its implementation and vocabulary); the
  sums are of f32 per-token values."""
  local = batch_size // jax.process_count()
  first = jax.process_index() * local
  out = []
  with jax.set_mesh(mesh):
    for start in range(0, len(pairs), batch_size):
      batch = pairs[start:start + batch_size]
      rows = continuation_rows(batch, seq_len, rows=batch_size)
      chunk = {k: v[first:first + local] for k, v in rows.items()}
      scores = _row_scores(graphdef, params, sharding.global_batch(chunk, mesh), loss_args)
      nats, greedy = (np.asarray(x) for x in multihost_utils.process_allgather(scores, tiled=True))
      out += [(-float(nats[r]), bool(greedy[r])) for r in range(len(batch))]
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
