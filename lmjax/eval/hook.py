"""Evaluation hooks of the trainer: bits per byte (`eval/<source>/bpb` beside the default hooks'
`eval/<source>/loss`, from the same held-out forward pass, lmjax/eval/heldout.py), and
lm-evaluation-harness tasks every N steps (`config.eval`, `harness/<task>/<metric>`), each logged to
metrics.jsonl, TensorBoard and W&B by the run's MetricsWriter.
"""
from __future__ import annotations


import ml_collections

from lmjax import errors, trainer
from lmjax.eval import heldout, runs


def defaults() -> ml_collections.ConfigDict:
  """config.eval: harness tasks run during training (lmjax/eval/harness.py; the [eval] extra)."""
  return ml_collections.ConfigDict(dict(
      harness_tasks=(),         # the harness's task names (or those under harness_include_path)
      harness_every=0,          # steps between runs (0: config.train.eval_every); also at the end
      harness_num_fewshot=-1,   # -1: each task's own
      harness_limit=0.0,        # examples a task (< 1: a fraction; 0: all)
      harness_include_path='',  # a directory of task YAMLs of your own
  ))


def hook(run: trainer.Run, writer: trainer.MetricsWriter, every: int | None = None) -> trainer.Hook:
  """A trainer hook that records `eval/<source>/bpb` every `every` steps (default
  config.train.eval_every) and at the end, beside the default hooks' `eval/<source>/loss`:

    r = trainer.setup(config, workdir)
    writer = trainer.MetricsWriter(r)
    trainer.train(r, trainer.default_hooks(r, writer) + [hook.hook(r, writer)])
  """
  ev = runs.of_run(run)

  def record(info: trainer.StepInfo):
    metrics = heldout.heldout(ev, info.state['params'])
    writer.write(info.step, {f'eval/{s}/bpb': m['bpb'] for s, m in metrics.items()})

  return trainer.Hook(every or run.config.train.eval_every, record, at_start=True)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """config.eval's values; with harness tasks, the [eval] extra must be installed."""
  if cfg.harness_every < 0 or cfg.harness_limit < 0:
    raise errors.ConfigError(f'config.eval.harness_every={cfg.harness_every}, harness_limit='
                             f'{cfg.harness_limit}: expected >= 0 (0: eval_every; all examples)')
  if task_names(cfg):
    errors.require('lm_eval', 'eval', 'config.eval.harness_tasks')


def task_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """config.eval.harness_tasks as names: a tuple, or one comma-separated string (as a flag gives it)."""
  return [t.strip() for item in cfg.harness_tasks for t in item.split(',') if t.strip()]


def harness_hooks(run: trainer.Run, writer: trainer.MetricsWriter) -> list[trainer.Hook]:
  """A hook that scores config.eval.harness_tasks on the run's params every harness_every steps and at
  the last step ([] without tasks), logging `harness/<task>/<metric>`. The task names are checked
  before training starts; a run stopped by a signal skips them (its checkpoint comes first)."""
  cfg, tasks = run.config.eval, task_names(run.config.eval)
  if not tasks:
    return []
  from lmjax.eval import harness  # pylint: disable=import-outside-toplevel  (the [eval] extra)
  harness.task_manager(tasks, cfg.harness_include_path or None)
  ev = runs.of_run(run)

  def record(info: trainer.StepInfo):
    if info.final and info.step != run.config.train.steps:  # SIGTERM or Ctrl-C: stop quickly
      return
    scorer = harness.evaluator_scorer(ev, info.state['params'])
    metrics, _ = harness.evaluate(scorer, tasks, None if cfg.harness_num_fewshot < 0 else cfg.harness_num_fewshot,
                                  cfg.harness_include_path or None, cfg.harness_limit or None,
                                  run=(run.config, run.workdir))
    writer.write(info.step, metrics)

  return [trainer.Hook(cfg.harness_every or run.config.train.eval_every, record)]
