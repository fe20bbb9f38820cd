"""Input pipeline on one CPU core at pretraining size: rows/s, start-up and memory against sources x docs.

  python benchmarks/data_pipeline.py [--workdir=/tmp/lmjax_bench_pipeline] [--docs=1000000,10000000]
      [--sources=1,5,8] [--seq=4096] [--batch=16] [--seconds=20] [--steps=10000]

Data: synthetic prepared sources (benchmarks/synthetic_index.py, made once in the workdir: documents
of ~500 tokens, log-normal lengths, 256 MB shards). Each (sources, docs) case runs in a fresh process
pinned to one core, reading with no grain threads, so the figures are per core:
- start: seconds to open the sources and build the mixture (what a training process does before its
  first batch, without preparing), and resident memory (VmRSS; RssAnon without file pages) after it;
- rows/s and tokens/s of batches of `--batch` x `--seq` tokens from an equal-weight mixture;
- with `--steps`, resident memory after that many steps, in the largest case.

Baselines measured in the same run: the one-source case of the same size (the mixture's overhead;
goal: 8 sources within 2x of it) and the consumption of a 1b model on one H200 (lmjax's 50.6k
tokens/s from RESULTS.md; goal >= 10x, 506k tokens/s a core).
"""
import argparse
import json
import os
import subprocess
import sys
import time

H200_1B_TOKENS_PER_S = 50_600.0  # lmjax's 1b step, B4 x T4096, one H200 (benchmarks/RESULTS.md)
SEED = 0


def _rss() -> dict[str, float]:
  out = {}
  with open('/proc/self/status') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key in ('VmRSS', 'RssAnon', 'RssFile'):
        out[key] = int(value.split()[0]) / 1024  # MB
  return out


def child(dirs: list[str], seq: int, batch: int, seconds: float, steps: int, max_open: int) -> dict:
  """Opens `dirs` as sources of one equal-weight mixture and measures it (runs in its own process)."""
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  import grain  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lmjax.data import pipeline  # pylint: disable=import-outside-toplevel
  rss0 = _rss()
  t0 = time.perf_counter()
  sources = [pipeline.SourceData(d, 'train', verify=True, max_open=max_open) for d in dirs]
  rows = [pipeline.PackedRows(data, seq, (SEED, i), bos_id=1, eos_id=2)
          for i, data in enumerate(sources)]
  mixture = pipeline.Mixture([(0, np.full(len(dirs), 1 / len(dirs)))], batch, 1024, SEED)
  p = pipeline.Pipeline(None, [f's{i}' for i in range(len(dirs))], rows, mixture,
                        global_batch_size=batch, process_index=0, process_count=1, eval_rows={},
                        num_eval_batches=0, read_options=grain.ReadOptions(num_threads=0,
                                                                           prefetch_buffer_size=0),
                        missing={}, prepared={}, stream={})
  it = p.train_iter()
  start_s = time.perf_counter() - t0
  rss_start = _rss()
  next(it)  # first batch: opens (and checksums) the shards it reads
  done, t0 = 1, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    done += 1
  rows_per_s = (done - 1) * batch / (time.perf_counter() - t0)
  out = dict(sources=len(dirs), start_s=start_s, rss_start=rss_start, rss_before=rss0,
             rows_per_s=rows_per_s, tokens_per_s=rows_per_s * seq)
  if steps:
    for _ in range(steps - done):
      next(it)
    out['rss_after_steps'] = _rss()
    out['steps'] = steps
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/lmjax_bench_pipeline')
  parser.add_argument('--docs', default='1000000,10000000', help='documents per source, comma-separated')
  parser.add_argument('--sources', default='1,5,8', help='source counts, comma-separated')
  parser.add_argument('--seq', type=int, default=4096)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--seconds', type=float, default=20.0)
  parser.add_argument('--steps', type=int, default=10000, help='memory after this many steps (largest '
                      'case; 0: skip)')
  parser.add_argument('--max_open', type=int, default=32, help='open shards a source (SourceData)')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child.split(','), args.seq, args.batch, args.seconds, args.steps,
                           args.max_open)))
    return

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import synthetic_index  # pylint: disable=import-outside-toplevel
  docs = [int(x) for x in args.docs.split(',')]
  counts = [int(x) for x in args.sources.split(',')]
  results = []
  for n in docs:
    dirs = []
    for s in range(max(counts)):
      d = os.path.join(args.workdir, f'docs{n}-source{s}')
      synthetic_index.write(d, n, seed=s)
      dirs.append(d)
    for k in counts:
      largest = (n, k) == (max(docs), max(counts))
      cmd = [sys.executable, __file__, f'--child={",".join(dirs[:k])}', f'--seq={args.seq}',
             f'--batch={args.batch}', f'--seconds={args.seconds}',
             f'--steps={args.steps if largest else 0}', f'--max_open={args.max_open}']
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode:
        sys.exit(f'{" ".join(cmd)} failed:\n{proc.stderr}')
      r = json.loads(proc.stdout.splitlines()[-1])
      r['docs'] = n
      results.append(r)
      print(json.dumps(r), flush=True)

  print(f'\nseq {args.seq}, batch {args.batch}, one core; memory in MB (VmRSS / RssAnon)')
  print(f'{"sources":>7s} {"docs/src":>10s} {"start s":>7s} {"mem at start":>13s} {"rows/s":>8s} '
        f'{"tokens/s":>11s} {"x 1b H200":>9s} {"vs 1 source":>11s}')
  single = {r['docs']: r['tokens_per_s'] for r in results if r['sources'] == 1}
  for r in results:
    base = single.get(r['docs'])
    print(f'{r["sources"]:7d} {r["docs"]:10,d} {r["start_s"]:7.2f} '
          f'{r["rss_start"]["VmRSS"]:6.0f}/{r["rss_start"]["RssAnon"]:<6.0f} {r["rows_per_s"]:8,.0f} '
          f'{r["tokens_per_s"]:11,.0f} {r["tokens_per_s"] / H200_1B_TOKENS_PER_S:9.1f} '
          f'{(r["tokens_per_s"] / base) if base else float("nan"):11.2f}')
    if 'rss_after_steps' in r:
      print(f'        after {r["steps"]:,} steps: {r["rss_after_steps"]["VmRSS"]:.0f} MB VmRSS, '
            f'{r["rss_after_steps"]["RssAnon"]:.0f} MB RssAnon')
  by = {(r['sources'], r['docs']): r for r in results}
  lo, hi = min(docs), max(docs)
  for k in counts:
    if (k, lo) in by and (k, hi) in by and lo != hi:
      grow = by[(k, hi)]['rss_start']['VmRSS'] - by[(k, lo)]['rss_start']['VmRSS']
      print(f'{k} sources: memory at start grows {grow:.0f} MB from {lo:,} to {hi:,} documents a source')


if __name__ == '__main__':
  main()
