"""Evaluation of a run: held-out loss and bits per byte per source, log-likelihood multiple-choice
tasks, and the forgetting report of continued pretraining.

  python -m lmjax.evaluate --workdir=RUN [--checkpoint=STEP] [--tasks=A.jsonl,B.jsonl]
      [--harness_tasks=hellaswag,arc_easy --num_fewshot=0 --include_path=DIR --limit=N]
  python -m lmjax.evaluate --workdir=RUN --forgetting=RUN_A,RUN_B --domain=legal
  python -m lmjax.evaluate --workdir=RUN --forgetting=RUN_A --metric=harness/acc \
      --domain=lmjax_legal_cloze --general=hellaswag,arc_easy

The config is RUN's config.json unless `--config=configs/<name>.py` names another.

The first scores one checkpoint of RUN (the latest; `--checkpoint=0`: the params the run started
from, `config.init_from`'s) on every source's held-out batches and on the tasks, prints the results
and appends them to RUN/evaluations.jsonl under their step. The second prints the forgetting report
of the runs and writes it as a plot (`--plot`, default RUN/forgetting.png).

Held-out sets are the run's own: `Pipeline.eval_batches`, each source's held-out documents packed in
stored order into rows of `config.train.seq_len` tokens, the batches the trainer's
`eval/<source>/loss` reads (`--config.data.eval.num_batches` bounds them). Bits per byte, the task
format and scoring, the records and the forgetting report are described in lmjax/eval/: heldout.py,
choice.py, records.py and forgetting.py.
"""
from __future__ import annotations

import os
import sys

import ml_collections

from lmjax import errors
from lmjax.eval import choice, forgetting, records, runs


def main(config: ml_collections.ConfigDict) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  workdir = f.workdir
  if f.forgetting:
    rows = forgetting.forgetting(f.forgetting, f.domain, f.general or None, f.metric)
    print(forgetting.format_forgetting(rows, f.domain, f.metric))
    plot = f.plot or os.path.join(workdir, 'forgetting.png')
    forgetting.plot_forgetting(rows, plot, f.domain, f.metric)
    print(f'wrote {plot}')
    return
  ev = runs.build(config, workdir)
  step, params = runs.load_params(ev, workdir, f.checkpoint)
  record = records.scores(ev, params, f.tasks)
  table = ''
  if f.harness_tasks:
    from lmjax.eval import harness  # pylint: disable=import-outside-toplevel  (the [eval] extra)
    found, table = harness.evaluate(harness.evaluator_scorer(ev, params), f.harness_tasks, f.num_fewshot,
                                    f.include_path, f.limit, run=(ev.config, workdir))
    record.update(found)
  print(f'step {step}' + (' (the starting params)' if step == 0 else ''))
  print(f'{"source":10s} {"loss":>8s} {"bpb":>8s}')
  for source in ev.eval_batches:
    print(f'{source:10s} {record[f"eval/{source}/loss"]:8.4f} {record[f"eval/{source}/bpb"]:8.4f}')
  for path in f.tasks:
    name = choice.task_name(path)
    acc, norm = record[f'task/{name}/acc'], record[f'task/{name}/acc_norm']
    print(f'task {name}: acc {acc:.4f}  acc_norm {norm:.4f}', flush=True)
  print(table, end='')
  sys.stdout.flush()
  path = os.path.join(workdir, records.EVALUATIONS)
  try:  # printed first: a directory that cannot be written loses nothing
    records.save_record(workdir, step, record)
  except OSError as e:
    raise errors.UserError(f'could not record the results in {path}: {errors.os_reason(e)} (they are '
                           'printed above)') from None
  print(f'recorded in {path}')


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags('run directory (checkpoints; evaluations.jsonl is written here)', config_from_run=True)
  flags.DEFINE_integer('checkpoint', None, 'step to evaluate (default: the latest); 0 = the params the '
                       'run started from (config.init_from)', lower_bound=0)
  flags.DEFINE_list('tasks', [], 'multiple-choice task files (jsonl: context, choices, answer)')
  flags.DEFINE_list('harness_tasks', [], "lm-evaluation-harness tasks by the harness's names (hellaswag, "
                    'arc_easy, ...; the [eval] extra), lmjax/eval/tasks\' (lmjax_legal_cloze, ...) or '
                    'lmjax_heldout (the run\'s held-out documents), scored as harness/<task>/<metric>')
  flags.DEFINE_integer('num_fewshot', None, 'harness tasks: few-shot examples (default: each task\'s own)')
  flags.DEFINE_string('include_path', None, 'harness tasks: a directory of task YAMLs of your own')
  flags.DEFINE_float('limit', None, 'harness tasks: at most this many examples a task (< 1: a fraction)')
  flags.DEFINE_list('forgetting', [], 'run directories: print their forgetting report instead')
  flags.DEFINE_string('domain', 'legal', 'forgetting report: the source (or task) trained for')
  flags.DEFINE_list('general', [], 'forgetting report: general sources or tasks (default: all but the domain)')
  flags.DEFINE_string('metric', 'loss', 'forgetting report: the metric compared: loss, bpb, or a task '
                      'score, harness/<metric> (harness/acc, harness/bits_per_byte, ...) or task/<metric>, '
                      'with --domain and --general naming tasks')
  flags.DEFINE_string('plot', '', 'forgetting report: PNG path (default <workdir>/forgetting.png)')
  cli.run(main)
