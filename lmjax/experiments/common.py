"""What every experiment shares: runs as (name, config) built from a config file with overrides, the
sweep runner that trains the unfinished ones (lmjax.scaling.sweep.run_local: resumable), their
held-out results read back from metrics.jsonl, the command line, and atomic result files.

A run trains with the trainer's default hooks plus the bits-per-byte hook (lmjax.eval.hook), so each
evaluation (before the first step, every `config.train.eval_every` steps, after the last) records
`eval/<source>/loss` and `eval/<source>/bpb`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from lmjax import config as config_lib, errors, fs
from lmjax.scaling import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, 'configs', 'experiment_tiny.py')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of an experiment; `labels` are what the report groups it by."""
  name: str
  config: ml_collections.ConfigDict
  labels: Mapping[str, object] = dataclasses.field(default_factory=dict)

  @property
  def steps(self) -> int:
    return int(self.config.train.steps)


def load(path: str = TINY, arg: str | None = None, overrides: Mapping[str, object] = (),
         cache_dir: str = '') -> ml_collections.ConfigDict:
  """config_lib.load(path, arg) with flat overrides {'optim.lr': 1e-3, ...} (as --config.a.b=v would
  set them; an unknown field is an error) and the experiment's shared data cache."""
  c = config_lib.load(path, arg)
  for key, value in dict(overrides).items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f'override {key}={value!r}: config has no field {key}')
    node[leaf] = value
  if cache_dir:
    c.data.cache_dir = cache_dir
  config_lib.validate(c)
  return c


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains (resuming) with the default hooks and the bits-per-byte hook (lmjax.eval.hook)."""
  from lmjax import train as train_lib  # pylint: disable=import-outside-toplevel
  from lmjax.eval import hook  # pylint: disable=import-outside-toplevel
  train_lib.run(config, workdir, writer_hooks=[hook.hook])


def run_all(runs: Sequence[Run], workdir: str, run_fn: Callable = train) -> list[str]:
  """Trains the unfinished runs under <workdir>/runs/ (finished ones are skipped; an interrupted
  one resumes from its checkpoint); returns the names of those it started."""
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise errors.ConfigError(f'experiment runs: duplicate names in {names}')

  def on_start(run):
    print(f'[{names.index(run.name) + 1}/{len(runs)}] {run.name}: {run.steps} steps', flush=True)

  return sweep.run_local(runs, workdir, run_fn=run_fn, on_start=on_start)


def evaluations(workdir: str, run: Run) -> list[dict]:
  """The run's evaluations: [{'step', 'tokens', 'loss': {source: nats/token}, 'bpb': {...}}]."""
  out = []
  for record in sweep.read_metrics(sweep.run_dir(workdir, run.name)):
    entry = dict(step=record['step'], tokens=record.get('tokens', 0), loss={}, bpb={})
    for key, value in record.items():
      parts = key.split('/')
      if len(parts) == 3 and parts[0] == 'eval' and parts[2] in ('loss', 'bpb'):
        entry[parts[2]][parts[1]] = value
    out.append(entry)
  return out


def final(workdir: str, run: Run) -> dict:
  """The run's evaluation at its last step (see `evaluations`)."""
  last = evaluations(workdir, run)[-1]
  if last['step'] != run.steps:
    raise errors.CheckpointError(f'run {run.name}: not finished (last evaluation at step {last["step"]} of '
                                 f'{run.steps})')
  return last


def mean(values: Mapping[str, float], sources: Sequence[str]) -> float:
  return float(np.mean([values[s] for s in sources]))


def spread(values: Sequence[float]) -> dict:
  """mean, sample std (0 for one value), min, max and count of a list of numbers (seeds)."""
  v = np.asarray(values, np.float64)
  return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0,
              min=float(v.min()), max=float(v.max()), n=int(v.size))


def write_json(path: str, data) -> None:
  fs.write_atomic(path, json.dumps(data, indent=1))


def finish(workdir: str, result: dict, plot: Callable[[dict, str], None], text: str, png: str) -> dict:
  """An experiment's last lines: results.json and its plot `png` in `workdir`, the report `text` printed."""
  write_json(os.path.join(workdir, 'results.json'), result)
  plot(result, os.path.join(workdir, png))
  print(text)
  print(f'wrote {workdir}/results.json, {png}')
  return result


def parser(description: str) -> argparse.ArgumentParser:
  """--workdir (required), --quick, --cache (a data cache to share between experiments)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--workdir', required=True, help='runs/, results.json, plots; re-running resumes')
  p.add_argument('--quick', action='store_true', help='the 2-CPU-core setting (CI, notebooks)')
  p.add_argument('--cache', default='', help='prepared data and tokenizer (default <workdir>/data)')
  return p


def cache_dir(args) -> str:
  """The data cache of the command line's runs; also turns on JAX's persistent compilation cache
  under it: runs that differ only in their LR schedule or mixture then recompile only the train step
  (on 2 CPU cores compiling takes most of a quick run)."""
  import jax  # pylint: disable=import-outside-toplevel
  cache = fs.abspath(args.cache) if args.cache else os.path.join(fs.abspath(args.workdir), 'data')
  jax.config.update('jax_compilation_cache_dir', os.path.join(cache, 'jax_compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return cache


def table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
  """Rows as aligned text columns (floats with 4 decimals)."""
  cells = [[f'{v:.4f}' if isinstance(v, float) else str(v) for v in row] for row in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
  line = lambda row: '  '.join(str(v).rjust(w) for v, w in zip(row, widths))
  return '\n'.join([line(header)] + [line(r) for r in cells])
