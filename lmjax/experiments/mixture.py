"""Mixture ablations: a grid over the Chinese share of the natural language (zh : en) and the code
share of the mixture (the playbook's advice: Chinese and English half and half, never too little
code), tiny models on the real corpora, held-out loss per source.

  python -m lmjax.experiments.mixture --workdir=/tmp/mixture [--quick] [--zh=0.25,0.5,0.75 \\
      --code=0.05,0.2,0.35 --math=0.1 --steps=300]

Mixture of a grid point (zh, code, math): legal 0.1, math `math`, code `code`, and the rest natural
language split zh : (1 - zh) between Chinese and English. Each point is one run of
configs/experiment_tiny.py (constant LR) with that mixture; all points see the same tokens and share
one tokenizer (trained on configs/tiny_mix.py's fixed sample weights), so their losses compare. The
report gives each source's final held-out loss and bits per byte, and their mean, per point; the
plot is a heat-map per source over (zh, code) (at each math share). Writes <workdir>/results.json and
mixture.png; resumable.
  --quick: zh 0.25,0.75 x code 0.05,0.35, 60 steps (4 runs).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from lmjax import errors, fs
from lmjax.experiments import common
from lmjax.scaling import report as plots

LEGAL = 0.1


def weights(zh: float, code: float, math: float) -> dict[str, float]:
  """The mixture of a grid point (see the module docstring)."""
  natural = 1.0 - LEGAL - code - math
  if not 0 <= zh <= 1 or natural <= 0 or code < 0 or math < 0:
    raise errors.ConfigError(f'mixture point zh={zh}, code={code}, math={math}: expected zh in [0, 1] and '
                             f'code + math < {1 - LEGAL}')
  return dict(zh=natural * zh, en=natural * (1 - zh), code=code, math=math, legal=LEGAL)


def runs(zh: Sequence[float], code: Sequence[float], math: Sequence[float], steps: int, quick: bool,
         seed: int = 0, cache_dir: str = '') -> list[common.Run]:
  out = []
  for z, c_share, m in itertools.product(zh, code, math):
    c = common.load(common.TINY, f'quick={quick},steps={steps}', {'seed': seed}, cache_dir)
    c.phases.main.weights = weights(z, c_share, m)
    out.append(common.Run(f'zh{z:g}-code{c_share:g}-math{m:g}', c, dict(zh=z, code=c_share, math=m)))
  return out


def report(workdir: str, all_runs: Sequence[common.Run]) -> dict:
  points = []
  for run in all_runs:
    end = common.final(workdir, run)
    sources = sorted(end['loss'])
    points.append(dict(**run.labels, weights=dict(run.config.phases.main.weights), loss=end['loss'],
                       bpb=end['bpb'], mean_loss=common.mean(end['loss'], sources),
                       mean_bpb=common.mean(end['bpb'], sources)))
  best = min(points, key=lambda p: p['mean_bpb'])
  return dict(points=points, best=dict(zh=best['zh'], code=best['code'], math=best['math'],
                                       mean_bpb=best['mean_bpb']))


def format_report(result: dict) -> str:
  sources = sorted(result['points'][0]['loss'])
  rows = [[f'{p["zh"]:g}', f'{p["code"]:g}', f'{p["math"]:g}'] + [p['loss'][s] for s in sources]
          + [p['mean_loss'], p['mean_bpb']] for p in result['points']]
  b = result['best']
  return (common.table(rows, ['zh', 'code', 'math'] + [f'{s} loss' for s in sources]
                       + ['mean loss', 'mean bpb'])
          + f'\nlowest mean bpb: zh {b["zh"]:g} of the natural language, code {b["code"]:g}, '
            f'math {b["math"]:g} ({b["mean_bpb"]:.4f} bpb)')


def plot(result: dict, path: str) -> None:
  """Heat-maps of the held-out loss over (zh share, code share), a panel per source and the mean,
  a row per math share."""
  points = result['points']
  sources = sorted(points[0]['loss']) + ['mean']
  zh, code, maths = (sorted({p[k] for p in points}) for k in ('zh', 'code', 'math'))
  fig, axes = plots.figure(len(maths), len(sources), (2.6 * len(sources), 2.4 * len(maths)))
  for row, m in enumerate(maths):
    for col, source in enumerate(sources):
      grid = [[next((p['mean_loss'] if source == 'mean' else p['loss'][source])
                    for p in points if (p['zh'], p['code'], p['math']) == (z, c, m)) for z in zh]
              for c in code]
      ax = axes[row, col]
      image = ax.imshow(grid, origin='lower', cmap='viridis_r', aspect='auto')
      middle = (np.max(grid) + np.min(grid)) / 2  # light cells (low loss) get dark text
      for i, line in enumerate(grid):
        for j, value in enumerate(line):
          ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=7,
                  color='w' if value > middle else 'k')
      ax.set_xticks(range(len(zh)), [f'{z:g}' for z in zh])
      ax.set_yticks(range(len(code)), [f'{c:g}' for c in code])
      ax.set_xlabel('zh share of zh+en')
      if col == 0:
        ax.set_ylabel(f'code share (math {m:g})')
      ax.set_title(f'{source} held-out loss', fontsize=9)
      fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=100)


def main(argv=None) -> dict:
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--zh', default='', help='zh shares of the natural language (default 0.25,0.5,0.75)')
  p.add_argument('--code', default='', help='code shares (default 0.05,0.2,0.35)')
  p.add_argument('--math', default='0.1', help='math shares')
  p.add_argument('--steps', type=int, default=0, help='steps per run (default: quick 60, else 300)')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  floats = lambda text: [float(v) for v in text.split(',')]
  zh = floats(args.zh or ('0.25,0.75' if args.quick else '0.25,0.5,0.75'))
  code = floats(args.code or ('0.05,0.35' if args.quick else '0.05,0.2,0.35'))
  workdir = fs.abspath(args.workdir)
  all_runs = runs(zh, code, floats(args.math), args.steps or (60 if args.quick else 300), args.quick,
                  args.seed, common.cache_dir(args))
  common.run_all(all_runs, workdir)
  result = report(workdir, all_runs)
  return common.finish(workdir, result, plot, format_report(result), 'mixture.png')


if __name__ == '__main__':
  main()
