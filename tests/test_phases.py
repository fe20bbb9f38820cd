"""One timeline: a phase that decays the learning rate and switches the mixture at the same step, its
closed forms, an exact resume across the boundary after SIGKILL, and phase overrides from flags."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from lmjax import config as config_lib, errors, phases, train, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK, BATCH, SWITCH, STEPS = 1e-2, 8, 6, 12

CONFIG = textwrap.dedent('''
    from lmjax import config as config_lib, phases

    def get_config(arg=None):
      c = config_lib.base()
      c.model.compute_dtype = 'float32'
      c.model.d_ff = 256
      c.train.update(steps={steps}, batch_size={batch}, seq_len=32, log_every=1, eval_every=100,
                     checkpoint_every=4)
      c.optim.lr = {peak}
      c.data.sources = {{'a': dict(corpora='txt:{root}/a/*.txt', max_chars=0),
                         'b': dict(corpora='txt:{root}/b/*.txt', max_chars=0)}}
      c.data.mix_block = {batch}  # a block is one batch: the proportions hold in every batch
      c.data.tokenizer.vocab_size = 300
      c.model.vocab_size = 384  # rows past the tokenizer's 300 are padding, masked in the loss
      c.data.eval.holdout_chars = 500
      c.phases = phases.timeline(
          pretrain=phases.phase(steps={switch}, shape='constant', weights={{'a': 1.0, 'b': 0.0}}),
          # The anneal: the LR decays linearly to 0 while source b is upsampled, from one step.
          anneal=phases.phase(shape='linear', end=0.0, weights={{'a': 0.25, 'b': 0.75}}))
      return c
''')

KILL = textwrap.dedent('''
    import os, signal, sys
    from lmjax import config as config_lib, train, trainer
    config_path, workdir, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def kill(info):
      if info.step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    train.run(config_lib.load(config_path), workdir, extra_hooks=[trainer.Hook(1, kill)])
''')


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
  root = tmp_path_factory.mktemp('phases')
  rng = np.random.default_rng(0)
  for name, alphabet in (('a', 'abcdefghijklm'), ('b', 'nopqrstuvwxyz')):
    os.makedirs(root / name)
    for i in range(40):
      words = [''.join(rng.choice(list(alphabet), rng.integers(2, 8))) for _ in range(rng.integers(20, 120))]
      (root / name / f'{i}.txt').write_text(' '.join(words) + '\n')
  path = root / 'two_phases.py'
  path.write_text(CONFIG.format(steps=STEPS, batch=BATCH, peak=PEAK, switch=SWITCH, root=root))
  return str(path)


def records(workdir):
  """The last train record of each step (a resumed run logs the steps after its checkpoint again)."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for r in map(json.loads, f):
      if 'loss' in r:
        out[r['step']] = {k: v for k, v in r.items() if k not in ('step_time_s', 'tokens_per_s')}
  return out


def lr_closed_form(step):
  """The LR of the update at (1-based) step k: constant to the switch, then linear to 0."""
  t = step - 1  # the update of step k reads the schedule at k - 1
  return PEAK if t < SWITCH else PEAK * (1 - (t - SWITCH) / (STEPS - SWITCH))


def rows_closed_form(step):
  """Rows of (a, b) drawn by the first `step` batches: all a, then 2 a + 6 b per batch."""
  after = max(step - SWITCH, 0)
  return BATCH * min(step, SWITCH) + 2 * after, 6 * after


@pytest.mark.slow
def test_one_phase_switches_lr_and_mixture_and_resumes_exactly(config_path, tmp_path):
  straight = str(tmp_path / 'straight')
  config = config_lib.load(config_path)
  train.run(config, straight)
  got = records(straight)
  assert sorted(got) == list(range(1, STEPS + 1))
  run = trainer.setup(config, str(tmp_path / 'inspect'))  # the same pipeline, to count epoch rows
  run.checkpointer.close()
  epoch_rows = {n: r.rows_per_epoch for n, r in zip(run.pipeline.sources, run.pipeline._rows)}
  for step, r in got.items():
    np.testing.assert_allclose(r['lr'], lr_closed_form(step), rtol=1e-6)
    a, b = rows_closed_form(step)
    assert round(r['data/a/epochs'] * epoch_rows['a']) == a and round(r['data/b/epochs'] * epoch_rows['b']) == b
    assert r['data/phase'] == (0 if step <= SWITCH else 1)
    assert ('train/b/loss' in r) == (step > SWITCH)  # b's rows are in the batch from the switch on
  # The batches themselves: source ids per step, read from the pipeline.
  for step in range(STEPS):
    counts = np.bincount(run.pipeline.batch(step)['source_id'], minlength=2).tolist()
    assert counts == ([BATCH, 0] if step < SWITCH else [2, 6]), (step, counts)

  # Killed mid-anneal at step 9 (its last finished checkpoint: step 8, or 4 if 8's async write was
  # torn), re-run: every step's loss, LR and data metrics equal the straight run's.
  killed = str(tmp_path / 'killed')
  script = tmp_path / 'kill.py'
  script.write_text(KILL)
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # the same 8 fake devices as this process (conftest)
  proc = subprocess.run([sys.executable, str(script), config_path, killed, '9'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert max(records(killed)) == 9
  train.run(config_lib.load(config_path), killed)
  assert records(killed) == got


def test_phase_weights_and_length_are_overridable_by_flag(config_path):
  argv = ['prog', f'--config={config_path}', '--config.phases.anneal.weights.a=0.5',
          '--config.phases.pretrain.steps=4', '--config.phases.anneal.lr.end=0.1']
  fv = flags.FlagValues()  # what lmjax.cli defines, on its own flag set
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  config = fv.config
  config_lib.validate(config)
  resolved = phases.resolve(config.phases, config.train.steps, list(config.data.sources))
  assert [(p.name, p.start, p.steps) for p in resolved] == [('pretrain', 0, 4), ('anneal', 4, 8)]
  assert resolved[1].weights == {'a': 0.5, 'b': 0.75} and resolved[1].lr['end'] == 0.1


@pytest.mark.parametrize('change, message', [
    (lambda c: c.phases.anneal.weights.update(a=0.0, b=0.0),
     r'config\.phases\.anneal\.weights=.*expected at least one weight > 0'),
    (lambda c: setattr(c.phases.pretrain, 'steps', 20),
     r'config\.phases: the phases other than anneal take 20 steps, more than config\.train\.steps=12'),
    (lambda c: setattr(c.phases.anneal, 'fraction', 0.1),
     r'config\.phases: lengths \(pretrain=6, anneal=1\.2\) sum to 7\.2 steps; expected config\.train\.steps=12'),
    (lambda c: setattr(c.phases.anneal.lr, 'shape', 'cubic'), r"config\.phases\.anneal\.lr\.shape='cubic'"),
])
def test_bad_phase_names_the_phase_and_field(config_path, change, message):
  config = config_lib.load(config_path)
  change(config)
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(config)


def test_unknown_source_in_a_phase_is_named(config_path):
  config = config_lib.load(config_path)
  with config.unlocked():
    config.phases.anneal.weights['c'] = 1.0
  with pytest.raises(errors.ConfigError, match=r"config\.phases\.anneal\.weights: unknown source 'c'"):
    config_lib.validate(config)
