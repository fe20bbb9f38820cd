"""The grain pipeline: packing against the source documents, exact resume, process slices, eval.

Packing is checked on fake documents whose token ids encode (document, position), so every token in a
row can be traced back to its document without trusting the pipeline. End-to-end tests build small
synthetic sources (text files in a tmp dir) plus the always-present standard library corpus.
"""
import json
import os

import numpy as np
import pytest

from lmjax import batch as batch_lib, phases
from lmjax.data import corpora
from lmjax.data import pipeline
from lmjax.data import shards

import docstream

KEYS = tuple(batch_lib.FIELDS)


def FakeDocs(lengths):
  """Stands in for SourceData: document i is the ids 10_000 * (i + 1) + j, j = 0 .. len - 1."""
  return docstream.DocStream(lengths, lambda i, n: 10_000 * (i + 1) + np.arange(n))


BOS, EOS = 1, 2


def _check_row(ex, lengths):
  """Asserts each segment is one contiguous piece of one document; returns [(doc, first j, last j)]."""
  seg, pos, inp, tgt, w = (ex[k] for k in ('segment_ids', 'positions', 'inputs', 'targets', 'weights'))
  pieces = []
  for s in np.unique(seg[seg > 0]):
    idx = np.flatnonzero(seg == s)
    assert np.all(np.diff(idx) == 1), 'a segment is not contiguous'
    np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
    body = inp[idx][(inp[idx] != BOS) & (inp[idx] != EOS)]
    docs = set(body // 10_000 - 1)
    assert len(docs) <= 1, f'segment {s} mixes documents {docs}'
    if body.size:
      d = docs.pop()
      np.testing.assert_array_equal(body % 10_000, np.arange(body[0] % 10_000, body[0] % 10_000 + body.size))
      pieces.append((d, int(body[0] % 10_000), int(body[-1] % 10_000)))
      if inp[idx[0]] == BOS:
        assert body[0] % 10_000 == 0
      if inp[idx[-1]] == EOS:
        assert body[-1] % 10_000 == lengths[d] - 1
  # Weight 1 exactly where input and target are consecutive tokens of one document (BOS/EOS included).
  def doc_of(t):
    return np.where((t == BOS) | (t == EOS) | (t == 0), -1, t // 10_000 - 1)
  same_doc = (seg > 0) & (
      ((inp == BOS) & (tgt % 10_000 == 0) & (tgt >= 10_000))
      | ((doc_of(inp) >= 0) & (doc_of(inp) == doc_of(tgt)) & (tgt == inp + 1))
      | ((doc_of(inp) >= 0) & (tgt == EOS)
         & (inp % 10_000 == lengths[np.maximum(doc_of(inp), 0)] - 1)))
  np.testing.assert_array_equal(w, same_doc.astype(np.float32))
  return pieces


@pytest.mark.parametrize('shuffle', [True, False])
def test_packing_covers_each_document_once_per_epoch_without_mixing(shuffle):
  lengths = np.random.default_rng(0).integers(1, 90, size=60)
  lengths[7] = 500  # spans several rows
  rows = pipeline.PackedRows(FakeDocs(lengths), seq_len=32, seed=(3,), bos_id=BOS, eos_id=EOS,
                             shuffle=shuffle)
  assert rows.rows_per_epoch == -(-(int(lengths.sum()) + 2 * len(lengths) - 1) // 32)
  for epoch in range(2):
    seen = {d: [] for d in range(len(lengths))}
    for k in range(epoch * rows.rows_per_epoch, (epoch + 1) * rows.rows_per_epoch):
      ex = pipeline.pack_example(*rows.row(k))
      for d, a, b in _check_row(ex, lengths):
        seen[d].append((a, b))
    # Every token of every document appears exactly once in the epoch.
    for d, spans in seen.items():
      covered = np.concatenate([np.arange(a, b + 1) for a, b in spans])
      np.testing.assert_array_equal(np.sort(covered), np.arange(lengths[d]))


def test_targets_are_next_tokens_and_padding_is_zero_weight():
  rows = pipeline.PackedRows(FakeDocs([5, 7]), seq_len=16, seed=(0,), bos_id=BOS, eos_id=EOS)
  ex = pipeline.pack_example(*rows.row(0))  # 16 tokens of documents + padding; one row per epoch
  assert rows.rows_per_epoch == 1
  n = 5 + 7 + 4
  assert np.all(ex['segment_ids'][n:] == 0) and np.all(ex['weights'][n - 1:] == 0)
  np.testing.assert_array_equal(ex['targets'][:n - 1], ex['inputs'][1:n])
  assert ex['weights'].sum() == n - 2  # every pair but the one across the document boundary


def _write_source(root, name, texts):
  d = os.path.join(root, name)
  os.makedirs(d)
  for i, t in enumerate(texts):
    with open(os.path.join(d, f'{i:04d}.txt'), 'w') as f:
      f.write(t)
  return f'txt:{d}/*.txt'


def _words(rng, alphabet, n):
  return ' '.join(''.join(rng.choice(list(alphabet), size=rng.integers(1, 8))) for _ in range(n))


@pytest.fixture(scope='module')
def two_sources(tmp_path_factory):
  """Config for two synthetic sources with disjoint alphabets: 'a' (a-m) and 'b' (n-z)."""
  root = str(tmp_path_factory.mktemp('corpora'))
  rng = np.random.default_rng(0)
  cfg = pipeline.defaults()
  cfg.sources = {
      'a': dict(corpora=_write_source(root, 'a', [_words(rng, 'abcdefghijklm', rng.integers(5, 200)) + '\n'
                                                  for _ in range(120)]), max_chars=0),
      'b': dict(corpora=_write_source(root, 'b', [_words(rng, 'nopqrstuvwxyz', rng.integers(5, 60)) + '\n'
                                                  for _ in range(80)]), max_chars=0),
  }
  cfg.mix_block = 8
  cfg.tokenizer.vocab_size = 300
  cfg.eval.holdout_chars = 2000
  cfg.cache_dir = os.path.join(root, 'cache')
  return cfg


# The mixture: source b is off for the first 5 steps, then 3:1 over a.
TWO_PHASES = phases.resolve(phases.timeline(first=phases.phase(steps=5, weights={'a': 1.0, 'b': 0.0}),
                                             then=phases.phase(weights={'a': 0.25, 'b': 0.75})),
                            1000, ['a', 'b'])


def _build(cfg, **kw):
  args = dict(seq_len=24, global_batch_size=8, seed=1, workdir='/nonexistent')
  args.update(kw)
  return pipeline.build(cfg, TWO_PHASES, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_batches_have_the_contract_shapes_and_types(two_sources):
  p = _build(two_sources)
  b = next(p.train_iter())
  batch_lib.check(b, 8, 24)  # the spec every step reads: fields, dtypes, shapes
  assert set(b['source_id']) <= {0, 1}
  assert p.sources == ['a', 'b'] and p.tokenizer.vocab_size == 300


@pytest.mark.parametrize('save_at', [3, 5])  # mid-stage, and exactly at the stage boundary
def test_resume_from_state_is_exact(two_sources, save_at):
  p = _build(two_sources)
  it = p.train_iter()
  _take(it, save_at)
  state = it.get_state()
  expected = _take(it, 9 - save_at)
  fresh = _build(two_sources).train_iter()  # a new process: rebuilt from the cache
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 9 - save_at), expected)


def test_two_process_slices_union_to_the_one_process_stream(two_sources):
  one = _take(_build(two_sources).train_iter(), 7)
  parts = [_take(_build(two_sources, process_index=i, process_count=2).train_iter(), 7) for i in range(2)]
  for step in range(7):
    for k in KEYS:
      assert parts[0][step][k].shape == batch_lib.shape(k, 4, 24)
      np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), one[step][k])
  e1, e2 = _build(two_sources).eval_batches(), _build(two_sources, process_index=1, process_count=2).eval_batches()
  for name in e1:
    for b1, b2 in zip(e1[name], e2[name]):
      np.testing.assert_array_equal(b1['inputs'][4:], b2['inputs'])


def _sources_of_rows(p, batch):
  """Which source each row came from, read off its text: 'a' uses a-m, 'b' uses n-z."""
  out = []
  for row, seg in zip(batch['inputs'], batch['segment_ids']):
    text = p.tokenizer.decode(row[seg > 0])
    letters = {c for c in text if c.isalpha()}
    assert letters <= set('abcdefghijklm') or letters <= set('nopqrstuvwxyz'), 'a row mixes sources'
    out.append('a' if letters <= set('abcdefghijklm') else 'b')
  return out


def test_stage_switch_is_exact_and_zero_weight_never_drawn(two_sources):
  p = _build(two_sources)
  batches = _take(p.train_iter(), 9)
  for step, b in enumerate(batches):
    srcs = _sources_of_rows(p, b)
    if step < 5:
      assert srcs == ['a'] * 8, f'step {step} (weight of b is 0) drew {srcs}'
    else:  # blocks of 8 rows = one batch: exactly 2 of a and 6 of b
      assert srcs.count('a') == 2, f'step {step} drew {srcs}'
  assert p.metrics(5)['data/phase'] == 0 and p.metrics(6)['data/phase'] == 1


def test_rows_are_text_of_the_source_documents(two_sources):
  p = _build(two_sources)
  docs = {n: corpora.source_documents(two_sources.sources[n].corpora) for n in ('a', 'b')}
  b = next(p.train_iter())
  for row, seg in zip(b['inputs'], b['segment_ids']):
    for s in np.unique(seg[seg > 0]):
      ids = [t for t in row[seg == s] if t not in (p.tokenizer.bos_id, p.tokenizer.eos_id)]
      text = p.tokenizer.decode(ids)
      assert any(text in d for d in docs['a'] + docs['b']), f'{text!r} is in no document'


def test_eval_batches_are_held_out_deterministic_and_padded(two_sources):
  p = _build(two_sources)
  ev = p.eval_batches()
  assert set(ev) == {'a', 'b'}
  _assert_batches_equal(ev['a'], _build(two_sources).eval_batches()['a'])
  root = two_sources.cache_dir
  for name in ('a', 'b'):
    assert 1 <= len(ev[name]) <= two_sources.eval.num_batches
    shard_dir = [os.path.join(root, d) for d in os.listdir(root) if d.startswith(name + '-')][0]
    train = pipeline.SourceData(shard_dir, 'train', verify=True)
    train_texts = [p.tokenizer.decode(ids) for ids, _ in train.span(0, train.num_tokens)]
    docs = corpora.source_documents(two_sources.sources[name].corpora)
    held = [d for d in docs if d not in train_texts]
    assert held and len(held) + len(train_texts) == len(docs)
    b = ev[name][0]
    for row, seg in zip(b['inputs'], b['segment_ids']):
      for s in np.unique(seg[seg > 0]):
        ids = [t for t in row[seg == s] if t not in (p.tokenizer.bos_id, p.tokenizer.eos_id)]
        assert any(p.tokenizer.decode(ids) in d for d in held)
    last = ev[name][-1]
    assert last['weights'].sum() > 0


def test_defaults_build_on_the_standard_library(tmp_path):
  cfg = pipeline.defaults()
  cfg.sources.code.max_chars = 400_000
  cfg.tokenizer.sample_chars = 300_000
  cfg.tokenizer.vocab_size = 1024
  p = pipeline.build(cfg, phases.resolve(phases.defaults(), 10, ['code']), seq_len=64,
                     global_batch_size=4, seed=0, workdir=str(tmp_path))
  assert p.sources == ['code'] and os.path.isdir(tmp_path / 'data')
  b = next(p.train_iter())
  assert b['inputs'].shape == (4, 64)
  same = b['segment_ids'][:, 1:] == b['segment_ids'][:, :-1]
  np.testing.assert_array_equal(b['targets'][:, :-1][same], b['inputs'][:, 1:][same])
  assert p.eval_batches()['code'] and set(p.metrics(1)) == {'data/code/epochs', 'data/phase'}
  assert b['source_id'].tolist() == [0] * 4
  batch_lib.check(b, 4, 64)


def test_tiny_mix_anneal_phase_starts_with_the_lr_decay():
  from lmjax import config as config_lib
  from lmjax import optim
  root = os.path.join(os.path.dirname(__file__), '..')
  cfg = config_lib.load(os.path.join(root, 'configs', 'tiny_mix.py'), 'steps=200')
  resolved = phases.resolve(cfg.phases, cfg.train.steps, list(cfg.data.sources))
  (pretrain, anneal), start = [p.weights for p in resolved], resolved[1].start
  lr = optim.make_schedule(resolved, 1.0)
  # Batch i feeds the update with optimizer count i: the last pretrain batch sees the peak LR,
  # the anneal batches see it decay.
  assert float(lr(start - 1)) == pytest.approx(1.0) and float(lr(start)) == pytest.approx(1.0)
  assert float(lr(start + 1)) < 1.0 and float(lr(cfg.train.steps - 1)) < 0.2
  for name in ('math', 'code', 'legal'):
    assert anneal[name] > pretrain[name]
  assert pretrain['zh'] == pretrain['en']
  assert start % cfg.train.eval_every == 0 and cfg.train.steps % cfg.train.eval_every == 0


def test_source_data_spans_are_the_stream_of_its_shards(tmp_path):
  """SourceData.span against the stream built by hand: documents across several shards and across
  the starts' in-memory stride (64), any window [begin, end), with a few shards open at once."""
  lengths = np.random.default_rng(0).integers(0, 40, size=700)
  lengths[300] = 2_000  # longer than a window: spans several strides of positions
  docs = [np.full(n, i % 60_000 + 3, np.uint16) for i, n in enumerate(lengths)]
  written = shards.write_shards(iter(docs), str(tmp_path), 'train', shard_bytes=6_000)
  assert len(written) > 3 and max(s['records'] for s in written) > 2 * 64
  (tmp_path / 'stats.json').write_text(json.dumps(dict(
      dtype='uint16', train=dict(documents=len(docs), tokens=int(lengths.sum()), shards=written))))
  data = pipeline.SourceData(str(tmp_path), 'train', verify=True, max_open=2)
  stream = np.concatenate([np.concatenate([[-1], d.astype(np.int64), [-2]]) for d in docs])
  owner = np.repeat(np.arange(len(docs)), lengths + 2)  # the document of each stream position
  starts = np.concatenate([[0], np.cumsum(lengths + 2)])
  assert data.num_tokens == len(stream)
  rng = np.random.default_rng(1)
  for begin in [0, len(stream) - 1, *rng.integers(0, len(stream), size=300)]:
    end = min(int(begin) + int(rng.integers(1, 3_000)), len(stream))
    got = data.span(int(begin), end)
    want = np.unique(owner[begin:end])
    assert [int(s) for _, s in got] == [int(starts[d]) for d in want]
    for (ids, _), d in zip(got, want):
      np.testing.assert_array_equal(ids, docs[d])
