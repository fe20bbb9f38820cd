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
                            dedup.bucket_pairs per bucket; connected components of the pairs by
                            Hash-to-Min (`components`: config.data.clean.cc_rounds rounds of
                            GroupByKey, no machine holds more than one node's set; an error if a set
                            still changed in the last round); CoGroupByKey of the documents with
                            their roots: a document whose root is another is a near-duplicate. The
                            root is the component's smallest doc_key, as the local runner's
                            union-find keeps, so the kept copy is the same whatever the runner, the
                            worker count or the bundle order. Keys are ints (`_node`).
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


def _node(key: bytes) -> int:
  """A key as a Python int of the same order: the keys the pipeline groups by are ints, whose hash
  is the same in every worker process (a str's or bytes' hash is salted per process, which splits
  GroupByKey's groups on runners that partition by Python's hash, such as Dask: beam#29365)."""
  return int.from_bytes(key, 'big')


def _content_hex(node: int) -> str:
  """The content_key (hex) of a doc_key node: a cluster is named by its kept document's content."""
  return node.to_bytes(24, 'big')[:16].hex()


def _exact(group):
  """The copies of one content: the one with the smallest id hash goes on; the others are drops."""
  content, docs = group
  docs = sorted(docs, key=lambda d: dedup.id_key(d.source, d.doc_id))
  yield docs[0]
  for d in docs[1:]:
    drop = Drop(d.source, d.doc_id, 'dedup', 'exact_duplicate', len(d.text))
    yield beam.pvalue.TaggedOutput('drops', drop_record(drop, d.text, content.to_bytes(16, 'big').hex()))
    yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'in'), (1, len(d.text))))
    yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'exact_duplicate'),
                                              (1, len(d.text))))


def _sign(docs: list[Doc], cfg: ml_collections.ConfigDict):
  """(key, doc, signature, band keys or None when it has no shingles) per document."""
  sigs = dedup.signatures([d.text for d in docs], cfg)
  bands = dedup.band_hashes(sigs, cfg)
  live = dedup.has_shingles(sigs)
  for d, sig, band, ok in zip(docs, sigs, bands, live):
    yield _node(dedup.row_key(dedup.key_rows([d])[0])), d, sig, band if ok else None


def _band_entries(signed):
  key, _, sig, bands = signed
  if bands is not None:
    for j, h in enumerate(bands.tolist()):
      yield (j, h), (key, sig)


def _bucket(group, cfg: ml_collections.ConfigDict):
  _, members = group
  members = sorted(members, key=lambda m: m[0])  # GroupByKey gives no order; dedup.near_rows sorts
  return dedup.bucket_pairs([m[0] for m in members], np.stack([m[1] for m in members]), cfg)


def _send(item):
  """A Hash-to-Min round's messages of one node (dedup.hash_to_min_messages) and its own set."""
  node, cluster = item
  yield node, ('was', cluster)
  for receiver, c in dedup.hash_to_min_messages(node, cluster):
    yield receiver, ('got', c)


def _merge(item):
  """(node, its new set), tagged 'changed' when it differs from the set it had."""
  node, messages = item
  was = [c for kind, c in messages if kind == 'was']
  new = dedup.hash_to_min_merge(c for kind, c in messages if kind == 'got')
  if was and was[0] != new:
    yield beam.pvalue.TaggedOutput('changed', node)
  yield node, new


def components(pairs, rounds: int):
  """(node -> smallest node of its component, nodes changed in the last round) of the pairs'
  graph: Hash-to-Min (dedup.components) as `rounds` rounds of FlatMap -> GroupByKey -> Map, so no
  machine holds more than one node's set. The clusters are complete when nothing changed."""
  state = (pairs | 'neighbours' >> beam.FlatMap(dedup.neighbourhood)
           | 'group neighbours' >> beam.GroupByKey()
           | 'first sets' >> beam.MapTuple(lambda node, cs: (node, dedup.hash_to_min_merge(cs))))
  changed = None
  for r in range(rounds):
    merged = (state | f'send {r}' >> beam.FlatMap(_send) | f'receive {r}' >> beam.GroupByKey()
              | f'merge {r}' >> beam.FlatMap(_merge).with_outputs('changed', main='state'))
    state, changed = merged.state, merged.changed
  roots = state | 'roots' >> beam.MapTuple(lambda node, c: (node, min(c[0], node)))
  return roots, changed


def _near(joined):
  """A signed document with its cluster's root, if it is in a cluster: kept, or dropped."""
  _, group = joined
  ((key, d, _, _),) = group['doc']
  root = group['root'][0] if group['root'] else key
  yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'in'), (1, len(d.text))))
  if root == key:
    yield d
    yield beam.pvalue.TaggedOutput('counts', ((d.source, 'dedup', 'kept'), (1, len(d.text))))
    return
  drop = Drop(d.source, d.doc_id, 'dedup', 'near_duplicate', len(d.text))
  yield beam.pvalue.TaggedOutput('drops', drop_record(drop, d.text, _content_hex(root)))
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
  changed_prefix = os.path.join(store, 'beam-changed')
  with beam.Pipeline(options=PipelineOptions(args)) as p:
    cleaned = (p | 'files' >> beam.Create(items) | beam.Reshuffle()
               | 'clean' >> beam.FlatMap(_clean_file, cfg).with_outputs('drops', 'counts',
                                                                         main='docs'))
    exact = (cleaned.docs | 'by content' >> beam.Map(lambda d: (_node(dedup.content_key(d.text)), d))
             | 'exact groups' >> beam.GroupByKey()
             | 'exact' >> beam.FlatMap(_exact).with_outputs('drops', 'counts', main='docs'))
    signed = (exact.docs | beam.BatchElements(min_batch_size=1, max_batch_size=_SIGN_BATCH)
              | 'sign' >> beam.FlatMap(_sign, cfg.dedup))
    pairs = (signed | 'bands' >> beam.FlatMap(_band_entries) | 'buckets' >> beam.GroupByKey()
             | 'pairs' >> beam.FlatMap(_bucket, cfg.dedup))
    roots, changed = components(pairs, int(cfg.cc_rounds))
    near = ({'doc': signed | 'by key' >> beam.Map(lambda s: (s[0], s)), 'root': roots}
            | 'join roots' >> beam.CoGroupByKey()
            | 'near' >> beam.FlatMap(_near).with_outputs('drops', 'counts', main='docs'))
    _ = (changed | 'count changed' >> beam.combiners.Count.Globally()
         | 'changed line' >> beam.Map(str)
         | 'write changed' >> beam.io.WriteToText(changed_prefix, file_name_suffix='.txt'))
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
  changed = 0
  for path in sorted(glob.glob(f'{changed_prefix}-*')):
    with open(path) as f:
      changed += sum(int(line) for line in f)
    os.remove(path)
  if changed:
    raise RuntimeError(f'near-duplicate clusters: {changed} documents still changed cluster in the '
                       f'last of {cfg.cc_rounds} Hash-to-Min rounds; raise config.data.clean.cc_rounds')
  counters = stages.Counters()
  for path in sorted(glob.glob(f'{counts_prefix}-*')):
    with open(path) as f:
      for line in f:
        (source, stage, outcome), (docs, chars) = json.loads(line)
        counters.add(source, stage, outcome, docs, chars)
    os.remove(path)
  return counters
