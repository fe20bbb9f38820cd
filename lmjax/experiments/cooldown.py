"""Cooldown forms (Haegele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations", arXiv 2405.18392): a constant LR followed by a cooldown to 0 in the linear,
1-sqrt or cosine form, against one cosine schedule to 0 over the whole run, at equal tokens.

  python -m lmjax.experiments.cooldown --workdir=/tmp/cooldown [--quick] [--steps=300 \\
      --fractions=0.1,0.3 --seeds=0,1]

Every run is configs/experiment_tiny.py on the real corpora with one phase: `wsd` (warmup, constant,
then a `decay`-form cooldown over `decay_fraction` of the run) for each form and cooldown fraction,
or `cosine` (warmup, then cosine to 0). Final loss: the mean held-out loss over the sources after
the last step. The paper's ordering, checked per cooldown fraction on the means over seeds:
1-sqrt <= linear (their fig. 4), and the best constant+cooldown within the seed spread of cosine or
below it (their fig. 3). Writes <workdir>/results.json and cooldown.png; resumable.
  --quick: 60 steps, fraction 0.2, one seed (4 runs, ~30 s on 2 CPU cores).
"""
from __future__ import annotations

from typing import Sequence

from lmjax import fs, phases
from lmjax.experiments import common
from lmjax.scaling import report as plots

FORMS = ('linear', '1-sqrt', 'cosine')


def runs(steps: int, fractions: Sequence[float], seeds: Sequence[int], quick: bool,
         cache_dir: str = '') -> list[common.Run]:
  """Per seed: cosine over the run, and constant + each form of cooldown at each fraction."""
  warmup = max(1, steps // 10)
  out = []
  for seed in seeds:
    schedules = [('cosine-full', 'cosine-full', 0.0, dict(shape='cosine'))] + [
        (f'{form}-f{f:g}', form, f, dict(shape='wsd', decay=form, decay_fraction=f))
        for f in fractions for form in FORMS]
    for name, form, fraction, lr in schedules:
      c = common.load(common.TINY, f'quick={quick},steps={steps}', {'seed': seed}, cache_dir)
      c.phases = phases.timeline(main=phases.phase(fraction=1.0, weights=dict(c.phases.main.weights),
                                                   warmup_steps=warmup, end=0.0, **lr))
      out.append(common.Run(f'{name}-s{seed}', c, dict(form=form, fraction=fraction, seed=seed)))
  return out


def report(workdir: str, all_runs: Sequence[common.Run]) -> dict:
  """Final mean held-out loss per run; per (form, fraction) its spread over seeds; the orderings."""
  finals = {}
  for run in all_runs:
    end = common.final(workdir, run)
    finals[run.name] = dict(**run.labels, loss=common.mean(end['loss'], sorted(end['loss'])),
                            per_source=end['loss'])
  groups = {}
  for r in finals.values():
    groups.setdefault((r['form'], r['fraction']), []).append(r['loss'])
  summary = [dict(form=form, fraction=f, **common.spread(v)) for (form, f), v in sorted(groups.items())]
  by = {(s['form'], s['fraction']): s for s in summary}
  cosine = by[('cosine-full', 0.0)]
  fractions = sorted({f for form, f in by if form != 'cosine-full'})
  orderings = []
  for f in fractions:
    sqrt, linear = by[('1-sqrt', f)], by[('linear', f)]
    best = min((by[(form, f)] for form in FORMS), key=lambda s: s['mean'])
    noise = max(cosine['std'], best['std'])
    orderings.append(dict(
        fraction=f, sqrt_minus_linear=sqrt['mean'] - linear['mean'],
        sqrt_le_linear=bool(sqrt['mean'] <= linear['mean']),
        best_cooldown=best['form'], best_minus_cosine=best['mean'] - cosine['mean'],
        close_to_cosine=bool(best['mean'] - cosine['mean'] <= max(2 * noise, 0.0))))
  return dict(runs=finals, summary=summary, orderings=orderings)


def format_report(result: dict) -> str:
  rows = [[s['form'], f'{s["fraction"]:g}', s['mean'], s['std'], s['n']] for s in result['summary']]
  lines = [common.table(rows, ['schedule', 'cooldown', 'final loss', 'std', 'seeds']), '']
  for o in result['orderings']:
    lines.append(f'cooldown {o["fraction"]:g}: 1-sqrt - linear = {o["sqrt_minus_linear"]:+.4f} '
                 f'(1-sqrt <= linear: {o["sqrt_le_linear"]}); best cooldown ({o["best_cooldown"]}) - '
                 f'cosine = {o["best_minus_cosine"]:+.4f} (close to or below cosine: '
                 f'{o["close_to_cosine"]})')
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  """Final loss against the cooldown fraction, one line per form (error bars: std over seeds), the
  cosine schedule as a band."""
  fig, axes = plots.figure(1, 1, (5.5, 3.8))
  ax = axes[0, 0]
  for form, colour in zip(FORMS, plots.colours(len(FORMS))):
    rows = [s for s in result['summary'] if s['form'] == form]
    ax.errorbar([s['fraction'] for s in rows], [s['mean'] for s in rows],
                yerr=[s['std'] for s in rows], marker='o', capsize=3, color=colour,
                label=f'constant + {form} cooldown')
  cosine = next(s for s in result['summary'] if s['form'] == 'cosine-full')
  ax.axhline(cosine['mean'], color='k', ls='--', lw=1, label='cosine to 0')
  ax.axhspan(cosine['mean'] - cosine['std'], cosine['mean'] + cosine['std'], color='k', alpha=0.1)
  ax.set_xlabel('cooldown fraction of the run')
  ax.set_ylabel('final held-out loss (mean over sources)')
  ax.set_title('cooldown forms at equal tokens', fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=0, help='steps per run (default: quick 60, else 300)')
  p.add_argument('--fractions', default='', help='cooldown fractions (default: quick 0.2, else 0.1,0.3)')
  p.add_argument('--seeds', default='', help='seeds (default: quick 0, else 0,1)')
  args = p.parse_args(argv)
  steps = args.steps or (60 if args.quick else 300)
  fractions = [float(f) for f in (args.fractions or ('0.2' if args.quick else '0.1,0.3')).split(',')]
  seeds = [int(s) for s in (args.seeds or ('0' if args.quick else '0,1')).split(',')]
  workdir = fs.abspath(args.workdir)
  all_runs = runs(steps, fractions, seeds, args.quick, common.cache_dir(args))
  common.run_all(all_runs, workdir)
  result = report(workdir, all_runs)
  return common.finish(workdir, result, plot, format_report(result), 'cooldown.png')


if __name__ == '__main__':
  main()
