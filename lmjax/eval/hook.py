"""Evaluation hooks of the trainer: bits per byte (`eval/<source>/bpb` beside the default hooks'
`eval/<source>/loss`, from the same held-out forward pass, lmjax/eval/heldout.py), and
lm-evaluation-harness tasks every N steps (`config.eval`, `harness/<task>/<metric>`), each logged to
metrics.jsonl, TensorBoard and W&B by the run's MetricsWriter.
"""
from __future__ import annotations

from lmjax import config as config_lib, trainer
from lmjax.eval import heldout, runs


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


def harness_hooks(run: trainer.Run, writer: trainer.MetricsWriter) -> list[trainer.Hook]:
  """A hook that scores config.eval.harness_tasks on the run's params every harness_every steps and at
  the last step ([] without tasks), logging `harness/<task>/<metric>`. The task names are checked
  before training starts; a run stopped by a signal skips them (its checkpoint comes first)."""
  cfg, tasks = run.config.eval, config_lib.harness_task_names(run.config.eval)
  if not tasks:
    return []
  from lmjax.eval import harness  # pylint: disable=import-outside-toplevel  (the [eval] extra)
  manager = harness.task_manager(tasks, cfg.harness_include_path or None)  # checked before training
  ev = runs.of_run(run)

  def record(info: trainer.StepInfo):
    if info.final and info.step != run.config.train.steps:  # SIGTERM or Ctrl-C: stop quickly
      return
    scorer = harness.evaluator_scorer(ev, info.state['params'])
    fewshot = None if cfg.harness_num_fewshot < 0 else cfg.harness_num_fewshot
    metrics, _ = harness.evaluate(scorer, tasks, fewshot, cfg.harness_include_path or None, cfg.harness_limit or None,
                                  run=(run.config, run.workdir), manager=manager)
    writer.write(info.step, metrics)

  return [trainer.Hook(cfg.harness_every or run.config.train.eval_every, record)]
