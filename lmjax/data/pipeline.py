"""Grain input pipeline: per-source packed rows, a stage-scheduled block-deterministic mixture, batches.

Every training row is a pure function of (seed, global row index), so the stream is exactly
resumable from one integer (grain's iterator state is the next step), a stage switch happens exactly
at its step, and each of P processes computes only its slice of every global batch.

Rows of one source ("concatenate then split" packing). A document is `[BOS] ids [EOS]`. A source's
documents, in the order prepare stored them (content-hash order, so already shuffled), form one
stream, cut into rows of seq_len inputs: row r holds stream positions [r*L, r*L+L) and their next
tokens. Epoch e of the source visits those rows in a permutation seeded with (seed, source, e) --
grain's index_shuffle, computed per index, so neither the rows nor the documents are ever listed.
The last row is padded, so an epoch is exactly `rows_per_epoch` rows and every token is a target
once per epoch. A row reads only the documents it overlaps, located by per-shard starts files read
on demand once a row first touches their shard: memory and cost per row do not grow with the source
(docs/data.md, "Rows at scale", says what this order gives up against a fresh document order each
epoch). Segment ids number the document pieces in a row 1, 2, ... (0 = padding);
positions restart at 0 at each piece (a document cut by a row boundary continues in another row as a
new piece: the model sees no context across rows anyway); weights are 1 where the target is the next
token of the same document.

Mixture (after Levanter's block-deterministic mixture, data/mixture.py). The stages are the phases of
`config.phases` (lmjax/phases.py) that have steps: stage j starts at its phase's first step and covers
global rows [start_j * B, start_{j+1} * B), so the mixture switches at the very step the learning-rate
shape does. Inside a
stage the rows are cut into blocks of `mix_block` rows (the last one cut short by the stage end); in a
block of n rows, source s gets exactly its largest-remainder share of round(w_s * n) rows, in an order
shuffled with (seed, stage, block). So proportions hold exactly in every block, a zero weight never
draws, and the number of rows each source drew before any row is known in closed form -- which is
what makes the row of a source (and the epochs it saw) computable without replaying the stream.

Weights are 'proportions' (shares of rows) or 'repeats' (share_s ~ repeat_s * size_s: a source is seen
repeat_s times as often as its natural share, so its epochs grow repeat_s times as fast; this is how a
small high-quality source is upsampled). The epochs each source saw are in `metrics`.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import shutil
import threading

import grain
import grain.experimental
import ml_collections
import numpy as np
from array_record.python import array_record_module

from lmjax import batch as batch_lib
from lmjax import errors
from lmjax import fs
from lmjax.data import corpora
from lmjax.data import prepare as prepare_lib
from lmjax.data import shards as shards_lib

_NUM_STEPS = 1 << 50  # length of the (unbounded) step-indexed dataset


def defaults() -> ml_collections.ConfigDict:
  """`config.data`: one source (the Python standard library), a small BPE tokenizer. The mixture
  weights are the phases' (`config.phases.<name>.weights`)."""
  return ml_collections.ConfigDict(dict(
      # Each source: comma-separated corpus names (lmjax.data.corpora.CORPORA, or txt:/jsonl:/
      # parquet: globs) and a cap on the characters of its train documents (0 = all); optional
      # `kind` (en | zh | code: normalisation and quality variant) and `languages` (ISO codes
      # langid keeps, '' = no langid), else by the corpus's domain (prepare.source_kind).
      sources={'code': dict(corpora='python_stdlib', max_chars=0)},
      weights_are='proportions',  # proportions | repeats (weight x the source's epoch size)
      mix_block=1024,  # rows per block in which the proportions hold exactly
      allow_missing=True,  # run without sources whose optional corpora are not installed (reported)
      tokenizer=dict(
          path='',  # an existing sentencepiece .model; '' = train one (cached in the cache dir)
          vocab_size=2048,
          model_type='bpe',  # bpe | unigram
          sample_chars=2_000_000,  # training sample size, drawn from the sources by sample_weights
          sample_weights={},  # {source: weight}; empty = equal
          character_coverage=0.9995,  # the rest is spelled in bytes (byte fallback)
      ),
      eval=dict(
          holdout_chars=100_000,  # held-out characters per source (documents, chosen by content hash)
          max_holdout_fraction=0.1,  # ... but at most this share of a source's documents
          num_batches=2,  # eval batches per source (fewer if the held-out docs fill fewer)
      ),
      clean=prepare_lib.defaults(),  # the cleaning stages' runner and thresholds (docs/data.md)
      cache_dir='',  # prepared data and tokenizer; '' = <workdir>/data (local or gs://). Set to share.
      shard_bytes=256 << 20,  # bytes of token ids per ArrayRecord train shard
      verify_checksums=True,  # hash each shard when a row first reads it (corrupt: an error naming it)
      num_threads=2,  # grain reader threads (and sentencepiece threads when preparing)
      prefetch=8,  # batches prefetched
  ))


class SourceData:
  """The prepared documents of one split of one source, read as one stream of `[BOS] ids [EOS]`
  documents in stored order (content-hash order: lmjax/data/prepare.py).

  Start-up reads stats.json alone: nothing per shard or per document. A shard is opened when a row
  first reads from it: its ArrayRecord reader and its starts file (shards.starts_file, searched a
  few entries at a time), checked then (size, records, tokens and, with
  `verify`, the checksum; once a process). At most `max_open` shards stay open (least recently used
  closed first). `directory` is local or a URL (gs://; lmjax/fs.py): ArrayRecord
  reads local files only, so a URL's shard and starts file are copied to this host's disk
  (`mirror_dir`) when first opened: each host fetches only the shards its rows read.
  """

  def __init__(self, directory: str, split: str, verify: bool, max_open: int = 32):
    stats_path = os.path.join(directory, 'stats.json')
    if not fs.isfile(stats_path):
      raise errors.MissingFile(f'prepared data {stats_path!r} does not exist')
    self.stats = json.loads(fs.read_text(stats_path))
    self.dtype = np.dtype(self.stats['dtype'])
    self._directory, self._verify, self._max_open = directory, verify, max_open
    self._shards = self.stats[split]['shards']
    # Stream position of each shard's first token (+ the total).
    self.shard_starts = np.cumsum([0] + [s['tokens'] + 2 * s['records'] for s in self._shards])
    self.num_tokens = int(self.shard_starts[-1])
    self.num_docs = int(sum(s['records'] for s in self._shards))
    if self.num_docs != self.stats[split]['documents']:
      raise errors.DataError(f'{directory}: its shards hold {self.num_docs} {split} documents, stats.json '
                             f'says {self.stats[split]["documents"]}')
    self._open: collections.OrderedDict[int, _OpenShard] = collections.OrderedDict()
    self._checked: set[int] = set()
    self._lock = threading.Lock()

  @property
  def fetched(self) -> list[str]:
    """The shard files opened so far."""
    with self._lock:
      return [self._shards[i]['file'] for i in sorted(self._checked)]

  def _shard(self, i: int) -> _OpenShard:
    """Shard i, opened (and checked, the first time) unless it is open."""
    with self._lock:
      if i in self._open:
        self._open.move_to_end(i)
        return self._open[i]
    shard = self._shards[i]
    path = os.path.join(self._directory, shard['file'])
    starts_path = os.path.join(self._directory, shards_lib.starts_file(shard['file']))
    if not fs.is_local(path):
      path, starts_path = _mirror(path, shard['bytes']), _mirror(starts_path, None)
    if i not in self._checked:
      _check_size(path, shard)
      if self._verify and shards_lib.file_checksum(path) != shard['checksum']:
        raise errors.DataError(f'data shard {path!r} fails its checksum (corrupt); {_hint(path)}')
    opened = _OpenShard(path, starts_path, shard)
    with self._lock:  # an evicted shard closes once no thread is reading it (its last reference)
      self._checked.add(i)
      self._open[i] = opened
      while len(self._open) > self._max_open:
        self._open.popitem(last=False)
      return opened

  def span(self, begin: int, end: int) -> list[tuple[np.ndarray, int]]:
    """The documents that overlap stream positions [begin, end): [(token ids, stream position of
    the document's BOS)], in stream order; each document checked against its recorded length."""
    out = []
    i = int(np.searchsorted(self.shard_starts, begin, side='right')) - 1
    while i < len(self._shards) and self.shard_starts[i] < end:
      shard = self._shard(i)
      offset = int(self.shard_starts[i])
      first, starts = shard.locate(begin - offset, end - offset)
      records = shard.reader.read(list(range(first, first + len(starts) - 1)))
      for j, (record, start, stop) in enumerate(zip(records, starts, starts[1:]), start=first):
        ids = np.frombuffer(record, self.dtype)
        if len(ids) + 2 != stop - start:
          raise errors.DataError(f'document {j} of data shard {self._shards[i]["file"]!r} in '
                                 f'{self._directory!r}: {len(ids)} tokens, expected {stop - start - 2} '
                                 '(corrupt); delete its directory to re-prepare')
        out.append((ids, offset + int(start)))
      i += 1
    return out


class _OpenShard:
  """An open shard: its ArrayRecord reader, and its starts file searched with a few small reads a
  row (opened for each search), so an open shard holds one file descriptor and no array, whatever its
  size."""

  BLOCK = 64  # starts read at a time once the search is this close

  def __init__(self, path: str, starts_path: str, shard: dict):
    self.reader = array_record_module.ArrayRecordReader(path, 'readahead_buffer_size:0',
                                                        file_reader_buffer_size=32768)
    n = shard['records']
    if self.reader.num_records() != n:
      raise errors.DataError(f'data shard {path!r} has {self.reader.num_records()} records, expected {n} '
                             f'(corrupt); {_hint(path)}')
    self._path = starts_path
    try:
      with open(starts_path, 'rb') as f:
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
        shape, fortran, dtype = read_header(f)
        self._offset, size = f.tell(), os.fstat(f.fileno()).st_size
        last = self._starts(f.fileno(), n, n + 1) if size == self._offset + 8 * (n + 1) else None
    except (OSError, ValueError, KeyError) as e:
      raise errors.DataError(f'starts file {starts_path!r} of data shard {path!r}: not a .npy file ({e}); '
                             f'{_hint(path)}') from None
    self._n = n
    if dtype != np.dtype('<i8') or fortran or shape != (n + 1,) or last is None or \
        last[0] != shard['tokens'] + 2 * n:
      raise errors.DataError(f'starts file {starts_path!r}: {dtype} {shape}, expected int64 ({n + 1},) '
                             f'ending at {shard["tokens"] + 2 * n} (corrupt); {_hint(path)}')

  def _starts(self, fd: int, lo: int, hi: int) -> np.ndarray:
    """starts[lo:hi] read from the starts file open as `fd`."""
    return np.frombuffer(os.pread(fd, 8 * (hi - lo), self._offset + 8 * lo), '<i8')

  def locate(self, begin: int, end: int) -> tuple[int, np.ndarray]:
    """(first document, starts of documents first .. last + 1) of the documents overlapping the
    shard's stream positions [begin, end)."""
    fd = os.open(self._path, os.O_RDONLY)
    try:
      lo, hi = 0, self._n  # the first document is the last i < n with starts[i] <= begin
      while hi - lo > self.BLOCK:
        mid = (lo + hi) // 2
        if self._starts(fd, mid, mid + 1)[0] <= begin:
          lo = mid
        else:
          hi = mid
      block = self._starts(fd, lo, min(lo + self.BLOCK, self._n) + 1)
      while block[-1] < end and lo + len(block) - 1 < self._n:  # the row reaches past this block
        more = self._starts(fd, lo + len(block), min(lo + len(block) + self.BLOCK, self._n + 1))
        block = np.concatenate([block, more])
    finally:
      os.close(fd)
    first = lo + max(int(np.searchsorted(block, begin, side='right')) - 1, 0)
    last = min(lo + int(np.searchsorted(block, end, side='left')), self._n)  # exclusive
    return first, block[first - lo:last - lo + 1]


def _hint(path: str) -> str:
  """What to do about a damaged prepared file."""
  return f'delete {os.path.dirname(path)!r} to prepare it again'


def _check_size(path: str, shard: dict) -> None:
  """Raises if the shard file is missing or not the size stats.json recorded."""
  if not os.path.isfile(path):
    raise errors.MissingFile(f'data shard {path!r} is missing; {_hint(path)}')
  if os.path.getsize(path) != shard['bytes']:
    raise errors.DataError(f'data shard {path!r} has {os.path.getsize(path)} bytes, expected '
                           f'{shard["bytes"]} (truncated or corrupt); {_hint(path)}')


def mirror_dir() -> str:
  """Where a host keeps its copies of shards prepared at a URL ($LMJAX_SHARD_CACHE, else
  ~/.cache/lmjax/shards)."""
  return os.environ.get('LMJAX_SHARD_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                             'lmjax', 'shards')


def _mirror(url: str, size: int | None) -> str:
  """A local copy of the file at `url` (fetched unless a copy is there, of `size` bytes if given)."""
  name = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
  path = os.path.join(mirror_dir(), f'{name}-{os.path.basename(url)}')
  if os.path.isfile(path) and (size is None or os.path.getsize(path) == size):
    return path
  os.makedirs(mirror_dir(), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.{threading.get_ident()}'
  with fs.removed_on_error(tmp), fs.open(url, 'rb') as src, open(tmp, 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  os.replace(tmp, path)
  return path


@functools.lru_cache(maxsize=256)
def _shuffle_seed(seed: tuple[int, ...], epoch: int) -> int:
  """A 32-bit seed of grain's index_shuffle from a source's seed and an epoch."""
  digest = hashlib.blake2b(repr((*seed, epoch)).encode(), digest_size=4).digest()
  return int.from_bytes(digest, 'little') >> 1  # 31 bits: within any integer seed index_shuffle takes


class PackedRows:
  """Rows of seq_len tokens cut from one source's stream of documents; a fresh row order each epoch.

  Row r of an epoch holds stream positions [r*L, r*L + L] (its inputs and their next tokens): the
  rows are fixed cuts of the stream in stored order, and epoch e visits them in a permutation seeded
  with (seed, e): grain's index_shuffle, a Feistel-style bijection computed per index, so no array per
  row or document is ever built. `row(k)` is row k of the infinite sequence epoch 0, epoch 1, ...;
  `rows_per_epoch` rows per epoch. With `shuffle=False` (eval) the rows are in stream order.
  `data`: a SourceData (or anything with `num_tokens` and `span`).
  """

  def __init__(self, data: SourceData, seq_len: int, seed: tuple[int, ...], *, bos_id: int, eos_id: int,
               shuffle: bool = True):
    self.data, self.seq_len, self.seed, self.shuffle = data, seq_len, seed, shuffle
    self.bos_id, self.eos_id = bos_id, eos_id
    self.epoch_tokens = int(data.num_tokens)
    # Targets are tokens 1..T-1 of the epoch's stream; row r has the targets r*L+1 .. r*L+L.
    self.rows_per_epoch = max(1, -(-(self.epoch_tokens - 1) // seq_len))

  def stream_row(self, k: int) -> int:
    """The row of the stream that row k of the sequence (epoch k // rows_per_epoch) reads."""
    epoch, i = divmod(int(k), self.rows_per_epoch)
    if not self.shuffle:
      return i
    return grain.experimental.index_shuffle(i, max_index=self.rows_per_epoch - 1,
                                            seed=_shuffle_seed(self.seed, epoch), rounds=4)

  def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [L+1], piece ids [L+1]) of row k; piece ids 1, 2, ... per document piece, 0 = pad."""
    L = self.seq_len
    begin = self.stream_row(k) * L
    end = min(begin + L + 1, self.epoch_tokens)
    tokens = np.zeros(L + 1, np.int32)
    pieces = np.zeros(L + 1, np.int32)
    at = 0
    for piece, (ids, start) in enumerate(self.data.span(begin, end), start=1):
      # This row holds [lo, hi) of the document's [BOS] ids [EOS]; slice without copying it whole.
      lo = max(begin - start, 0)
      hi = min(end - start, len(ids) + 2)
      pieces[at:at + hi - lo] = piece
      if lo == 0:
        tokens[at] = self.bos_id
        at, lo = at + 1, 1
      body = ids[lo - 1:min(hi, len(ids) + 1) - 1]
      tokens[at:at + len(body)] = body
      at += len(body)
      if hi == len(ids) + 2:
        tokens[at] = self.eos_id
        at += 1
    return tokens, pieces


def pack_example(tokens: np.ndarray, pieces: np.ndarray) -> dict[str, np.ndarray]:
  """One row's features from tokens [L+1] and piece ids [L+1] (see the module docstring)."""
  seg = pieces[:-1]
  L = len(seg)
  starts = np.flatnonzero(np.diff(seg, prepend=-1))
  positions = np.arange(L) - np.repeat(starts, np.diff(np.append(starts, L)))
  return dict(
      inputs=tokens[:-1].astype(np.int32),
      targets=tokens[1:].astype(np.int32),
      weights=((seg == pieces[1:]) & (seg > 0)).astype(np.float32),
      segment_ids=seg.astype(np.int32),
      positions=np.where(seg > 0, positions, 0).astype(np.int32),
  )


def _stack(examples: list[dict[str, np.ndarray]], source_ids: list[int]) -> dict[str, np.ndarray]:
  """A batch in the spec of lmjax/batch.py from rows (pack_example) and their sources."""
  out = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
  out['source_id'] = np.asarray(source_ids)
  return {name: out[name].astype(dtype, copy=False) for name, (dtype, _) in batch_lib.FIELDS.items()}


def _largest_remainder(weights: np.ndarray, n: int) -> np.ndarray:
  """Integer counts summing to n, proportional to `weights` (Hamilton's method; ties -> lower index)."""
  exact = weights / weights.sum() * n
  counts = np.floor(exact).astype(np.int64)
  rest = n - int(counts.sum())
  if rest:
    counts[np.argsort(-(exact - counts), kind='stable')[:rest]] += 1
  return counts


class Mixture:
  """The block-deterministic, stage-scheduled assignment of global rows to (source, row of source)."""

  def __init__(self, stages: list[tuple[int, np.ndarray]], rows_per_step: int, block: int, seed: int):
    """stages: [(start_step, weights [S])], starts increasing from 0; weights of a stage sum > 0."""
    self.num_sources = len(stages[0][1])
    self.block, self.seed = block, seed
    self.start_rows = np.array([s * rows_per_step for s, _ in stages], np.int64)
    self.weights = [np.asarray(w, np.float64) for _, w in stages]
    self.full_counts = [_largest_remainder(w, block) for w in self.weights]  # per full block
    self._block = functools.lru_cache(maxsize=64)(self._make_block)  # this mixture's blocks
    # Rows each source drew before each stage begins.
    self.before = np.zeros((len(stages) + 1, self.num_sources), np.int64)
    for j in range(len(stages) - 1):
      self.before[j + 1] = self.before[j] + self._drawn_in_stage(j, self.start_rows[j + 1] - self.start_rows[j])

  def _block_len(self, j: int, b: int) -> int:
    if j + 1 < len(self.start_rows):
      return int(min(self.block, self.start_rows[j + 1] - self.start_rows[j] - b * self.block))
    return self.block

  def _drawn_in_stage(self, j: int, n: int) -> np.ndarray:
    """Rows per source among the first n rows of stage j."""
    full, part = divmod(int(n), self.block)
    out = full * self.full_counts[j]
    if part:
      out = out + self._block(j, full)[1][:, part]
    return out

  def _make_block(self, j: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each row [n], rows drawn per source before each position [S, n+1]) of a block."""
    n = self._block_len(j, b)
    counts = _largest_remainder(self.weights[j], n)
    src = np.repeat(np.arange(self.num_sources), counts)
    src = np.random.default_rng([self.seed, j, b]).permutation(src)
    drawn = np.zeros((self.num_sources, n + 1), np.int64)
    np.cumsum(src[None, :] == np.arange(self.num_sources)[:, None], axis=1, out=drawn[:, 1:])
    return src, drawn

  def stage(self, row: int) -> int:
    return int(np.searchsorted(self.start_rows, row, side='right')) - 1

  def assign(self, row: int) -> tuple[int, int]:
    """(source, index of this row within that source's row sequence) of global row `row`."""
    j = self.stage(row)
    b, pos = divmod(int(row - self.start_rows[j]), self.block)
    src, drawn = self._block(j, b)
    s = int(src[pos])
    k = self.before[j, s] + b * self.full_counts[j][s] + drawn[s, pos]
    return s, int(k)

  def drawn_before(self, row: int) -> np.ndarray:
    """Rows each source drew among global rows [0, row)."""
    if row <= 0:
      return np.zeros(self.num_sources, np.int64)
    j = self.stage(row)
    return self.before[j] + self._drawn_in_stage(j, row - self.start_rows[j])


class Pipeline:
  """What the training loop uses: tokenizer, train iterator, eval batches, data metrics."""

  def __init__(self, tokenizer, sources, rows, mixture, *, global_batch_size, process_index,
               process_count, eval_rows, num_eval_batches, read_options, missing, prepared, stream):
    self.tokenizer = tokenizer
    self.sources = sources
    self.missing = missing  # {source: install line} of configured sources that are not installed
    self.prepared = prepared  # {source: its prepared directory's name, <source>-<key>}
    self.stream = stream  # what fixes the rows (`build`), as JSON: the key of a distillation store
    self._rows, self._mixture, self._eval_rows = rows, mixture, eval_rows
    self._global_batch = global_batch_size
    self._local_batch = global_batch_size // process_count
    self.row_offset = process_index * self._local_batch  # this process's first row of a global batch
    self._num_eval_batches = num_eval_batches
    self._read_options = read_options

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of global batch `step` (rows step*B + offset ... + local batch)."""
    first = step * self._global_batch + self.row_offset
    examples, source_ids = [], []
    for g in range(first, first + self._local_batch):
      s, k = self._mixture.assign(g)
      examples.append(pack_example(*self._rows[s].row(k)))
      source_ids.append(s)
    return _stack(examples, source_ids)

  def dataset(self) -> grain.MapDataset:
    """The step-indexed grain dataset of this process's batches."""
    return grain.MapDataset.range(_NUM_STEPS).map(self.batch)

  def train_iter(self):
    """A grain iterator of batches from step 0; get_state()/set_state() give an exact resume."""
    return iter(self.dataset().to_iter_dataset(self._read_options))

  def eval_batches(self) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per source, the held-out documents packed in stored order: a fixed list of batches.

    Rows past the held-out documents are padding (weights 0). A source with no held-out documents
    (it has a single document) is left out.
    """
    out = {}
    for source_id, (name, rows) in enumerate(self._eval_rows.items()):
      if rows is None:
        continue
      n = min(self._num_eval_batches, -(-rows.rows_per_epoch // self._global_batch))
      padding = np.zeros(rows.seq_len + 1, np.int32)
      out[name] = []
      for b in range(n):
        first = b * self._global_batch + self.row_offset
        out[name].append(_stack([
            pack_example(*(rows.row(g) if g < rows.rows_per_epoch else (padding, padding)))
            for g in range(first, first + self._local_batch)], [source_id] * self._local_batch))
    return out

  def plan(self, steps: int) -> dict[str, dict]:
    """Per source: its train tokens, rows per epoch, and the epochs the first `steps` steps read."""
    epochs = self.metrics(steps)
    return {name: dict(tokens=int(r.data.stats['train']['tokens']), rows_per_epoch=r.rows_per_epoch,
                       epochs=epochs[f'data/{name}/epochs'])
            for name, r in zip(self.sources, self._rows)}

  def metrics(self, step: int) -> dict[str, float]:
    """Data seen by the first `step` batches (steps 0 .. step-1) of the global stream.

    'data/<source>/epochs': rows drawn / rows per epoch (exact); 'data/phase': the index of the
    phase (among those with steps) of the last of those batches.
    """
    drawn = self._mixture.drawn_before(step * self._global_batch)
    out = {f'data/{name}/epochs': float(d / r.rows_per_epoch)
           for name, d, r in zip(self.sources, drawn, self._rows)}
    out['data/phase'] = float(self._mixture.stage(max(step - 1, 0) * self._global_batch))
    return out


def _name_seed(name: str) -> int:
  """A per-source seed from its name, so adding or losing another source leaves its order alone."""
  return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), 'little')


def stage_weights(phases, data_cfg, names: list[str], epoch_rows: dict[str, int]
                  ) -> list[tuple[int, np.ndarray]]:
  """The mixture stages [(start_step, row shares over `names`)] of the phases that have steps.

  `phases`: lmjax.phases.resolve's (weights validated there). Sources not in `names` (not installed)
  get weight 0. With weights_are='repeats' a weight multiplies the source's epoch size
  (`epoch_rows`), so the epochs sources see grow in the ratio of their weights.
  """
  if data_cfg.weights_are not in ('proportions', 'repeats'):
    raise errors.ConfigError(f'config.data.weights_are={data_cfg.weights_are!r}: expected proportions or '
                             'repeats')
  out = []
  for p in phases:
    if not p.steps:
      continue
    vec = np.array([float(p.weights.get(n, 0.0)) for n in names])
    if data_cfg.weights_are == 'repeats':
      vec = vec * np.array([epoch_rows[n] for n in names], np.float64)
    if vec.sum() <= 0:
      raise errors.ConfigError(f'config.phases.{p.name}.weights: no installed source has weight > 0 '
                               f'(installed: {names})')
    out.append((p.start, vec / vec.sum()))
  return out


SOURCE_KEYS = {'corpora', 'max_chars'}  # required; 'kind' and 'languages' are optional
OPTIONAL_SOURCE_KEYS = {'kind', 'languages'}


def validate(data_cfg) -> None:
  """Checks `config.data` fields that build() would otherwise trip over later; raises ValueError."""
  if not data_cfg.sources:
    raise errors.ConfigError('config.data.sources is empty: expected {name: dict(corpora=..., max_chars=...)}')
  for name, src in data_cfg.sources.items():
    if not SOURCE_KEYS <= set(src.keys()) <= SOURCE_KEYS | OPTIONAL_SOURCE_KEYS:
      raise errors.ConfigError(f'config.data.sources.{name}: keys {sorted(src.keys())}, expected '
                               f'{sorted(SOURCE_KEYS)} and optionally {sorted(OPTIONAL_SOURCE_KEYS)}')
    corpora.corpus_names(src.corpora)
    prepare_lib.source_kind(data_cfg, name)
    if int(src.max_chars) < 0:
      raise errors.ConfigError(f'config.data.sources.{name}.max_chars={src.max_chars}: expected >= 0 '
                               '(0 = all)')
  if int(data_cfg.mix_block) < 1:
    raise errors.ConfigError(f'config.data.mix_block={data_cfg.mix_block}: expected a positive number of rows')
  if not 0 <= float(data_cfg.eval.max_holdout_fraction) < 1:
    raise errors.ConfigError(f'config.data.eval.max_holdout_fraction={data_cfg.eval.max_holdout_fraction}: '
                             'expected a fraction in [0, 1)')
  if data_cfg.weights_are not in ('proportions', 'repeats'):
    raise errors.ConfigError(f'config.data.weights_are={data_cfg.weights_are!r}: expected proportions or '
                             'repeats')
  if data_cfg.clean.runner not in prepare_lib.RUNNERS:
    raise errors.ConfigError(f'config.data.clean.runner={data_cfg.clean.runner!r}: expected one of '
                             f'{prepare_lib.RUNNERS}')
  for field in ('cc_rounds', 'beam_files'):
    if int(data_cfg.clean[field]) < 1:
      raise errors.ConfigError(f'config.data.clean.{field}={data_cfg.clean[field]}: expected a positive '
                               'integer')


def build(data_cfg, phases, *, seq_len: int, global_batch_size: int, seed: int, workdir: str,
          process_index: int = 0, process_count: int = 1) -> Pipeline:
  """Prepares (or loads cached) tokenizer and shards, then returns the Pipeline of this process.

  `phases`: the run's resolved phases (lmjax.phases.resolve), whose weights make the mixture.
  The prepared files go to `data_cfg.cache_dir`, else `<workdir>/data` (see prepare.cache_dir).
  """
  validate(data_cfg)
  if global_batch_size % process_count:
    raise errors.ConfigError(f'global batch size {global_batch_size} is not divisible by the '
                             f'{process_count} processes')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index}: expected 0 <= index < {process_count}')
  tok, dirs, missing, _, _ = prepare_lib.prepare(data_cfg, workdir, verbose=process_index == 0)
  for name, line in missing.items():
    logging.warning('data source %r is not installed and is left out; install with: %s', name, line)
  names = list(dirs)
  verify = bool(data_cfg.verify_checksums)
  train = {n: SourceData(dirs[n], 'train', verify) for n in names}
  for n in names:
    if not train[n].stats['train']['documents']:
      raise errors.DataError(f'data source {n!r} has no train documents (all held out?); see {dirs[n]}')
  rows = [PackedRows(train[n], seq_len, (seed, _name_seed(n)), bos_id=tok.bos_id, eos_id=tok.eos_id)
          for n in names]
  eval_rows = {}
  for n in names:
    data = SourceData(dirs[n], 'eval', verify)
    eval_rows[n] = (PackedRows(data, seq_len, 0, bos_id=tok.bos_id, eos_id=tok.eos_id, shuffle=False)
                    if data.num_docs else None)
  epoch_rows = {n: r.rows_per_epoch for n, r in zip(names, rows)}
  mixture = Mixture(stage_weights(phases, data_cfg, names, epoch_rows), global_batch_size,
                    int(data_cfg.mix_block), seed)
  read = grain.ReadOptions(num_threads=int(data_cfg.num_threads), prefetch_buffer_size=int(data_cfg.prefetch))
  prepared = {n: os.path.basename(os.path.normpath(dirs[n])) for n in names}
  # What fixes the global rows: the seed and batch shape, each phase's start, length and mixture
  # weights, and the prepared sources' directories (their names hash the corpora, cleaning, split and
  # tokenizer). Not the LR, freezing or loss settings, which change no row.
  stream = json.loads(json.dumps(dict(
      seed=seed, batch_size=global_batch_size, seq_len=seq_len, weights_are=data_cfg.weights_are,
      mix_block=data_cfg.mix_block, phases=[[p.name, p.start, p.steps, p.weights] for p in phases],
      prepared=prepared)))
  return Pipeline(tok, names, rows, mixture, global_batch_size=global_batch_size,
                  process_index=process_index, process_count=process_count, eval_rows=eval_rows,
                  num_eval_batches=int(data_cfg.eval.num_batches), read_options=read, missing=missing,
                  prepared=prepared, stream=stream)
