"""Train: the entry point for every phase (pretrain, anneal, continued pretraining are configs).

    python -m lmjax.train --config=configs/tiny.py --workdir=/tmp/tiny [--config.optim.lr=1e-3 ...]

Re-running the same command resumes from the latest checkpoint in the workdir. The loop itself is
`lmjax.trainer`; this adds the progress bar and prints evaluations. From Python (the experiments,
the demos, a notebook), `run(config, workdir)` trains with the same hooks, without the printing.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable, Iterable

import jax
import ml_collections
from absl import flags

from lmjax import cli, distributed, fs, trainer
from lmjax.eval import hook


def hooks(r: trainer.Run, writer: trainer.MetricsWriter) -> list[trainer.Hook]:
  """The hooks of every training run: the trainer's defaults and config.eval's harness tasks."""
  return trainer.default_hooks(r, writer) + hook.harness_hooks(r, writer)


def run(config: ml_collections.ConfigDict, workdir: str, extra_hooks: Iterable[trainer.Hook] = (),
        writer_hooks: Iterable[Callable[[trainer.Run, trainer.MetricsWriter], trainer.Hook]] = ()) -> dict:
  """Trains `config` in `workdir` (resuming if possible) with the default hooks, config.eval's harness
  tasks, `extra_hooks` and the hooks `writer_hooks` make from the run and its metrics writer (e.g.
  lmjax.eval.hook.hook)."""
  r = trainer.setup(config, workdir)
  writer = trainer.MetricsWriter(r)
  try:
    return trainer.train(r, hooks(r, writer) + list(extra_hooks)
                         + [make(r, writer) for make in writer_hooks])
  finally:
    writer.close()
    r.checkpointer.close()


def main(config: ml_collections.ConfigDict) -> None:
  from tqdm import tqdm
  workdir = flags.FLAGS.workdir
  lead = jax.process_index() == 0
  r = trainer.setup(config, workdir, accept_changes=flags.FLAGS.accept_config_changes)
  say = functools.partial(print, file=sys.stderr) if lead else lambda *_: None
  for c in r.config_changes:
    say(f"config.{c['field']}: {c['old']!r} -> {c['new']!r} (changed from the run's config.json; "
        'recorded in config_changes.jsonl)')
  if r.start_step >= config.train.steps:
    r.checkpointer.close()
    say(f'the run is complete: step {r.start_step} of config.train.steps={config.train.steps}, '
        f'final train loss {_last_loss(workdir)}; {_where(r)}')
    return
  if lead:
    summary = trainer.summary(r)
    fs.write_atomic(os.path.join(workdir, 'summary.json'), json.dumps(summary, indent=1))
    say(trainer.format_summary(summary))
  if r.start_step:
    say(f'resuming from step {r.start_step} (checkpoint in {r.checkpointer.directory})')
  bar = tqdm(total=config.train.steps, initial=r.start_step, unit='step', dynamic_ncols=True,
             disable=jax.process_index() != 0)

  def progress(info: trainer.StepInfo):
    bar.update(1)
    if info.step % config.train.log_every == 0 or info.final:
      bar.set_postfix(loss=f"{float(info.metrics['loss']):.3f}")

  def print_eval(step: int, record: dict):
    losses = {k.split('/')[1]: v for k, v in record.items() if k.startswith('eval/')}
    if losses:
      bar.write(f'step {step} eval loss: ' + '  '.join(f'{k} {v:.3f}' for k, v in losses.items()))

  writer = trainer.MetricsWriter(r, echo=print_eval)
  try:
    trainer.train(r, hooks(r, writer) + [trainer.Hook(1, progress)])
  finally:
    bar.close()
    writer.close()
    r.checkpointer.close()
  say(f'done: step {config.train.steps}, final train loss {_last_loss(workdir)}; {_where(r)}')


def _last_loss(workdir: str) -> str:
  path = os.path.join(workdir, 'metrics.jsonl')
  losses = [r['loss'] for r in map(json.loads, fs.read_text(path).splitlines())
            if r.get('loss') is not None] if fs.isfile(path) else []
  return f'{losses[-1]:.4f}' if losses else 'not logged'


def _where(r: trainer.Run) -> str:
  """Where a run's outputs are."""
  step = r.checkpointer.latest_step()
  parts = [f'checkpoint {r.checkpointer.directory}/{step}' if step is not None else 'no checkpoint',
           f"metrics {os.path.join(r.workdir, 'metrics.jsonl')}"]
  if 'tensorboard' in r.config.train.trackers:
    parts.append(f"TensorBoard: tensorboard --logdir {os.path.join(r.workdir, 'tb')}")
  if fs.isfile(os.path.join(r.workdir, 'data_report.json')):
    parts.append(f"data report {os.path.join(r.workdir, 'data_report.json')}")
  return ', '.join(parts)


if __name__ == '__main__':
  cli.define_flags('run directory (checkpoints, metrics, tokenizer)')
  flags.DEFINE_bool('accept_config_changes', False, 'resume even though the config changed in fields '
                    'that alter the model, data order or optimizer state (recorded in '
                    'config_changes.jsonl)')
  distributed.initialize()
  cli.run(main)
