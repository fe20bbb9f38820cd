"""Evaluation of a run: held-out loss and bits per byte per source, log-likelihood multiple-choice
tasks, and the forgetting report of continued pretraining.

  python -m lmjax.evaluate --workdir=RUN [--checkpoint=STEP] [--tasks=A.jsonl,B.jsonl]
  python -m lmjax.evaluate --workdir=RUN --forgetting=RUN_A,RUN_B --domain=legal

The config is RUN's config.json unless `--config=configs/<name>.py` names another.

The first scores one checkpoint of RUN (the latest; `--checkpoint=0`: the params the run started
from, `config.init_from`'s) on every source's held-out batches and on the tasks, prints the results
and appends them to RUN/evaluations.jsonl under their step. The second prints the forgetting report
of the runs and writes it as a plot (`--plot`, default RUN/forgetting.png).

Held-out sets are the run's own: `Pipeline.eval_batches`, each source's held-out documents packed in
stored order into rows of `config.train.seq_len` tokens, the batches the trainer's
`eval/<source>/loss` reads (`--config.data.eval.num_batches` bounds them).

Bits per byte, a loss that does not depend on the tokenizer. Over the targets of a source's held-out
batches (each document's tokens after its BOS, and its EOS; the context of a target is its
document's tokens before it in the same row),
    bpb = sum of -ln p(target | context) / (ln 2 x sum of bytes(target)),
where bytes(t) is the number of UTF-8 bytes that token t adds to the decoded text (`token_bytes`: a
piece's text with '\u2581' read as a space, a byte-fallback piece <0xNN> 1, a byte-level BPE token its
length in the byte alphabet, BOS/EOS/UNK and special tokens 0). Over whole documents the denominator
is therefore the UTF-8 size of their text whatever the tokenizer (one that prepends a space to each
text, as Llama 2's does, counts that space too), and models with different tokenizers compare on the
same documents (let num_batches cover all held-out documents: a batch budget covers different text
under different tokenizers).

Tasks (lm-eval-harness's log-likelihood scoring). A task is a jsonl file the user writes, an example
a line: {"context": str, "choices": [str, ...], "answer": index of the right choice}. A choice's score
is the sum of log p(choice tokens | BOS, context tokens), the tokens split as lm-eval-harness splits
them: the context's trailing whitespace moves to the choice, and the choice's tokens are those of
encode(context + choice) past encode(context); a context too long for a row loses its start. acc:
the best-scoring choice is the answer; acc_norm: the same after dividing each score by the choice's
UTF-8 length in bytes (lm-eval-harness's length-normalised accuracy). `cloze` builds such a task from
documents (scripts/make_legal_cloze.py: tests/assets/eval/legal_cloze.jsonl).

The forgetting report: from the evaluations of one or more continued-pretraining runs (metrics.jsonl
and evaluations.jsonl), per evaluated step the domain's loss and its gain over the starting model
(step 0, `--checkpoint=0`), and the general sources' mean loss and its change (> 0: forgetting).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from typing import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lmjax import (batch as batch_lib, checkpoint, errors, fs, init_from, losses, model, sharding,
                   steps as steps_lib, trainer)
from lmjax.data import tokenizer as tokenizer_lib

EVALUATIONS = 'evaluations.jsonl'  # what this module's CLI records in a run directory
_BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')


# ----------------------------------------------------------------------------- bytes per token


def token_bytes(tok: tokenizer_lib.Tokenizer) -> np.ndarray:
  """[V] int64: the UTF-8 bytes each token id adds to decoded text (see the module docstring)."""
  special = {tok.bos_id, tok.eos_id}
  byte_level = False
  if isinstance(tok, tokenizer_lib.HFTokenizer):
    with open(tok.path) as f:
      spec = json.load(f)
    special |= {t['id'] for t in spec.get('added_tokens', []) if t.get('special')}
    byte_level = 'ByteLevel' in json.dumps(spec.get('decoder'))
  else:
    special.add(tokenizer_lib.UNK_ID)
  out = np.zeros(tok.vocab_size, np.int64)
  for i in range(tok.vocab_size):
    piece = tok.id_to_piece(i)
    if i in special or piece is None:
      continue
    if byte_level:
      out[i] = len(piece)  # one character of the byte alphabet per byte
    elif _BYTE_PIECE.fullmatch(piece):
      out[i] = 1
    else:
      out[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
  return out


@jax.jit
def _target_bytes(batch: dict, bytes_v: jax.Array) -> jax.Array:
  return (bytes_v[batch['targets']] * batch['weights']).sum()


# ----------------------------------------------------------------------------- a run's model and data


@dataclasses.dataclass
class Evaluator:
  """What evaluating a run's params needs: its mesh, steps (model graph, eval step), tokenizer and
  held-out batches by source (empty when built without data)."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  steps: steps_lib.Steps
  tokenizer: tokenizer_lib.Tokenizer
  eval_batches: dict[str, list[dict[str, np.ndarray]]]

  @functools.cached_property
  def bytes_v(self) -> jax.Array:
    return jax.device_put(token_bytes(self.tokenizer),
                          jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))


def of_run(run: trainer.Run) -> Evaluator:
  """The Evaluator of a run set up by `trainer.setup` (for hooks)."""
  return Evaluator(run.config, run.mesh, run.steps, run.pipeline.tokenizer, run.pipeline.eval_batches())


def build(config: ml_collections.ConfigDict, workdir: str, data: bool = True) -> Evaluator:
  """The Evaluator of the run of `config` in `workdir`, built as `trainer.setup` builds it (the same
  tokenizer, held-out data and steps) but restoring and writing nothing except prepared data.

  data=False skips the data (no held-out batches): the tokenizer is the one the run recorded in its
  provenance.json, so the run must have started."""
  mesh = sharding.make_mesh(config.mesh)
  if data:
    pipeline = trainer.build_pipeline(config, workdir)
    tok, sources, batches = pipeline.tokenizer, pipeline.sources, pipeline.eval_batches()
  else:
    tok, sources, batches = tokenizer_lib.load(run_tokenizer_path(workdir)), None, {}
  steps = steps_lib.build(config, mesh, tok.vocab_size, sources, tok.path)
  return Evaluator(config, mesh, steps, tok, batches)


def run_tokenizer_path(workdir: str) -> str:
  """The tokenizer file a run trained with, as its provenance.json records it."""
  path = os.path.join(workdir, 'provenance.json')
  if not fs.isfile(path):
    raise errors.MissingFile(f'{path} does not exist: expected the directory of a run that has started')
  tok = json.loads(fs.read_text(path)).get('tokenizer')
  if not tok or not fs.exists(tok):
    raise errors.MissingFile(f'{path}: the tokenizer it records ({tok!r}) does not exist')
  return tok


def load_params(ev: Evaluator, workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, params) of the run in `workdir`: its latest checkpoint (step None), checkpoint `step`,
  or for step 0 the params it started from (config.init_from's, else the seed's initialisation)."""
  if step == 0:
    params = ev.steps.init(ev.config.seed)['params']
    if ev.config.init_from:
      params = init_from.load(ev.config, ev.steps.args, params, ev.steps.abstract_state['params'],
                              ev.mesh)
    return 0, params
  directory = os.path.join(workdir, 'checkpoints')
  # Finished checkpoints only (a save in flight has no commit marker yet); nothing is moved or deleted.
  saved = sorted(int(d) for d in fs.listdir(directory)
                 if d.isdigit() and fs.isfile(os.path.join(directory, d, 'commit_success.txt')))
  if not saved or (step is not None and step not in saved):
    want = 'a finished checkpoint' if step is None else f'checkpoint {step}'
    raise errors.CheckpointError(f'{directory}: expected {want}; found steps {saved} '
                            '(0 = the starting params)')
  step = saved[-1] if step is None else step
  ckpt = checkpoint.Checkpointer(directory)
  try:
    state, _ = ckpt.restore(step, ev.steps.abstract_state)
  finally:
    ckpt.close()
  return int(step), state['params']


# ----------------------------------------------------------------------------- held-out loss and bpb


def heldout(ev: Evaluator, params: dict) -> dict[str, dict[str, float]]:
  """Per source: `loss` (nats per target token), `bpb` (bits per byte), and the `tokens` and `bytes`
  of the targets, over its held-out batches."""
  out = {}
  with jax.set_mesh(ev.mesh):
    for source, batches in ev.eval_batches.items():
      nats = tokens = nbytes = 0.0
      for b in batches:
        placed = sharding.global_batch(b, ev.mesh)
        loss_sum, weight_sum = jax.device_get(ev.steps.eval_step(params, placed))
        nats, tokens = nats + float(loss_sum), tokens + float(weight_sum)
        nbytes += float(jax.device_get(_target_bytes(placed, ev.bytes_v)))
      out[source] = dict(loss=nats / max(tokens, 1.0), bpb=nats / (math.log(2) * max(nbytes, 1.0)),
                         tokens=tokens, bytes=nbytes)
  return out


def hook(run: trainer.Run, writer: trainer.MetricsWriter, every: int | None = None) -> trainer.Hook:
  """A trainer hook that records `eval/<source>/bpb` every `every` steps (default
  config.train.eval_every) and at the end, beside the default hooks' `eval/<source>/loss`:

    r = trainer.setup(config, workdir)
    writer = trainer.MetricsWriter(r)
    trainer.train(r, trainer.default_hooks(r, writer) + [evaluate.hook(r, writer)])
  """
  ev = of_run(run)

  def record(info: trainer.StepInfo):
    metrics = heldout(ev, info.state['params'])
    writer.write(info.step, {f'eval/{s}/bpb': m['bpb'] for s, m in metrics.items()})

  return trainer.Hook(every or run.config.train.eval_every, record, at_start=True)


# ----------------------------------------------------------------------------- multiple-choice tasks


def read_task(path: str) -> list[dict]:
  """The examples of a task file (see the module docstring); an error names the line and field."""
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


def split_choice(tok: tokenizer_lib.Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
  """(context ids, choice ids) as lm-eval-harness splits them (see the module docstring)."""
  stripped = context.rstrip()
  context, choice = stripped, context[len(stripped):] + choice
  context_ids = tok.encode(context)
  return context_ids, tok.encode(context + choice)[len(context_ids):]


def choice_rows(tok: tokenizer_lib.Tokenizer, examples: Sequence[dict], seq_len: int
                ) -> dict[str, np.ndarray]:
  """One row per (example, choice), in order, as a batch (lmjax/batch.py) of R rows of T tokens
  (T: the longest row rounded up to a power of two, at most seq_len): [BOS] context choice, the
  targets of the choice's tokens weighted 1, rows cut from the left to fit."""
  rows = []
  for n, ex in enumerate(examples):
    for c, choice in enumerate(ex['choices']):
      context_ids, choice_ids = split_choice(tok, ex['context'], choice)
      if not choice_ids:
        raise errors.DataError(f'example {n} choice {c} ({choice!r}): no tokens of its own after the context')
      if len(choice_ids) > seq_len:
        raise errors.DataError(f'example {n} choice {c}: {len(choice_ids)} tokens, more than a row of '
                         f'config.train.seq_len={seq_len}')
      seq = ([tok.bos_id] + list(context_ids) + list(choice_ids))[-(seq_len + 1):]
      rows.append((seq, len(choice_ids)))
  longest = max(len(seq) - 1 for seq, _ in rows)
  width = min(seq_len, 1 << (longest - 1).bit_length())
  out = {k: np.zeros((len(rows), width), dtype) for k, (dtype, axes) in batch_lib.FIELDS.items()
         if axes == ('B', 'T')}
  for r, (seq, n_choice) in enumerate(rows):
    t = len(seq) - 1
    out['inputs'][r, :t], out['targets'][r, :t] = seq[:-1], seq[1:]
    out['weights'][r, t - n_choice:t] = 1.0
    out['segment_ids'][r, :t] = 1
    out['positions'][r, :t] = np.arange(t)
  out['source_id'] = np.zeros(len(rows), np.int32)
  return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def _row_nats(graphdef, params: dict, batch: dict, loss_args: losses.Args) -> jax.Array:
  """Weighted nats per row [B]."""
  x_btd, w_dv = model.hidden_and_head(graphdef, params, batch)
  return (losses.per_token(x_btd, w_dv, batch, loss_args) * batch['weights']).sum(-1)


def choice_loglikelihoods(ev: Evaluator, params: dict, examples: Sequence[dict]) -> list[np.ndarray]:
  """Per example, the log-likelihood of each choice given its context (float64 [choices])."""
  rows = choice_rows(ev.tokenizer, examples, ev.config.train.seq_len)
  n, b = len(rows['source_id']), ev.config.train.batch_size
  total = -(-n // b) * b
  rows = {k: np.concatenate([v, np.zeros((total - n, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
  loss_args = dataclasses.replace(ev.steps.loss, name='ce', z_loss=0.0)
  local = b // jax.process_count()
  first = jax.process_index() * local
  nats = []
  with jax.set_mesh(ev.mesh):
    for start in range(0, total, b):
      chunk = {k: v[start + first:start + first + local] for k, v in rows.items()}
      per_row = _row_nats(ev.steps.graphdef, params, sharding.global_batch(chunk, ev.mesh), loss_args)
      nats.append(np.asarray(multihost_utils.process_allgather(per_row, tiled=True)))
  ll = -np.concatenate(nats)[:n].astype(np.float64)
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


def score_task(ev: Evaluator, params: dict, path: str) -> dict[str, float]:
  """acc and acc_norm of the task file at `path`, and its number of examples `n`."""
  examples = read_task(path)
  try:
    loglikelihoods = choice_loglikelihoods(ev, params, examples)
  except errors.DataError as e:
    raise errors.DataError(f'{path}: {e}') from None
  return dict(accuracy(loglikelihoods, examples), n=len(examples))


def task_name(path: str) -> str:
  """The name a task's scores are recorded under: its file name without the extension."""
  return os.path.splitext(os.path.basename(path))[0]


def cloze(docs: Sequence[str], n: int, *, context_chars: int = 240, choice_chars: int = 48,
          num_choices: int = 4, seed: int = 0) -> list[dict]:
  """A cloze task from documents, deterministic in its arguments: each example's context is a
  passage of one document (about context_chars, ending before a space), its choices the passage's
  true continuation and continuations from other documents, each starting at a space and cut at
  the first whitespace past choice_chars; the true one at a seeded position."""
  min_chars = 2 * (context_chars + choice_chars)
  long_enough = [d for d in docs if len(d) >= min_chars]
  if len(long_enough) < num_choices:
    raise errors.DataError(f'cloze: {len(long_enough)} documents of at least {min_chars} characters; '
                     f'expected at least num_choices={num_choices}')
  rng = np.random.default_rng(seed)

  def continuation(doc: str, at: int) -> str:
    end = at + choice_chars
    while end < len(doc) and not doc[end].isspace():
      end += 1
    return doc[at:end]

  def space_after(doc: str, at: int) -> int:
    while at < len(doc) and doc[at] != ' ':
      at += 1
    return at

  examples = []
  for _ in range(100 * n):
    if len(examples) == n:
      return examples
    i = int(rng.integers(len(long_enough)))
    doc = long_enough[i]
    cut = space_after(doc, int(rng.integers(context_chars, len(doc) - 2 * choice_chars)))
    true = continuation(doc, cut)
    others = rng.choice([j for j in range(len(long_enough)) if j != i], num_choices - 1, replace=False)
    wrong = []
    for j in others:
      other = long_enough[j]
      start = space_after(other, int(rng.integers(len(other) - 2 * choice_chars)))
      wrong.append(continuation(other, start))
    context = doc[space_after(doc, max(0, cut - context_chars)) + 1:cut]
    if len(true.strip()) < choice_chars // 2 or any(len(w.strip()) < choice_chars // 2 or w == true
                                                    for w in wrong):
      continue  # a continuation ran into the end of its document
    answer = int(rng.integers(num_choices))
    examples.append(dict(context=context, choices=wrong[:answer] + [true] + wrong[answer:],
                         answer=answer))
  raise errors.DataError(f'cloze: {len(examples)} of {n} examples after {100 * n} draws: the documents '
                   f'have too few spaces to cut continuations of about choice_chars={choice_chars}')


# ----------------------------------------------------------------------------- one checkpoint


def scores(ev: Evaluator, params: dict, tasks: Sequence[str] = ()) -> dict[str, float]:
  """A record of params' held-out `eval/<source>/loss`, `eval/<source>/bpb` and each task's
  `task/<name>/acc`, `task/<name>/acc_norm`."""
  record = {}
  for source, m in heldout(ev, params).items():
    record.update({f'eval/{source}/loss': m['loss'], f'eval/{source}/bpb': m['bpb']})
  for path in tasks:
    task = score_task(ev, params, path)
    record.update({f'task/{task_name(path)}/{k}': task[k] for k in ('acc', 'acc_norm')})
  return record


def save_record(workdir: str, step: int, record: Mapping[str, float]) -> None:
  """Appends {step, **record} to <workdir>/evaluations.jsonl (process 0 only)."""
  if jax.process_index() == 0:
    fs.makedirs(workdir)
    fs.append_text(os.path.join(workdir, EVALUATIONS),
                   json.dumps({'step': step, **{k: float(v) for k, v in record.items()}}) + '\n')


# ----------------------------------------------------------------------------- the forgetting report


def eval_records(run_dir: str) -> dict[int, dict[str, float]]:
  """{step: {'eval/<source>/loss': ..., ...}} of a run: the `eval/` and `task/` values of its
  metrics.jsonl, then its evaluations.jsonl (a later value for the same step and key wins)."""
  out: dict[int, dict[str, float]] = {}
  for name in ('metrics.jsonl', EVALUATIONS):
    path = os.path.join(run_dir, name)
    if not fs.isfile(path):
      continue
    with fs.open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          values = {k: v for k, v in r.items() if k.startswith(('eval/', 'task/'))}
          if values:
            out.setdefault(int(r['step']), {}).update(values)
  if not out:
    raise errors.MissingFile(f'{run_dir}: no evaluations in metrics.jsonl or {EVALUATIONS}')
  return dict(sorted(out.items()))


def forgetting(runs: Mapping[str, str] | Sequence[str], domain: str,
               general: Sequence[str] | None = None, metric: str = 'loss') -> list[dict]:
  """The forgetting table: a row per run and evaluated step, with the step-0 evaluation (the
  starting model) as the reference.

  Args:
    runs: {label: run directory}, or directories (labelled by their base names).
    domain: the source trained for.
    general: the sources to keep (default: every evaluated source but the domain).
    metric: 'loss' or 'bpb' (`eval/<source>/<metric>`).
  Returns:
    Rows {run, step, domain, domain_gain (start - now: > 0 is learning), general (the mean over
    the general sources), general_change (now - start: > 0 is forgetting), <source>_change for each
    general source}.
  """
  if metric not in ('loss', 'bpb'):
    raise errors.ConfigError(f'metric={metric!r}: expected loss or bpb')
  if not isinstance(runs, Mapping):
    runs = {os.path.basename(os.path.normpath(d)): d for d in runs}
  rows = []
  for label, run_dir in runs.items():
    records = eval_records(run_dir)
    key = lambda s: f'eval/{s}/{metric}'
    if 0 not in records or key(domain) not in records[0]:
      raise errors.DataError(f'{run_dir}: no {key(domain)} at step 0 (the starting model); record it with '
                       f'python -m lmjax.evaluate --config=... --workdir={run_dir} --checkpoint=0')
    start = records[0]
    sources = sorted(k.split('/')[1] for k in start
                     if k.startswith('eval/') and k.endswith(f'/{metric}'))
    names = [s for s in sources if s != domain] if general is None else list(general)
    missing = [s for s in names if key(s) not in start]
    if missing or not names:
      raise errors.DataError(f'{run_dir}: general sources {missing or names} have no {metric} at step 0; '
                       f'evaluated: {sources}')
    for step, r in records.items():
      if key(domain) not in r or any(key(s) not in r for s in names):
        continue  # a record of task scores alone, or of another metric
      changes = {f'{s}_change': r[key(s)] - start[key(s)] for s in names}
      general_now = float(np.mean([r[key(s)] for s in names]))
      general_start = float(np.mean([start[key(s)] for s in names]))
      rows.append(dict(run=label, step=step, domain=r[key(domain)],
                       domain_gain=start[key(domain)] - r[key(domain)], general=general_now,
                       general_change=general_now - general_start, **changes))
  return rows


def format_forgetting(rows: Sequence[dict], domain: str, metric: str = 'loss') -> str:
  """The forgetting table as text, one line per row."""
  changes = [k for k in rows[0] if k.endswith('_change') and k != 'general_change']
  w = max(len(str(r['run'])) for r in rows)
  head = (f'{"run":{w}s} {"step":>6s} {domain + " " + metric:>11s} {"gain":>7s} {"general":>8s} '
          f'{"change":>7s}  ' + ' '.join(f'{k[:-len("_change")]:>7s}' for k in changes))
  lines = [head, ' ' * (w + 6 + 11 + 7 + 8 + 7 + 7) + '(change of each general source)']
  for r in rows:
    lines.append(f'{r["run"]:{w}s} {r["step"]:6d} {r["domain"]:11.4f} {r["domain_gain"]:+7.4f} '
                 f'{r["general"]:8.4f} {r["general_change"]:+7.4f}  '
                 + ' '.join(f'{r[k]:+7.4f}' for k in changes))
  return '\n'.join(lines)


def plot_forgetting(rows: Sequence[dict], path: str, domain: str, metric: str = 'loss') -> None:
  """Two panels over the steps, a line per run: the domain's gain and the general change; writes
  `path` (PNG)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(10, 3.6))  # a bare Figure: pyplot's backend and figures stay the caller's
  axes = fig.subplots(1, 2)
  for label in dict.fromkeys(r['run'] for r in rows):
    mine = [r for r in rows if r['run'] == label]
    steps = [r['step'] for r in mine]
    axes[0].plot(steps, [r['domain_gain'] for r in mine], marker='o', ms=3, label=label)
    axes[1].plot(steps, [r['general_change'] for r in mine], marker='o', ms=3, label=label)
  axes[0].set_title(f'{domain}: {metric} gained over the starting model', fontsize=10)
  axes[1].set_title(f'general sources: mean {metric} change (> 0: forgetting)', fontsize=10)
  for ax in axes:
    ax.axhline(0.0, color='grey', lw=0.8, ls=':')
    ax.set_xlabel('step')
    ax.legend(fontsize=8)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- command line


def main(config: ml_collections.ConfigDict) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  workdir = f.workdir
  if f.forgetting:
    rows = forgetting(f.forgetting, f.domain, f.general or None, f.metric)
    print(format_forgetting(rows, f.domain, f.metric))
    plot = f.plot or os.path.join(workdir, 'forgetting.png')
    plot_forgetting(rows, plot, f.domain, f.metric)
    print(f'wrote {plot}')
    return
  ev = build(config, workdir)
  step, params = load_params(ev, workdir, f.checkpoint)
  record = scores(ev, params, f.tasks)
  print(f'step {step}' + (' (the starting params)' if step == 0 else ''))
  print(f'{"source":10s} {"loss":>8s} {"bpb":>8s}')
  for source in ev.eval_batches:
    print(f'{source:10s} {record[f"eval/{source}/loss"]:8.4f} {record[f"eval/{source}/bpb"]:8.4f}')
  for path in f.tasks:
    name = task_name(path)
    acc, norm = record[f'task/{name}/acc'], record[f'task/{name}/acc_norm']
    print(f'task {name}: acc {acc:.4f}  acc_norm {norm:.4f}', flush=True)
  sys.stdout.flush()
  try:  # printed first: a directory that cannot be written loses nothing
    save_record(workdir, step, record)
  except OSError as e:
    raise errors.UserError(f'could not record the results in {os.path.join(workdir, EVALUATIONS)}: '
                           f'{errors.os_reason(e)} (they are printed above)') from None
  print(f'recorded in {os.path.join(workdir, EVALUATIONS)}')


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags('run directory (checkpoints; evaluations.jsonl is written here)', config_from_run=True)
  flags.DEFINE_integer('checkpoint', None, 'step to evaluate (default: the latest); 0 = the params the '
                       'run started from (config.init_from)', lower_bound=0)
  flags.DEFINE_list('tasks', [], 'multiple-choice task files (jsonl: context, choices, answer)')
  flags.DEFINE_list('forgetting', [], 'run directories: print their forgetting report instead')
  flags.DEFINE_string('domain', 'legal', 'forgetting report: the source trained for')
  flags.DEFINE_list('general', [], 'forgetting report: general sources (default: all but the domain)')
  flags.DEFINE_enum('metric', 'loss', ['loss', 'bpb'], 'forgetting report: the metric compared')
  flags.DEFINE_string('plot', '', 'forgetting report: PNG path (default <workdir>/forgetting.png)')
  cli.run(main)
