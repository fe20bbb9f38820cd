"""The records that flow between the prepare stages: a document, and a document some stage dropped.

Every stage (readers, normalize, langid, quality, dedup) is a pure function from a batch of `Doc`s
to (kept `Doc`s, `Drop`s), so a local runner and a Beam pipeline call the same functions. Both
records are NamedTuples of plain str/int: picklable, and cheap to count by (source, stage, reason).
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

SNIPPET_CHARS = 1000  # characters of a dropped document kept for the report's examples


class Doc(NamedTuple):
  """One document of one source."""
  source: str  # the source (mixture domain) it belongs to, e.g. 'code'
  doc_id: str  # where it came from: 'path' (a txt file), 'path:line' (jsonl), 'path:row' (parquet)
  text: str


class Drop(NamedTuple):
  """A document (or a whole unreadable file) that a stage removed, and why."""
  source: str
  doc_id: str  # as in Doc; the file's path when the whole file (or its rest) is lost
  stage: str  # 'read', 'normalize', 'langid', 'quality' or 'dedup'
  reason: str  # e.g. 'invalid_json', 'gopher_quality.word_count', 'near_duplicate'
  chars: int  # characters removed (bytes when the input could not be decoded; 0 when unknown)


def drop_record(drop: Drop, text: str = '', of: str = '') -> dict:
  """What a runner writes for a Drop (the report's input): the Drop's fields, the first
  SNIPPET_CHARS of the text it dropped ('' for unreadable input) and, for a duplicate, `of`: the hex
  content key of the copy kept in its place."""
  return dict(source=drop.source, id=drop.doc_id, stage=drop.stage, reason=drop.reason,
              chars=drop.chars, of=of, text=text[:SNIPPET_CHARS])


def rank(source: str, doc_id: str) -> bytes:
  """A document's place among the report's examples (the smallest are shown): a hash of where it
  came from, so the choice does not depend on the runner or the reading order."""
  return hashlib.blake2b(f'{source}\0{doc_id}'.encode('utf-8', 'surrogatepass'), digest_size=8).digest()
