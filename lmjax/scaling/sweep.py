"""Scaling-law sweeps: one config -> a grid of runs -> a resumable runner -> a results CSV -> a fit.

  python -m lmjax.scaling.sweep --config=configs/dcpt_sweep.py:runlocal=True --workdir=/tmp/dcpt
  python -m lmjax.scaling.sweep --config=... --workdir=... --mode=commands  # a launcher runs them
  python -m lmjax.scaling.sweep --config=... --workdir=... --mode=report    # fit finished runs
  python -m lmjax.scaling.sweep --config=... --workdir=... --mode=run --run=NAME  # one run of it

`--config.a.b=v` overrides apply to the sweep config before it is expanded into runs, so they may
change the grid (`--config.sweep.tokens='(245760,)'`); the commands of `--mode=commands` carry them.

A sweep config is a run config (lmjax.config.base()) plus a `sweep` section (`sweep_defaults`):
model sizes x CPT token budgets x domain shares r of a two-part mixture (the `domain` source
against the `general` sources in fixed proportions). With `pretrain_tokens` > 0 each size is first
trained on general data alone; its CPT runs start from that model (`init_from`) and its final
losses are the starting model's. One run gives many D points: every evaluation on its curve.

Layout under the sweep's workdir: runs/<name>/ (each run's own workdir: metrics.jsonl,
checkpoints), data/ (one data cache, so every run has the same tokenizer), results.csv (one row per
CPT evaluation), start.csv (the starting models' losses), fit.json and the plots (report.py).

A run is finished when its metrics.jsonl has an evaluation at its last step; the local runner skips
finished runs and lmjax.train resumes unfinished ones from their checkpoints, so re-running the
same command continues the sweep.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import glob
import json
import math
import os
import shlex
import sys
from typing import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from lmjax import errors, fs
from lmjax.scaling import fit, laws


def defaults() -> ml_collections.ConfigDict:
  """config.sweep."""
  return ml_collections.ConfigDict(dict(
      law='dcpt',
      domain='',              # source whose share r is swept
      general={},             # {source: weight}: the rest of the mixture, in these proportions
      ratios=(0.1, 0.5, 0.9),  # domain shares r_d of the CPT mixture
      sizes={},               # {name: config.model overrides}, e.g. dict(d_model=64, n_layers=2)
      tokens=(1_000_000,),    # CPT token budgets (each run: ceil(tokens / tokens per step) steps)
      pretrain_tokens=0,      # > 0: a general-only run per size first; CPT runs start from it
      min_tokens=0,           # evaluations before this many CPT tokens are not fitted
      holdout_ratios=(),      # runs at these shares (or sizes) are left out of the fit and scored
      holdout_sizes=(),
      eps=laws.DCPT_EPS,      # eps of the D-CPT Law's C / (r + eps)^gamma
      max_increase=0.03,      # usage (a): general loss may rise this much over the starting model
      domain_tokens=0,        # usage (b): domain tokens on hand; 0 = the prepared domain corpus's
      bootstrap=100,          # bootstrap resamples for the parameter intervals (0: none)
  ))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep. kind: 'pretrain' (general only) or 'cpt'; ratio: the domain share."""
  name: str
  kind: str
  size: str
  ratio: float
  tokens: int
  config: ml_collections.ConfigDict

  @property
  def steps(self) -> int:
    return int(self.config.train.steps)


def run_dir(sweep_dir: str, name: str) -> str:
  return os.path.join(sweep_dir, 'runs', name)


def _validate(sw, sources) -> None:
  if sw.law != 'dcpt':
    raise errors.ConfigError(f'config.sweep.law={sw.law!r}: expected dcpt')
  if sw.domain not in sources:
    raise errors.ConfigError(f'config.sweep.domain={sw.domain!r}: expected one of config.data.sources '
                             f'{sorted(sources)}')
  if not sw.general:
    raise errors.ConfigError('config.sweep.general is empty: expected {source: weight}')
  for name, weight in sw.general.items():
    if name not in sources or name == sw.domain:
      raise errors.ConfigError(f'config.sweep.general: {name!r} is not a source other than the domain '
                               f'(sources: {sorted(sources)})')
    if not weight > 0:
      raise errors.ConfigError(f'config.sweep.general.{name}={weight}: expected a positive weight')
  if not sw.sizes:
    raise errors.ConfigError('config.sweep.sizes is empty: expected {name: model overrides}')
  for r in sw.ratios:
    if not 0.0 <= r <= 1.0:
      raise errors.ConfigError(f'config.sweep.ratios: {r} is not a share in [0, 1]')
  for t in sw.tokens:
    if not t > 0:
      raise errors.ConfigError(f'config.sweep.tokens: {t} is not a positive token count')
  if sw.pretrain_tokens < 0:
    raise errors.ConfigError(f'config.sweep.pretrain_tokens={sw.pretrain_tokens}: expected >= 0')


def _mixture(sw, ratio: float) -> dict:
  total = sum(sw.general.values())
  weights = {name: (1.0 - ratio) * w / total for name, w in sw.general.items()}
  weights[sw.domain] = ratio
  return weights


def expand(config: ml_collections.ConfigDict, sweep_dir: str) -> list[RunSpec]:
  """The runs of a sweep config, pretraining runs first (the CPT runs start from them)."""
  sw = config.sweep
  _validate(sw, config.data.sources)
  base = copy.deepcopy(config)
  with base.unlocked():
    del base['sweep']
    if not base.data.cache_dir:
      base.data.cache_dir = os.path.join(sweep_dir, 'data')
  tokens_per_step = base.train.batch_size * base.train.seq_len

  def make(name, kind, size, ratio, tokens, init_from):
    c = copy.deepcopy(base)
    for field, value in sw.sizes[size].items():
      c.model[field] = value
    for phase in c.phases.order:  # the sweep's mixture in every phase of the base config
      c.phases[phase].weights = _mixture(sw, ratio)
    c.train.steps = math.ceil(tokens / tokens_per_step)
    c.init_from = init_from
    return RunSpec(name, kind, size, ratio, tokens, c)

  specs = []
  for size in sw.sizes:
    start = ''
    if sw.pretrain_tokens:
      specs.append(make(f'{size}-pretrain', 'pretrain', size, 0.0, sw.pretrain_tokens, ''))
      start = run_dir(sweep_dir, specs[-1].name)
    for ratio in sw.ratios:
      for tokens in sw.tokens:
        specs.append(make(f'{size}-r{ratio:g}-t{int(tokens)}', 'cpt', size, float(ratio), tokens,
                          start))
  return sorted(specs, key=lambda s: s.kind != 'pretrain')  # stable: pretraining first


def run_config(config: ml_collections.ConfigDict, name: str, sweep_dir: str):
  """The config of run `name` of the sweep (for configs that a launcher runs one by one)."""
  specs = {s.name: s for s in expand(config, sweep_dir)}
  if name not in specs:
    raise errors.ConfigError(f'sweep run {name!r}: expected one of {sorted(specs)}')
  return specs[name].config


# ------------------------------------------------------------------------------ running

def read_metrics(workdir: str) -> list[dict]:
  """Evaluation records of a run's metrics.jsonl, one per step, in step order. Records of one step
  are merged (the trainer's loss and lmjax.eval.hook's bits per byte are separate records); where a
  resumed run logged a key twice, the later value wins."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not fs.isfile(path):
    return []
  by_step = {}
  with fs.open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        if any(k.startswith('eval/') for k in record):
          by_step.setdefault(record['step'], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def finished(spec: RunSpec, sweep_dir: str) -> bool:
  return any(r['step'] == spec.steps for r in read_metrics(run_dir(sweep_dir, spec.name)))


def run_local(specs: Sequence[RunSpec], sweep_dir: str,
              run_fn: Callable[[ml_collections.ConfigDict, str], object] | None = None,
              on_start: Callable[[RunSpec], None] | None = None) -> list[str]:
  """Runs the unfinished runs one after another with run_fn(config, workdir) (default:
  lmjax.train.run); returns the names of the runs it started."""
  if run_fn is None:
    from lmjax import train  # pylint: disable=import-outside-toplevel  (the run layer)
    run_fn = train.run
  started = []
  for spec in specs:
    if finished(spec, sweep_dir):
      continue
    if on_start:
      on_start(spec)
    run_fn(spec.config, run_dir(sweep_dir, spec.name))
    if not finished(spec, sweep_dir):
      # The trainer returned early (SIGTERM: preempted) or evaluated nothing: rerunning resumes, not a bug.
      raise errors.UserError(f'sweep run {spec.name}: no evaluation at its last step {spec.steps} in '
                             f'{run_dir(sweep_dir, spec.name)}/metrics.jsonl')
    started.append(spec.name)
  return started


def commands(specs: Sequence[RunSpec], config_file: str, config_arg: str, sweep_dir: str,
             overrides: Sequence[str] = ()) -> list[str]:
  """One training command per run, pretraining first, for a launcher (launch/local.py,
  python -m launch.tpu sweep).

  Without overrides: `python -m lmjax.train` with the config file's `run` and `sweep_dir` knobs,
  which the file must pass to `run_config`. With `overrides` (the sweep command's `--config.a.b=v`
  flags): `python -m lmjax.scaling.sweep --mode=run --run=NAME` with the same flags, since they must
  reach the sweep config before it is expanded (they may change the runs and their names), which a
  config file's knobs cannot carry."""
  if overrides:
    spec = f'{config_file}:{config_arg}' if config_arg else config_file
    flags = ' '.join(shlex.quote(o) for o in overrides)
    return [f'python -m lmjax.scaling.sweep --config={spec} {flags} --workdir={sweep_dir} '
            f'--mode=run --run={s.name}' for s in specs]
  knobs = f'{config_arg},' if config_arg else ''
  return [f'python -m lmjax.train --config={config_file}:{knobs}run={s.name},sweep_dir={sweep_dir} '
          f'--workdir={run_dir(sweep_dir, s.name)}' for s in specs]


def config_overrides(argv: Sequence[str]) -> list[str]:
  """The `--config.a.b=value` flags of a command line, in order."""
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config.'):
      if '=' not in arg and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
        arg = f'{arg}={argv[i + 1]}'  # absl also takes `--config.a.b value`
      out.append(arg)
  return out


# ------------------------------------------------------------------------------ results

COLUMNS = ('run', 'size', 'n', 'ratio', 'step', 'tokens', 'holdout', 'domain_loss', 'general_loss')


def param_count(model_cfg) -> int:
  """N of a run: lmjax.model.param_count of its model (whose vocabulary is the config's)."""
  from lmjax import model
  return model.param_count(model.resolve(model_cfg))


def _losses(sw, record: Mapping) -> dict:
  sources = {k.split('/')[1]: v for k, v in record.items()
             if k.startswith('eval/') and k.endswith('/loss')}
  missing = [s for s in [sw.domain, *sw.general] if s not in sources]
  if missing:
    raise errors.CheckpointError(f'evaluation at step {record["step"]} has no loss for sources {missing}')
  total = sum(sw.general.values())
  general = sum(w * sources[s] for s, w in sw.general.items()) / total
  return dict(domain_loss=sources[sw.domain], general_loss=general,
              **{f'loss/{k}': v for k, v in sources.items()})


def collect(config: ml_collections.ConfigDict, sweep_dir: str) -> tuple[list[dict], list[dict]]:
  """(rows, start rows) from the finished runs: one row per CPT evaluation after the first step (D =
  CPT tokens so far), one start row per size with a finished pretraining run (its final
  evaluation)."""
  sw = config.sweep
  rows, start = [], []
  for spec in expand(config, sweep_dir):
    if not finished(spec, sweep_dir):
      continue
    n = param_count(spec.config.model)
    records = read_metrics(run_dir(sweep_dir, spec.name))
    if spec.kind == 'pretrain':
      start.append(dict(size=spec.size, n=n, **_losses(sw, records[-1])))
      continue
    holdout = int(spec.ratio in sw.holdout_ratios or spec.size in sw.holdout_sizes)
    for record in records:
      if record['step'] == 0:  # the evaluation before the first step: the starting model, D = 0
        continue
      rows.append(dict(run=spec.name, size=spec.size, n=n, ratio=spec.ratio, step=record['step'],
                       tokens=record['tokens'], holdout=holdout, **_losses(sw, record)))
  return rows, start


def write_csv(path: str, rows: Sequence[Mapping]) -> None:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with fs.open(path, 'w') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def _rule(column: str):
  """(check, what is expected) for a numeric results column."""
  if column == 'ratio':
    return (lambda v: 0.0 <= v <= 1.0), 'a share in [0, 1]'
  if column == 'holdout':
    return (lambda v: v in (0.0, 1.0)), '0 or 1'
  if column in ('n', 'tokens', 'domain_loss', 'general_loss') or column.startswith('loss/'):
    return (lambda v: 0.0 < v < math.inf), 'a positive number'
  return math.isfinite, 'a number'


def read_csv(path: str, required: Sequence[str] = COLUMNS) -> dict[str, np.ndarray]:
  """Columns of a results CSV (strings for run/size, float64 otherwise), checked: a missing column,
  or a row whose n, tokens or loss is not a positive number, whose ratio is not in [0, 1] or whose
  holdout is not 0/1, is an error naming the file, the row (1 = first data row) and the column."""
  with fs.open(path) as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
      raise errors.DataError(f'{path}: missing column(s) {missing}; the header has {header}')
    raw = list(reader)
  if not raw:
    raise errors.DataError(f'{path}: no data rows')
  out = {}
  for column in header:
    if column in ('run', 'size'):
      out[column] = np.array([row[column] for row in raw])
      continue
    check, what = _rule(column)
    values = []
    for i, row in enumerate(raw, start=1):
      text = row[column]
      try:
        value = float(text)
      except (TypeError, ValueError):
        value = math.nan
      if not check(value):
        raise errors.DataError(f'{path} row {i} (run {row.get("run", "?")}): column {column!r} is '
                               f'{text!r}; expected {what}')
      values.append(value)
    out[column] = np.array(values)
  return out


# ------------------------------------------------------------------------------ fitting

def fit_sweep(table: Mapping[str, np.ndarray], sweep_cfg, start: Sequence[Mapping] = (),
              domain_tokens: float = 0.0, options: fit.Options = fit.Options()) -> dict:
  """Fits the D-CPT Law to the domain loss (r = domain share) and to the general loss
  (r = 1 - domain share) of the fitting rows; scores each on the fitting rows and the held-out
  rows; adds bootstrap intervals, `warnings` (fit.warnings: a collapsed irreducible term, no
  convergence) and the law's usages. Returns a JSON-able dict."""
  form = laws.dcpt_form(float(sweep_cfg.eps))
  late = np.asarray(table['tokens']) >= sweep_cfg.min_tokens
  used = (np.asarray(table['holdout']) == 0) & late
  held = (np.asarray(table['holdout']) == 1) & late
  out = dict(law='dcpt', eps=float(sweep_cfg.eps), min_tokens=float(sweep_cfg.min_tokens),
             points_fitted=int(used.sum()),
             points_held_out=int(held.sum()))
  for target, share in (('domain', table['ratio']), ('general', 1.0 - np.asarray(table['ratio']))):
    data = dict(n=table['n'], d=table['tokens'], r=share)
    loss = np.asarray(table[f'{target}_loss'])
    pick = lambda mask: {k: np.asarray(v)[mask] for k, v in data.items()}
    result = fit.fit(form, pick(used), loss[used], options=options)
    entry = dict(params=result.params, objective=result.objective, converged=result.converged,
                 warnings=fit.warnings(result, loss[used]),
                 fitted=fit.evaluate(form, result.params, pick(used), loss[used]))
    if held.any():
      entry['held_out'] = fit.evaluate(form, result.params, pick(held), loss[held])
    if sweep_cfg.bootstrap:
      entry['intervals_95'] = fit.bootstrap(result, pick(used), loss[used],
                                            resamples=int(sweep_cfg.bootstrap), options=options)
    out[target] = entry
  out['usages'] = usages(out['domain']['params'], out['general']['params'], table, sweep_cfg, start,
                         domain_tokens)
  return out


def usages(domain: Mapping, general: Mapping, table: Mapping, sweep_cfg, start: Sequence[Mapping],
           domain_tokens: float = 0.0) -> list[dict]:
  """The law's three usages at each swept size N and the largest CPT token count D swept:
  (a) the domain share with the lowest domain loss whose general loss stays within max_increase of
  the starting model's (needs start losses); (b) with only `domain_tokens` of domain data (if > 0),
  the share (and so the total tokens) with the lowest domain loss; (c) the compute-optimal N, D for
  the budget 6 N D at the usage-(a) share."""
  import jax  # pylint: disable=import-outside-toplevel
  eps = float(sweep_cfg.eps)
  d_max = float(np.max(table['tokens']))
  start_by_n = {float(s['n']): float(s['general_loss']) for s in start}
  out = []
  with jax.enable_x64(True):
    for n in sorted(set(float(v) for v in table['n'])):
      entry = dict(n=n, tokens=d_max)
      share = math.nan
      if n in start_by_n:
        share = float(laws.tradeoff_share(domain, general, n, d_max, start_by_n[n],
                                          float(sweep_cfg.max_increase), eps))
        entry.update(start_general_loss=start_by_n[n], max_increase=float(sweep_cfg.max_increase),
                     tradeoff_share=share)
      if domain_tokens > 0:
        r_d, tokens = laws.limited_domain_share(domain, n, domain_tokens, eps=eps)
        entry.update(domain_tokens=float(domain_tokens), limited_share=float(r_d),
                     limited_total_tokens=float(tokens))
      if math.isfinite(share) and share > 0:
        n_opt, d_opt = laws.dcpt_optimal(domain, 6 * n * d_max, share, eps)
        entry.update(optimal_n=float(n_opt), optimal_tokens=float(d_opt))
      out.append(entry)
  return out


def domain_corpus_tokens(config: ml_collections.ConfigDict, sweep_dir: str) -> float:
  """config.sweep.domain_tokens, else the train tokens of the prepared domain source (its newest
  stats.json in the sweep's data cache), else 0."""
  if config.sweep.domain_tokens:
    return float(config.sweep.domain_tokens)
  cache = config.data.cache_dir or os.path.join(sweep_dir, 'data')
  stats = glob.glob(os.path.join(cache, f'{config.sweep.domain}-*', 'stats.json'))
  if not stats:
    return 0.0
  with open(max(stats, key=os.path.getmtime)) as f:
    return float(json.load(f)['train']['tokens'])


def report(config: ml_collections.ConfigDict, sweep_dir: str,
           options: fit.Options = fit.Options()) -> dict:
  """collect -> results.csv, start.csv -> fit.json -> plots; returns the fit dict."""
  from lmjax.scaling import report as report_lib  # pylint: disable=import-outside-toplevel
  rows, start = collect(config, sweep_dir)
  if not rows:
    raise errors.CheckpointError(f'sweep {sweep_dir}: no finished CPT runs to fit')
  results_path = os.path.join(sweep_dir, 'results.csv')
  write_csv(results_path, rows)
  if start:
    write_csv(os.path.join(sweep_dir, 'start.csv'), start)
  table = read_csv(results_path)
  fitted = fit_sweep(table, config.sweep, start, domain_corpus_tokens(config, sweep_dir), options)
  with fs.open(os.path.join(sweep_dir, 'fit.json'), 'w') as f:
    json.dump(fitted, f, indent=1)
  report_lib.plot_sweep(table, fitted, start, os.path.join(sweep_dir, 'fit.png'))
  report_lib.plot_tradeoff(fitted, start, os.path.join(sweep_dir, 'tradeoff.png'))
  return fitted


def main(config: ml_collections.ConfigDict) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from lmjax import cli  # pylint: disable=import-outside-toplevel
  sweep_dir, mode = fs.abspath(flags.FLAGS.workdir), flags.FLAGS.mode
  specs = expand(config, sweep_dir)
  if mode == 'commands':
    file, _, arg = cli.config_file().partition(':')
    print('\n'.join(commands(specs, file, arg, sweep_dir, config_overrides(sys.argv))))
    return
  if mode == 'run':
    run_config(config, flags.FLAGS.run, sweep_dir)  # an unknown name is an error naming the runs
    from lmjax import train  # pylint: disable=import-outside-toplevel
    spec = next(s for s in specs if s.name == flags.FLAGS.run)
    if run_local([spec], sweep_dir, run_fn=train.run):
      print(f'{spec.name}: finished {spec.steps} steps in {run_dir(sweep_dir, spec.name)}')
    else:
      print(f'{spec.name}: already finished')
    return
  if mode == 'local':
    total = len(specs)
    def on_start(spec):
      print(f'[{specs.index(spec) + 1}/{total}] {spec.name}: {spec.steps} steps', flush=True)
    run_local(specs, sweep_dir, on_start=on_start)
  fitted = report(config, sweep_dir)
  for target in ('domain', 'general'):
    e = fitted[target]
    scores = ' '.join(f'{k} R^2={v["r2"]:.4f} RMSE={v["rmse"]:.4f}'
                      for k, v in e.items() if k in ('fitted', 'held_out'))
    print(f'{target} loss: {scores}; params ' +
          ', '.join(f'{k}={v:.4g}' for k, v in e['params'].items()))
    for warning in e['warnings']:
      print(f'WARNING: {target} loss fit: {warning}')
  print(f'wrote {sweep_dir}/results.csv, fit.json, fit.png, tradeoff.png')


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags('sweep directory (runs/, data/, results.csv, fit.json, plots)')
  flags.DEFINE_enum('mode', 'local', ['local', 'commands', 'report', 'run'],
                    'local: run unfinished runs here, then report; commands: print one training '
                    'command per run; report: collect, fit and plot the finished runs; run: train '
                    'the run --run (resuming it) and nothing else')
  flags.DEFINE_string('run', '', '--mode=run: the name of the run (as --mode=commands prints it)')
  from lmjax import distributed
  distributed.initialize()  # --mode=run on several hosts, as lmjax.train
  cli.run(main)
