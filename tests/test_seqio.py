"""seqio interop (lmjax/data/seqio_tasks.py): seqio Tasks and Mixtures read through lmjax's prepare
and pipeline, and a prepared lmjax source read back through an exported seqio Task.

The oracles are lmjax's own `txt:` reader over the same files (one document per file, each file one
line, so seqio's TextLineDataSource sees the same documents), sentencepiece itself, and the rates the
test gives its seqio Mixture.
"""
import glob
import json
import os
import sys

import numpy as np
import pytest
import sentencepiece as spm

seqio = pytest.importorskip(
    'seqio', reason="seqio is not installed: pip install -e '.[seqio]' (CI installs the extra)")

# pylint: disable=wrong-import-position
from lmjax import batch as batch_lib, errors, phases
from lmjax.data import clean_store, pipeline, prepare, readers, seqio_tasks, shards
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.data.records import Doc

KEYS = tuple(batch_lib.FIELDS)
ALPHABETS = {'a': 'abcdefghijklm', 'b': 'nopqrstuvwxyz'}
TASKS = {'a': 'lmjax_test_a', 'b': 'lmjax_test_b'}
MIXTURE = 'lmjax_test_mix'
DOCS = 12  # documents (one-line files) per source; seqio reads each file as a shard of its own


def _lines(rng, alphabet, n):
  words = [''.join(rng.choice(list(alphabet), size=rng.integers(1, 8))) for _ in range(n)]
  return ' '.join(words) + '\tend'  # a tab: kept as is by both readers and the tokenizer


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Per source a folder of one-line files, a sentencepiece model trained on all of them, and the
  seqio Tasks 'lmjax_test_a' / 'lmjax_test_b' (TextLineDataSource, the same model as their
  SentencePieceVocabulary, a preprocessor that names the line and seqio's tokenize) mixed 3:1."""
  root = str(tmp_path_factory.mktemp('seqio'))
  rng = np.random.default_rng(0)
  texts = {}
  for src, alphabet in ALPHABETS.items():
    texts[src] = [_lines(rng, alphabet, rng.integers(5, 60)) for _ in range(DOCS)]
    os.makedirs(os.path.join(root, src))
    for i, t in enumerate(texts[src] + texts[src][:1]):  # the last file repeats the first (dedup)
      with open(os.path.join(root, src, f'{i:03d}.txt'), 'w') as f:
        f.write(t)  # no final newline: TextLineDataSource drops it, the txt: reader would keep it
  sp_path = os.path.join(root, 'sp.model')
  tokenizer_lib.train(texts['a'] + texts['b'], sp_path, vocab_size=300)
  vocab = seqio.SentencePieceVocabulary(sp_path)
  for src, task in TASKS.items():
    seqio.TaskRegistry.add(
        task, source=seqio.TextLineDataSource({'train': os.path.join(root, src, '*.txt')}),
        preprocessors=[lambda ds: ds.map(lambda line: {'text': line}), seqio.preprocessors.tokenize],
        output_features={'text': seqio.Feature(vocab, add_eos=False)})
  seqio.MixtureRegistry.add(MIXTURE, [(TASKS['a'], 3.0), (TASKS['b'], 1.0)])
  yield dict(root=root, sp_path=sp_path, texts=texts,
             txt={src: f'txt:{os.path.join(root, src)}/*.txt' for src in ALPHABETS})
  seqio.MixtureRegistry.remove(MIXTURE)
  for task in TASKS.values():
    seqio.TaskRegistry.remove(task)


def _data_cfg(world, sources, cache):
  cfg = pipeline.defaults()
  cfg.sources = {name: dict(corpora=spec, max_chars=0) for name, spec in sources.items()}
  cfg.tokenizer.path = world['sp_path']
  cfg.mix_block = 8
  cfg.eval.holdout_chars = 300
  cfg.cache_dir = os.path.join(world['root'], cache)
  return cfg


def _build(cfg, weights):
  timeline = phases.resolve(phases.timeline(main=phases.phase(weights=weights)), 100,
                            list(cfg.sources))
  return pipeline.build(cfg, timeline, seq_len=24, global_batch_size=8, seed=1,
                        workdir=cfg.cache_dir + '-run')


@pytest.mark.parametrize('feature', ['text', 'text_pretokenized'])  # token ids, and the text
def test_task_reads_as_the_same_token_stream_as_the_txt_source(world, feature):
  spec = f'seqio:{TASKS["a"]}#{feature}'
  docs = list(seqio_tasks.documents(spec, 'a', readers.defaults()))
  assert all(isinstance(d, Doc) for d in docs)
  txt = list(readers.read(world['txt']['a'], 'a', readers.defaults()))
  assert sorted(d.text for d in docs) == sorted(d.text for d in txt)
  assert sorted(set(d.text for d in docs)) == sorted(world['texts']['a'])  # and one repeat

  ours = _build(_data_cfg(world, {'a': spec}, f'cache-seqio-{feature}'), {'a': 1.0})
  theirs = _build(_data_cfg(world, {'a': world['txt']['a']}, 'cache-txt'), {'a': 1.0})
  assert ours.plan(10) == theirs.plan(10)
  cache = f'cache-seqio-{feature}'
  with open(glob.glob(os.path.join(world['root'], cache, 'a-*', 'stats.json'))[0]) as f:
    stats = json.load(f)
  assert stats['train']['documents'] + stats['eval']['documents'] == DOCS  # the repeat deduplicated
  it, ref = ours.train_iter(), theirs.train_iter()
  for _ in range(4):
    x, y = next(it), next(ref)
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  for x, y in zip(ours.eval_batches()['a'], theirs.eval_batches()['a'], strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


@pytest.mark.parametrize('block', [8, 10])  # a block holds 3:1 exactly, and to the nearest row
def test_mixture_rates_become_phase_weights_with_exact_block_counts(world, block):
  spec = f'seqio:{MIXTURE}#text'
  rates = seqio_tasks.rates(spec)
  assert rates == {TASKS['a']: 3.0, TASKS['b']: 1.0}
  specs = seqio_tasks.task_specs(spec)
  assert specs == {t: f'seqio:{t}#text' for t in TASKS.values()}
  texts = [d.text for d in seqio_tasks.documents(spec, 'mix', readers.defaults())]
  assert sorted(set(texts)) == sorted(world['texts']['a'] + world['texts']['b'])

  cfg = _data_cfg(world, specs, 'cache-mix')
  cfg.mix_block = block
  p = _build(cfg, rates)
  assert p.sources == [TASKS['a'], TASKS['b']]
  share = rates[TASKS['a']] / sum(rates.values())
  it, sources = p.train_iter(), []
  for step in range(6):
    b = next(it)
    sources += b['source_id'].tolist()
    for row, seg, s in zip(b['inputs'], b['segment_ids'], b['source_id']):  # the text agrees
      letters = {c for c in p.tokenizer.decode(row[seg > 0]) if c.isalpha()} - set('end')
      assert letters <= set(ALPHABETS['ab'[s]]), f'step {step}: a row of source {s} reads {letters}'
  for first in range(0, len(sources), block):  # every block: the rate's share of its rows
    in_block = np.array(sources[first:first + block])
    expected = share * len(in_block)  # 6 of 8 rows; 7.5 of 10: 7 or 8
    assert abs(np.sum(in_block == 0) - expected) < 1, (first, in_block)
    assert np.sum(in_block == 0) == expected or not expected.is_integer(), (first, in_block)


def test_exported_task_yields_the_prepared_token_ids(world, monkeypatch):
  monkeypatch.delenv('LMJAX_CLEAN_CACHE', raising=False)  # the clean store in this cache dir, read below
  cfg = _data_cfg(world, {'a': world['txt']['a']}, 'cache-export')
  cfg.tokenizer.path = ''  # prepare trains its own: register_task finds it beside the source
  cfg.tokenizer.vocab_size = 280
  cfg.shard_bytes = 256  # several train shards, read in order
  prep = prepare.prepare(cfg, cfg.cache_dir + '-run')
  assert len(glob.glob(os.path.join(prep.dirs['a'], 'train-*.arrayrecord'))) > 1
  with pytest.raises(errors.ConfigError, match='is not the tokenizer'):
    seqio_tasks.register_task('lmjax_test_export', prep.dirs['a'], vocabulary_path=world['sp_path'])
  task = seqio_tasks.register_task('lmjax_test_export', prep.dirs['a'])
  try:
    # The prepared documents: the clean store's, held out and trained on as prepare splits them.
    index = clean_store.index_source(glob.glob(os.path.join(cfg.cache_dir, 'clean-*'))[0], 'a')
    n_eval, n_train = shards.split(index.chars, cfg.eval, 0)
    docs = {split: [d['text'] for d in clean_store.read_docs(index, rows)] for split, rows in
            (('train', range(n_eval, n_eval + n_train)), ('validation', range(n_eval)))}
    assert docs['validation']
    assert sorted(docs['train'] + docs['validation']) == sorted(world['texts']['a'])
    sp = spm.SentencePieceProcessor(model_file=prep.tokenizer.path)
    vocab = task.output_features['targets'].vocabulary
    for split, texts in docs.items():
      got = [ex['targets'].tolist() for ex in
             task.get_dataset(sequence_length=None, split=split, shuffle=False).as_numpy_iterator()]
      assert got == [sp.encode(t) for t in texts]
      assert [vocab.decode(ids) for ids in got] == texts
  finally:
    seqio.TaskRegistry.remove('lmjax_test_export')


def test_errors_name_the_spec_and_what_was_expected(world, tmp_path):
  with pytest.raises(errors.ConfigError, match=r"seqio:\[MODULE/\]NAME\[#FEATURE\]"):
    seqio_tasks.parse_spec('seqio:')
  with pytest.raises(errors.ConfigError, match=r"features \['text', 'text_pretokenized'\], not 'targets'"):
    list(seqio_tasks.documents(f'seqio:{TASKS["a"]}', 'a', readers.defaults()))
  with pytest.raises(errors.ConfigError, match='lmjax_no_such_task'):
    seqio_tasks.tasks('seqio:lmjax_no_such_task')
  with pytest.raises(errors.ConfigError, match="cannot import module 'lmjax_no_such_module'"):
    seqio_tasks.tasks(f'seqio:lmjax_no_such_module/{TASKS["a"]}')
  with pytest.raises(errors.MissingFile, match='expected a source directory that lmjax.data.prepare'):
    seqio_tasks.register_task('lmjax_test_nothing', str(tmp_path))


def test_undecodable_examples_are_dropped_by_reason():
  """A feature that is not UTF-8 (bytes) or decodes to lone surrogates is dropped as invalid_utf8,
  a too large one as too_large, a blank one as empty; the rest is a document."""
  from lmjax.data.records import Drop  # pylint: disable=import-outside-toplevel
  record = lambda text: readers.value_record(text, 'x', 's', max_bytes=16)  # as file_records calls it
  assert record(b'\xff\xfe') == Drop('s', 'x', 'read', 'invalid_utf8', 2)  # bytes: counted in bytes
  assert record('a\ud800b') == Drop('s', 'x', 'read', 'invalid_utf8', 3)  # text: in characters
  assert record('x' * 17).reason == 'too_large' and record(' \n').reason == 'empty'
  assert record('ok') == Doc('s', 'x', 'ok')


def test_a_missing_seqio_extra_names_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` raises ModuleNotFoundError
  seqio_tasks._seqio.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(errors.MissingExtra, match=r"seqio sources needs tensorflow, which is not installed: "
                                                  r"pip install -e '\.\[seqio\]'"):
      seqio_tasks.tasks('seqio:lmjax_test_a')
    assert seqio_tasks.files('seqio:lmjax_test_a') == []  # reported as a missing source, not an error
  finally:
    seqio_tasks._seqio.cache_clear()  # pylint: disable=protected-access
