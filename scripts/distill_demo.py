"""The CPU demo of distillation: a small student trained with and without KD from a bigger teacher's
top-k, at equal tokens, 3 seeds; and sequence-level distillation (teacher text mixed in) beside it.

  python scripts/distill_demo.py --workdir=/tmp/lmjax_distill_demo [--quick]

1. Trains the teacher, tiny_mix's `tiny` model, on the zh/en/code/math/legal mixture of real corpora
   (configs/distill.py:role=teacher; <workdir>/teacher), once for all seeds.
2. For each seed: dumps the teacher's top-k over that seed's student rows (lmjax.distill.dump, compact
   encoding, <workdir>/kd_s<seed>/topk) and trains the small student with KD (<workdir>/kd_s<seed>)
   and without (<workdir>/ce_s<seed>): the same rows, steps and tokens; each evaluates the held-out
   loss of every source 7 times.
3. Sequence-level: the teacher continues prompts from every source's training rows
   (lmjax.distill.sequences) into <workdir>/teacher_text.jsonl, a `jsonl:` source the student's phase
   mixes in at 30% of the rows (seed 0, <workdir>/seq_s0), the same steps and tokens.
4. Prints the table of final held-out loss per source (mean ± std over seeds, the KD margin's mean ±
   std and its smallest value), writes it as <workdir>/report.json and the curves as
   <workdir>/eval_loss.png.

A finished run is not run again. Full setting: teacher 300 steps, students 150 steps (configs/
distill.py's defaults); --quick (the CI test, tests/test_distill_demo.py, and the notebook): teacher
60 steps, students 20, one seed, sources capped at 100k characters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmjax import config as config_lib, fs, init_from, train  # noqa: E402
from lmjax.distill import dump as dump_lib, sequences  # noqa: E402

CONFIG = os.path.join(ROOT, 'configs', 'distill.py')
SETTINGS = {'full': dict(teacher_steps=300, steps=150, seeds=(0, 1, 2), max_chars=1_000_000,
                         prompts=64, new_tokens=96),
            'quick': dict(teacher_steps=60, steps=20, seeds=(0,), max_chars=100_000,
                          prompts=8, new_tokens=32)}
SEQ_SHARE = 0.3
KINDS = {'ce': 'no KD', 'kd': 'KD', 'seq': 'seq-level'}


def _config(cache: str, tokenizer: str = '', **knobs):
  config = config_lib.load(CONFIG, ','.join(f'{k}={v}' for k, v in knobs.items()))
  config.data.cache_dir = cache
  if tokenizer:
    config.data.tokenizer.path = tokenizer
  return config


def _done(run_dir: str, steps: int) -> bool:
  return bool(curves(run_dir)) and max(curves(run_dir)) == steps


def curves(run_dir: str) -> dict[int, dict[str, float]]:
  """{step: {source: held-out loss}} from the run's metrics.jsonl."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  out = {}
  if os.path.isfile(path):
    with open(path) as f:
      for r in map(json.loads, f):
        losses = {k.split('/')[1]: v for k, v in r.items() if k.startswith('eval/')}
        if losses:
          out[r['step']] = losses
  return out


def run_dirs(workdir: str, seeds) -> dict[tuple[str, int], str]:
  """{(kind, seed): run directory} of the demo's runs: the teacher, no KD and KD per seed, and the
  sequence-level student (seed 0)."""
  runs = {('teacher', 0): os.path.join(workdir, 'teacher')}
  for seed in seeds:
    runs.update({(kind, seed): os.path.join(workdir, f'{kind}_s{seed}') for kind in ('ce', 'kd')})
  runs[('seq', 0)] = os.path.join(workdir, 'seq_s0')
  return runs


def _teacher_text(workdir: str, cache: str, teacher: str, s: dict, common: dict) -> str:
  """The teacher's continuations of `prompts` rows of every source, as one jsonl file."""
  text = os.path.join(workdir, 'teacher_text.jsonl')
  if not os.path.isfile(text):
    prompt_cfg = _config(cache, teacher=teacher, store='unused', **common)
    lines = []
    for source in prompt_cfg.data.sources:
      part = text + f'.{source}'
      sequences.write(prompt_cfg, os.path.join(workdir, 'seq_s0'), part, source, n=s['prompts'],
                      new_tokens=s['new_tokens'])
      with open(part) as f:
        lines += f.read().splitlines()
    with open(text + '.tmp', 'w') as f:
      f.write('\n'.join(lines) + '\n')
    os.replace(text + '.tmp', text)
  return text


def run(workdir: str, setting: str, teacher_steps: int = 0) -> dict:
  s = dict(SETTINGS[setting], **({'teacher_steps': teacher_steps} if teacher_steps else {}))
  cache = os.path.join(workdir, 'data')
  common = dict(max_chars=s['max_chars'], teacher_steps=s['teacher_steps'], steps=s['steps'])
  seconds = {}

  def timed(name, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return out

  runs = run_dirs(workdir, s['seeds'])
  teacher = runs[('teacher', 0)]
  if not _done(teacher, s['teacher_steps']):
    timed('teacher', train.run, _config(cache, role='teacher', **common), teacher)
  tokenizer = init_from.parent_tokenizer(teacher)
  for seed in s['seeds']:
    for kind in ('ce', 'kd'):
      run_dir = runs[(kind, seed)]
      if _done(run_dir, s['steps']):
        continue
      if kind == 'kd':
        config = _config(cache, teacher=teacher, store=os.path.join(run_dir, 'topk'), seed=seed, **common)
        timed('dump', dump_lib.dump, config, run_dir, chunk_steps=10)
      else:
        config = _config(cache, tokenizer, kd=False, seed=seed, **common)
      timed(kind, train.run, config, run_dir)
  # Sequence-level distillation: teacher text as a source of the student's mixture.
  seq_dir = runs[('seq', 0)]
  if not _done(seq_dir, s['steps']):
    text = timed('teacher_text', _teacher_text, workdir, cache, teacher, s, common)
    config = _config(cache, tokenizer, kd=False, **common)
    config.unlock()
    config.data.sources['teacher'] = dict(corpora=f'jsonl:{text}', max_chars=0)
    weights = config.phases.main.weights
    config.phases.main.weights = {**{k: v * (1 - SEQ_SHARE) / sum(weights.values()) for k, v in weights.items()},
                                  'teacher': SEQ_SHARE}
    config.lock()
    timed('seq', train.run, config, seq_dir)
  return report(workdir, runs, s, seconds)


def _final_tokens(run_dir: str, steps: int) -> float:
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return max(r['tokens'] for r in map(json.loads, f) if r['step'] == steps)


def report(workdir: str, runs: dict, s: dict, seconds: dict | None = None) -> dict:
  """Final held-out loss per source: mean and std (ddof 1) over seeds, the KD margin (no KD - KD),
  the sequence-level student's (seed 0) and the teacher's; the tokens each student saw."""
  seeds, steps = list(s['seeds']), s['steps']
  sources = sorted(curves(runs[('ce', seeds[0])])[steps])
  final = {key: curves(d)[steps if key[0] != 'teacher' else s['teacher_steps']]
           for key, d in runs.items()}
  std = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  rows = {}
  for src in sources:
    ce = np.array([final[('ce', seed)][src] for seed in seeds])
    kd = np.array([final[('kd', seed)][src] for seed in seeds])
    margin = ce - kd
    rows[src] = dict(ce=float(ce.mean()), ce_std=std(ce), kd=float(kd.mean()), kd_std=std(kd),
                     margin=float(margin.mean()), margin_std=std(margin), margin_min=float(margin.min()),
                     seq=final[('seq', 0)][src], teacher=final[('teacher', 0)][src])
  out = dict(steps=steps, teacher_steps=s['teacher_steps'], seeds=seeds, sources=rows,
             tokens={f'{k}_s{seed}': _final_tokens(d, steps) for (k, seed), d in runs.items()
                     if k != 'teacher'},
             seconds={k: round(v, 1) for k, v in (seconds or {}).items()})
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(out, f, indent=1)
  print(format_report(out))
  fig = figure(runs, sources)
  fs.write_figure(fig, os.path.join(workdir, 'eval_loss.png'), dpi=100)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  plt.close(fig)
  return out


def format_report(out: dict) -> str:
  lines = [f"held-out loss after {out['steps']} student steps (equal tokens; teacher {out['teacher_steps']} "
           f"steps); seeds {out['seeds']}: mean ± std; margin = no KD - KD",
           f"{'source':8s} {'no KD':>16s} {'KD':>16s} {'margin':>16s} {'min':>7s} {'seq (s0)':>9s} "
           f"{'teacher':>8s}"]
  for src, r in out['sources'].items():
    lines.append(f"{src:8s} {r['ce']:8.4f} ±{r['ce_std']:.4f} {r['kd']:8.4f} ±{r['kd_std']:.4f} "
                 f"{r['margin']:+8.4f} ±{r['margin_std']:.4f} {r['margin_min']:+7.4f} {r['seq']:9.4f} "
                 f"{r['teacher']:8.4f}")
  return '\n'.join(lines)


def figure(runs: dict, sources: list[str]):
  """Eval loss per source over steps: no KD and KD (mean over seeds, band = min..max) and
  sequence-level (seed 0); a matplotlib figure."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(sources), figsize=(3.2 * len(sources), 3))
  for ax, src in zip(np.atleast_1d(axes), sources):
    for i, kind in enumerate(KINDS):
      dirs = [d for (k, _), d in runs.items() if k == kind]
      steps = sorted(curves(dirs[0]))
      loss = np.array([[curves(d)[t][src] for t in steps] for d in dirs])
      ax.plot(steps, loss.mean(0), f'C{i}', label=KINDS[kind])
      if len(dirs) > 1:
        ax.fill_between(steps, loss.min(0), loss.max(0), color=f'C{i}', alpha=0.2)
    ax.set_title(src)
    ax.set_xlabel('student step')
  np.atleast_1d(axes)[0].set_ylabel('held-out loss (nats/token)')
  np.atleast_1d(axes)[0].legend()
  fig.tight_layout()
  return fig


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--quick', action='store_true', help='the CI setting (one seed, shorter)')
  parser.add_argument('--teacher_steps', type=int, default=0, help="the setting's teacher steps unless set")
  args = parser.parse_args()
  run(args.workdir, 'quick' if args.quick else 'full', args.teacher_steps)
  print(f"wrote {os.path.join(args.workdir, 'report.json')} and eval_loss.png")


if __name__ == '__main__':
  main()
