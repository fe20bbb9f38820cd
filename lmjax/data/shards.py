"""A prepared source's split and shard files, written alike by the local runner (prepare.py) and the
Beam runner (beam_shards.py): the held-out/train split of the content-hash order (`split`, or
`split_files` over a Beam store's files), the tokenizer trained on the train documents, the shard of
a document by its offset (`shard_of`), the ArrayRecord shards and their starts files
(`ShardWriter`, `write_shards`), and a source's stats.json (`source_stats`). The layout is in
prepare.py's docstring.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterator

import numpy as np
from array_record.python import array_record_module

from lmjax import fs
from lmjax.data import tokenizer as tokenizer_lib

SHARD_FORMAT = 3  # bump when the shard files change (2: 64 records a chunk, per-shard starts;
#                  3: a document's shard by its offset, shard_of)
# 64 records a chunk: a row reads a run of consecutive documents, so one chunk serves several, and a
# reader opens in 0.2 ms with a small chunk index (one record a chunk: 9 ms and 3 MB a 256 MB shard).
WRITER_OPTIONS = 'group_size:64,uncompressed'
ENCODE_BATCH = 256  # documents per tokenizer call


def file_checksum(path: str) -> str:
  h = hashlib.blake2b(digest_size=16)
  with fs.open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def split(lengths: np.ndarray, eval_cfg, max_chars: int) -> tuple[int, int]:
  """(held-out, train) document counts of a source whose documents, in content-hash order, have
  `lengths` characters: the first n_eval are held out, the next n_train are trained on (max_chars=0:
  all the rest)."""
  n = len(lengths)
  limit = max(1, int(n * eval_cfg.max_holdout_fraction)) if n > 1 else 0
  before = np.concatenate([[0], np.cumsum(lengths)])  # characters before each document
  n_eval = min(limit, int(np.searchsorted(before, eval_cfg.holdout_chars, side='left')))
  n_train = n - n_eval
  if max_chars:
    rest = before[n_eval:] - before[n_eval]
    n_train = min(n_train, int(np.searchsorted(rest, max_chars, side='left')))
  return n_eval, n_train


def split_files(files: list[tuple[int, int, int]], lengths_of: Callable[[int], np.ndarray], eval_cfg,
                max_chars: int) -> tuple[int, int]:
  """`split` of a source held as docs files whose concatenation is its content-hash order (a Beam
  store: clean_store.Sizes), without its lengths in memory: files[j] = (file index, documents,
  characters); lengths_of(file index) = the characters of that file's documents. Reads the lengths
  of at most three files (where the hold-out and max_chars end)."""
  docs = np.array([0] + [d for _, d, _ in files], np.int64).cumsum()  # documents before file j
  chars = np.array([0] + [c for _, _, c in files], np.int64).cumsum()  # characters before file j
  n = int(docs[-1])
  limit = max(1, int(n * eval_cfg.max_holdout_fraction)) if n > 1 else 0

  def before_in(j: int) -> np.ndarray:  # characters before each document of file j
    return chars[j] + np.concatenate([[0], np.cumsum(lengths_of(files[j][0]))[:-1]])

  def count_below(x: int) -> int:  # documents with fewer than x characters before them
    j = int(np.searchsorted(chars[:-1], x, side='left')) - 1  # the last file starting below x
    return 0 if j < 0 else int(docs[j] + np.searchsorted(before_in(j), x, side='left'))

  def before(k: int) -> int:  # characters before document k
    if k == n:
      return int(chars[-1])
    j = int(np.searchsorted(docs, k, side='right')) - 1
    return int(before_in(j)[k - docs[j]])

  n_eval = min(limit, count_below(eval_cfg.holdout_chars))
  n_train = n - n_eval
  if max_chars:
    n_train = min(n_train, count_below(before(n_eval) + max_chars) - n_eval)
  return n_eval, n_train


def train_tokenizer(data_cfg, path: str, train_texts: dict[str, Iterator[str]]) -> tokenizer_lib.Tokenizer:
  """Trains the tokenizer on a weighted sample (tokenizer.sample) of each source's train documents,
  `train_texts[source]` in content-hash order (read only as far as the sample goes)."""
  tcfg = data_cfg.tokenizer
  sentences = tokenizer_lib.sample(train_texts, {k: float(v) for k, v in tcfg.sample_weights.items()},
                                   int(tcfg.sample_chars))
  return tokenizer_lib.train(sentences, path, vocab_size=int(tcfg.vocab_size),
                             model_type=tcfg.model_type, character_coverage=tcfg.character_coverage,
                             num_threads=int(data_cfg.num_threads) or 1)


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def starts_file(shard_file: str) -> str:
  """The name of a shard's starts file (`train-00000.arrayrecord` -> `train-00000.starts.npy`)."""
  return shard_file.removesuffix('.arrayrecord') + '.starts.npy'


class ShardWriter:
  """Writes shard `k` of a split, `<prefix>-<k:05d>.arrayrecord` (one record a document: its token
  ids) and its starts file, into the local directory `directory`."""

  def __init__(self, directory: str, prefix: str, k: int, writer_options: str = WRITER_OPTIONS):
    self.path = os.path.join(directory, f'{prefix}-{k:05d}.arrayrecord')
    self._writer = array_record_module.ArrayRecordWriter(self.path, writer_options)
    self._lengths = []

  def write(self, data: bytes, tokens: int) -> None:
    self._writer.write(data)
    self._lengths.append(tokens)

  def close(self) -> dict:
    """Closes the shard and writes its starts; returns its entry of stats.json."""
    self._writer.close()
    starts = np.zeros(len(self._lengths) + 1, np.int64)
    np.cumsum(np.asarray(self._lengths, np.int64) + 2, out=starts[1:])  # BOS and EOS
    np.save(starts_file(self.path), starts)
    return dict(file=os.path.basename(self.path), records=len(self._lengths),
                tokens=int(sum(self._lengths)), bytes=os.path.getsize(self.path),
                checksum=file_checksum(self.path))


def shard_of(offset, shard_bytes: int):
  """The shard of a document whose token ids start `offset` bytes (an int, or an int array) into its
  split's stream of ids: shard k holds the documents starting in [k, k + 1) * shard_bytes (0: one
  shard). A rule of the offset alone, so writers of different parts of a split (beam_shards.py)
  agree; a document longer than shard_bytes leaves the next numbers unused."""
  return offset // shard_bytes if shard_bytes > 0 else offset * 0


def write_shards(token_docs: Iterator[np.ndarray], directory: str, prefix: str, shard_bytes: int,
                 writer_options: str = WRITER_OPTIONS) -> list[dict]:
  """Writes a split's documents, in order, into shards of about `shard_bytes` token bytes
  (`shard_of`) in `directory`; returns their entries of stats.json."""
  shards, writer, offset = [], None, 0
  for ids in token_docs:
    data = ids.tobytes()
    k = shard_of(offset, shard_bytes)
    if writer is None or not writer.path.endswith(f'-{k:05d}.arrayrecord'):
      if writer is not None:
        shards.append(writer.close())
      writer = ShardWriter(directory, prefix, k, writer_options)
    writer.write(data, len(ids))
    offset += len(data)
  if writer is not None:
    shards.append(writer.close())
  return shards


def source_stats(data_cfg, name: str, tok, tok_hash: str, missing_corpora: dict,
                 splits: dict[str, tuple[int, int, list[dict]]]) -> dict:
  """A source's stats.json; splits: {'train' and 'eval': (documents, characters, shard entries)}."""
  stats = dict(source=name, corpora=data_cfg.sources[name].corpora, missing_corpora=missing_corpora,
               dtype=token_dtype(tok.vocab_size).name, tokenizer=os.path.basename(tok.path),
               tokenizer_hash=tok_hash)
  for split_name in ('train', 'eval'):
    documents, chars, shards = splits[split_name]
    stats[split_name] = dict(documents=documents, tokens=sum(s['tokens'] for s in shards),
                             chars=chars, shards=shards)
  return stats
