"""lmjax.scaling.sweep and report: grid expansion, the resumable runner with a fake training function
whose eval losses follow a known D-CPT Law (the oracle the fit must recover), CSV checks, plots."""
import json
import os

import numpy as np
import pytest

from lmjax import config as config_lib, errors
from lmjax.scaling import laws, sweep

# Laws that fall in r at these token counts (the C term outweighs the r^eta one), as fitted ones do.
DOMAIN = dict(E=1.5, A=40.0, alpha=0.3, B=1.0, beta=0.3, eta=0.5, C=0.3, gamma=0.4)
GENERAL = dict(E=1.8, A=50.0, alpha=0.32, B=0.5, beta=0.28, eta=0.6, C=0.3, gamma=0.3)
CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'dcpt_sweep.py')


def _config(**sweep_overrides):
  c = config_lib.base()
  c.train.batch_size, c.train.seq_len, c.train.eval_every = 4, 32, 10
  c.data.sources = {'en': dict(corpora='pydoc_topics', max_chars=0),
                    'code': dict(corpora='python_stdlib', max_chars=0),
                    'legal': dict(corpora='common_licenses', max_chars=0)}
  c.sweep = sweep.defaults()
  c.sweep.domain = 'legal'
  c.sweep.general = {'en': 3.0, 'code': 1.0}
  c.sweep.ratios = (0.1, 0.3, 0.5, 0.7, 0.9)
  c.sweep.holdout_ratios = (0.3,)
  c.sweep.sizes = {'a': dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64),
                   'b': dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=128),
                   'c': dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384)}
  c.sweep.tokens = (12_800,)
  c.sweep.pretrain_tokens = 6_400
  c.sweep.bootstrap = 8
  for k, v in sweep_overrides.items():
    c.sweep[k] = v
  c.lock()
  return c


class FakeTrain:
  """Stands in for lmjax.train.run: appends eval records whose losses follow DOMAIN/GENERAL at the
  run's N, tokens and mixture (en and code both follow GENERAL, so their weighted mean does too).
  A pretraining run (general data only) logs the laws at r_d = 0. As the trainer does, it also
  evaluates before the first step (step 0, D = 0: not a point of the law), and like the lmjax.eval.hook
  hook it logs bits per byte as a separate record of the same step."""

  def __init__(self, fail_on=None):
    self.calls, self.fail_on = [], fail_on

  def __call__(self, config, workdir):
    self.calls.append(os.path.basename(workdir))
    if os.path.basename(workdir) == self.fail_on:
      raise RuntimeError('preempted')
    os.makedirs(workdir, exist_ok=True)
    n = sweep.param_count(config.model)
    weights = dict(config.phases.main.weights)
    r_d = weights['legal']
    per_step = config.train.batch_size * config.train.seq_len
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': 0, 'tokens': 0, 'eval/legal/loss': 9.0, 'eval/en/loss': 9.0,
                          'eval/code/loss': 9.0}) + '\n')
      for step in range(config.train.eval_every, config.train.steps + 1, config.train.eval_every):
        d = step * per_step
        general = float(laws.dcpt_loss(GENERAL, n, d, 1.0 - r_d))
        record = {'step': step, 'tokens': d, 'eval/legal/loss': float(laws.dcpt_loss(DOMAIN, n, d, r_d)),
                  'eval/en/loss': general, 'eval/code/loss': general}
        f.write(json.dumps({'step': step, 'loss': 1.0}) + '\n' + json.dumps(record) + '\n'
                + json.dumps({'step': step, 'eval/legal/bpb': 1.0}) + '\n')


def test_expand_builds_the_grid():
  c = _config()
  specs = sweep.expand(c, '/sw')
  assert [s.name for s in specs[:3]] == ['a-pretrain', 'b-pretrain', 'c-pretrain']
  cpt = {s.name: s for s in specs[3:]}
  assert len(cpt) == 3 * 5 and all(s.kind == 'cpt' for s in cpt.values())
  s = cpt['b-r0.3-t12800']
  assert s.steps == 100 and s.ratio == 0.3 and s.size == 'b'
  stage = dict(s.config.phases.main.weights)
  assert stage['legal'] == 0.3
  assert stage['en'] == pytest.approx(0.7 * 0.75) and stage['code'] == pytest.approx(0.7 * 0.25)
  assert s.config.model.d_model == 64 and s.config.model.n_layers == 2
  assert s.config.init_from == '/sw/runs/b-pretrain'
  assert s.config.data.cache_dir == '/sw/data'  # one cache: one tokenizer for every run
  assert 'sweep' not in s.config
  pre = specs[0].config
  assert specs[0].steps == 50 and dict(pre.phases.main.weights) == pytest.approx(
      {'en': 0.75, 'code': 0.25, 'legal': 0.0})
  config_lib.validate(s.config)


@pytest.mark.parametrize('field, value, message', [
    ('domain', 'math', "config.sweep.domain='math'"),
    ('general', {'legal': 1.0}, "config.sweep.general: 'legal' is not a source other than"),
    ('ratios', (0.1, 1.5), 'config.sweep.ratios: 1.5 is not a share'),
    ('tokens', (0,), 'config.sweep.tokens: 0 is not a positive token count'),
    ('law', 'kaplan', "config.sweep.law='kaplan'"),
])
def test_bad_sweep_config_is_named(field, value, message):
  with pytest.raises(errors.ConfigError, match=message):
    sweep.expand(_config(**{field: value}), '/sw')


def test_runner_resumes_and_fit_recovers_the_law(tmp_path):
  c = _config()
  specs = sweep.expand(c, str(tmp_path))
  crashing = FakeTrain(fail_on='b-r0.5-t12800')
  with pytest.raises(RuntimeError, match='preempted'):
    sweep.run_local(specs, str(tmp_path), run_fn=crashing)
  done_before = crashing.calls[:-1]
  # A run that stopped before its last evaluation is not finished: it is run again.
  partial = os.path.join(tmp_path, 'runs', 'c-r0.9-t12800')
  os.makedirs(partial)
  with open(os.path.join(partial, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': 10, 'tokens': 1280, 'eval/legal/loss': 9.0}) + '\n')
  again = FakeTrain()
  started = sweep.run_local(specs, str(tmp_path), run_fn=again)
  assert again.calls == started
  assert not set(done_before) & set(again.calls)
  assert set(done_before) | set(again.calls) == {s.name for s in specs}
  assert sweep.run_local(specs, str(tmp_path), run_fn=FakeTrain()) == []  # all finished

  fitted = sweep.report(c, str(tmp_path))
  table = sweep.read_csv(os.path.join(tmp_path, 'results.csv'))
  # Every CPT evaluation after step 0, the stale partial record replaced, the bpb records merged.
  assert len(table['run']) == 15 * 10 and table['step'].min() == 10
  assert set(table['holdout'][table['ratio'] == 0.3]) == {1.0}
  n_c = sweep.param_count(specs[2].config.model)
  row = np.flatnonzero((table['n'] == n_c) & (table['ratio'] == 0.7) & (table['step'] == 40))[0]
  assert table['tokens'][row] == 40 * 128
  assert table['domain_loss'][row] == pytest.approx(float(laws.dcpt_loss(DOMAIN, n_c, 5120, 0.7)))
  assert sweep.read_metrics(os.path.join(tmp_path, 'runs', 'c-r0.7-t12800'))[4]['eval/legal/bpb'] == 1.0
  for target, true in (('domain', DOMAIN), ('general', GENERAL)):
    for k, v in true.items():
      assert fitted[target]['params'][k] == pytest.approx(v, rel=1e-4), (target, k)
    assert fitted[target]['warnings'] == []
    assert fitted[target]['held_out']['r2'] > 0.999999
    lo, hi = fitted[target]['intervals_95']['E']
    assert lo <= fitted[target]['params']['E'] * (1 + 1e-9) and hi >= lo
  with open(os.path.join(tmp_path, 'fit.json')) as f:
    assert json.load(f)['points_held_out'] == 3 * 10
  for name in ('fit.png', 'tradeoff.png'):
    with open(os.path.join(tmp_path, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # Usage (a) at the largest size: the largest share whose general loss is within 3% of the
  # starting model's, checked on the true general law with a dense grid.
  use = [u for u in fitted['usages'] if u['n'] == n_c][0]
  start = float(laws.dcpt_loss(GENERAL, n_c, 6400, 1.0))  # the pretraining run's last evaluation
  assert use['start_general_loss'] == pytest.approx(start)
  r = np.linspace(0, 1, 200_001)
  ok = laws.dcpt_loss(GENERAL, n_c, 12_800, 1 - r) <= 1.03 * start
  assert 0.05 < r[ok].max() < 0.95  # the cap binds inside (0, 1)
  assert use['tradeoff_share'] == pytest.approx(r[ok].max(), abs=2e-4)


def test_commands_and_run_config_agree(tmp_path):
  c = config_lib.load(CONFIG)
  specs = sweep.expand(c, str(tmp_path))
  lines = sweep.commands(specs, 'configs/dcpt_sweep.py', 'runlocal=True', str(tmp_path))
  assert lines[0].startswith('python -m lmjax.train --config=configs/dcpt_sweep.py:runlocal=True,'
                             'run=l-pretrain,sweep_dir=')
  spec = specs[-1]
  knobs = f'runlocal=True,run={spec.name},sweep_dir={tmp_path}'
  assert f'--config=configs/dcpt_sweep.py:{knobs} --workdir={tmp_path}/runs/{spec.name}' in lines[-1]
  from_file = config_lib.load(CONFIG, knobs)
  assert from_file.to_dict() == spec.config.to_dict()


def _write(path, header, rows):
  with open(path, 'w') as f:
    f.write(','.join(header) + '\n' + ''.join(','.join(map(str, r)) + '\n' for r in rows))


def test_csv_errors_name_row_and_column(tmp_path):
  path = str(tmp_path / 'results.csv')
  header = list(sweep.COLUMNS)
  good = ['x-r0.1', 'x', 1e6, 0.1, 10, 1280, 0, 3.2, 3.5]
  _write(path, header, [good, good])
  assert sweep.read_csv(path)['tokens'].tolist() == [1280.0, 1280.0]
  _write(path, header[:-1], [good[:-1]])
  with pytest.raises(errors.DataError, match=r"results.csv: missing column\(s\) \['general_loss'\]"):
    sweep.read_csv(path)
  for column, value, expected in [('tokens', -5, 'a positive number'), ('n', 0, 'a positive number'),
                                  ('domain_loss', 'nan', 'a positive number'),
                                  ('general_loss', '', 'a positive number'),
                                  ('ratio', 1.2, r'a share in \[0, 1\]'), ('holdout', 2, '0 or 1')]:
    bad = list(good)
    bad[header.index(column)] = value
    _write(path, header, [good, bad])
    with pytest.raises(errors.DataError, match=rf"results.csv row 2 \(run x-r0.1\): column '{column}' is "
                                         rf"'{value}'; expected {expected}"):
      sweep.read_csv(path)
