"""The CPU demo of domain continued pretraining: forgetting with and without general replay.

  python scripts/cpt_demo.py --workdir=/tmp/lmjax_cpt_demo [--pretrain_steps=100 --cpt_steps=30 \\
      --replays=0,0.2]

1. Pretrains the tiny model of configs/tiny_mix.py on its zh/en/code/math/legal mixture, anneal
   included (<workdir>/pretrain).
2. Continues it on legal text with each replay share r of general data (configs/cpt_domain.py,
   <workdir>/replay<r>), a re-warm to 0.3 of the pretraining peak LR, then a cosine decay. Before the
   first step the starting params are evaluated (step 0: held-out loss and bits per byte of every
   source, and the legal cloze task lmjax/eval/tasks/legal_cloze.jsonl), the trainer's held-out
   loss every steps/5 steps, and after the last step the same as at step 0.
3. Prints the forgetting report (`lmjax.eval.forgetting`) and the cloze accuracies, and writes
   the report as <workdir>/forgetting.png.

The same steps from the command line, one run at a time, are in configs/cpt_domain.py's docstring.
All runs share one data cache (<workdir>/data). A finished run is not run again, so a re-run only
prints the report. The defaults take about 3 minutes on 2 CPU cores (tests/test_cpt_demo.py).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmjax import config as config_lib, train, trainer  # noqa: E402
from lmjax.eval import choice, forgetting, records, runs as runs_lib  # noqa: E402

CLOZE = os.path.join(ROOT, 'lmjax', 'eval', 'tasks', 'legal_cloze.jsonl')
DOMAIN = 'legal'


def _finished(run_dir: str, steps: int) -> bool:
  """Whether the run recorded its final evaluation (the cloze after its last step)."""
  if not os.path.isfile(os.path.join(run_dir, records.EVALUATIONS)):
    return False
  return any(k.startswith('task/') for k in records.eval_records(run_dir).get(steps, {}))


def pretrain(workdir: str, steps: int, cache: str) -> str:
  """Trains the tiny_mix model for `steps` steps in <workdir>/pretrain; returns that directory."""
  run_dir = os.path.join(workdir, 'pretrain')
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny_mix.py'), f'steps={steps}')
  config.data.cache_dir = cache
  train.run(config, run_dir)
  return run_dir


def continued(workdir: str, parent: str, replay: float, steps: int, cache: str) -> str:
  """Continues `parent` on legal with `replay` general data (see the module docstring); returns
  the run directory."""
  run_dir = os.path.join(workdir, f'replay{replay:g}')
  if _finished(run_dir, steps):
    return run_dir
  config = config_lib.load(os.path.join(ROOT, 'configs', 'cpt_domain.py'),
                           f'init_from=lmjax:{parent},replay={replay},steps={steps}')
  config.data.cache_dir = cache
  r = trainer.setup(config, run_dir)
  ev = runs_lib.of_run(r)
  if r.start_step == 0:
    records.save_record(run_dir, 0, records.scores(ev, r.state['params'], [CLOZE]))
  writer = trainer.MetricsWriter(r)
  try:
    state = trainer.train(r, trainer.default_hooks(r, writer))
  finally:
    writer.close()
    r.checkpointer.close()
  records.save_record(run_dir, steps, records.scores(ev, state['params'], [CLOZE]))
  return run_dir


def cloze_lines(runs: dict[str, str]) -> list[str]:
  """The cloze accuracy of each run at its start and its end."""
  name = choice.task_name(CLOZE)
  lines = []
  for label, run_dir in runs.items():
    evals = records.eval_records(run_dir)
    first, last = evals[0], evals[max(evals)]
    acc, norm = f'task/{name}/acc', f'task/{name}/acc_norm'
    lines.append(f'{label}: {name} acc {first[acc]:.3f} -> {last[acc]:.3f}, '
                 f'acc_norm {first[norm]:.3f} -> {last[norm]:.3f}')
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--pretrain_steps', type=int, default=100)
  parser.add_argument('--cpt_steps', type=int, default=30)
  parser.add_argument('--replays', default='0,0.2', help='general shares of the CPT mixture')
  args = parser.parse_args()
  cache = os.path.join(args.workdir, 'data')
  parent = pretrain(args.workdir, args.pretrain_steps, cache)
  runs = {}
  for replay in (float(r) for r in args.replays.split(',')):
    run_dir = continued(args.workdir, parent, replay, args.cpt_steps, cache)
    runs[os.path.basename(run_dir)] = run_dir
  print(forgetting.format_forgetting(forgetting.forgetting(runs, DOMAIN), DOMAIN) + '\n')
  bpb = forgetting.forgetting(runs, DOMAIN, metric='bpb')  # evaluated at the first and last steps
  print(forgetting.format_forgetting(bpb, DOMAIN, 'bpb') + '\n')
  print('\n'.join(cloze_lines(runs)))
  plot = os.path.join(args.workdir, 'forgetting.png')
  forgetting.plot_forgetting(forgetting.forgetting(runs, DOMAIN), plot, DOMAIN)
  print(f'wrote {plot}')


if __name__ == '__main__':
  main()
