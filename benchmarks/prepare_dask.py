"""`prepare` (clean, exact and near dedup, split, tokenizer, tokenization, shards, report) on Beam's
DaskRunner with 1, 2 and 4 worker processes, at 1x, 4x and 16x a web-like corpus with planted
duplicates.

  python benchmarks/prepare_dask.py [--workdir=/tmp/lmjax_bench_dask] [--docs=10000]
      [--sizes=1,4,16] [--workers=1,2,4] [--largest_workers=2] [--docs_per_partition=2500]

Corpus (made once in the workdir): two sources of English-like documents (6-20 sentences drawn from
the pydoc topics, so the quality filters keep most), 8 jsonl files each. Planted: 5% of the
documents start a cluster of 2-4 near-duplicates (each a copy of the cluster's first with two words
replaced, placed in another file and often the other source) and 2% are exact copies of
an earlier document. Recall: the planted duplicates dropped, as a share of all planted duplicates
(every member of a cluster but one, among the documents the quality stages kept); precision: the
dedup drops that are planted duplicates. A
cluster counts as kept right when exactly one member survives.

Each case prepares into a fresh cache dir: a LocalCluster of N single-threaded worker processes (on
this 2-core machine more than 2 workers share cores), with `--dask_npartitions` = documents /
`--docs_per_partition` (so a partition holds the same documents at every size) and
`config.data.clean.beam_files` = documents / 5,000 per source (at least 16). Reported: documents/s in
all and per worker, the workers' peak resident memory (ru_maxrss), and the local runner on the same
corpus in the same run as the baseline (its peak includes the corpus this process built). The
largest size runs with `--largest_workers` only. Every case must produce the same shards (their
checksums in stats.json) and report as the local runner: the run stops if one differs.
"""
import argparse
import json
import logging
import os
import random
import resource
import shutil
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(directory: str, n_docs: int, seed: int) -> dict:
  """Writes the corpus; returns {'clusters': [[(source, doc id), ...]], 'exact': [[...]], 'docs': n}."""
  if os.path.isfile(os.path.join(directory, 'truth.json')):
    with open(os.path.join(directory, 'truth.json')) as f:
      return json.load(f)
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  sentences = sorted({s.strip() + '.' for t in topics.topics.values()
                      for s in t.replace('\n', ' ').split('. ') if 40 < len(s) < 300})
  rng = random.Random(seed)
  tmp = f'{directory}.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  lines = {(s, f): [] for s in ('web', 'forum') for f in range(8)}
  truth = dict(clusters=[], exact=[], docs=0)

  def put(text):
    where = rng.choice(sorted(lines))
    lines[where].append(json.dumps({'text': text}) + '\n')
    source, f = where
    truth['docs'] += 1
    return source, f'{tmp.removesuffix(".tmp")}/{source}/{f:02d}.jsonl:{len(lines[where])}'

  earlier = []
  while truth['docs'] < n_docs:
    doc = [rng.choice(sentences) for _ in range(rng.randint(6, 20))]
    r = rng.random()
    if r < 0.05:
      members = [put('\n'.join(doc))]
      words = '\n'.join(doc).split(' ')
      for _ in range(rng.randint(1, 3)):
        variant = list(words)
        for i in rng.sample(range(len(words)), 2):
          variant[i] = rng.choice(rng.choice(sentences).split())
        members.append(put(' '.join(variant)))
      truth['clusters'].append(members)
    elif r < 0.07 and earlier:
      text = rng.choice(earlier)
      truth['exact'].append([text[1], put(text[0])])
    else:
      text = '\n'.join(doc)
      earlier = (earlier + [(text, put(text))])[-1000:]
  for (source, f), content in lines.items():
    os.makedirs(os.path.join(tmp, source), exist_ok=True)
    with open(os.path.join(tmp, source, f'{f:02d}.jsonl'), 'w') as out:
      out.writelines(content)
  with open(os.path.join(tmp, 'truth.json'), 'w') as f:
    json.dump(truth, f)
  os.rename(tmp, directory)
  return truth


def _config(corpus: str, docs: int):
  from lmjax.data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = pipeline.defaults()
  cfg.sources = {s: dict(corpora=f'jsonl:{corpus}/{s}/*.jsonl', max_chars=0, kind='en', languages='en')
                 for s in ('web', 'forum')}
  cfg.tokenizer.vocab_size = 4096
  cfg.clean.beam_files = max(16, docs // 5000)
  return cfg


def _prepare(cfg, cache: str) -> tuple[float, dict, str]:
  """Seconds, the stats.json of every source and the clean store's directory, prepared afresh."""
  from lmjax.data import prepare  # pylint: disable=import-outside-toplevel
  shutil.rmtree(cache, ignore_errors=True)
  cfg.cache_dir = cache
  t0 = time.perf_counter()
  done = prepare.prepare(cfg, cache)
  seconds = time.perf_counter() - t0
  stats = {n: json.load(open(os.path.join(d, 'stats.json'))) for n, d in done.dirs.items()}
  (store,) = [d for d in os.listdir(cache) if d.startswith('clean-')]
  return seconds, dict(stats=stats, report={k: v for k, v in done.report.items() if k != 'runner'}), \
      os.path.join(cache, store)


def _scores(store: str, truth: dict) -> dict:
  """Recall and precision of the dedup drops against the planted duplicates (among the documents
  that reached dedup: a member an earlier stage dropped is out of its group)."""
  drops, earlier = set(), set()
  for name in os.listdir(store):
    if name.startswith('drops-'):
      with open(os.path.join(store, name)) as f:
        for r in map(json.loads, f):
          (drops if r['stage'] == 'dedup' else earlier).add((r['source'], r['id']))
  groups = [[tuple(m) for m in g if tuple(m) not in earlier] for g in truth['clusters'] + truth['exact']]
  groups = [g for g in groups if len(g) > 1]
  planted = sum(len(g) - 1 for g in groups)
  members = {m for g in groups for m in g}
  found = sum(min(len(drops & set(g)), len(g) - 1) for g in groups)
  return dict(recall=found / planted, precision=len(drops & members) / max(len(drops), 1),
              one_kept=sum(len(set(g) - drops) == 1 for g in groups) / len(groups),
              dropped=len(drops))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/lmjax_bench_dask')
  parser.add_argument('--docs', type=int, default=10000, help='documents at 1x')
  parser.add_argument('--sizes', default='1,4,16')
  parser.add_argument('--workers', default='1,2,4')
  parser.add_argument('--largest_workers', type=int, default=2)
  parser.add_argument('--docs_per_partition', type=int, default=2500)
  parser.add_argument('--worker_memory', default='auto',
                      help="each worker's Dask memory limit (LocalCluster's memory_limit)")
  args = parser.parse_args()
  os.environ.setdefault('DASK_LOGGING__DISTRIBUTED', 'error')
  os.environ.pop('LMJAX_CLEAN_CACHE', None)
  import distributed  # pylint: disable=import-outside-toplevel
  sizes = [int(x) for x in args.sizes.split(',')]
  rows = []
  for size in sizes:
    corpus = os.path.join(args.workdir, f'corpus{size}x')
    truth = make_corpus(corpus, args.docs * size, seed=size)
    cfg = _config(corpus, truth['docs'])
    cache = os.path.join(args.workdir, 'cache')
    cfg.clean.runner = 'local'
    seconds, want, store = _prepare(cfg, cache)
    rows.append(dict(size=size, runner='local', workers=1, seconds=seconds, docs=truth['docs'],
                     peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     **_scores(store, truth)))
    print(json.dumps(rows[-1]), flush=True)
    counts = [int(x) for x in args.workers.split(',')] if size != max(sizes) else [args.largest_workers]
    for n in counts:
      with distributed.LocalCluster(n_workers=n, processes=True, threads_per_worker=1,
                                    memory_limit=args.worker_memory, dashboard_address=None,
                                    silence_logs=logging.ERROR) as cluster, \
          distributed.Client(cluster) as client:
        cfg.clean.runner = 'beam'
        cfg.clean.beam_args = (f'--runner=apache_beam.runners.dask.dask_runner.DaskRunner '
                               f'--dask_client_address={cluster.scheduler_address} '
                               f'--dask_npartitions={max(1, truth["docs"] // args.docs_per_partition)}')
        seconds, got, store = _prepare(cfg, cache)
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
      if got != want:
        raise SystemExit(f'{size}x, {n} workers: the Beam runner prepared other data than the local one')
      rows.append(dict(size=size, runner='dask', workers=n, seconds=seconds, docs=truth['docs'],
                       peak_mb=max(peaks.values()), **_scores(store, truth)))
      print(json.dumps(rows[-1]), flush=True)

  print(f'\n{"size":>4s} {"runner":>6s} {"workers":>7s} {"docs":>8s} {"s":>7s} {"docs/s":>8s} '
        f'{"/worker":>8s} {"peak MB":>8s} {"recall":>7s} {"precision":>9s} {"one kept":>8s}')
  for r in rows:
    rate = r['docs'] / r['seconds']
    print(f'{r["size"]:3d}x {r["runner"]:>6s} {r["workers"]:7d} {r["docs"]:8,d} {r["seconds"]:7.1f} '
          f'{rate:8,.0f} {rate / r["workers"]:8,.0f} {r["peak_mb"]:8.0f} {r["recall"]:7.4f} '
          f'{r["precision"]:9.4f} {r["one_kept"]:8.4f}')


if __name__ == '__main__':
  main()
