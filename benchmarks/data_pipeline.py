"""Input pipeline throughput on one CPU core against what a 1B model consumes on one H200.

  python benchmarks/data_pipeline.py [--workdir=/tmp/lmjax_bench_data] [--seconds=10]

Data: the tiny_mix mixture (configs/tiny_mix.py: zh/en/code/math/legal real corpora, whichever are
installed), prepared once into the workdir. The process is pinned to one core and grain reads with no
extra threads, so the figure is per core. Rows: `seq_len` tokens per row, 1B pretraining shapes.

Baselines, both measured in this run where they can be:
- anchor: PyTorch 1B Llama on an H200 trains at 49.2k tokens/s (peer figure; replace with
  lmjax's own 1b tokens/s once measured). Goal: pipeline >= 10x the anchor.
- ceiling: reading the same shards' token records sequentially with no packing or mixing.
"""
import argparse
import os
import time

import numpy as np

ANCHOR_TOKENS_PER_S = 49_200.0  # PyTorch 1B Llama, one H200 (peer anchor given in the issue)


def _time(fn, seconds):
  fn()  # warm (caches, first epoch permutation)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += fn()
  return n / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default='/tmp/lmjax_bench_data')
  parser.add_argument('--seconds', type=float, default=10.0)
  args = parser.parse_args()
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

  from lmjax import config as config_lib, phases  # pylint: disable=import-outside-toplevel
  from lmjax.data import pipeline, prepare  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny_mix.py'))
  data_cfg = cfg.data
  with data_cfg.unlocked():
    data_cfg.num_threads = 0  # no reader threads: one core
    data_cfg.prefetch = 0

  rows = []
  for seq_len, batch in ((4096, 16), (2048, 32), (128, 512)):
    timeline = phases.resolve(cfg.phases, cfg.train.steps, list(data_cfg.sources))
    p = pipeline.build(data_cfg, timeline, seq_len=seq_len, global_batch_size=batch, seed=0,
                       workdir=args.workdir)
    it = p.train_iter()

    def pipe():
      return next(it)['inputs'].size

    _, dirs, _ = prepare.prepare(data_cfg, args.workdir)  # cached: just finds the shards
    readers = [pipeline.SourceData(d, 'train', verify=False) for d in dirs.values()]
    state = {'i': 0}

    def ceiling():
      n = 0
      for data in readers:
        lo = state['i'] % len(data.lengths)
        n += sum(len(x) for x in data.docs(range(lo, min(lo + 64, len(data.lengths)))))
      state['i'] += 64
      return n

    tps = _time(pipe, args.seconds)
    ceil = _time(ceiling, args.seconds / 2)
    rows.append((seq_len, batch, tps, tps / ANCHOR_TOKENS_PER_S, ceil, tps / ceil))

  print(f'sources: {p.sources}  (missing: {sorted(p.missing) or "none"})')
  print(f'{"seq_len":>7s} {"batch":>5s} {"pipeline tok/s":>15s} {"x anchor 49.2k":>14s} '
        f'{"raw read tok/s":>15s} {"pipeline/raw":>12s}')
  for seq_len, batch, tps, ratio, ceil, frac in rows:
    print(f'{seq_len:7d} {batch:5d} {tps:15,.0f} {ratio:14.1f} {ceil:15,.0f} {frac:12.2f}')
  print(f'goal: >= 10x anchor at the 1b shapes -> {"met" if min(r[3] for r in rows[:2]) >= 10 else "NOT met"}')


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  main()
