"""More tokens than Chinchilla-optimal: at a fixed small model size, held-out loss against tokens far
past the compute-optimal point of a Chinchilla law fitted on the same setup (the playbook's "train
small models on much more data"; Hoffmann et al. 2022, eq. 2 and 4).

  python -m lmjax.experiments.overtrain --workdir=/tmp/overtrain [--quick] [--fit_steps=200 --long=8]

Runs of configs/experiment_tiny.py at constant LR (a point mid-run approximates a run of that
length, as in configs/dcpt_sweep.py): each size to `fit_steps`, the smallest also `long` times as
far. The law L(N, D) = E + A/N^alpha + B/D^beta is fitted (lmjax.scaling.fit, Hoffmann's 4,500
starts) to the mean held-out loss over the sources of every evaluation up to fit_steps from the
fourth on (past the warmup transient). For the small size N the law's optimal tokens are those at
which N is compute-optimal, D_opt = (N/G)^((alpha+beta)/beta) / N (G as in chinchilla_optimal). The
report gives D_opt, the observed loss at D_opt and at the last step, the law's prediction error
beyond the fitted range, every size's loss at the end of the fitted range beside the small one's
at its last step, and the fit's warnings (fit.warnings: e.g. a collapsed irreducible term, which
makes D_opt meaningless);
overtrain.png draws the small model's curve beside the law's. Writes results.json; resumable.
  --quick: d_model 16/32/48 (1 layer), 40 fitting steps, the small one 4x as long.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from lmjax import fs
from lmjax.experiments import common
from lmjax.scaling import fit, laws, report as plots, sweep

SIZES = {  # model overrides, smallest first: full, quick
    False: {'d32': dict(d_model=32, n_layers=1, d_ff=96), 'd64': dict(d_model=64, n_layers=2, d_ff=192),
            'd96': dict(d_model=96, n_layers=3, d_ff=288)},
    True: {'d16': dict(d_model=16, n_layers=1, d_ff=48), 'd32': dict(d_model=32, n_layers=1, d_ff=96),
           'd48': dict(d_model=48, n_layers=1, d_ff=144)},
}
SKIP_EVALS = 3  # evaluations (after step 0) left out of the fit: the warmup transient


def runs(sizes: Mapping[str, dict], fit_steps: int, long: int, quick: bool,
         cache_dir: str = '') -> list[common.Run]:
  out = []
  for i, (size, model) in enumerate(sizes.items()):
    steps = fit_steps * (long if i == 0 else 1)
    overrides = {f'model.{k}': v for k, v in model.items()}
    overrides['train.eval_every'] = max(1, fit_steps // 8)
    c = common.load(common.TINY, f'quick={quick},steps={steps}', overrides, cache_dir)
    out.append(common.Run(f'{size}-{steps}', c, dict(size=size, long=i == 0)))
  return out


def points(workdir: str, run: common.Run) -> dict:
  """n, and per evaluation after step 0: tokens, mean held-out loss over the sources."""
  evals = [e for e in common.evaluations(workdir, run) if e['step'] > 0]
  return dict(n=float(sweep.param_count(run.config.model)),
              tokens=np.array([e['tokens'] for e in evals], np.float64),
              loss=np.array([common.mean(e['loss'], sorted(e['loss'])) for e in evals]))


def optimal_tokens(params: Mapping[str, float], n: float) -> float:
  """The tokens at which N is the compute-optimal size of the law (inverse of chinchilla_optimal)."""
  a, b = params['alpha'], params['beta']
  g = (a * params['A'] / (b * params['B'])) ** (1.0 / (a + b))
  return float((n / g) ** ((a + b) / b) / n)


def report(workdir: str, all_runs: Sequence[common.Run], fit_tokens: float,
           options: fit.Options = fit.Options()) -> dict:
  for run in all_runs:
    common.final(workdir, run)
  data = {run.labels['size']: points(workdir, run) for run in all_runs}
  first_fitted = min(p['tokens'][min(SKIP_EVALS, len(p['tokens']) - 1)] for p in data.values())
  n, d, y = [], [], []
  for p in data.values():
    keep = (p['tokens'] >= first_fitted) & (p['tokens'] <= fit_tokens)
    n += [p['n']] * int(keep.sum())
    d += list(p['tokens'][keep])
    y += list(p['loss'][keep])
  table = dict(n=np.array(n), d=np.array(d))
  result = fit.fit(laws.CHINCHILLA, table, np.array(y), options=options)
  small = next(r.labels['size'] for r in all_runs if r.labels['long'])
  s = data[small]
  predicted = fit.predict(laws.CHINCHILLA, result.params, dict(n=np.full_like(s['tokens'], s['n']),
                                                                 d=s['tokens']))
  beyond = s['tokens'] > fit_tokens
  d_opt = optimal_tokens(result.params, s['n'])
  at_opt = int(np.argmin(np.abs(np.log(s['tokens'] / d_opt))))
  at_fit_end = int(np.flatnonzero(s['tokens'] <= fit_tokens)[-1])
  return dict(
      params=result.params, warnings=fit.warnings(result, y), points_fitted=len(y),
      fit_tokens=fit_tokens, fitted=fit.evaluate(laws.CHINCHILLA, result.params, table, y),
      loss_at_fit_end={k: float(v['loss'][v['tokens'] <= fit_tokens][-1]) for k, v in data.items()},
      sizes={k: dict(n=v['n'], tokens=v['tokens'].tolist(), loss=v['loss'].tolist())
             for k, v in data.items()},
      small=dict(size=small, n=s['n'], optimal_tokens=d_opt, last_tokens=float(s['tokens'][-1]),
                 tokens_over_optimal=float(s['tokens'][-1] / d_opt),
                 loss_near_optimal=float(s['loss'][at_opt]), tokens_near_optimal=float(s['tokens'][at_opt]),
                 loss_last=float(s['loss'][-1]), loss_at_fit_end=float(s['loss'][at_fit_end]),
                 predicted=predicted.tolist(),
                 beyond_rmse=float(np.sqrt(np.mean((predicted[beyond] - s['loss'][beyond]) ** 2)))
                 if beyond.any() else float('nan'),
                 beyond_mean_error=float(np.mean(predicted[beyond] - s['loss'][beyond]))
                 if beyond.any() else float('nan')))


def format_report(result: dict) -> str:
  p, s = result['params'], result['small']
  lines = [f'Chinchilla fit on {result["points_fitted"]} points (D <= {result["fit_tokens"]:.3g}): '
           + ', '.join(f'{k}={v:.4g}' for k, v in p.items())
           + f'; R^2 {result["fitted"]["r2"]:.4f}, RMSE {result["fitted"]["rmse"]:.4f}']
  lines += [f'WARNING: {w}' for w in result['warnings']]
  lines.append(f'size {s["size"]} (N={s["n"]:.3g}): law-optimal tokens D_opt={s["optimal_tokens"]:.3g}; '
               f'trained to {s["last_tokens"]:.3g} tokens ({s["tokens_over_optimal"]:.1f}x D_opt)')
  lines.append(f'  held-out loss {s["loss_near_optimal"]:.4f} at {s["tokens_near_optimal"]:.3g} tokens '
               f'(nearest evaluation to D_opt) -> {s["loss_last"]:.4f} at the last step')
  lines.append(f'  law beyond the fitted range: RMSE {s["beyond_rmse"]:.4f}, mean error (law - observed) '
               f'{s["beyond_mean_error"]:+.4f}')
  lines.append(f'  at {result["fit_tokens"]:.3g} tokens: ' + ', '.join(
      f'{k} {v:.4f}' for k, v in result['loss_at_fit_end'].items())
      + f'; {s["size"]} at {s["last_tokens"]:.3g} tokens: {s["loss_last"]:.4f}')
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  fig, axes = plots.figure(1, 1, (6, 4))
  ax = axes[0, 0]
  s = result['small']
  p = {k: float(v) for k, v in result['params'].items()}
  for (size, v), colour in zip(result['sizes'].items(), plots.colours(len(result['sizes']))):
    tokens = np.array(v['tokens'])
    grid = np.geomspace(tokens.min(), tokens.max(), 200)
    faint = size != s['size']
    ax.scatter(tokens, v['loss'], s=12, color=colour, alpha=0.4 if faint else 1.0,
               label=f'{size} (N={v["n"]:.3g}) observed')
    ax.plot(grid, laws.chinchilla_loss(p, v['n'], grid), color=colour, lw=1, alpha=0.4 if faint else 1.0,
            ls='-', label=None if faint else f'{size}: fitted law')
  ax.axvline(result['fit_tokens'], color='grey', ls=':', lw=1, label='end of the fitted range')
  ax.axvline(s['optimal_tokens'], color='k', ls='--', lw=1, label=f'{s["size"]}: law-optimal tokens')
  ax.set_xscale('log')
  ax.set_xlabel('tokens D')
  ax.set_ylabel('held-out loss (mean over sources)')
  title = f'{s["size"]} to {s["tokens_over_optimal"]:.1f}x its Chinchilla-optimal tokens'
  ax.set_title(title + (' (fit warning: see results)' if result['warnings'] else ''), fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--fit_steps', type=int, default=0, help='default: quick 40, else 200')
  p.add_argument('--long', type=int, default=0, help='the small size runs this many times as long '
                 '(default: quick 4, else 12)')
  args = p.parse_args(argv)
  fit_steps = args.fit_steps or (40 if args.quick else 200)
  workdir = fs.abspath(args.workdir)
  all_runs = runs(SIZES[args.quick], fit_steps, args.long or (4 if args.quick else 12), args.quick,
                  common.cache_dir(args))
  common.run_all(all_runs, workdir)
  c = all_runs[0].config.train
  result = report(workdir, all_runs, fit_steps * c.batch_size * c.seq_len)
  return common.finish(workdir, result, plot, format_report(result), 'overtrain.png')


if __name__ == '__main__':
  main()
