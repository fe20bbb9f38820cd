"""Evaluation hooks of the trainer: bits per byte (`eval/<source>/bpb` beside the default hooks'
`eval/<source>/loss`, from the same held-out forward pass, lmjax/eval/heldout.py), and
lm-evaluation-harness tasks every N steps (`config.eval`, `harness/<task>/<metric>`), each logged to
metrics.jsonl, TensorBoard and W&B by the run's MetricsWriter.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from lmjax import trainer
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


def harness_hooks(run: trainer.Run, writer: trainer.MetricsWriter) -> list[trainer.Hook]:
  """A hook that scores config.eval.harness_tasks on the run's params every harness_every steps and at
  the end ([] without tasks), logging `harness/<task>/<metric>`."""
  cfg = run.config.eval
  if not cfg.harness_tasks:
    return []
  from lmjax.eval import harness  # pylint: disable=import-outside-toplevel  (the [eval] extra)
  ev = runs.of_run(run)
  loss_args = dataclasses.replace(ev.steps.loss, name='ce', z_loss=0.0)

  def record(info: trainer.StepInfo):
    scorer = harness.Scorer(ev.steps.graphdef, info.state['params'], ev.tokenizer, ev.mesh, loss_args,
                            run.config.train.seq_len, run.config.train.batch_size)
    metrics, _ = harness.evaluate(scorer, list(cfg.harness_tasks),
                                  None if cfg.harness_num_fewshot < 0 else cfg.harness_num_fewshot,
                                  cfg.harness_include_path or None, cfg.harness_limit or None)
    writer.write(info.step, metrics)

  return [trainer.Hook(cfg.harness_every or run.config.train.eval_every, record)]
