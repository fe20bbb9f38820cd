"""The stage-scheduled block-deterministic mixture and the epochs it reports."""
import numpy as np
import pytest
import scipy.stats

from lmjax import phases
from lmjax.data import pipeline

import docstream


def _sources(mix, rows):
  return np.array([mix.assign(g)[0] for g in rows])


def test_realised_proportions_match_weights_in_every_block():
  w = np.array([0.5, 0.3, 0.2, 0.0])
  mix = pipeline.Mixture([(0, w)], rows_per_step=10, block=100, seed=0)
  src = _sources(mix, range(10_000))
  share = np.bincount(src, minlength=4) / len(src)
  np.testing.assert_allclose(share, w, atol=0.01)
  for b in range(100):  # each block of 100 rows holds exactly 50 / 30 / 20 / 0
    np.testing.assert_array_equal(np.bincount(src[b * 100:(b + 1) * 100], minlength=4), [50, 30, 20, 0])
  # The order inside blocks is random: a chi-square test of independence between consecutive draws.
  table = np.zeros((3, 3))
  np.add.at(table, (src[:-1], src[1:]), 1)
  assert scipy.stats.chi2_contingency(table).pvalue > 1e-3


def test_irrational_weights_keep_every_window_within_one_row():
  w = np.array([1 / 3, np.pi, np.e])
  w = w / w.sum()
  mix = pipeline.Mixture([(0, w)], rows_per_step=7, block=64, seed=3)
  src = _sources(mix, range(64 * 50))
  for b in range(50):
    counts = np.bincount(src[b * 64:(b + 1) * 64], minlength=3)
    assert counts.sum() == 64 and np.all(np.abs(counts - w * 64) < 1)


def test_stage_switch_happens_exactly_at_its_step_and_zero_weight_never_draws():
  # Stage 1 starts at step 13 = row 13 * 6 = 78, not a multiple of the block (16).
  stages = [(0, np.array([1.0, 0.0, 0.0])), (13, np.array([0.0, 0.5, 0.5])), (20, np.array([0.2, 0.0, 0.8]))]
  mix = pipeline.Mixture(stages, rows_per_step=6, block=16, seed=1)
  src = _sources(mix, range(6 * 40))
  assert np.all(src[:78] == 0)
  assert np.all(src[78:120] != 0) and set(src[78:120]) == {1, 2}
  assert np.all(src[120:] != 1)
  # The cut blocks at the stage ends still follow the weights: 78 = 4 * 16 + 14; 42 rows in stage 1.
  assert np.bincount(src[78:120], minlength=3)[1] == 21


def test_each_source_row_is_drawn_once_in_order():
  stages = [(0, np.array([0.6, 0.4])), (7, np.array([0.1, 0.9]))]
  mix = pipeline.Mixture(stages, rows_per_step=5, block=8, seed=2)
  ks = {0: [], 1: []}
  for g in range(5 * 30):
    s, k = mix.assign(g)
    ks[s].append(k)
  for s in ks:
    assert ks[s] == list(range(len(ks[s])))
  for row in (0, 1, 17, 35, 36, 100, 150):
    np.testing.assert_array_equal(mix.drawn_before(row), [sum(1 for g in range(row) if mix.assign(g)[0] == s)
                                                          for s in range(2)])


def _Docs(lengths, base):
  """Document i of a source with base `base`: token ids base + 1000 * i + j."""
  return docstream.DocStream(lengths, lambda i, n: base + 1000 * i + np.arange(n))


def _pipeline(stages, lengths, *, repeats, batch=8, seq_len=16, block=16):
  rows = [pipeline.PackedRows(_Docs(n, (s + 1) * 1_000_000), seq_len, (0, s), bos_id=1, eos_id=2)
          for s, n in enumerate(lengths)]
  size = [r.rows_per_epoch for r in rows]
  weights = []
  for start, w in stages:
    w = np.asarray(w, np.float64) * (np.asarray(size) if repeats else 1)
    weights.append((start, w / w.sum()))
  mix = pipeline.Mixture(weights, batch, block, seed=0)
  return pipeline.Pipeline(None, [f's{i}' for i in range(len(lengths))], rows, mix,
                           global_batch_size=batch, process_index=0, process_count=1, eval_rows={},
                           num_eval_batches=0, read_options=None, missing={}, prepared={}, stream={})


def test_epoch_count_of_an_upsampled_source_is_exact():
  rng = np.random.default_rng(0)
  big, small = rng.integers(5, 60, size=200), rng.integers(5, 60, size=20)
  # Anneal-like: stage 1 upsamples the small source 4x relative to its natural share.
  p = _pipeline([(0, [1.0, 1.0]), (10, [1.0, 4.0])], [big, small], repeats=True, block=256)
  seen = {}
  step = 0
  for step in range(1, 400):
    b = p.batch(step - 1)
    tok = b['inputs'][b['weights'] > 0]
    small_tok = tok[(tok >= 2_000_000) & (tok < 3_000_000)]
    for t in small_tok:
      seen[t] = seen.get(t, 0) + 1
    epochs = p.metrics(step)['data/s1/epochs']
    if epochs >= 2 and epochs == int(epochs):
      break
  assert epochs == int(epochs) >= 2, f'no whole epoch boundary found by step {step}'
  # Every token of the small source was a weighted input (its target: the next token or EOS)
  # exactly `epochs` times.
  expected = [2_000_000 + 1000 * i + j for i, n in enumerate(small) for j in range(n)]
  assert sorted(seen) == sorted(expected)
  assert set(seen.values()) == {int(epochs)}
  # Upsampled 4x in stage 1: it gains epochs 4x as fast as the other (to the rounding in a block).
  m10, m = p.metrics(10), p.metrics(10 + 2 * 256 // 8)  # two whole blocks of stage 1
  rate_big = (m['data/s0/epochs'] - m10['data/s0/epochs'])
  rate_small = (m['data/s1/epochs'] - m10['data/s1/epochs'])
  assert rate_small / rate_big == pytest.approx(4.0, rel=0.02)


def test_metrics_report_phase_of_the_last_batch():
  p = _pipeline([(0, [1.0, 0.0]), (3, [0.0, 1.0])], [[10] * 50, [10] * 50], repeats=False)
  assert [p.metrics(s)['data/phase'] for s in (0, 1, 3, 4)] == [0, 0, 0, 1]
  assert p.metrics(3)['data/s1/epochs'] == 0 and p.metrics(4)['data/s1/epochs'] > 0


def test_bad_phase_weights_are_errors_naming_the_phase():
  with pytest.raises(ValueError, match=r"config\.phases\.warm\.weights: unknown source 'nope'"):
    phases.resolve(phases.timeline(warm=phases.phase(weights={'code': 1.0, 'nope': 1.0})), 10, ['code'])
  with pytest.raises(ValueError, match=r'config\.phases\.warm\.weights=.*expected at least one weight > 0'):
    phases.resolve(phases.timeline(warm=phases.phase(weights={'code': 0.0})), 10, ['code'])
  with pytest.raises(ValueError, match=r'config\.phases\.warm\.weights\.code=-1\.0: expected a number >= 0'):
    phases.resolve(phases.timeline(warm=phases.phase(weights={'code': -1.0})), 10, ['code'])
  # Weight only on a source that is not installed: named at build time.
  two = phases.resolve(phases.timeline(warm=phases.phase(weights={'code': 0.0, 'gone': 1.0})), 10, ['code', 'gone'])
  with pytest.raises(ValueError, match=r'config\.phases\.warm\.weights: no installed source has weight'):
    pipeline.stage_weights(two, pipeline.defaults(), ['code'], {'code': 1})


def test_bad_sources_are_errors_naming_the_field():
  cfg = pipeline.defaults()
  cfg.sources.code.corpora = 'python_stdlib,nope'
  with pytest.raises(ValueError, match="unknown corpus 'nope'"):
    pipeline.validate(cfg)
  cfg = pipeline.defaults()
  cfg.sources = {'code': dict(corpora='python_stdlib', max_chars=0, typo=1)}
  with pytest.raises(ValueError, match='config.data.sources.code'):
    pipeline.validate(cfg)
  cfg = pipeline.defaults()
  cfg.mix_block = 0
  with pytest.raises(ValueError, match='mix_block'):
    pipeline.validate(cfg)
