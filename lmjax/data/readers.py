"""Streaming readers: a source spec -> an iterator of `Doc`s (and `Drop`s for what is unreadable).

Specs (the `txt:` and `jsonl:` forms are those corpora.py accepts; all three take local paths or any
fsspec URL, e.g. gs://bucket/dir/*.jsonl.gz with gcsfs installed):

  txt:GLOB               one document per file
  jsonl:GLOB[#FIELD]     a document per line: the string FIELD of a JSON object (default 'text')
  parquet:GLOB[#COLUMN]  a document per row: the string (or UTF-8 binary) COLUMN (default 'text')

A txt or jsonl file whose name ends in .gz or .zst is decompressed while it is read. GLOB may use
'**' for any depth of folders; a '#' followed by no '/' ends the glob. Document ids are 'path'
(txt), 'path:LINE' (jsonl, from 1) and 'path:ROW' (parquet, from 0).

Nothing is read whole: jsonl and txt are read in 1 MiB blocks, parquet in batches of rows. Bad
input never stops the run and is never dropped silently: each bad record (or the unreadable rest of
a file) becomes a `Drop(stage='read', reason=...)` with one of REASONS:

  invalid_json    a jsonl line that is not JSON
  missing_field   a JSON line that is not an object with FIELD, a null cell, or a parquet file
                  without COLUMN (one Drop for the file)
  not_text        FIELD is not a string, or COLUMN is neither string nor binary (one Drop per file)
  invalid_utf8    bytes that are not UTF-8, or a JSON string with an unpaired surrogate (\\ud800)
  empty           a document that is empty or only whitespace
  too_large       a document (a txt file, a jsonl line, a parquet cell) over `max_doc_bytes` (a txt
                  file is read only up to the first block past the limit)
  truncated_file  a compressed file that ends early: the documents before the cut are kept
  corrupt_file    a file that cannot be decompressed or parsed (bad gzip data, not parquet)

Blank lines of a jsonl file are not records and are skipped.

`max_doc_bytes` defaults to 16 MiB: the largest single documents worth training on (a whole book is
1-5 MB, the largest Python standard-library file 0.9 MB) fit many times over, while one record stays
small against a worker's memory (Beam workers hold a batch of records at once). Larger inputs are
almost always dumps (logs, data files, minified bundles) that the quality filters would drop anyway.
"""
from __future__ import annotations

import json
import re
import zlib
from typing import Iterator, NamedTuple

import fsspec
import ml_collections

from lmjax import errors
from lmjax.data.records import Doc, Drop

KINDS = ('txt', 'jsonl', 'parquet')
REASONS = ('invalid_json', 'missing_field', 'not_text', 'invalid_utf8', 'empty', 'too_large',
           'truncated_file', 'corrupt_file')
_BLOCK_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 256
_SURROGATE = re.compile('[\ud800-\udfff]')


def defaults() -> ml_collections.ConfigDict:
  """The read stage's config."""
  return ml_collections.ConfigDict(dict(
      max_doc_bytes=16 << 20,  # a document over this is dropped as 'too_large' (module docstring)
  ))


class Spec(NamedTuple):
  kind: str  # one of KINDS
  pattern: str  # a glob: local path or fsspec URL
  field: str  # the JSON field or parquet column holding the text ('' for txt)


def parse_spec(spec: str) -> Spec:
  """'jsonl:data/*.jsonl.gz#content' -> Spec('jsonl', 'data/*.jsonl.gz', 'content')."""
  kind, sep, rest = spec.partition(':')
  if not sep or kind not in KINDS or not rest:
    raise errors.ConfigError(f'reader spec {spec!r}: expected txt:GLOB, jsonl:GLOB[#FIELD] or '
                     'parquet:GLOB[#COLUMN]')
  pattern, hash_, field = rest.rpartition('#')
  if not hash_ or '/' in field:
    pattern, field = rest, ''
  if kind == 'txt' and field:
    raise errors.ConfigError(f'reader spec {spec!r}: txt files have no field; expected txt:GLOB')
  return Spec(kind, pattern, field or ('text' if kind != 'txt' else ''))


def list_files(spec: str) -> list[str]:
  """The files matching the spec's glob, sorted (fsspec URLs keep their protocol)."""
  pattern = parse_spec(spec).pattern
  fs, path = fsspec.core.url_to_fs(pattern)
  files = sorted(p for p, info in fs.glob(path, detail=True).items() if info['type'] == 'file')
  return [fs.unstrip_protocol(p) for p in files] if '://' in pattern else files


def read(spec: str, source: str, cfg: ml_collections.ConfigDict) -> Iterator[Doc | Drop]:
  """Every record of every file matching `spec`, file by file in sorted order."""
  for path in list_files(spec):
    yield from read_file(path, spec, source, cfg)


def read_file(path: str, spec: str, source: str,
              cfg: ml_collections.ConfigDict) -> Iterator[Doc | Drop]:
  """The records of one file of `spec` (a Beam pipeline maps this over `list_files(spec)`)."""
  kind, _, field = parse_spec(spec)
  max_bytes = int(cfg.max_doc_bytes)
  if kind == 'parquet':
    yield from _parquet_records(path, field, source, max_bytes)
    return
  fs, fs_path = fsspec.core.url_to_fs(path)
  try:
    with fs.open(fs_path, 'rb') as f:
      blocks = _decompressed_blocks(f, path)
      if kind == 'txt':
        yield _txt_record(blocks, path, source, max_bytes)
      else:
        yield from _jsonl_records(blocks, path, field, source, max_bytes)
  except _Truncated as e:
    yield Drop(source, path, 'read', 'truncated_file', e.pending)
  except _Corrupt:
    yield Drop(source, path, 'read', 'corrupt_file', 0)


class _Corrupt(Exception):
  """A compressed stream that cannot be decompressed."""


class _Truncated(Exception):
  """A compressed stream ended before its end marker; `pending` bytes of a record were lost."""

  def __init__(self, pending: int = 0):
    super().__init__(pending)
    self.pending = pending


def _decompressed_blocks(f, path: str) -> Iterator[bytes]:
  """The decompressed bytes of an open file in blocks.

  Raises _Truncated when a .gz/.zst file ends inside a member, _Corrupt when its data is invalid.
  """
  if path.endswith('.gz'):  # zlib stops at an output limit: a gzip bomb is read block by block
    new = lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    error, limit = zlib.error, (_BLOCK_BYTES,)
  elif path.endswith('.zst'):  # zstandard's decompressobj has no output limit
    import zstandard  # pylint: disable=import-outside-toplevel
    new = lambda: zstandard.ZstdDecompressor().decompressobj()
    error, limit = zstandard.ZstdError, ()
  else:
    while block := f.read(_BLOCK_BYTES):
      yield block
    return
  d, started = new(), False
  while block := f.read(_BLOCK_BYTES):
    while block:  # a file may hold several members (gzip) or frames (zstd) back to back
      started = True
      try:
        out = d.decompress(block, *limit)
      except error:
        raise _Corrupt() from None
      if out:
        yield out
      if limit and d.unconsumed_tail:  # stopped at the output limit: go on with the same input
        block = d.unconsumed_tail
      elif d.eof:
        block, d, started = d.unused_data, new(), False
      else:
        break
  if started:
    raise _Truncated()


def _lines(blocks: Iterator[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
  """(line number from 1, the line without its newline or None when over max_bytes, its size)."""
  buf, number, oversize = b'', 0, 0
  try:
    for block in blocks:
      buf += block
      start = 0
      while (end := buf.find(b'\n', start)) >= 0:
        number += 1
        if oversize:
          yield number, None, oversize + end - start
          oversize = 0
        else:
          yield number, buf[start:end], end - start
        start = end + 1
      buf = buf[start:]
      if len(buf) > max_bytes:  # the line is already too long: count it, keep nothing of it
        oversize += len(buf)
        buf = b''
  except _Truncated:
    raise _Truncated(oversize + len(buf)) from None
  if oversize or buf:
    yield number + 1, (None if oversize else buf), oversize + len(buf)


def _jsonl_records(blocks, path, field, source, max_bytes) -> Iterator[Doc | Drop]:
  for number, line, size in _lines(blocks, max_bytes):
    doc_id = f'{path}:{number}'
    if line is None or size > max_bytes:
      yield Drop(source, doc_id, 'read', 'too_large', size)
    elif line.strip():
      yield _json_record(line, doc_id, field, source)


def _json_record(line: bytes, doc_id: str, field: str, source: str) -> Doc | Drop:
  try:
    obj = json.loads(line.decode('utf-8'))
  except UnicodeDecodeError:
    return Drop(source, doc_id, 'read', 'invalid_utf8', len(line))
  except (ValueError, RecursionError):
    return Drop(source, doc_id, 'read', 'invalid_json', len(line))
  text = obj.get(field) if isinstance(obj, dict) else None
  if text is None:
    return Drop(source, doc_id, 'read', 'missing_field', len(line))
  return _text_record(text, doc_id, source)


def _text_record(text, doc_id: str, source: str) -> Doc | Drop:
  """A Doc, or the Drop saying why a decoded value is no document."""
  if not isinstance(text, str):
    return Drop(source, doc_id, 'read', 'not_text', 0)
  if _SURROGATE.search(text):
    return Drop(source, doc_id, 'read', 'invalid_utf8', len(text))
  if not text.strip():
    return Drop(source, doc_id, 'read', 'empty', len(text))
  return Doc(source, doc_id, text)


def _txt_record(blocks, path, source, max_bytes) -> Doc | Drop:
  data, size = [], 0
  try:
    for block in blocks:
      size += len(block)
      if size > max_bytes:  # stop reading: the Drop counts the bytes read so far
        return Drop(source, path, 'read', 'too_large', size)
      data.append(block)
  except _Truncated:
    raise _Truncated(size) from None
  try:
    text = b''.join(data).decode('utf-8')
  except UnicodeDecodeError:
    return Drop(source, path, 'read', 'invalid_utf8', size)
  return _text_record(text, path, source)


def _pyarrow():
  """(pyarrow, pyarrow.parquet), or MissingExtra naming the [parquet] extra."""
  pa = errors.require('pyarrow', 'parquet', 'a parquet: source')
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  return pa, pq


def fields(path: str, spec: str) -> list[str]:
  """The fields a file of `spec` has: a parquet file's columns, or the keys of a jsonl file's first
  JSON object (an error message's list when no record has the spec's field); [] for txt."""
  kind = parse_spec(spec).kind
  fs, fs_path = fsspec.core.url_to_fs(path)
  if kind == 'parquet':
    _, pq = _pyarrow()
    with fs.open(fs_path, 'rb') as f:
      return list(pq.ParquetFile(f).schema_arrow.names)
  if kind == 'jsonl':
    with fs.open(fs_path, 'rb') as f:
      try:
        for _, line, _ in _lines(_decompressed_blocks(f, path), _BLOCK_BYTES):
          try:
            obj = json.loads(line or b'')
          except ValueError:
            continue
          if isinstance(obj, dict):
            return sorted(obj)
      except (_Truncated, _Corrupt):
        pass
  return []


def _parquet_records(path, column, source, max_bytes) -> Iterator[Doc | Drop]:
  pa, pq = _pyarrow()
  fs, fs_path = fsspec.core.url_to_fs(path)
  with fs.open(fs_path, 'rb') as f:
    try:
      pf = pq.ParquetFile(f)
      schema = pf.schema_arrow
    except (pa.ArrowException, OSError):
      yield Drop(source, path, 'read', 'corrupt_file', 0)
      return
    if column not in schema.names:
      yield Drop(source, path, 'read', 'missing_field', 0)
      return
    kind = schema.field(column).type
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      yield Drop(source, path, 'read', 'not_text', 0)
      return
    row = 0
    try:
      for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
          doc_id = f'{path}:{row}'
          yield (Drop(source, doc_id, 'read', 'missing_field', 0) if value is None
                 else value_record(value, doc_id, source, max_bytes))
          row += 1
    except (pa.ArrowException, OSError):
      yield Drop(source, path, 'read', 'corrupt_file', 0)


def value_record(value: str | bytes, doc_id: str, source: str, max_bytes: int) -> Doc | Drop:
  """A Doc from one value (a parquet cell, a seqio feature): text, or bytes decoded as UTF-8; the
  Drop saying why it is none (too_large over `max_bytes` of UTF-8, invalid_utf8, empty)."""
  binary = isinstance(value, bytes)
  size = len(value) if binary else len(value.encode('utf-8', 'surrogatepass'))
  if size > max_bytes:
    return Drop(source, doc_id, 'read', 'too_large', size)
  if binary:
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError:
      return Drop(source, doc_id, 'read', 'invalid_utf8', size)
  return _text_record(value, doc_id, source)
