"""The forgetting report of continued pretraining: from the evaluations of one or more runs
(metrics.jsonl and evaluations.jsonl, lmjax/eval/records.py), per evaluated step the domain's loss and
its gain over the starting model (step 0: `python -m lmjax.evaluate --checkpoint=0`, or the trainer's
evaluation before its first step), and the general sources' mean loss and its change (> 0:
forgetting); or the same of lm-evaluation-harness task scores (a domain task against general
benchmarks: `metric='harness/acc'`, and so on); as a table (`forgetting`), its text
(`format_forgetting`) and a plot (`plot_forgetting`).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np

from lmjax import errors, fs
from lmjax.eval import records as records_lib


# The harness metrics for which lower is better (lm-eval's higher_is_better: false); any other
# task metric (acc, acc_norm, exact_match, ...) is better higher.
LOWER_IS_BETTER = ('perplexity', 'word_perplexity', 'byte_perplexity', 'bits_per_byte')


def metric_keys(metric: str) -> tuple[Callable[[str], str], bool]:
  """(the record key of `metric` for a source or task, whether lower is better). `metric`: 'loss' or
  'bpb' (`eval/<source>/<metric>`), or 'harness/<name>' / 'task/<name>' (`harness/<task>/<name>`,
  `task/<task>/<name>`: a harness task's or a jsonl task's score, e.g. harness/acc,
  harness/bits_per_byte, harness/exact_match/strict-match)."""
  if metric in ('loss', 'bpb'):
    return (lambda s: f'eval/{s}/{metric}'), True
  prefix, _, name = metric.partition('/')
  if prefix not in ('harness', 'task') or not name:
    raise errors.ConfigError(f'metric={metric!r}: expected loss, bpb, harness/<metric> (harness/acc, '
                             'harness/bits_per_byte, ...) or task/<metric> (task/acc, task/acc_norm)')
  return (lambda s: f'{prefix}/{s}/{name}'), name.split('/')[0] in LOWER_IS_BETTER


def forgetting(runs: Mapping[str, str] | Sequence[str], domain: str,
               general: Sequence[str] | None = None, metric: str = 'loss') -> list[dict]:
  """The forgetting table: a row per run and evaluated step, with the step-0 evaluation (the
  starting model) as the reference.

  Args:
    runs: {label: run directory}, or directories (labelled by their base names).
    domain: the source (or, for a task metric, the task) trained for.
    general: the sources or tasks to keep (default: every one evaluated but the domain).
    metric: 'loss', 'bpb', 'harness/<name>' or 'task/<name>' (`metric_keys`): held-out losses, or the
      scores of lm-evaluation-harness tasks (python -m lmjax.evaluate --harness_tasks, or
      config.eval.harness_tasks in training) or of jsonl tasks.
  Returns:
    Rows {run, step, domain (its metric), domain_gain (> 0 is learning: a loss down, a score up),
    general (the mean over the general sources), general_change (> 0 is forgetting: a loss up, a
    score down), <source>_change (the same, each general source)}.
  """
  key, lower_is_better = metric_keys(metric)
  worse = 1.0 if lower_is_better else -1.0  # (now - start) * worse > 0: got worse
  if not isinstance(runs, Mapping):
    runs = {os.path.basename(os.path.normpath(d)): d for d in runs}
  rows = []
  for label, run_dir in runs.items():
    records = records_lib.eval_records(run_dir)
    if 0 not in records or key(domain) not in records[0]:
      raise errors.DataError(f'{run_dir}: no {key(domain)} at step 0 (the starting model); record it with '
                             f'python -m lmjax.evaluate --config=... --workdir={run_dir} --checkpoint=0')
    start = records[0]
    sources = sorted(k.split('/')[1] for k in start if k == key(k.split('/')[1]))
    names = [s for s in sources if s != domain] if general is None else list(general)
    missing = [s for s in names if key(s) not in start]
    if missing or not names:
      raise errors.DataError(f'{run_dir}: general sources {missing or names} have no {metric} at step 0; '
                             f'evaluated: {sources}')
    for step, r in records.items():
      if key(domain) not in r or any(key(s) not in r for s in names):
        continue  # a record of other scores alone
      changes = {f'{s}_change': worse * (r[key(s)] - start[key(s)]) for s in names}
      general_now = float(np.mean([r[key(s)] for s in names]))
      general_start = float(np.mean([start[key(s)] for s in names]))
      rows.append(dict(run=label, step=step, domain=r[key(domain)],
                       domain_gain=worse * (start[key(domain)] - r[key(domain)]), general=general_now,
                       general_change=worse * (general_now - general_start), **changes))
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
  axes[1].set_title(f'general: mean {metric} change (> 0: forgetting)', fontsize=10)
  for ax in axes:
    ax.axhline(0.0, color='grey', lw=0.8, ls=':')
    ax.set_xlabel('step')
    ax.legend(fontsize=8)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=120)
