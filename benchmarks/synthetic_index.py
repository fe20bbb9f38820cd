"""A synthetic prepared source at pretraining size, for benchmarks/data_pipeline.py: no text needed.

  python benchmarks/synthetic_index.py --out=/tmp/synth/s0 --docs=10000000 [--seed=0]

Writes what lmjax.prepare writes for one source (stats.json; ArrayRecord train shards of about
`--shard_mb` MB of token ids, each with its starts file, through shards.write_shards) for `--docs`
documents whose lengths are drawn from a log-normal with median 300 and mean ~500 tokens (clipped to
[1, 32768]), like web text. Every token of document i is the id (i mod 60000) + 3: the pipeline
never looks at the ids, and constant documents let the shards be zstd-compressed to a few MB per
million documents, so eight sources of 10M documents (40 GB of uint16 ids as prepare would write
them) fit on a laptop's disk. Reading them adds the decompression, but they also stay in the page
cache, which 80 GB of real shards would not: a pipeline figure measured on them is the pipeline's
own cost, not the disk's. The held-out split is empty.
"""
import argparse
import json
import os
import shutil
import time

import numpy as np

from lmjax.data import shards

_SYNTHETIC_WRITER = 'group_size:64,zstd:1'  # prepare's chunking, compressed


def lengths(num_docs: int, seed: int) -> np.ndarray:
  """Document lengths [num_docs] in tokens: log-normal, median 300, mean ~500."""
  rng = np.random.default_rng(seed)
  return np.clip(rng.lognormal(np.log(300), 1.0, num_docs), 1, 32768).astype(np.int64)


def write(out: str, num_docs: int, seed: int = 0, shard_mb: int = 256) -> dict:
  """Writes the synthetic source to the local directory `out` (atomically); returns its stats."""
  if os.path.isfile(os.path.join(out, 'stats.json')):
    with open(os.path.join(out, 'stats.json')) as f:
      return json.load(f)
  tmp = f'{out}.tmp{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  n = lengths(num_docs, seed)
  docs = (np.full(int(m), i % 60000 + 3, np.uint16) for i, m in enumerate(n))
  written = shards.write_shards(docs, tmp, 'train', shard_mb << 20, _SYNTHETIC_WRITER)
  stats = dict(source=f'synthetic-{seed}', corpora='synthetic', missing_corpora={}, dtype='uint16',
               tokenizer='', tokenizer_hash='',
               train=dict(documents=num_docs, tokens=int(n.sum()), chars=0, shards=written),
               eval=dict(documents=0, tokens=0, chars=0, shards=[]))
  with open(os.path.join(tmp, 'stats.json'), 'w') as f:
    json.dump(stats, f, indent=1)
  os.rename(tmp, out)
  return stats


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--docs', type=int, required=True)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--shard_mb', type=int, default=256)
  args = parser.parse_args()
  t0 = time.perf_counter()
  stats = write(args.out, args.docs, args.seed, args.shard_mb)
  print(f'{args.out}: {stats["train"]["documents"]:,} documents, {stats["train"]["tokens"]:,} tokens, '
        f'{len(stats["train"]["shards"])} shards, {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
  main()
