"""The clean store's documents by content: an index of a source's kept documents in content-hash
order (the order the held-out split and the report use) and random access to them.

A clean store (prepare.py's module docstring; a local directory or a URL, read through lmjax.fs)
holds docs/<source>-NNNNN-of-NNNNN.jsonl, one {"id", "text"} a line; `index_source` reads a source's
files once and keeps ~44 bytes a document (the local runner's path: its store has one unsorted file a
source). A Beam store (beam.py) needs no index: its file i holds the i-th of N equal ranges of the
doc_key space (`part`), sorted, so its files in order are the source in content-hash order; each has
a lengths file (`read_lengths`), and beam-files.json (`read_sizes`) has their documents and
characters; beam-summary.json is the report's summary of its drops (report.summarize), made in the
pipeline.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterator, NamedTuple

import numpy as np

from lmjax import fs
from lmjax.data import dedup


SIZES = 'beam-files.json'  # a Beam store's {"files": N, "rows": [[source, file, docs, chars], ...]}
SUMMARY = 'beam-summary.json'  # a Beam store's report.summarize of its drops


def part(node: int, files: int) -> int:
  """The docs file of a Beam store that holds doc_key `node` (an int, big-endian): the index of its
  range when the key space is cut into `files` equal ranges (by the key's top 64 bits, uniform:
  they are a content hash). So a Beam store's files in order hold a source in content-hash order."""
  return ((node >> 128) * files) >> 64


def docs_file(store: str, source: str, i: int, files: int) -> str:
  return os.path.join(store, 'docs', f'{source}-{i:05d}-of-{files:05d}.jsonl')


class Sizes(NamedTuple):
  """A Beam store's docs files: `files` of them per source; per source, its (file index, documents,
  characters) in file order (files without documents are absent)."""
  files: int
  sources: dict[str, list[tuple[int, int, int]]]


def read_sizes(store: str) -> Sizes | None:
  """The sizes of a Beam store's docs files (every Beam store has them, empty or not); None for a
  local runner's store (one unsorted file a source, indexed whole by `index_source`)."""
  path = os.path.join(store, SIZES)
  if not fs.isfile(path):
    return None
  sizes = json.loads(fs.read_text(path))
  sources = {}
  for source, i, docs, chars in sizes['rows']:
    sources.setdefault(source, []).append((i, docs, chars))
  return Sizes(sizes['files'], sources)


def lengths_file(docs_path: str) -> str:
  """A Beam store's docs file's lengths file: int64 characters of each of its documents (.npy)."""
  return docs_path.removesuffix('.jsonl') + '.chars.npy'


def read_lengths(docs_path: str) -> np.ndarray:
  with fs.open(lengths_file(docs_path), 'rb') as f:
    return np.load(f)


def file_docs(path: str) -> Iterator[dict]:
  """The {"id", "text"} documents of one docs file, in its order."""
  with fs.open(path, 'rb') as f:
    for line in f:
      yield json.loads(line)


class SourceIndex(NamedTuple):
  """A source's kept documents in content-hash order: where each line is, and its length."""
  keys: np.ndarray  # uint64[n, 3], dedup.key_rows, sorted
  chars: np.ndarray  # int64[n]
  file: np.ndarray  # int32[n], index into files
  offset: np.ndarray  # int64[n], byte offset of the line
  files: list[str]


def doc_line(doc_id: str, text: str) -> str:
  """A line of the clean store's docs files."""
  return json.dumps(dict(id=doc_id, text=text), ensure_ascii=False) + '\n'


def index_source(store: str, name: str) -> SourceIndex:
  """Indexes the docs files of source `name` in a clean store (one pass; ~44 bytes per document)."""
  docs = os.path.join(store, 'docs')
  own = re.compile(rf'{re.escape(name)}-\d{{5}}-of-\d{{5}}\.jsonl')  # not source 'web-zh' for 'web'
  files = [os.path.join(docs, f) for f in fs.listdir(docs) if own.fullmatch(f)]
  keys, chars, file, offset = [], [], [], []
  for i, path in enumerate(files):
    with fs.open(path, 'rb') as f:
      pos = 0
      for line in f:
        doc = json.loads(line)
        keys.append(dedup.content_key(doc['text']) + dedup.id_key(name, doc['id']))
        chars.append(len(doc['text']))
        file.append(i)
        offset.append(pos)
        pos += len(line)
  keys = np.frombuffer(b''.join(keys), '>u8').astype(np.uint64).reshape(-1, 3)
  order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
  return SourceIndex(keys[order], np.asarray(chars, np.int64)[order],
                     np.asarray(file, np.int32)[order], np.asarray(offset, np.int64)[order], files)


def read_docs(index: SourceIndex, rows) -> Iterator[dict]:
  """The {"id", "text"} documents of `rows` of the index, in that order (random access)."""
  with contextlib.ExitStack() as stack:
    handles = {}
    for r in rows:
      f = int(index.file[r])
      if f not in handles:
        handles[f] = stack.enter_context(fs.open(index.files[f], 'rb'))
      handles[f].seek(int(index.offset[r]))
      yield json.loads(handles[f].readline())


def find_doc(index: SourceIndex, content: bytes) -> dict | None:
  """The kept document whose content_key is `content`, or None."""
  hi, lo = np.frombuffer(content, '>u8').astype(np.uint64)
  r = int(np.searchsorted(index.keys[:, 0], hi))
  while r < len(index.keys) and index.keys[r, 0] == hi:
    if index.keys[r, 1] == lo:
      with contextlib.closing(read_docs(index, [r])) as docs:
        return next(docs)
    r += 1
  return None
