"""The Beam runner of prepare's steps after cleaning, for a clean store that beam.py wrote: its docs
files are ranges of the content-hash order (clean_store.part), and beam-files.json has their sizes,
so no machine holds a source's documents or an index of them.

  split      on the launching machine: shards_lib.split_files over the files' sizes (it reads the
             lengths files, 8 bytes a document, of at most three docs files a source)
  tokenizer  one worker reads the sample (each source's first train documents, as far as its share
             of tokenizer.sample_chars) and trains it (shards_lib.train_tokenizer)
  tokenize   per docs file: its held-out and train documents tokenized into
             <store>/tokens-<tokenizer hash>-<run>/<source>-<file>.ids (the ids, concatenated) and
             .lengths.npy (int64 tokens a document); their counts into counts.json
  shards     per shard: shards_lib.shard_of puts a document by the offset of its ids in its split, which
             the counts give per file, so each shard knows the files it covers; it reads its
             documents' ids from them, writes the shard and its starts on local disk and copies
             them to the source's directory; the entries into shards.json
Then the launching machine checks that the shards hold every document, writes each source's
stats.json (last: it marks a source complete) and removes the tokens directory; the report's summary
was made in the clean pipeline (beam.report_summary). Shards, tokenizer and stats are the local
runner's, byte for byte (tests/test_data_beam.py).
"""
from __future__ import annotations

import functools
import json
import os
import uuid
import tempfile
from typing import Iterator

import apache_beam as beam
import numpy as np

from lmjax import errors, fs
from lmjax.data import beam as beam_lib
from lmjax.data import clean_store
from lmjax.data import shards as shards_lib
from lmjax.data import tokenizer as tokenizer_lib

COUNTS = 'counts.json'  # [[source, file, eval docs, eval tokens, eval chars, train docs, ...], ...]
SHARDS = 'shards.json'  # [[source, split, k, stats.json entry], ...]
_tokenizers = {}  # one loaded tokenizer per worker process, path and content hash


def _tokenizer(path: str, tok_hash: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer at `path`, loaded once per worker (keyed by its hash too: a file replaced in place
  between runs on long-lived workers is loaded again)."""
  if (path, tok_hash) not in _tokenizers:
    _tokenizers[path, tok_hash] = tokenizer_lib.load(path)
  return _tokenizers[path, tok_hash]


def splits(data_cfg, names: list[str], store: str,
           sizes: clean_store.Sizes) -> dict[str, tuple[int, int]]:
  """{source: (held-out documents, train documents)}, as shards_lib.split gives them, from the files'
  sizes and the lengths files of at most three docs files a source."""
  def lengths_of(name):
    return functools.lru_cache(maxsize=None)(lambda i: clean_store.read_lengths(
        clean_store.docs_file(store, name, i, sizes.files)))

  return {n: shards_lib.split_files(sizes.sources.get(n, []), lengths_of(n), data_cfg.eval,
                                 int(data_cfg.sources[n].max_chars)) for n in names}


def texts(store: str, sizes: clean_store.Sizes, name: str, begin: int, end: int) -> Iterator[str]:
  """The texts of documents [begin, end) of source `name` in content-hash order, read from the
  files they are in."""
  first = 0
  for i, docs, _ in sizes.sources.get(name, []):
    if first < end and first + docs > begin:
      path = clean_store.docs_file(store, name, i, sizes.files)
      for g, doc in zip(range(first, min(first + docs, end)), clean_store.file_docs(path)):
        if g >= begin:
          yield doc['text']
    first += docs


def _train_tokenizer(path: str, data_cfg, store: str, sizes: clean_store.Sizes, split: dict):
  shards_lib.train_tokenizer(data_cfg, path, {n: texts(store, sizes, n, e, e + t)
                                           for n, (e, t) in split.items()})
  yield path


def _tokenize_file(item, store: str, files: int, tok_path: str, tok_hash: str, work: str):
  """One docs file's held-out and train documents, tokenized into the tokens directory; yields
  [source, file, eval docs, eval tokens, eval chars, train docs, train tokens, train chars]."""
  name, i, first, n_eval, end = item
  tok = _tokenizer(tok_path, tok_hash)
  dtype = shards_lib.token_dtype(tok.vocab_size)
  docs = clean_store.file_docs(clean_store.docs_file(store, name, i, files))
  lengths, chars = [], []
  with tempfile.TemporaryDirectory(prefix='lmjax-tokens-') as tmp:
    with open(os.path.join(tmp, 'ids'), 'wb') as out:

      def encode(batch):
        for ids in tok.encode_batch(batch, num_threads=1):
          out.write(np.asarray(ids, dtype).tobytes())
          lengths.append(len(ids))

      batch = []
      for _, doc in zip(range(first, end), docs):
        batch.append(doc['text'])
        chars.append(len(doc['text']))
        if len(batch) == shards_lib.ENCODE_BATCH:
          encode(batch)
          batch = []
      encode(batch)
    np.save(os.path.join(tmp, 'lengths.npy'), np.asarray(lengths, np.int64))
    for ext in ('ids', 'lengths.npy'):
      fs.upload_file(os.path.join(tmp, ext), os.path.join(work, f'{name}-{i:05d}.{ext}'))
  n = min(max(n_eval - first, 0), len(lengths))  # the file's held-out documents come first
  yield [name, i, n, sum(lengths[:n]), sum(chars[:n]), len(lengths) - n, sum(lengths[n:]),
         sum(chars[n:])]


def _write_shard(item, work: str, itemsize: int):
  """Writes shard k of a source's split from the pieces of the tokens files it covers (file, the
  offset of its first document of the split in the split, its documents [lo, hi) of the file, the
  byte where lo starts in the file's ids) into `dest`; yields [source, split, k, entry]."""
  name, split, k, shard_bytes, dest, pieces = item
  with tempfile.TemporaryDirectory(prefix='lmjax-shard-') as tmp:
    writer = None
    for i, offset, lo, hi, byte in pieces:
      with fs.open(os.path.join(work, f'{name}-{i:05d}.lengths.npy'), 'rb') as f:
        nbytes = np.load(f)[lo:hi] * itemsize
      starts = offset + np.concatenate([[0], np.cumsum(nbytes)[:-1]])
      mine = np.flatnonzero(shards_lib.shard_of(starts, shard_bytes) == k)
      if not len(mine):
        continue
      a, b = int(mine[0]), int(mine[-1]) + 1
      with fs.open(os.path.join(work, f'{name}-{i:05d}.ids'), 'rb') as f:
        f.seek(byte + int(starts[a] - offset))
        data = f.read(int(nbytes[a:b].sum()))
      writer = writer or shards_lib.ShardWriter(tmp, split, k)
      pos = 0
      for n in nbytes[a:b]:
        writer.write(data[pos:pos + n], int(n) // itemsize)
        pos += n
    if writer is None:  # no document starts in this shard (one before it is longer than a shard)
      return
    entry = writer.close()
    for path in (writer.path, shards_lib.starts_file(writer.path)):
      fs.upload_file(path, os.path.join(dest, os.path.basename(path)))
  yield [name, split, k, entry]


def _collect(pcoll, path: str, label: str):
  """Writes every element of `pcoll` (JSON-able) to the JSON list `path`, in sorted order."""
  return (pcoll | f'{label}: one key' >> beam.Map(lambda row: (0, row))
          | f'{label}: all' >> beam.GroupByKey()
          | f'{label}: write' >> beam.MapTuple(lambda _, rows: fs.write_atomic(
              path, json.dumps(sorted(rows, key=lambda r: r[:3])))))


def _read_list(path: str, expected: bool) -> list:
  """What _collect wrote to `path`: nothing if its pipeline had no elements, else an error if the
  file is missing (a runner lost the pipeline's output)."""
  if fs.isfile(path):
    return json.loads(fs.read_text(path))
  if expected:
    raise errors.FileSystemError(f'{path} is missing: the Beam pipeline that writes it lost its output')
  return []


def _pieces(counts: list[list], split: str, itemsize: int, shard_bytes: int) -> dict[int, list]:
  """{shard: its pieces (as _write_shard takes them)} of one source's split, from its files' rows of
  counts.json in file order."""
  shards, offset = {}, 0
  for _, i, n_eval, eval_tokens, _, n_train, train_tokens, _ in counts:
    if split == 'eval':
      lo, hi, byte, tokens = 0, n_eval, 0, eval_tokens
    else:
      lo, hi, byte, tokens = n_eval, n_eval + n_train, eval_tokens * itemsize, train_tokens
    if hi > lo:  # its documents start in [offset, end], end itself for a last one of no tokens
      end = offset + tokens * itemsize
      for k in range(shards_lib.shard_of(offset, shard_bytes), shards_lib.shard_of(end, shard_bytes) + 1):
        shards.setdefault(k, []).append((i, offset, lo, hi, byte))
    offset += tokens * itemsize
  return shards


def write_sources(data_cfg, dirs: dict[str, str], store: str, sizes: clean_store.Sizes,
                  split: dict[str, tuple[int, int]], tok, tok_hash: str,
                  missing: dict[str, dict]) -> None:
  """Writes the shards and stats.json of sources {name: final directory} (module docstring). A local
  directory is written under a temporary name and renamed; on an object store stats.json, written
  last, marks it complete. The tokens directory is this call's own, removed at the end."""
  work = os.path.join(store, f'tokens-{tok_hash}-{uuid.uuid4().hex[:8]}')
  dest = {n: f'{d}.tmp{os.getpid()}' if fs.is_local(d) else d for n, d in dirs.items()}
  try:
    for n, d in dest.items():
      if d != dirs[n]:
        fs.rmtree(d)
      fs.makedirs(d)
    counts = _tokenize(data_cfg, dirs, store, sizes, split, tok, tok_hash, work)
    entries = _shards(data_cfg, dirs, dest, counts, work, shards_lib.token_dtype(tok.vocab_size).itemsize)
    for n, final in dirs.items():
      mine = [r for r in counts if r[0] == n]
      parts = {}
      for split_name, docs_at, chars_at in (('eval', 2, 4), ('train', 5, 7)):
        shards = [e for name, s, _, e in entries if name == n and s == split_name]
        documents = sum(r[docs_at] for r in mine)
        if sum(e['records'] for e in shards) != documents:  # rows dropped in flight: a bug (ours or Beam's)
          raise RuntimeError(f'source {n!r}: the {split_name} shards hold '
                             f'{sum(e["records"] for e in shards)} documents, not {documents}: '
                             'the Beam pipeline lost some')
        parts[split_name] = (documents, sum(r[chars_at] for r in mine), shards)
      stats = shards_lib.source_stats(data_cfg, n, tok, tok_hash, missing[n], parts)
      fs.write_atomic(os.path.join(dest[n], 'stats.json'), json.dumps(stats, indent=1))
      if dest[n] != final:
        try:
          os.rename(dest[n], final)
        except OSError:  # another process finished first; its files are identical
          pass
  finally:
    fs.rmtree(work)
    for n, d in dest.items():
      if d != dirs[n]:
        fs.rmtree(d)


def _tokenize(data_cfg, dirs, store, sizes, split, tok, tok_hash: str, work: str) -> list[list]:
  """The tokenize pipeline: one task a docs file with held-out or train documents; their counts."""
  items = []
  for n in dirs:
    first, (n_eval, n_train) = 0, split[n]
    for i, docs, _ in sizes.sources.get(n, []):
      if first < n_eval + n_train:
        items.append((n, i, first, n_eval, n_eval + n_train))
      first += docs
  p = beam_lib.pipeline(data_cfg.clean)
  tokenized = (p | 'files' >> beam.Create(items) | 'spread' >> beam.Reshuffle()
               | 'tokenize' >> beam.FlatMap(_tokenize_file, store, sizes.files, tok.path, tok_hash,
                                            work))
  _collect(tokenized, os.path.join(work, COUNTS), 'counts')
  beam_lib.execute(p)
  counts = _read_list(os.path.join(work, COUNTS), expected=bool(items))
  if sorted(r[:2] for r in counts) != sorted([n, i] for n, i, *_ in items):  # a bug, as in write_sources
    raise RuntimeError(f'{os.path.join(work, COUNTS)}: {len(counts)} files tokenized of '
                       f'{len(items)}: the Beam pipeline lost some')
  return counts


def _shards(data_cfg, dirs, dest, counts: list[list], work: str, itemsize: int) -> list[list]:
  """The shards pipeline: one task a shard of every source's splits; their stats.json entries."""
  jobs = []
  for n in dirs:
    mine = [r for r in counts if r[0] == n]
    for split_name, shard_bytes in (('train', int(data_cfg.shard_bytes)), ('eval', 0)):
      for k, pieces in sorted(_pieces(mine, split_name, itemsize, shard_bytes).items()):
        jobs.append((n, split_name, k, shard_bytes, dest[n], pieces))
  p = beam_lib.pipeline(data_cfg.clean)
  written = (p | 'shards' >> beam.Create(jobs) | 'spread' >> beam.Reshuffle()
             | 'write' >> beam.FlatMap(_write_shard, work, itemsize))
  _collect(written, os.path.join(work, SHARDS), 'shards')
  beam_lib.execute(p)
  return _read_list(os.path.join(work, SHARDS), expected=bool(jobs))


def train_tokenizer(data_cfg, path: str, store: str, sizes: clean_store.Sizes,
                    split: dict[str, tuple[int, int]]) -> tokenizer_lib.Tokenizer:
  """Trains the tokenizer on one worker (its sample is read there, not here); loads it."""
  p = beam_lib.pipeline(data_cfg.clean)
  _ = (p | 'one' >> beam.Create([path])
       | 'train' >> beam.FlatMap(_train_tokenizer, data_cfg, store, sizes, split))
  beam_lib.execute(p)
  return tokenizer_lib.load(path)
