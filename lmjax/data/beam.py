"""The Beam runner of the clean step: the same stage functions as the local runner (stages.py), as
an Apache Beam pipeline (near dedup as a GroupByKey on band keys, so it needs no machine to hold the
signatures; the DirectRunner here, cluster runners once the store is shared: see below). It writes the same clean store as prepare's local runner (prepare.py's module
docstring), so the documents, shards and report that follow are the same.

  python -m lmjax.prepare --config=configs/tiny_mix.py --workdir=/tmp/run --runner=beam
  pip install -e '.[beam]'   # apache-beam==2.77.0 (with pyarrow==25.0.1)

The pipeline:
  files (corpora.files)  -> Reshuffle -> per file: read, normalize, langid, quality (stages.batches,
                            stages.apply_stages): kept docs, drop records, counters
  exact dedup            -> GroupByKey on the content hash; the copy with the smallest id hash is kept
  near dedup             -> MinHash signatures and band keys per batch (dedup.signatures,
                            dedup.band_hashes); GroupByKey on (band, band key) = the LSH buckets;
                            dedup.bucket_pairs per bucket; the pairs combined globally into clusters
                            (dedup.clusters: the pairs are few) as a side input that drops members
  outputs                -> docs/<source>-SSSSS-of-NNNNN.jsonl, drops-SSSSS-of-NNNNN.jsonl, and the
                            counters summed per (source, stage, outcome)

Pipeline options come from config.data.clean.beam_args; the default is the DirectRunner on one
worker, which is what is tested. Not yet on a cluster runner: the clean store is a local directory of
the launching machine (prepare._clean_store) and its counters are read with local file calls, so
Dataflow/Flink/Spark workers would write where it does not look; the store has to move to the cache
directory through lmjax.fs first.
"""
from __future__ import annotations

import glob
import json
import os
import shlex

import apache_beam as beam
import ml_collections
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from lmjax.data import corpora
from lmjax.data import dedup
from lmjax.data import stages
from lmjax.data.records import Doc, Drop, drop_record

_SIGN_BATCH = 256  # documents per signatures() call


def _clean_file(item, cfg: ml_collections.ConfigDict):
  """One file through read -> normalize -> langid -> quality: kept Docs (main output), drop records
  ('drops') and counter entries ((source, stage, outcome), (docs, chars)) ('counts')."""
  name, spec_name, path, root, kind, languages = item
  counters, drops = stages.Counters(), []
  steps = stages.source_stages(stages.Source(name, (), kind, languages), cfg)
  records = corpora.file_records(spec_name, path, root, name, cfg.read)
  for batch in stages.batches(records, int(cfg.batch_docs), name, counters, drops.append):
    yield from stages.apply_stages(batch, steps, counters, drops.append)
  for record in drops:
    yield beam.pvalue.TaggedOutput('drops', record)
  for key, docs in counters.docs.items():
    yield beam.pvalue.TaggedOutput('counts', (key, (docs, counters.chars[key])))


def _exact(group):
  """The copies of one content: the one with the smallest id hash goes on; the others are drops."""
  content, docs = group
  docs = sorted(docs, key=lambda d: dedup.id_key(d.source, d.doc_id))
  yield docs[0]
  for d in docs[1:]:
    drop = Drop(d.source, d.doc_id, 'dedup', 'exact_duplicate', len(d.text))
    yield beam.pvalue.TaggedOutput('drops', drop_record(drop, d.text, content.hex()))
    yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'in'), (1, len(d.text))))
    yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'exact_duplicate'),
                                              (1, len(d.text))))


def _sign(docs: list[Doc], cfg: ml_collections.ConfigDict):
  """(key, doc, signature, band keys or None when it has no shingles) per document."""
  sigs = dedup.signatures([d.text for d in docs], cfg)
  bands = dedup.band_hashes(sigs, cfg)
  live = dedup.has_shingles(sigs)
  for d, sig, band, ok in zip(docs, sigs, bands, live):
    yield dedup.row_key(dedup.key_rows([d])[0]), d, sig, band if ok else None


def _band_entries(signed):
  key, _, sig, bands = signed
  if bands is not None:
    for j, h in enumerate(bands.tolist()):
      yield (j, h), (key, sig)


def _bucket(group, cfg: ml_collections.ConfigDict):
  _, members = group
  members = sorted(members, key=lambda m: m[0])  # GroupByKey gives no order; dedup.near_rows sorts
  return dedup.bucket_pairs([m[0] for m in members], np.stack([m[1] for m in members]), cfg)


def _near(signed, roots: dict):
  key, d, _, _ = signed
  root = roots.get(key, key)
  yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'in'), (1, len(d.text))))
  if root == key:
    yield d
    yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'kept'), (1, len(d.text))))
    return
  drop = Drop(d.source, d.doc_id, 'dedup', 'near_duplicate', len(d.text))
  yield beam.pvalue.TaggedOutput('drops', drop_record(drop, d.text, root[:16].hex()))
  yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'near_duplicate'),
                                            (1, len(d.text))))


def _sum(values):
  values = list(values)
  return sum(v[0] for v in values), sum(v[1] for v in values)


def run(specs: list[tuple[str, str, str, str]], cfg: ml_collections.ConfigDict,
        store: str) -> stages.Counters:
  """Cleans sources (name, corpora spec, kind, languages) into the clean store `store`; returns the
  counters (prepare.clean writes them to counters.json)."""
  names = [n for n, *_ in specs]
  items = [(n, spec_name, path, root, kind, languages) for n, spec, kind, languages in specs
           for spec_name, path, root in corpora.files(spec)]
  args = shlex.split(cfg.beam_args) or ['--runner=DirectRunner', '--direct_num_workers=1']
  counts_prefix = os.path.join(store, 'beam-counters')
  with beam.Pipeline(options=PipelineOptions(args)) as p:
    cleaned = (p | 'files' >> beam.Create(items) | beam.Reshuffle()
               | 'clean' >> beam.FlatMap(_clean_file, cfg).with_outputs('drops', 'counts',
                                                                         main='docs'))
    exact = (cleaned.docs | 'by content' >> beam.Map(lambda d: (dedup.content_key(d.text), d))
             | 'exact groups' >> beam.GroupByKey()
             | 'exact' >> beam.FlatMap(_exact).with_outputs('drops', 'counts', main='docs'))
    signed = (exact.docs | beam.BatchElements(min_batch_size=1, max_batch_size=_SIGN_BATCH)
              | 'sign' >> beam.FlatMap(_sign, cfg.dedup))
    pairs = (signed | 'bands' >> beam.FlatMap(_band_entries) | 'buckets' >> beam.GroupByKey()
             | 'pairs' >> beam.FlatMap(_bucket, cfg.dedup))
    roots = (pairs | beam.combiners.ToList() | 'clusters' >> beam.Map(dedup.clusters))
    near = (signed | 'near' >> beam.FlatMap(_near, beam.pvalue.AsSingleton(roots))
            .with_outputs('drops', 'counts', main='docs'))
    parts = near.docs | beam.Partition(lambda d, n: names.index(d.source), len(names))
    for name, part in zip(names, parts):
      _ = (part | f'line {name}' >> beam.Map(lambda d: json.dumps(dict(id=d.doc_id, text=d.text),
                                                                  ensure_ascii=False))
           | f'write {name}' >> beam.io.WriteToText(os.path.join(store, 'docs', name),
                                                    file_name_suffix='.jsonl'))
    _ = ((cleaned.drops, exact.drops, near.drops) | 'all drops' >> beam.Flatten()
         | 'drop lines' >> beam.Map(json.dumps, ensure_ascii=False)
         | 'write drops' >> beam.io.WriteToText(os.path.join(store, 'drops'),
                                                file_name_suffix='.jsonl'))
    _ = ((cleaned.counts, exact.counts, near.counts) | 'all counts' >> beam.Flatten()
         | beam.CombinePerKey(_sum) | 'count lines' >> beam.Map(json.dumps)
         | 'write counts' >> beam.io.WriteToText(counts_prefix, file_name_suffix='.jsonl'))
  counters = stages.Counters()
  for path in sorted(glob.glob(f'{counts_prefix}-*')):
    with open(path) as f:
      for line in f:
        (source, stage, outcome), (docs, chars) = json.loads(line)
        counters.add(source, stage, outcome, docs, chars)
    os.remove(path)
  return counters
