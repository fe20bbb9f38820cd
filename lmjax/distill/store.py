"""The offline store of a teacher's top-k next-token distribution, written and read with tensorstore.

Keyed by the run's global rows: row g = step * B + i is row i of global batch `step`, which the data
pipeline makes as a pure function of (seed, g) (lmjax/data/pipeline.py). The store records the data
stream it was dumped for (`stream`: seed, batch, sequence length, phases' mixtures, prepared sources), so the
student reads exactly the positions it trains on, from any resume point; a run whose stream differs
is refused, naming the fields.

Layout under DIR:
  meta.json               k, encoding, vocab, id bits, stream, rows, chunk_rows, teacher, tokenizer digest
  ids/ logprobs/ tail/    zarr arrays [rows, T, ...], one chunk per `chunk_rows` rows (chunk c is
                          rows [c * chunk_rows, (c + 1) * chunk_rows); its files are ids/c.0.0 ...)
  done/<c>.json           written (atomically) after chunk c: the crc32 of each of its arrays

Encodings (bytes per token at k, vocabulary V, b = ceil(log2 V) bits an id):
  full     ids int32 [T, k], log-probs float32 [T, k], tail float32 [T]      8k + 4
  compact  ids packed to b bits (uint8 [T, ceil(k b / 8)]); log-probs and the tail's log as uint16
           fixed point, code = round(-log p * 2^10) (step 2^-10 nats, so every probability is kept
           within 0.05% relative; up to 64 nats), 65535 = zero mass     ceil(k b / 8) + 2k + 2
At k = 128 and V = 128,256 (b = 17): full 1,028 B, compact 530 B a token; k = 64: 516 B, 266 B.

Writing is resumable: chunks are independent, a chunk counts once its done/ marker exists, and a rerun
writes only the chunks without one (the teacher is deterministic, so the result is the same store).
One process writes (lmjax/distill/dump.py); every process of a student run reads. Reading checks each chunk's
marker and checksums: a missing or corrupt chunk is an error naming its files.
"""
from __future__ import annotations

import json
import math
import os
import zlib

import numpy as np
import tensorstore as ts

from lmjax import errors, fs

SCALE = 1024.0     # compact: log-prob codes per nat
ZERO_CODE = 65535  # compact: zero probability (-inf log-prob)


def id_bits(vocab_size: int) -> int:
  return max(1, math.ceil(math.log2(vocab_size)))


def bytes_per_token(k: int, encoding: str, vocab_size: int) -> int:
  """Stored bytes per token position (see the module docstring)."""
  if encoding == 'full':
    return 8 * k + 4
  return math.ceil(k * id_bits(vocab_size) / 8) + 2 * k + 2


# ----------------------------------------------------------------------------- encodings


def _quantize(logp: np.ndarray) -> np.ndarray:
  code = np.round(-np.asarray(logp, np.float64) * SCALE)
  return np.where(np.isfinite(code), np.clip(code, 0, ZERO_CODE - 1), ZERO_CODE).astype(np.uint16)


def _dequantize(code: np.ndarray) -> np.ndarray:
  return np.where(code == ZERO_CODE, -np.inf, code.astype(np.float32) / np.float32(-SCALE)).astype(np.float32)


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
  """[..., k] ids < 2^bits -> [..., ceil(k bits / 8)] uint8, little-endian bit order."""
  ids = np.asarray(ids, np.uint32)
  bit_array = ((ids[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
  return np.packbits(bit_array.reshape(*ids.shape[:-1], -1), axis=-1, bitorder='little')


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
  bit_array = np.unpackbits(packed, axis=-1, count=k * bits, bitorder='little')
  bit_array = bit_array.reshape(*packed.shape[:-1], k, bits).astype(np.uint32)
  return (bit_array << np.arange(bits, dtype=np.uint32)).sum(-1, dtype=np.uint32).astype(np.int32)


def encode(fields: dict, encoding: str, vocab_size: int) -> dict[str, np.ndarray]:
  """teacher_ids/teacher_logprobs [N, T, k], teacher_tail [N, T] -> the stored arrays."""
  ids, lp, tail = (np.asarray(fields[f]) for f in ('teacher_ids', 'teacher_logprobs', 'teacher_tail'))
  if encoding == 'full':
    return {'ids': ids.astype(np.int32), 'logprobs': lp.astype(np.float32), 'tail': tail.astype(np.float32)}
  with np.errstate(divide='ignore'):
    log_tail = np.log(np.maximum(tail, 0))
  return {'ids': pack_ids(ids, id_bits(vocab_size)), 'logprobs': _quantize(lp), 'tail': _quantize(log_tail)}


def decode(stored: dict, encoding: str, k: int, vocab_size: int) -> dict[str, np.ndarray]:
  """The stored arrays -> the batch's teacher fields (lmjax/batch.py)."""
  if encoding == 'full':
    return {'teacher_ids': stored['ids'], 'teacher_logprobs': stored['logprobs'],
            'teacher_tail': stored['tail']}
  return {'teacher_ids': unpack_ids(stored['ids'], k, id_bits(vocab_size)),
          'teacher_logprobs': _dequantize(stored['logprobs']),
          'teacher_tail': np.exp(_dequantize(stored['tail']))}


def _layout(k: int, seq_len: int, encoding: str, vocab_size: int) -> dict[str, tuple[tuple, str]]:
  """Per stored array: (shape of one row, zarr dtype)."""
  if encoding == 'full':
    return {'ids': ((seq_len, k), '<i4'), 'logprobs': ((seq_len, k), '<f4'), 'tail': ((seq_len,), '<f4')}
  return {'ids': ((seq_len, math.ceil(k * id_bits(vocab_size) / 8)), '|u1'),
          'logprobs': ((seq_len, k), '<u2'), 'tail': ((seq_len,), '<u2')}


# ----------------------------------------------------------------------------- the store


class Store:
  """A top-k store at `path` (see the module docstring): `create` one or `open` an existing one."""

  def __init__(self, path: str, meta: dict):
    if not fs.is_local(path):  # tensorstore's file driver below; meta and markers go through lmjax.fs
      raise errors.ConfigError(f'config.loss.kd.store={path!r}: expected a local path (or a mounted bucket): '
                               'the store does not write to URLs yet')
    self.path, self.meta = path, meta
    self._last = (None, None)  # (chunk, its decoded fields): batches of one chunk read it once
    self.k, self.encoding, self.vocab_size = meta['k'], meta['encoding'], meta['vocab_size']
    self.rows, self.chunk_rows, self.seq_len = meta['rows'], meta['chunk_rows'], meta['stream']['seq_len']
    self.num_chunks = -(-self.rows // self.chunk_rows)
    layout = _layout(self.k, self.seq_len, self.encoding, self.vocab_size)
    self._arrays = {}
    for name, (row_shape, dtype) in layout.items():
      spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': os.path.join(path, name)},
              'metadata': {'shape': [self.rows, *row_shape], 'chunks': [self.chunk_rows, *row_shape],
                           'dtype': dtype, 'compressor': None, 'dimension_separator': '.'}}
      self._arrays[name] = ts.open(spec, create=True, open=True,
                                   context=ts.Context({'data_copy_concurrency': {'limit': 1}})).result()
    self._row_shapes = {name: shape for name, (shape, _) in layout.items()}

  @classmethod
  def create(cls, path: str, *, k: int, encoding: str, vocab_size: int, stream: dict, rows: int,
             chunk_rows: int, teacher: str, tokenizer_digest: str) -> 'Store':
    """Creates the store, or opens it if it exists with the same settings (a resumed dump)."""
    meta = dict(k=int(k), encoding=encoding, vocab_size=int(vocab_size), id_bits=id_bits(vocab_size),
                stream=stream, rows=int(rows), chunk_rows=int(chunk_rows), teacher=teacher,
                tokenizer_digest=tokenizer_digest)
    meta_path = os.path.join(path, 'meta.json')
    if fs.isfile(meta_path):
      old = json.loads(fs.read_text(meta_path))
      changed = sorted(f for f in set(old) | set(meta) if old.get(f) != meta.get(f))
      if changed:
        raise errors.CheckpointError(f'store {path!r} exists with other settings ({", ".join(changed)}: '
                                     f'{[old.get(f) for f in changed]} there, '
                                     f'{[meta.get(f) for f in changed]} '
                                     'now); delete it or choose another --store')
    else:
      fs.makedirs(os.path.join(path, 'done'))
      fs.write_atomic(meta_path, json.dumps(meta, indent=1))
    return cls(path, meta)

  @classmethod
  def open(cls, path: str) -> 'Store':
    meta_path = os.path.join(path, 'meta.json')
    if not fs.isfile(meta_path):
      raise errors.MissingFile(f'top-k store {path!r}: {meta_path} does not exist (python -m '
                               'lmjax.distill.dump writes it)')
    return cls(path, json.loads(fs.read_text(meta_path)))

  def tokenizer_digest(self) -> str:
    return self.meta['tokenizer_digest']

  def _marker(self, chunk: int) -> str:
    return os.path.join(self.path, 'done', f'{chunk}.json')

  def chunk_files(self, chunk: int) -> list[str]:
    return [os.path.join(self.path, name, '.'.join([str(chunk)] + ['0'] * len(shape)))
            for name, shape in self._row_shapes.items()]

  def done(self, chunk: int) -> bool:
    return fs.isfile(self._marker(chunk))

  def missing(self) -> list[int]:
    return [c for c in range(self.num_chunks) if not self.done(c)]

  def write_chunk(self, chunk: int, fields: dict) -> None:
    """Writes rows [chunk * chunk_rows, ...) from the teacher fields [n, T, ...], then its marker."""
    stored = encode(fields, self.encoding, self.vocab_size)
    lo = chunk * self.chunk_rows
    hi = min(lo + self.chunk_rows, self.rows)
    for name, arr in stored.items():
      if arr.shape[0] != hi - lo:
        raise ValueError(f'chunk {chunk} of {self.path}: {arr.shape[0]} rows, expected {hi - lo}')
      self._arrays[name][lo:hi].write(arr).result()
    sums = {name: zlib.crc32(np.ascontiguousarray(arr).tobytes()) for name, arr in stored.items()}
    fs.write_atomic(self._marker(chunk), json.dumps(sums))

  def read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
    """Decoded teacher fields of chunk `chunk`, checked against its marker's checksums (the last
    chunk read is kept: consecutive batches come from the same chunk)."""
    if self._last[0] != chunk:
      self._last = (chunk, self._read_chunk(chunk))
    return self._last[1]

  def _read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
    files = ', '.join(self.chunk_files(chunk))
    lo = chunk * self.chunk_rows
    hi = min(lo + self.chunk_rows, self.rows)
    where = f'top-k store {self.path!r}: chunk {chunk} (rows {lo}-{hi - 1}; {files})'
    if not self.done(chunk):
      raise errors.MissingFile(f'{where} is missing (its write did not finish); rerun '
                               'python -m lmjax.distill.dump to finish the store')
    for path in self.chunk_files(chunk):
      if not fs.isfile(path):
        raise errors.MissingFile(f'{where}: {path} is missing; delete {self._marker(chunk)} and rerun '
                                 'python -m lmjax.distill.dump to write it again')
    sums = json.loads(fs.read_text(self._marker(chunk)))
    stored = {}
    for name, array in self._arrays.items():
      try:
        stored[name] = array[lo:hi].read().result()
      except Exception as e:  # tensorstore: a truncated or unreadable chunk file
        raise errors.CheckpointError(f'{where} is corrupt: {name}: {e}') from None
      if zlib.crc32(np.ascontiguousarray(stored[name]).tobytes()) != sums[name]:
        raise errors.CheckpointError(f'{where} is corrupt: {name} fails its checksum; delete '
                                     f'{self._marker(chunk)} '
                                     'and rerun python -m lmjax.distill.dump to write it again')
    return decode(stored, self.encoding, self.k, self.vocab_size)

  def read(self, first: int, n: int) -> dict[str, np.ndarray]:
    """Teacher fields of rows [first, first + n) ([n, T, k] and [n, T])."""
    if first < 0 or first + n > self.rows:
      raise errors.CheckpointError(f'top-k store {self.path!r} holds rows 0-{self.rows - 1}; rows {first}-'
                                   f'{first + n - 1} were asked for (the run is longer than the dump: rerun '
                                   'python -m lmjax.distill.dump with more --steps)')
    parts = []
    for chunk in range(first // self.chunk_rows, (first + n - 1) // self.chunk_rows + 1):
      fields = self.read_chunk(chunk)
      lo = max(first - chunk * self.chunk_rows, 0)
      hi = min(first + n - chunk * self.chunk_rows, self.chunk_rows)
      parts.append({k: v[lo:hi] for k, v in fields.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def check_stream(store: Store, pipeline) -> None:
  """Raises CheckpointError naming the stream fields (data.pipeline.Pipeline.stream: what fixes the
  run's rows) where the run differs from the store's."""
  want, have = pipeline.stream, store.meta['stream']
  changed = sorted(f for f in set(want) | set(have) if want.get(f) != have.get(f))
  if changed:
    raise errors.CheckpointError(f'top-k store {store.path!r} was dumped for another data stream: '
                                 + '; '.join(f'{f}: {have.get(f)!r} there, {want.get(f)!r} in this run'
                                             for f in changed))


class WithTeacher:
  """The run's data iterator with the teacher's top-k of each batch's rows added (offline KD).

  Batch `step` (0-based) of this process holds global rows step * B + offset ... + local batch."""

  def __init__(self, data_iter, store: Store, global_batch: int, offset: int, start_step: int):
    self._it, self._store = data_iter, store
    self._global_batch, self._offset, self._step = global_batch, offset, start_step

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    n = len(batch['inputs'])
    fields = self._store.read(self._step * self._global_batch + self._offset, n)
    self._step += 1
    return {**batch, **fields}

  def get_state(self):
    return self._it.get_state()
