"""A run's evaluation records, read and written here only: the record of one checkpoint (`scores`:
`eval/<source>/loss`, `eval/<source>/bpb`, `task/<name>/acc`, `task/<name>/acc_norm`, and
`harness/<task>/<metric>` from lmjax/eval/harness.py), appended to <run>/evaluations.jsonl under its
step (`save_record`), and read back merged with the `eval/`, `task/` and `harness/` values the
trainer's hooks wrote to <run>/metrics.jsonl (`eval_records`). Files go through
lmjax.fs (a gs:// run directory works).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax

from lmjax import errors, fs
from lmjax.eval import choice, heldout

EVALUATIONS = 'evaluations.jsonl'  # what `python -m lmjax.evaluate` records in a run directory
METRICS = 'metrics.jsonl'  # the trainer's (trainer.MetricsWriter)


def scores(ev: heldout.Evaluator, params: dict, tasks: Sequence[str] = ()) -> dict[str, float]:
  """A record of params' held-out `eval/<source>/loss`, `eval/<source>/bpb` and each task's
  `task/<name>/acc`, `task/<name>/acc_norm`."""
  record = {}
  for source, m in heldout.heldout(ev, params).items():
    record.update({f'eval/{source}/loss': m['loss'], f'eval/{source}/bpb': m['bpb']})
  for path in tasks:
    task = choice.score_task(ev, params, path)
    record.update({f'task/{choice.task_name(path)}/{k}': task[k] for k in ('acc', 'acc_norm')})
  return record


def save_record(workdir: str, step: int, record: Mapping[str, float]) -> None:
  """Appends {step, **record} to <workdir>/evaluations.jsonl (process 0 only)."""
  if jax.process_index() == 0:
    fs.makedirs(workdir)
    fs.append_text(os.path.join(workdir, EVALUATIONS),
                   json.dumps({'step': step, **{k: float(v) for k, v in record.items()}}) + '\n')


def eval_records(run_dir: str) -> dict[int, dict[str, float]]:
  """{step: {'eval/<source>/loss': ..., ...}} of a run: the `eval/`, `task/` and `harness/` values of
  its metrics.jsonl, then its evaluations.jsonl (a later value for the same step and key wins)."""
  out: dict[int, dict[str, float]] = {}
  for name in (METRICS, EVALUATIONS):
    path = os.path.join(run_dir, name)
    if not fs.isfile(path):
      continue
    with fs.open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          values = {k: v for k, v in r.items() if k.startswith(('eval/', 'task/', 'harness/'))}
          if values:
            out.setdefault(int(r['step']), {}).update(values)
  if not out:
    raise errors.MissingFile(f'{run_dir}: no evaluations in {METRICS} or {EVALUATIONS}')
  return dict(sorted(out.items()))
