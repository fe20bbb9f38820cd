"""Annealing as a data-quality probe (Llama 3, Dubey et al. 2024, section 3.1.3: "we anneal the
learning rate of a 50% trained model linearly to 0 on 40B tokens, assigning 30% weight to the new
dataset and the remaining 70% to the default data mix").

  python -m lmjax.experiments.anneal_probe --config=configs/tiny_mix.py --from=RUN_DIR \\
      --candidate=legal --candidate=mine=jsonl:/data/mine.jsonl --workdir=/tmp/probe [--quick]

From the latest checkpoint of RUN_DIR (a run of --config, part-way through pretraining), one anneal
per candidate: the LR falls linearly from `--peak` x config.optim.lr to 0 over `--tokens` tokens on
`--share` (30%) candidate data + the rest the default mix (the first phase's mixture of --config),
against the same anneal on 100% default mix. A candidate is a source of --config (`legal`) or new
data `NAME=CORPORA` (a corpus name, `jsonl:GLOB` or `txt:GLOB`; lmjax.data.corpora), tokenized with
the parent's tokenizer. Every run is evaluated before its first step (the parent) and after its
last: held-out loss and bits per byte of every source (each run has every candidate as a source, at
weight 0 where unused, so all are scored on the same held-out documents).

Verdict per candidate: delta = its run's mean bits per byte over the default mix's sources minus the
baseline's (mean over --seeds); `helps` if delta < -tolerance, `hurts` if delta > tolerance, else
`neutral`; candidates are ranked by delta. Writes <workdir>/results.json and probe.png; re-running
the command skips finished runs and resumes unfinished ones.
  --quick: 48 steps (24,576 tokens with configs/experiment_tiny.py:quick=True), one seed.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import ml_collections

from lmjax import errors, fs, phases
from lmjax.data import prepare
from lmjax.experiments import common
from lmjax.scaling import report as plots

BASELINE = 'default'


def parse_candidate(text: str, sources: Sequence[str]) -> tuple[str, str]:
  """'legal' -> ('legal', '') (a source of the config); 'mine=jsonl:x.jsonl' -> ('mine', 'jsonl:...')."""
  name, sep, corpora = text.partition('=')
  if not sep:
    if name not in sources:
      raise errors.ConfigError(f'--candidate={text!r}: not a source of the config ({sorted(sources)}); '
                               'new data is NAME=CORPORA, e.g. mine=jsonl:/data/mine.jsonl')
    return name, ''
  if not name.isidentifier() or name in sources or name == BASELINE:
    raise errors.ConfigError(f'--candidate={text!r}: expected a new source name (an identifier other than '
                             f'{BASELINE!r} and {sorted(sources)}) before "="')
  return name, corpora


def default_mix(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The first phase's mixture over the sources that are installed (an optional corpus may not be:
  the run trains without it), normalised, sources of weight 0 left out."""
  resolved = phases.resolve(config.phases, config.train.steps, list(config.data.sources))
  present, _ = prepare.available_sources(config.data)
  weights = {s: w for s, w in resolved[0].weights.items() if w > 0 and s in present}
  total = sum(weights.values())
  return {s: w / total for s, w in weights.items()}


def runs(config: ml_collections.ConfigDict, parent: str, candidates: Sequence[str], tokens: int,
         share: float = 0.3, peak: float = 1.0, seeds: Sequence[int] = (0,),
         cache_dir: str = '') -> list[common.Run]:
  """The baseline anneal and one per candidate, for each seed (see the module docstring)."""
  if not 0 < share < 1:
    raise errors.ConfigError(f'--share={share}: expected a fraction in (0, 1)')
  mix = default_mix(config)
  parsed = [parse_candidate(c, list(config.data.sources)) for c in candidates]
  if len({n for n, _ in parsed}) != len(parsed):
    raise errors.ConfigError(f'--candidate: duplicate names in {candidates}')
  base = copy.deepcopy(config)
  with base.unlocked():  # candidate sources are new keys
    for name, corpora in parsed:
      if corpora:
        base.data.sources[name] = dict(corpora=corpora, max_chars=0)
  steps = math.ceil(tokens / (base.train.batch_size * base.train.seq_len))
  base.train.steps = steps
  base.train.eval_every = steps
  base.train.checkpoint_every = steps
  base.init_from = f'lmjax:{fs.abspath(parent)}'
  if cache_dir:
    base.data.cache_dir = cache_dir
  out = []
  for seed in seeds:
    for name in [BASELINE] + [n for n, _ in parsed]:
      weights = {s: (1 - share) * w for s, w in mix.items()} if name != BASELINE else dict(mix)
      if name != BASELINE:
        weights[name] = weights.get(name, 0.0) + share
      c = copy.deepcopy(base)
      c.seed = seed
      c.phases = phases.timeline(anneal=phases.phase(
          fraction=1.0, weights=weights, shape='linear', warmup_steps=0, init=peak, peak=peak, end=0.0))
      out.append(common.Run(f'{name}-s{seed}', c, dict(candidate=name, seed=seed)))
  return out


def report(workdir: str, all_runs: Sequence[common.Run], mix: dict, tolerance: float) -> dict:
  """Per run the held-out loss and bpb of each source (before and after); per candidate the delta in
  mean bpb over the default mix's sources against the baseline, its spread and the verdict."""
  default_sources = sorted(mix)
  per_run, by_candidate = {}, {}
  for run in all_runs:
    evals = common.evaluations(workdir, run)
    end = common.final(workdir, run)
    per_run[run.name] = dict(candidate=run.labels['candidate'], seed=run.labels['seed'],
                             start=dict(loss=evals[0]['loss'], bpb=evals[0]['bpb']),
                             end=dict(loss=end['loss'], bpb=end['bpb']),
                             default_bpb=common.mean(end['bpb'], default_sources),
                             default_loss=common.mean(end['loss'], default_sources))
    by_candidate.setdefault(run.labels['candidate'], {})[run.labels['seed']] = per_run[run.name]
  base = by_candidate.pop(BASELINE)
  verdicts = {}
  for name, seeds in by_candidate.items():
    deltas = [r['default_bpb'] - base[s]['default_bpb'] for s, r in seeds.items()]
    loss_deltas = [r['default_loss'] - base[s]['default_loss'] for s, r in seeds.items()]
    d = common.spread(deltas)
    verdict = 'helps' if d['mean'] < -tolerance else 'hurts' if d['mean'] > tolerance else 'neutral'
    verdicts[name] = dict(delta_bpb=d, delta_loss=common.spread(loss_deltas), verdict=verdict)
  ranking = sorted(verdicts, key=lambda n: verdicts[n]['delta_bpb']['mean'])
  return dict(default_mix=mix, tolerance=tolerance, runs=per_run, verdicts=verdicts, ranking=ranking)


def format_report(result: dict) -> str:
  sources = sorted(next(iter(result['runs'].values()))['end']['bpb'])
  rows = []
  for name, r in result['runs'].items():
    rows.append([name] + [r['end']['loss'][s] for s in sources] + [r['end']['bpb'][s] for s in sources]
                + [r['default_bpb']])
  header = ['run'] + [f'{s} loss' for s in sources] + [f'{s} bpb' for s in sources] + ['mix bpb']
  lines = [common.table(rows, header), '',
           f'verdict (mean bpb over the default mix {sorted(result["default_mix"])}, candidate run '
           f'minus baseline; tolerance {result["tolerance"]:g}), best first:']
  for rank, name in enumerate(result['ranking'], start=1):
    v = result['verdicts'][name]
    d = v['delta_bpb']
    lines.append(f'  {rank}. {name}: {v["verdict"]} (delta {d["mean"]:+.4f} bpb, std {d["std"]:.4f} '
                 f'over {d["n"]} seed(s); delta loss {v["delta_loss"]["mean"]:+.4f} nats/token)')
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  """Per source, the held-out bpb after each anneal, relative to the baseline's (< 0: better)."""
  names = [BASELINE] + result['ranking']
  sources = sorted(next(iter(result['runs'].values()))['end']['bpb'])
  fig, axes = plots.figure(1, 1, (1.2 + 0.9 * len(sources) * len(names) / 2, 3.6))
  ax = axes[0, 0]
  width = 0.8 / len(names)
  colours = plots.colours(len(names))
  for i, name in enumerate(names):
    runs = [r for r in result['runs'].values() if r['candidate'] == name]
    base = [r for r in result['runs'].values() if r['candidate'] == BASELINE]
    deltas = [sum(r['end']['bpb'][s] - b['end']['bpb'][s] for r, b in zip(runs, base)) / len(runs)
              for s in sources]
    ax.bar([j + i * width for j in range(len(sources))], deltas, width, color=colours[i], label=name)
  ax.axhline(0, color='grey', lw=0.8)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sources))], sources)
  ax.set_ylabel('held-out bpb minus baseline')
  ax.set_title('anneal probe: 30% candidate + 70% default mix vs 100% default mix', fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
  p = common.parser(__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/tiny_mix.py', help='the parent run\'s config[:knobs]')
  p.add_argument('--from', dest='parent', required=True, help='the parent run directory')
  p.add_argument('--candidate', action='append', required=True, help='SOURCE or NAME=CORPORA')
  p.add_argument('--tokens', type=int, default=0, help='anneal tokens (default: quick 24576, else 409600)')
  p.add_argument('--share', type=float, default=0.3)
  p.add_argument('--peak', type=float, default=1.0, help='the anneal\'s first LR, x config.optim.lr')
  p.add_argument('--seeds', default='0', help='comma-separated data-order seeds')
  p.add_argument('--tolerance', type=float, default=0.005, help='bits per byte')
  args = p.parse_args(argv)
  config = common.load(*args.config.split(':', 1))
  tokens = args.tokens or (24_576 if args.quick else 409_600)
  seeds = [int(s) for s in args.seeds.split(',')]
  workdir = fs.abspath(args.workdir)
  all_runs = runs(config, args.parent, args.candidate, tokens, args.share, args.peak, seeds,
                  common.cache_dir(args))
  common.run_all(all_runs, workdir)
  result = report(workdir, all_runs, default_mix(config), args.tolerance)
  return common.finish(workdir, result, plot, format_report(result), 'probe.png')


if __name__ == '__main__':
  main()
