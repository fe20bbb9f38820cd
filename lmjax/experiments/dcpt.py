"""D-CPT Law end to end (Que et al. 2024, arXiv 2406.01375): the sweep over model sizes, tokens and
domain share r -> the fit -> the law's three uses as a recommendation with bootstrap uncertainty,
and the cross-domain form on a second domain.

  python -m lmjax.experiments.dcpt --workdir=/tmp/dcpt [--quick] [--budget=1e15 --max_increase=0.03]

1. The sweep of configs/dcpt_sweep.py (legal into English; lmjax.scaling.sweep: resumable; fit.json,
   fit.png with the fitted curves against the held-out runs, tradeoff.png) in <workdir>/legal.
2. The recommendation at the largest size N and CPT tokens D swept, each use computed on the fitted
   law and on every bootstrap refit (resampled points, the domain and general fits on the same
   resample), reported as the full-data value and its 95% percentile interval:
   (a) the domain share with the lowest domain loss whose general loss stays within `max_increase`
       of the starting model's (laws.tradeoff_share);
   (b) with only the legal corpus's tokens (each seen once), the share and total tokens with the
       lowest domain loss (laws.limited_domain_share);
   (c) for a compute budget C = 6 N D (`--budget`, default 10x the largest run's), the
       compute-optimal N and D at share (a) (laws.dcpt_optimal).
3. The cross-domain law L = D-CPT(N, D, r) + F / K^mu (K = w1/k1 + w2 k2, w1 = w2 = 1; k1: the
   starting model's loss on the domain, k2: its relative decrease per million tokens over the first
   evaluation of the largest size's highest-share run) fitted to the legal and math sweeps together
   (math in <workdir>/math, continuing the legal sweep's pretrained models), against per-domain fits.
Writes <workdir>/recommendation.json; re-running resumes.
  --quick: sizes d32 (1 layer) and d64 (2 layers), shares 0.2/0.4/0.5/0.6/0.8 (0.5 held out), 40 CPT steps
  of 512 tokens after 60 pretraining steps; 20 bootstrap refits; math at shares 0.2/0.8.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from lmjax import config as config_lib, fs
from lmjax.experiments import common
from lmjax.scaling import fit, laws, sweep

CONFIG = os.path.join(common.ROOT, 'configs', 'dcpt_sweep.py')
SECOND = ('math', 'metamath')  # the cross-domain law's second domain: source, corpus


def sweep_config(quick: bool, domain: str = 'legal') -> ml_collections.ConfigDict:
  """configs/dcpt_sweep.py with the math source added (so both domains' runs share one tokenizer
  and the same pretrained models), for `domain`; quick: see the module docstring."""
  c = config_lib.load(CONFIG, 'runlocal=True')
  with c.unlocked():
    c.data.sources[SECOND[0]] = dict(corpora=SECOND[1], max_chars=4_000_000)
    c.data.tokenizer.sample_weights[SECOND[0]] = 1.0
  c.sweep.domain = domain
  c.train.trackers = ()
  if quick:
    c.train.batch_size, c.train.seq_len, c.train.eval_every = 8, 64, 5
    c.data.eval.num_batches = 2
    c.data.tokenizer.sample_chars = 600_000
    for source in c.data.sources.values():
      source.max_chars = 300_000
    c.sweep.sizes = {'s': dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=96),
                     'm': dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=192)}
    c.sweep.ratios, c.sweep.holdout_ratios = (0.2, 0.4, 0.5, 0.6, 0.8), (0.5,)
    c.sweep.tokens, c.sweep.pretrain_tokens = (40 * 512,), 60 * 512
    c.sweep.min_tokens = 2 * 5 * 512
    c.sweep.bootstrap = 20
  if domain != 'legal':
    c.sweep.ratios = (c.sweep.ratios[0], c.sweep.ratios[-1])
    c.sweep.holdout_ratios = ()
  return c


def second_domain_runs(config: ml_collections.ConfigDict, sweep_dir: str, first_dir: str):
  """The CPT runs of the second domain's sweep, starting from the first sweep's pretrained models
  (the same configs: the pretraining mixture gives both domains weight 0)."""
  specs = []
  for s in sweep.expand(config, sweep_dir):
    if s.kind == 'cpt':
      c = copy.deepcopy(s.config)
      c.init_from = sweep.run_dir(first_dir, f'{s.size}-pretrain')
      specs.append(sweep.RunSpec(s.name, s.kind, s.size, s.ratio, s.tokens, c))
  return specs


# ------------------------------------------------------------------------------ the recommendation

def uses(domain: Mapping, general: Mapping, n: float, d: float, start_general: float,
         max_increase: float, domain_tokens: float, budget: float, eps: float) -> dict:
  """The three uses of one pair of fitted laws (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    share = float(laws.tradeoff_share(domain, general, n, d, start_general, max_increase, eps))
    out = dict(tradeoff_share=share)
    if domain_tokens > 0:
      r, tokens = laws.limited_domain_share(domain, n, domain_tokens, eps=eps)
      out.update(limited_share=float(r), limited_total_tokens=float(tokens))
    if math.isfinite(share) and share > 0:
      n_opt, d_opt = laws.dcpt_optimal(domain, budget, share, eps)
      out.update(optimal_n=float(n_opt), optimal_tokens=float(d_opt))
  return out


def recommend(table: Mapping[str, np.ndarray], fitted: Mapping, start: Sequence[Mapping], sweep_cfg,
              domain_tokens: float, budget: float = 0.0, resamples: int = 20, seed: int = 0,
              options: fit.Options = fit.Options()) -> dict:
  """The uses at the largest swept N and D, on the fitted laws and on `resamples` bootstrap refits
  (the same resampled points for the domain and the general fit): {use: {value, low, high}}."""
  import jax  # pylint: disable=import-outside-toplevel
  eps = float(sweep_cfg.eps)
  n = float(np.max(table['n']))
  d = float(np.max(table['tokens']))
  start_general = {float(s['n']): float(s['general_loss']) for s in start}[n]
  budget = budget or 10 * 6 * n * d
  args = dict(n=n, d=d, start_general=start_general, max_increase=float(sweep_cfg.max_increase),
              domain_tokens=domain_tokens, budget=budget, eps=eps)
  best = uses(fitted['domain']['params'], fitted['general']['params'], **args)
  used = (np.asarray(table['holdout']) == 0) & (np.asarray(table['tokens']) >= sweep_cfg.min_tokens)
  counts = fit.resample_counts(int(used.sum()), resamples, seed)
  samples = {}
  form = laws.dcpt_form(eps)
  for target, share in (('domain', table['ratio']), ('general', 1.0 - np.asarray(table['ratio']))):
    data = dict(n=np.asarray(table['n'])[used], d=np.asarray(table['tokens'])[used],
                r=np.asarray(share)[used])
    with jax.enable_x64(True):
      theta = np.asarray(form.to_theta(fitted[target]['params']))
    result = fit.FitResult(form, fitted[target]['params'], theta, 0.0, np.zeros(0), True)
    samples[target] = fit.bootstrap_samples(result, data, np.asarray(table[f'{target}_loss'])[used],
                                            counts, options)
  with np.errstate(all='ignore'):  # a refit far off can overflow; its use is then nan, not counted
    draws = [uses({k: v[i] for k, v in samples['domain'].items()},
                  {k: v[i] for k, v in samples['general'].items()}, **args) for i in range(resamples)]
  out = dict(n=n, tokens=d, start_general_loss=start_general, max_increase=args['max_increase'],
             domain_tokens=domain_tokens, budget=budget, resamples=resamples)
  for key, value in best.items():
    values = np.array([u.get(key, np.nan) for u in draws], np.float64)
    finite = values[np.isfinite(values)]
    out[key] = dict(value=value, low=float(np.percentile(finite, 2.5)) if finite.size else math.nan,
                    high=float(np.percentile(finite, 97.5)) if finite.size else math.nan,
                    finite_draws=int(finite.size))
  return out


def format_recommendation(rec: dict) -> str:
  ci = lambda k, f='.3f': (f'{rec[k]["value"]:{f}} [{rec[k]["low"]:{f}}, {rec[k]["high"]:{f}}]'
                           if k in rec else 'n/a')
  lines = [f'Recommendation at N={rec["n"]:.3g} parameters, D={rec["tokens"]:.3g} CPT tokens '
           f'(95% bootstrap intervals, {rec["resamples"]} refits):',
           f'  (a) domain share r_d = {ci("tradeoff_share")}: the lowest domain loss with the general '
           f'loss at most {100 * rec["max_increase"]:g}% above the starting model\'s '
           f'({rec["start_general_loss"]:.4f})']
  if 'limited_share' in rec:
    lines.append(f'  (b) with only {rec["domain_tokens"]:.3g} domain tokens: r_d = {ci("limited_share")}, '
                 f'training on {ci("limited_total_tokens", ".3g")} tokens in all')
  if 'optimal_n' in rec:
    lines.append(f'  (c) compute budget {rec["budget"]:.3g} FLOPs at share (a): N* = '
                 f'{ci("optimal_n", ".3g")}, D* = {ci("optimal_tokens", ".3g")}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------ cross-domain law

def domain_coefficients(sweep_dir: str, config: ml_collections.ConfigDict) -> dict:
  """k1, k2 and K of the swept domain (see the module docstring), from the largest size's run at the
  highest share: its evaluations before the first step and at the first evaluation."""
  specs = [s for s in sweep.expand(config, sweep_dir) if s.kind == 'cpt']
  spec = max(specs, key=lambda s: (sweep.param_count(s.config.model), s.ratio, s.tokens))
  records = sweep.read_metrics(sweep.run_dir(sweep_dir, spec.name))
  key = f'eval/{config.sweep.domain}/loss'
  k1, first = records[0][key], records[1]
  k2 = (k1 - first[key]) / k1 / (first['tokens'] / 1e6)
  return dict(k1=k1, k2=k2, K=float(laws.domain_coefficient(k1, k2, 1.0, 1.0)))


def cross_domain(tables: Mapping[str, Mapping], coefficients: Mapping[str, Mapping], min_tokens: float,
                 eps: float, every: int = 1, options: fit.Options = fit.Options()) -> dict:
  """The cross-domain law fitted to every domain's fitting rows together, and per domain the R^2 of
  it and of that domain's own D-CPT fit; `every` > 1 starts the fits from every so many points of
  the laws' grids only."""
  cols = {k: [] for k in ('n', 'd', 'r', 'k', 'loss', 'domain')}
  for name, t in tables.items():
    keep = (np.asarray(t['holdout']) == 0) & (np.asarray(t['tokens']) >= min_tokens)
    cols['n'] += list(t['n'][keep])
    cols['d'] += list(t['tokens'][keep])
    cols['r'] += list(t['ratio'][keep])
    cols['loss'] += list(t['domain_loss'][keep])
    cols['k'] += [coefficients[name]['K']] * int(keep.sum())
    cols['domain'] += [name] * int(keep.sum())
  arrays = {k: np.asarray(v) for k, v in cols.items()}
  form = laws.cross_domain_form(eps)
  result = fit.fit(form, arrays, arrays['loss'], starts=form.grid[::every], options=options)
  out = dict(params=result.params, warnings=fit.warnings(result, arrays['loss']),
             fitted=fit.evaluate(form, result.params, arrays, arrays['loss']),
             coefficients=dict(coefficients), per_domain={})
  own_form = laws.dcpt_form(eps)
  for name in tables:
    pick = arrays['domain'] == name
    sub = {k: v[pick] for k, v in arrays.items()}
    own = fit.fit(own_form, sub, sub['loss'], starts=own_form.grid[::every], options=options)
    out['per_domain'][name] = dict(
        cross_domain_r2=fit.evaluate(form, result.params, sub, sub['loss'])['r2'],
        own_dcpt_r2=fit.evaluate(own_form, own.params, sub, sub['loss'])['r2'], points=int(pick.sum()))
  return out


def main(argv=None) -> dict:
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--budget', type=float, default=0.0, help='use (c): FLOPs (default 10x the largest run)')
  p.add_argument('--max_increase', type=float, default=0.03, help='use (a): general loss may rise this much')
  p.add_argument('--resamples', type=int, default=0, help='bootstrap refits (default: quick 20, else 100)')
  p.add_argument('--no_cross_domain', action='store_true', help='skip the second domain and step 3')
  args = p.parse_args(argv)
  workdir = fs.abspath(args.workdir)
  cache = common.cache_dir(args)
  first_dir = os.path.join(workdir, 'legal')
  config = sweep_config(args.quick)
  config.sweep.max_increase = args.max_increase
  config.data.cache_dir = cache
  sweep.run_local(sweep.expand(config, first_dir), first_dir)
  fitted = sweep.report(config, first_dir)
  for target in ('domain', 'general'):
    for warning in fitted[target]['warnings']:
      print(f'WARNING: {target} loss fit: {warning}')
  table = sweep.read_csv(os.path.join(first_dir, 'results.csv'))
  _, start = sweep.collect(config, first_dir)
  rec = recommend(table, fitted, start, config.sweep, sweep.domain_corpus_tokens(config, first_dir),
                  args.budget, args.resamples or (20 if args.quick else 100))
  out = dict(fit=dict(domain=fitted['domain'], general=fitted['general']), recommendation=rec)
  print(format_recommendation(rec))
  if not args.no_cross_domain:
    second = sweep_config(args.quick, SECOND[0])
    second.data.cache_dir = cache
    second_dir = os.path.join(workdir, SECOND[0])
    sweep.run_local(second_domain_runs(second, second_dir, first_dir), second_dir)
    rows, _ = sweep.collect(second, second_dir)
    sweep.write_csv(os.path.join(second_dir, 'results.csv'), rows)
    tables = {'legal': table, SECOND[0]: sweep.read_csv(os.path.join(second_dir, 'results.csv'))}
    coefficients = {'legal': domain_coefficients(first_dir, config),
                    SECOND[0]: domain_coefficients(second_dir, second)}
    out['cross_domain'] = cross_domain(tables, coefficients, config.sweep.min_tokens, config.sweep.eps)
    cd = out['cross_domain']
    print('cross-domain law (K per domain: ' + ', '.join(f'{k} {v["K"]:.3f}' for k, v in
                                                         coefficients.items())
          + f'): R^2 {cd["fitted"]["r2"]:.4f}; ' + '; '.join(
              f'{k}: cross-domain R^2 {v["cross_domain_r2"]:.4f} vs own D-CPT fit {v["own_dcpt_r2"]:.4f}'
              for k, v in cd['per_domain'].items()))
    for warning in cd['warnings']:
      print(f'WARNING: cross-domain fit: {warning}')
  common.write_json(os.path.join(workdir, 'recommendation.json'), out)
  print(f'wrote {workdir}/recommendation.json, {first_dir}/fit.png, tradeoff.png')
  return out


if __name__ == '__main__':
  main()
