"""Top-k store throughput and size: write (encode + tensorstore) and read (tensorstore + checksum +
decode) tokens/s of lmjax/distill/store.py, per encoding and k, with the bytes per token of the files.

  taskset -c 0 python benchmarks/distill_store.py [--k=64,128 --vocab=128256 --rows=64 --seq=512]

Random top-k of a `vocab`-token model (ids distinct per position, sorted log-probs), chunks of 8 rows.
"""
import argparse
import glob
import os
import tempfile
import time

import numpy as np

from lmjax.distill import store as store_lib


def fields(rng, rows, seq, k, vocab):
  logits = np.sort(rng.normal(size=(rows, seq, k)) * 3, -1)[..., ::-1]
  lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.25)).astype(np.float32)
  ids = np.argsort(rng.random((rows, seq, vocab)), -1)[..., :k].astype(np.int32) if vocab <= 4096 \
      else rng.integers(0, vocab, (rows, seq, k), dtype=np.int32)
  return {'teacher_ids': ids, 'teacher_logprobs': lp,
          'teacher_tail': (1 - np.exp(lp).sum(-1)).astype(np.float32)}


def measure(k, encoding, vocab, rows, seq, chunk_rows=8):
  data = fields(np.random.default_rng(0), rows, seq, k, vocab)
  with tempfile.TemporaryDirectory() as d:
    store = store_lib.Store.create(d, k=k, encoding=encoding, vocab_size=vocab, stream={'seq_len': seq},
                                   rows=rows, chunk_rows=chunk_rows, teacher='', tokenizer_digest='')
    start = time.perf_counter()
    for c in range(rows // chunk_rows):
      store.write_chunk(c, {f: v[c * chunk_rows:(c + 1) * chunk_rows] for f, v in data.items()})
    write_s = time.perf_counter() - start
    reader = store_lib.Store.open(d)
    start = time.perf_counter()
    reader.read(0, rows)
    read_s = time.perf_counter() - start
    size = sum(os.path.getsize(f) for name in ('ids', 'logprobs', 'tail')
               for f in glob.glob(os.path.join(d, name, '[0-9]*')))
  tokens = rows * seq
  return dict(k=k, encoding=encoding, bytes_per_token=size / tokens,
              write_tokens_per_s=round(tokens / write_s), read_tokens_per_s=round(tokens / read_s))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--k', default='64,128')
  parser.add_argument('--vocab', type=int, default=128_256)
  parser.add_argument('--rows', type=int, default=64)
  parser.add_argument('--seq', type=int, default=512)
  a = parser.parse_args()
  for k in map(int, a.k.split(',')):
    for encoding in ('full', 'compact'):
      print(measure(k, encoding, a.vocab, a.rows, a.seq))


if __name__ == '__main__':
  main()
