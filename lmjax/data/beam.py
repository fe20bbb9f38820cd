"""The Beam runner of the clean step: the same stage functions as the local runner (stages.py), as
an Apache Beam pipeline that needs no machine to hold more than one file's documents, one LSH bucket
or one node's cluster. It writes the clean store of prepare's local runner (prepare.py's module
docstring) with the same documents, in key-range files (clean_store.part), so the shards and
report that follow are the same.

  python -m lmjax.prepare --config=configs/tiny_mix.py --workdir=/tmp/run --runner=beam
  pip install -e '.[beam]'   # apache-beam[dask]==2.77.0 (with pyarrow==25.0.1)

The pipeline:
  files (corpora.files)  -> Reshuffle -> per file: read, normalize, langid, quality (stages.batches,
                            stages.apply_stages), then MinHash signatures and band keys per batch
                            (dedup.signatures, dedup.band_hashes): kept docs, drop records, counters
  exact dedup            -> GroupByKey on the content hash; the copy with the smallest id hash is kept
  near dedup             -> GroupByKey on (band, band key) = the LSH buckets; dedup.bucket_pairs per
                            bucket; connected components of the pairs by Hash-to-Min (`components`:
                            config.data.clean.cc_rounds rounds of GroupByKey, no machine holds more
                            than one node's set; an error if a set still changed in the last round);
                            CoGroupByKey of the documents with their roots: a document whose root is
                            another is a near-duplicate. The root is the component's smallest doc_key,
                            as the local runner's union-find keeps, so the kept copy is the same
                            whatever the runner, the worker count or the bundle order.
  outputs                -> docs/<source>-SSSSS-of-NNNNN.jsonl (`part`: file i holds the i-th of N
                            equal ranges of doc_key, N = config.data.clean.beam_files, sorted by
                            doc_key within it, so the files in order are the source in content-hash
                            order), drops-SSSSS-of-NNNNN.jsonl, the counters summed per (source,
                            stage, outcome) and beam-files.json (documents and characters of each
                            docs file: what beam_shards.py splits by), each file written whole
                            through lmjax.fs by one worker

  report summary         -> report.summarize's figures where the drops are (`report_summary`):
                            examples and cluster members by Top.SmallestPerKey, group sizes by
                            CombinePerKey, each cluster joined with its kept document, the largest
                            by a TopCombineFn on one key; into beam-summary.json

The store is `<cache dir>/clean-<key>` (prepare._clean_store), local or gs://, so cluster workers
write it directly; split, tokenizer, tokenization and shards follow as Beam pipelines over it
(beam_shards.py), and the launching machine reads only its small JSON files. Pipeline options come from
config.data.clean.beam_args; the default is the DirectRunner on one worker. docs/data.md has the Dask
and Dataflow command lines.

Portable by construction, because Beam's DaskRunner (2.77) gets several things silently wrong: a
tagged output receives every element, outputs of finish_bundle are dropped (so BatchElements,
WriteToText and Top.Of/Top.Smallest lose data; Top.SmallestPerKey and CombinePerKey work) and only
the last of several leaf transforms runs. So every step yields
(kind, value) pairs that the next steps filter, batches are made inside a file's DoFn, files are
written in DoFns, and the pipeline ends in one Flatten. The documents, buckets and clusters are
grouped by ints (`_node`: a key's bytes as a big-endian int, same order), hashed alike in every
process (beam#29365 reported str keys splitting groups on Dask; it does not reproduce with dask
2026.8); the counters are summed by (source, stage, outcome) strings.
"""
from __future__ import annotations

import io
import json
import os
import shlex

import apache_beam as beam
import ml_collections
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from lmjax import errors, fs
from lmjax.data import clean_store
from lmjax.data import corpora
from lmjax.data import dedup
from lmjax.data import records
from lmjax.data import report
from lmjax.data import stages
from lmjax.data.records import Doc, Drop, drop_record

COUNTERS = 'beam-counters.json'
CHANGED = 'beam-changed.json'


def _node(key: bytes) -> int:
  """A key as a Python int of the same order (big-endian)."""
  return int.from_bytes(key, 'big')


def _content_hex(node: int) -> str:
  """The content_key (hex) of a doc_key node: a cluster is named by its kept document's content."""
  return node.to_bytes(24, 'big')[:16].hex()


def _count(source: str, stage: str, outcome: str, doc: Doc) -> tuple:
  return 'count', ((source, stage, outcome), (1, len(doc.text)))


def _clean_file(item, cfg: ml_collections.ConfigDict):
  """One file through read -> normalize -> langid -> quality, then signed: ('doc', (node, Doc,
  signature, band keys or None when it has no shingles)), ('drop', record) and ('count', ((source,
  stage, outcome), (docs, chars)))."""
  name, spec_name, path, root, kind, languages = item
  counters, drops = stages.Counters(), []
  steps = stages.source_stages(stages.Source(name, (), kind, languages), cfg)
  read = corpora.file_records(spec_name, path, root, name, cfg.read)
  for batch in stages.batches(read, int(cfg.batch_docs), name, counters, drops.append):
    docs = stages.apply_stages(batch, steps, counters, drops.append)
    if not docs:
      continue
    sigs = dedup.signatures([d.text for d in docs], cfg.dedup)
    bands = dedup.band_hashes(sigs, cfg.dedup)
    nodes = [_node(dedup.row_key(row)) for row in dedup.key_rows(docs)]
    for node, d, sig, band, live in zip(nodes, docs, sigs, bands, dedup.has_shingles(sigs)):
      yield 'doc', (node, d, sig, band.tolist() if live else None)
  for record in drops:
    yield 'drop', record
  for key, docs in counters.docs.items():
    yield 'count', (key, (docs, counters.chars[key]))


def _exact(group):
  """The copies of one content: the one with the smallest id hash goes on; the others are drops."""
  _, signed = group
  signed = sorted(signed, key=lambda s: s[0])  # same content: doc_key order is id_key order
  yield 'doc', signed[0]
  for _, d, _, _ in signed[1:]:
    drop = Drop(d.source, d.doc_id, 'dedup', 'exact_duplicate', len(d.text))
    yield 'drop', drop_record(drop, d.text, _content_hex(signed[0][0]))
    yield _count(d.source, 'dedup', 'in', d)
    yield _count(d.source, 'dedup', 'exact_duplicate', d)


def _band_entries(signed):
  node, _, sig, bands = signed
  if bands is not None:
    for j, h in enumerate(bands):
      yield (j, h), (node, sig)


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
  """('state', (node, its new set)), and ('changed', node) when it differs from the set it had."""
  node, messages = item
  was = [c for kind, c in messages if kind == 'was']
  new = dedup.hash_to_min_merge(c for kind, c in messages if kind == 'got')
  if was and was[0] != new:
    yield 'changed', node
  yield 'state', (node, new)


def _kind(pcoll, kind: str, label: str):
  """The values of the (kind, value) elements of `pcoll` of that kind."""
  return (pcoll | f'{label}: only {kind}' >> beam.Filter(lambda e, k=kind: e[0] == k)
          | f'{label}: {kind} values' >> beam.Map(lambda e: e[1]))


def components(pairs, rounds: int):
  """(node -> smallest node of its component, nodes changed in the last round) of the pairs'
  graph: Hash-to-Min (dedup.components) as `rounds` rounds of FlatMap -> GroupByKey -> FlatMap, so
  no machine holds more than one node's set. The clusters are complete when nothing changed."""
  state = (pairs | 'neighbours' >> beam.FlatMap(dedup.neighbourhood)
           | 'group neighbours' >> beam.GroupByKey()
           | 'first sets' >> beam.MapTuple(lambda node, cs: (node, dedup.hash_to_min_merge(cs))))
  for r in range(rounds):
    merged = (state | f'send {r}' >> beam.FlatMap(_send) | f'receive {r}' >> beam.GroupByKey()
              | f'merge {r}' >> beam.FlatMap(_merge))
    state = _kind(merged, 'state', f'round {r}')
  changed = _kind(merged, 'changed', 'last round')
  roots = state | 'roots' >> beam.MapTuple(lambda node, c: (node, min(c[0], node)))
  return roots, changed


def _near(joined):
  """A signed document with its cluster's root, if it is in a cluster: kept, or dropped."""
  _, group = joined
  ((key, d, _, _),) = group['doc']
  root = group['root'][0] if group['root'] else key
  yield _count(d.source, 'dedup', 'in', d)
  if root == key:
    yield 'doc', (key, d)
    yield _count(d.source, 'dedup', 'kept', d)
    if group['root']:  # the kept document of a cluster
      yield 'root', (_content_hex(key), dict(source=d.source, id=d.doc_id,
                                             text=d.text[:records.SNIPPET_CHARS]))
    return
  drop = Drop(d.source, d.doc_id, 'dedup', 'near_duplicate', len(d.text))
  yield 'drop', drop_record(drop, d.text, _content_hex(root))
  yield _count(d.source, 'dedup', 'near_duplicate', d)


def _cluster(joined):
  """(-size, name, dropped members shown, kept document) of a near-duplicate cluster."""
  of, group = joined
  if group['n']:
    members = group['members'][0] if group['members'] else []
    kept = group['kept'][0] if group['kept'] else None
    yield (-group['n'][0], of, [dict(source=s, id=i, text=t) for _, s, i, t in members], kept)


def report_summary(drops, roots):
  """report.summarize's dedup, examples and clusters, from the drop records and the clusters' kept
  documents (content hex, {source, id, text}), where they are: ('examples', key, list), ('totals',
  reason, (groups, dropped)) and ('clusters', the largest) for `_summary`."""
  examples = (drops | 'example keys' >> beam.Map(lambda r: (
      f'{r["source"]}/{r["stage"]}/{r["reason"]}',
      (records.rank(r['source'], r['id']), r['id'], r['chars'], r['text'])))
              | 'examples' >> beam.combiners.Top.SmallestPerKey(report.EXAMPLES)
              | 'example rows' >> beam.MapTuple(lambda key, top: (
                  'examples', key, [dict(id=i, chars=c, text=t) for _, i, c, t in top])))
  dups = drops | 'duplicates' >> beam.Filter(lambda r: r['reason'] in report.DUPLICATES)
  sizes = (dups | 'group keys' >> beam.Map(lambda r: ((r['reason'], r['of']), 1))
           | 'group sizes' >> beam.CombinePerKey(sum))
  totals = (sizes | 'per reason' >> beam.MapTuple(lambda key, n: (key[0], (1, n)))
            | 'totals' >> beam.CombinePerKey(_sum)
            | 'total rows' >> beam.MapTuple(lambda reason, v: ('totals', reason, v)))
  near = (sizes | 'near sizes' >> beam.Filter(lambda kv: kv[0][0] == 'near_duplicate')
          | 'by cluster' >> beam.MapTuple(lambda key, n: (key[1], n)))
  members = (dups | 'near members' >> beam.Filter(lambda r: r['reason'] == 'near_duplicate')
             | 'member keys' >> beam.Map(lambda r: (r['of'], (
                 records.rank(r['source'], r['id']), r['source'], r['id'], r['text'])))
             | 'members shown' >> beam.combiners.Top.SmallestPerKey(report.EXAMPLES))
  clusters = ({'n': near, 'members': members, 'kept': roots} | 'join clusters' >> beam.CoGroupByKey()
              | 'clusters' >> beam.FlatMap(_cluster) | 'one key' >> beam.Map(lambda c: (0, c))
              | 'largest' >> beam.CombinePerKey(beam.combiners.TopCombineFn(report.CLUSTERS,
                                                                             reverse=True))
              | 'cluster rows' >> beam.MapTuple(lambda _, top: ('clusters', top)))
  return (examples, totals, clusters) | 'summary' >> beam.Flatten()


def _summary(parts) -> dict:
  """report.summarize's dict from report_summary's parts."""
  examples, totals, top = {}, {}, []
  for part in parts:
    if part[0] == 'examples':
      examples[part[1]] = part[2]
    elif part[0] == 'totals':
      totals[part[1]] = part[2]
    elif part[0] == 'clusters':
      top = part[1]
  (exact_groups, exact_dropped), (near_clusters, near_dropped) = (
      totals.get(reason, (0, 0)) for reason in report.DUPLICATES)
  return dict(
      dedup=dict(exact_groups=exact_groups, exact_dropped=exact_dropped,
                 near_clusters=near_clusters, near_dropped=near_dropped),
      examples={k: examples[k] for k in sorted(examples)},
      clusters=[dict(size=1 - neg_size, kept=kept, dropped=dropped)
                for neg_size, _, dropped, kept in sorted(top, key=lambda c: c[:2])])


def _write(item, store: str, names: list[str], files: int):
  """Writes one output file of the store whole (fs.write_atomic). item: (key, values); key (source
  index, file index) for documents, (-1, file index) for drops, (-2, 0) for the counters, (-3, 0)
  for the changed count, (-4, 0) for the docs files' sizes, (-5, 0) for the report's summary (the
  last three get a seed element, so they are written whatever the input). A docs file, written with
  its lengths file, yields its ('file', [source,
  index, documents, characters])."""
  (what, i), values = item
  if what == -5:
    path = os.path.join(store, clean_store.SUMMARY)
    text = json.dumps(_summary(values))
  elif what >= 0:
    path = clean_store.docs_file(store, names[what], i, files)
    docs = sorted(values)
    text = ''.join(line for _, _, line in docs)
    lengths = np.array([chars for _, chars, _ in docs], np.int64)
    out = io.BytesIO()
    np.save(out, lengths)
    fs.write_atomic(clean_store.lengths_file(path), out.getvalue())
    yield 'file', [names[what], i, len(docs), int(lengths.sum())]
  elif what == -1:
    path = os.path.join(store, f'drops-{i:05d}-of-{files:05d}.jsonl')
    text = ''.join(sorted(values))
  elif what == -2:
    path = os.path.join(store, COUNTERS)
    text = json.dumps(sorted(values))
  elif what == -3:
    path = os.path.join(store, CHANGED)
    text = json.dumps(sum(values))
  else:
    path = os.path.join(store, clean_store.SIZES)
    text = json.dumps(dict(files=files, rows=sorted(v for v in values if v is not None)))
  fs.write_atomic(path, text)


def run(specs: list[tuple[str, str, str, str]], cfg: ml_collections.ConfigDict,
        store: str) -> stages.Counters:
  """Cleans sources (name, corpora spec, kind, languages) into the clean store `store` (a local
  directory or a URL); returns the counters (prepare.clean writes them to counters.json)."""
  names = [n for n, *_ in specs]
  files = int(cfg.beam_files)
  items = [(n, spec_name, path, root, kind, languages) for n, spec, kind, languages in specs
           for spec_name, path, root in corpora.files(spec)]
  p = pipeline(cfg)
  cleaned = (p | 'files' >> beam.Create(items) | beam.Reshuffle()
             | 'clean' >> beam.FlatMap(_clean_file, cfg))
  signed = _kind(cleaned, 'doc', 'cleaned')
  exact = (signed | 'by content' >> beam.Map(lambda s: (s[0] >> 64, s))
           | 'exact groups' >> beam.GroupByKey() | 'exact' >> beam.FlatMap(_exact))
  unique = _kind(exact, 'doc', 'exact')
  pairs = (unique | 'bands' >> beam.FlatMap(_band_entries) | 'buckets' >> beam.GroupByKey()
           | 'pairs' >> beam.FlatMap(_bucket, cfg.dedup))
  roots, changed = components(pairs, int(cfg.cc_rounds))
  near = ({'doc': unique | 'by key' >> beam.Map(lambda s: (s[0], s)), 'root': roots}
          | 'join roots' >> beam.CoGroupByKey() | 'near' >> beam.FlatMap(_near))
  events = (cleaned, exact, near) | 'events' >> beam.Flatten()
  doc_lines = (_kind(near, 'doc', 'kept')
               | 'doc lines' >> beam.MapTuple(lambda node, d: (
                   (names.index(d.source), clean_store.part(node, files)),
                   (node, len(d.text), clean_store.doc_line(d.doc_id, d.text)))))
  drops = _kind(events, 'drop', 'all')
  drop_lines = (drops | 'drop lines' >> beam.Map(
      lambda r: ((-1, _node(dedup.id_key(r['source'], r['id'])) % files),
                 json.dumps(r, ensure_ascii=False) + '\n')))
  counts = (_kind(events, 'count', 'all') | 'sum counts' >> beam.CombinePerKey(_sum)
            | 'count rows' >> beam.Map(lambda kv: ((-2, 0), kv)))
  # One key, not CombineGlobally: its default value is a side input, whose producer (all of the
  # above) the DaskRunner recomputes for every bundle that reads it.
  changed_count = ((changed | 'ones' >> beam.Map(lambda _: ((-3, 0), 1)),
                    p | 'changed seed' >> beam.Create([((-3, 0), 0)]))
                   | 'changed rows' >> beam.Flatten())
  summary = ((report_summary(drops, _kind(near, 'root', 'kept')),
              p | 'summary seed' >> beam.Create([('seed',)]))
             | 'summary parts' >> beam.Flatten()
             | 'summary rows' >> beam.Map(lambda part: ((-5, 0), part)))
  written = ((doc_lines, drop_lines, counts, changed_count, summary) | 'outputs' >> beam.Flatten()
             | 'by file' >> beam.GroupByKey() | 'write' >> beam.FlatMap(_write, store, names, files))
  sizes = (_kind(written, 'file', 'docs files') | 'sizes' >> beam.Map(lambda row: ((-4, 0), row)))
  _ = ((sizes, p | 'sizes seed' >> beam.Create([((-4, 0), None)])) | 'all sizes' >> beam.Flatten()
       | 'by size file' >> beam.GroupByKey() | 'write sizes' >> beam.FlatMap(_write, store, names, files))
  execute(p)
  changed_docs = json.loads(fs.read_text(os.path.join(store, CHANGED)))
  if changed_docs:  # too few rounds for the widest cluster: the knob named is the fix
    raise errors.ConfigError(f'near-duplicate clusters: {changed_docs} documents still changed cluster in '
                             f'the last of {cfg.cc_rounds} Hash-to-Min rounds; raise '
                             'config.data.clean.cc_rounds')
  counters = stages.Counters()
  for (source, stage, outcome), (docs, chars) in json.loads(
      fs.read_text(os.path.join(store, COUNTERS))):
    counters.add(source, stage, outcome, docs, chars)
  return counters


def pipeline(cfg: ml_collections.ConfigDict) -> beam.Pipeline:
  """A pipeline with config.data.clean.beam_args as its options (default: the DirectRunner, one
  worker)."""
  args = shlex.split(cfg.beam_args) or ['--runner=DirectRunner', '--direct_num_workers=1']
  return beam.Pipeline(options=PipelineOptions(args))


def execute(p: beam.Pipeline) -> None:
  """Runs `p` to the end; the DaskRunner's client is closed whatever happens."""
  result = p.run()
  try:
    result.wait_until_finish()
  finally:
    client = getattr(result, 'client', None)  # the DaskRunner's dask.distributed client
    if client is not None:
      client.close()


def _sum(values):
  values = list(values)
  return sum(v[0] for v in values), sum(v[1] for v in values)
