"""The local runner: streams each source's records through normalize -> langid -> quality in
batches, then drops exact and near-duplicates across all sources, counting documents and characters
per (source, stage, outcome).

Memory is bounded by a batch of documents plus 24 bytes per surviving document (its dedup key,
dedup.key_rows): the first pass writes the kept documents and their MinHash signatures to spill files
in `spill_dir`, dedup decides on keys and the spilled signatures (dedup.duplicate_rows, one band in
memory at a time), and the second pass streams the spill file and yields the documents dedup kept. The stage functions are the same pure functions over a
batch that a Beam pipeline maps; this module only composes them.

A source is a `Source(name, records, kind, languages)`: records are any iterable of Doc and Drop
(readers.read, or corpus documents wrapped as Docs); kind picks the normalisation (code keeps
indentation) and the quality variant ('en', 'zh' or 'code', quality.defaults()), or 'raw': the
documents as they are, only deduplicated; languages are the ISO codes langid keeps ('' for none:
code skips language identification).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from typing import Callable, Iterable, Iterator, NamedTuple

import ml_collections
import numpy as np

from lmjax import errors
from lmjax.data import dedup
from lmjax.data import langid
from lmjax.data import normalize
from lmjax.data import quality
from lmjax.data.records import Doc, Drop, drop_record

KINDS = ('en', 'zh', 'code', 'raw')


def defaults() -> ml_collections.ConfigDict:
  """The runner's config: batch size and each stage's config."""
  return ml_collections.ConfigDict(dict(
      batch_docs=512,  # documents per batch through the per-source stages
      normalize=dict(form='NFC'),  # normalize.defaults(); `code` comes from the source's kind
      langid=langid.defaults(),  # `languages` comes from the source
      quality=quality.defaults(),
      dedup=dedup.defaults(),
  ))


class Source(NamedTuple):
  name: str
  records: Iterable[Doc | Drop]
  kind: str  # one of KINDS
  languages: str  # comma-separated ISO codes langid keeps; '' keeps all (and skips langid)


@dataclasses.dataclass
class Counters:
  """Documents and characters per (source, stage, outcome); outcome is 'in', 'kept', 'edited' (kept
  but shortened; its chars are those cut) or a drop reason."""
  docs: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)
  chars: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)

  def add(self, source: str, stage: str, outcome: str, docs: int, chars: int):
    key = (source, stage, outcome)
    self.docs[key] = self.docs.get(key, 0) + docs
    self.chars[key] = self.chars.get(key, 0) + chars

  def count_stage(self, stage: str, docs_in: list[Doc], kept: list[Doc], drops: list[Drop]):
    """Counts a batch through a stage. Characters a stage cut from a kept document (normalisation,
    C4's line removal) are the outcome 'edited' (negative when it added some, e.g. the final newline
    of normalisation), so chars in = kept + edited + dropped."""
    before = {(d.source, d.doc_id): len(d.text) for d in docs_in}
    for d in docs_in:
      self.add(d.source, stage, 'in', 1, len(d.text))
    for d in kept:
      self.add(d.source, stage, 'kept', 1, len(d.text))
      if len(d.text) != before[(d.source, d.doc_id)]:
        self.add(d.source, stage, 'edited', 1, before[(d.source, d.doc_id)] - len(d.text))
    for d in drops:
      self.add(d.source, d.stage, d.reason, 1, d.chars)

  def rows(self) -> list[dict]:
    """One dict per (source, stage, outcome), sorted: for printing or a JSON report."""
    return [dict(source=key[0], stage=key[1], outcome=key[2], docs=self.docs[key],
                 chars=self.chars[key]) for key in sorted(self.docs)]


def source_stages(source: Source, cfg: ml_collections.ConfigDict
                  ) -> list[tuple[str, Callable[[list[Doc]], tuple[list[Doc], list[Drop]]]]]:
  """The (stage name, batch function) pairs a source's documents go through, in order."""
  if source.kind not in KINDS:
    raise errors.ConfigError(f'source {source.name!r}: kind={source.kind!r}; expected one of {KINDS}')
  if source.kind == 'raw':
    return []
  norm = normalize.defaults()
  norm.form, norm.code = cfg.normalize.form, source.kind == 'code'
  steps = [('normalize', lambda docs: normalize.normalize_batch(docs, norm))]
  if source.languages:
    lang = cfg.langid.copy_and_resolve_references()
    lang.languages = source.languages
    steps.append(('langid', lambda docs: langid.langid_batch(docs, lang)))
  variant = cfg.quality[source.kind]
  steps.append(('quality', lambda docs: quality.quality_batch(docs, variant)))
  return steps


def batches(records: Iterable[Doc | Drop], size: int, source: str, counters: Counters,
             on_drop: Callable[[dict], None]) -> Iterator[list[Doc]]:
  """Lists of up to `size` Docs; Drops (unreadable input) are counted and passed on the way."""
  batch = []
  for r in records:
    if isinstance(r, Drop):
      counters.add(source, r.stage, r.reason, 1, r.chars)
      on_drop(drop_record(r))
      continue
    if r.source != source:
      raise ValueError(f'source {source!r}: got a record of source {r.source!r} ({r.doc_id})')
    counters.add(source, 'read', 'kept', 1, len(r.text))
    batch.append(r)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def apply_stages(batch: list[Doc], steps, counters: Counters,
                 on_drop: Callable[[dict], None]) -> list[Doc]:
  """A batch through a source's stages (source_stages): the kept documents; drops counted and passed
  to `on_drop` as drop_record dicts."""
  for stage, fn in steps:
    kept, drops = fn(batch)
    counters.count_stage(stage, batch, kept, drops)
    if drops:
      text = {d.doc_id: d.text for d in batch}
      for drop in drops:
        on_drop(drop_record(drop, text[drop.doc_id]))
    batch = kept
  return batch


def dedup_outcome(doc: Doc, keys: np.ndarray, i: int, kept_row: int, reason: str,
                  counters: Counters, on_drop: Callable[[dict], None]) -> bool:
  """Counts document `doc` (row i of `keys`) through the dedup stage; True when it is kept.
  `kept_row` is the row kept in its place (i itself when kept), `reason` why it is not."""
  counters.add(doc.source, 'dedup', 'in', 1, len(doc.text))
  if kept_row == i:
    counters.add(doc.source, 'dedup', 'kept', 1, len(doc.text))
    return True
  drop = Drop(doc.source, doc.doc_id, 'dedup', reason, len(doc.text))
  counters.add(doc.source, 'dedup', reason, 1, len(doc.text))
  on_drop(drop_record(drop, doc.text, dedup.row_content(keys[kept_row]).hex()))
  return False


def run(sources: list[Source], cfg: ml_collections.ConfigDict, counters: Counters,
        spill_dir: str | None = None, on_drop: Callable[[dict], None] = lambda record: None,
        progress: Callable[[int], None] = lambda docs: None) -> Iterator[Doc]:
  """The documents of all sources that every stage kept, source by source in reading order.

  `counters` is filled as the stream is consumed; it is complete when the iterator is exhausted.
  Every dropped document is passed to `on_drop` as a records.drop_record dict; `progress` gets the
  number of documents read after each batch.
  """
  names = [s.name for s in sources]
  if len(set(names)) != len(names):
    raise errors.ConfigError(f'sources: names must be unique, got {names}')
  with tempfile.TemporaryDirectory(dir=spill_dir) as tmp:
    spill, sig_path = os.path.join(tmp, 'kept.pickle'), os.path.join(tmp, 'signatures.bin')
    keys = []
    with open(spill, 'wb') as f, open(sig_path, 'wb') as sig_file:
      for source in sources:
        steps = source_stages(source, cfg)
        for batch in batches(source.records, int(cfg.batch_docs), source.name, counters, on_drop):
          progress(len(batch))
          batch = apply_stages(batch, steps, counters, on_drop)
          if batch:
            pickle.dump(batch, f, protocol=pickle.HIGHEST_PROTOCOL)
            keys.append(dedup.key_rows(batch))
            sig_file.write(dedup.signatures([d.text for d in batch], cfg.dedup).tobytes())
    keys = np.concatenate(keys) if keys else np.zeros((0, 3), np.uint64)
    kept_row, exact = dedup.duplicate_rows(keys, sig_path, cfg.dedup, tmp)
    i = 0
    with open(spill, 'rb') as f:
      for batch in _unpickled(f):
        for doc in batch:
          reason = 'exact_duplicate' if exact[i] else 'near_duplicate'
          if dedup_outcome(doc, keys, i, int(kept_row[i]), reason, counters, on_drop):
            yield doc
          i += 1


def _unpickled(f) -> Iterator[list[Doc]]:
  while True:
    try:
      yield pickle.load(f)
    except EOFError:
      return
