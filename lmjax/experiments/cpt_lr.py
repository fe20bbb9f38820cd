"""The learning rate of continued pretraining (D-CPT Law, Que et al. 2024, arXiv 2406.01375, as the
playbook quotes it: a small LR learns the domain quickly and forgets general ability slowly; a large
one learns fast, then oscillates; the best LR depends on the model size).

  python -m lmjax.experiments.cpt_lr --workdir=/tmp/cpt_lr [--quick] [--lrs=3e-4,1e-3,3e-3,1e-2]

Per model size, a general pretraining run (configs/experiment_tiny.py, its mixture, constant LR),
then from it one continued-pretraining run per peak LR on the legal source with 20% replay of the
general sources in their pretraining proportions (configs/cpt_domain.py's mixture): a short warmup,
then that LR held constant, so the curve shows what the LR does rather than a decay. Evaluated before
the first step and 6 times after. Per evaluation: domain gain (the legal loss the starting model had
minus now) and general forgetting (the mean loss of the other sources now minus the starting
model's). Findings checked (results.json `findings`): per size, final forgetting rises with the LR;
the largest LR gains the most domain loss at the first evaluation; the largest LR's domain loss
oscillates (rises between evaluations or ends above its best); the LR with the lowest final domain
loss per size (and whether it differs between sizes). Writes results.json and cpt_lr.png; resumable.
  --quick: 2 sizes (d_model 32, 48; 1 layer) x LRs 1e-3, 1e-2; 60 pretraining + 30 CPT steps.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from lmjax import fs, phases
from lmjax.experiments import common
from lmjax.scaling import report as plots

DOMAIN = 'legal'
REPLAY = 0.2
SIZES = {  # model overrides: full, quick
    False: {'s': dict(d_model=64, n_layers=2, d_ff=192), 'm': dict(d_model=96, n_layers=3, d_ff=288)},
    True: {'s': dict(d_model=32, n_layers=1, d_ff=96), 'm': dict(d_model=48, n_layers=1, d_ff=144)},
}


def runs(sizes: Mapping[str, dict], lrs: Sequence[float], pretrain_steps: int, cpt_steps: int,
         workdir: str, quick: bool, cache_dir: str = '') -> list[common.Run]:
  """Pretraining per size first, then the CPT runs from it (see the module docstring)."""
  out = []
  for size, model in sizes.items():
    fields = {f'model.{k}': v for k, v in model.items()}
    parent = common.load(common.TINY, f'quick={quick},steps={pretrain_steps}', fields, cache_dir)
    out.append(common.Run(f'pretrain-{size}', parent, dict(size=size, kind='pretrain')))
    general = {s: w for s, w in parent.phases.main.weights.items() if s != DOMAIN}
    total = sum(general.values())
    weights = {DOMAIN: 1 - REPLAY, **{s: REPLAY * w / total for s, w in general.items()}}
    for lr in lrs:
      c = common.load(common.TINY, f'quick={quick},steps={cpt_steps}', dict(fields, **{
          'optim.lr': lr, 'init_from': 'lmjax:' + os.path.join(workdir, 'runs', f'pretrain-{size}'),
          'train.eval_every': max(1, cpt_steps // 6)}), cache_dir)
      c.phases = phases.timeline(cpt=phases.phase(fraction=1.0, weights=weights, shape='constant',
                                                  warmup_fraction=0.1))
      out.append(common.Run(f'cpt-{size}-lr{lr:g}', c, dict(size=size, kind='cpt', lr=lr)))
  return out


def curves(workdir: str, run: common.Run) -> list[dict]:
  """Per evaluation of a CPT run: step, domain loss, domain gain, general loss, forgetting."""
  evals = common.evaluations(workdir, run)
  general = [s for s in evals[0]['loss'] if s != DOMAIN]
  start_domain, start_general = evals[0]['loss'][DOMAIN], common.mean(evals[0]['loss'], general)
  return [dict(step=e['step'], domain=e['loss'][DOMAIN], gain=start_domain - e['loss'][DOMAIN],
               general=common.mean(e['loss'], general),
               forgetting=common.mean(e['loss'], general) - start_general) for e in evals]


def report(workdir: str, all_runs: Sequence[common.Run]) -> dict:
  cpt = [r for r in all_runs if r.labels['kind'] == 'cpt']
  for run in cpt:
    common.final(workdir, run)  # every run finished
  result = {r.name: dict(size=r.labels['size'], lr=r.labels['lr'], curve=curves(workdir, r)) for r in cpt}
  findings = {}
  for size in dict.fromkeys(r.labels['size'] for r in cpt):
    mine = sorted((v for v in result.values() if v['size'] == size), key=lambda v: v['lr'])
    forgetting = [v['curve'][-1]['forgetting'] for v in mine]
    first_gain = [v['curve'][1]['gain'] for v in mine]
    top = mine[-1]['curve'][1:]
    domain = [p['domain'] for p in top]
    best = min(mine, key=lambda v: v['curve'][-1]['domain'])
    findings[size] = dict(
        lrs=[v['lr'] for v in mine], final_forgetting=forgetting, first_gain=first_gain,
        final_gain=[v['curve'][-1]['gain'] for v in mine],
        forgetting_rises_with_lr=all(a < b for a, b in zip(forgetting, forgetting[1:])),
        largest_lr_learns_fastest=first_gain[-1] == max(first_gain),
        largest_lr_oscillates=any(b > a for a, b in zip(domain, domain[1:])) or domain[-1] > min(domain),
        best_lr=best['lr'])
  best = {f['best_lr'] for f in findings.values()}
  return dict(runs=result, findings=findings, best_lr_depends_on_size=len(best) > 1)


def format_report(result: dict) -> str:
  rows = []
  for name, r in result['runs'].items():
    end = r['curve'][-1]
    rows.append([name, f'{r["lr"]:g}', r['curve'][1]['gain'], end['gain'], end['domain'],
                 end['forgetting']])
  lines = [common.table(rows, ['run', 'lr', 'first gain', 'final gain', f'{DOMAIN} loss',
                               'forgetting']), '']
  for size, f in result['findings'].items():
    lines.append(f'size {size}: forgetting rises with LR: {f["forgetting_rises_with_lr"]}; largest LR '
                 f'learns fastest: {f["largest_lr_learns_fastest"]}; largest LR oscillates: '
                 f'{f["largest_lr_oscillates"]}; best LR (lowest final {DOMAIN} loss) {f["best_lr"]:g}')
  lines.append(f'best LR depends on size: {result["best_lr_depends_on_size"]}')
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  """A row per size: domain gain and general forgetting against CPT steps, a line per LR."""
  sizes = list(dict.fromkeys(r['size'] for r in result['runs'].values()))
  fig, axes = plots.figure(len(sizes), 2, (10, 3.2 * len(sizes)))
  for row, size in enumerate(sizes):
    mine = sorted((r for r in result['runs'].values() if r['size'] == size), key=lambda r: r['lr'])
    for r, colour in zip(mine, plots.colours(len(mine))):
      steps = [p['step'] for p in r['curve']]
      axes[row, 0].plot(steps, [p['gain'] for p in r['curve']], marker='o', ms=3, color=colour,
                        label=f'lr {r["lr"]:g}')
      axes[row, 1].plot(steps, [p['forgetting'] for p in r['curve']], marker='o', ms=3, color=colour,
                        label=f'lr {r["lr"]:g}')
    axes[row, 0].set_title(f'size {size}: {DOMAIN} loss gained over the start', fontsize=9)
    axes[row, 1].set_title(f'size {size}: general loss change (> 0: forgetting)', fontsize=9)
    for ax in axes[row]:
      ax.axhline(0, color='grey', lw=0.8, ls=':')
      ax.set_xlabel('CPT step')
      ax.legend(fontsize=7)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--lrs', default='', help='peak LRs (default: quick 1e-3,1e-2, else 3e-4,1e-3,3e-3,1e-2)')
  p.add_argument('--pretrain_steps', type=int, default=0, help='default: quick 60, else 300')
  p.add_argument('--cpt_steps', type=int, default=0, help='default: quick 30, else 150')
  p.add_argument('--sizes', default='s,m', help='which of the sizes s, m to run')
  args = p.parse_args(argv)
  sizes = {k: SIZES[args.quick][k] for k in args.sizes.split(',')}
  lrs = [float(v) for v in (args.lrs or ('1e-3,1e-2' if args.quick else '3e-4,1e-3,3e-3,1e-2')).split(',')]
  workdir = fs.abspath(args.workdir)
  all_runs = runs(sizes, lrs, args.pretrain_steps or (60 if args.quick else 300),
                  args.cpt_steps or (30 if args.quick else 150), workdir, args.quick,
                  common.cache_dir(args))
  common.run_all(all_runs, workdir)
  result = report(workdir, all_runs)
  return common.finish(workdir, result, plot, format_report(result), 'cpt_lr.png')


if __name__ == '__main__':
  main()
