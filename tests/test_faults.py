"""Run safety: nothing is lost but the steps since the last good checkpoint, and a user's mistake is one
line naming the culprit. Kill -9 and Ctrl-C many times (scripts/fault_soak.py), damaged checkpoints, a
full disk, damaged data and tokenizer files, SIGTERM and SIGINT, a resume with a changed config,
metrics after a resume."""
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lmjax import config as config_lib, errors, train, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')


def _soak_module():
  spec = importlib.util.spec_from_file_location('fault_soak', os.path.join(ROOT, 'scripts', 'fault_soak.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """Prepared data shared by the tests of this file (the tokenizer is trained once)."""
  return str(tmp_path_factory.mktemp('data'))


def tiny(cache, steps=4, **train):
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'), f'steps={steps}')
  config.train.update(dict(batch_size=8, seq_len=32, log_every=1, eval_every=1000, checkpoint_every=2,
                           async_checkpoint=False), **train)
  config.data.cache_dir = cache
  return config


def train_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['step'] for r in map(json.loads, f) if 'loss' in r]


@pytest.mark.slow
def test_twenty_kills_lose_nothing(tmp_path):
  figures = _soak_module().soak(str(tmp_path), kills=20, steps=50, seed=0)
  assert figures['kills'] == 20 and figures['kills_during_checkpoint_write'] >= 2


@pytest.mark.parametrize('damage', ['truncate', 'no_commit_marker'])
def test_damaged_latest_checkpoint_restores_the_previous(cache, tmp_path, damage, caplog):
  workdir = str(tmp_path / 'run')
  train.run(tiny(cache), workdir)  # checkpoints at steps 2 and 4
  latest = os.path.join(workdir, 'checkpoints', '4')
  if damage == 'truncate':
    files = [p for p in glob.glob(os.path.join(latest, 'state', '**', '*'), recursive=True)
             if os.path.isfile(p)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, 'r+b') as f:
      f.truncate(os.path.getsize(biggest) // 2)
  else:
    os.remove(os.path.join(latest, 'commit_success.txt'))
  run = trainer.setup(tiny(cache), workdir)
  run.checkpointer.close()
  assert run.start_step == 2
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_corrupt', '4'))  # kept aside, not deleted
  assert 'checkpoint' in caplog.text and 'unreadable' in caplog.text
  # Training on redoes steps 3 and 4; metrics.jsonl reads as one run.
  train.run(tiny(cache), workdir)
  assert train_steps(workdir) == [1, 2, 3, 4]


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path], check=True,
                   capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f'cannot mount a small tmpfs here (needs root): {e}')


def test_a_full_disk_stops_training_at_the_failed_save_and_the_rerun_resumes(cache, tmp_path):
  """A 20 MiB filesystem holds one checkpoint of the tiny run (~12.6 MB: params and two Adam
  moments) but not two: the save at step 4 fails, training stops there with the disk's reason (it
  never trains on with nothing saveable), no partial files stay, and the run, moved to a disk with
  room, resumes from step 2 to the losses of a run never interrupted."""
  disk = str(tmp_path / 'disk')
  _mount_tmpfs(disk, '20m')
  try:
    workdir = os.path.join(disk, 'run')
    with pytest.raises(errors.CheckpointSaveError,
                       match=r'training stopped at step 4: checkpoint 4 could not be written to '
                             r'.*/run/checkpoints: No space left on device \(the last good checkpoint: 2\)'):
      train.run(tiny(cache, steps=8, keep_checkpoints=3), workdir)
    assert train_steps(workdir) == [1, 2, 3, 4]
    assert not glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))
    moved = str(tmp_path / 'moved')
    shutil.copytree(workdir, moved)
  finally:
    subprocess.run(['umount', '-l', disk], check=False)  # lazy: files the run held may close later
  run = trainer.setup(tiny(cache, steps=8), moved)
  run.checkpointer.close()
  assert run.start_step == 2
  train.run(tiny(cache, steps=8), moved)
  train.run(tiny(cache, steps=8), str(tmp_path / 'straight'))
  assert _losses(moved) == _losses(str(tmp_path / 'straight'))


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.mark.slow
def test_a_full_disk_is_one_line_from_the_command(cache, tmp_path):
  disk = str(tmp_path / 'disk')
  _mount_tmpfs(disk, '20m')
  try:
    run = subprocess.run(
        [sys.executable, '-m', 'lmjax.train', '--config=configs/tiny.py:steps=8', f'--workdir={disk}/run',
         '--config.train.batch_size=8', '--config.train.seq_len=32', '--config.train.checkpoint_every=2',
         '--config.train.keep_checkpoints=3', f'--config.data.cache_dir={cache}'],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  finally:
    subprocess.run(['umount', '-l', disk], check=False)
  errors_said = [l for l in run.stderr.splitlines() if 'error' in l.lower()]
  assert run.returncode == 2 and len(errors_said) == 1, run.stderr[-3000:]
  assert errors_said[0].startswith('lmjax.train: error: training stopped at step ')
  assert 'checkpoint 4 could not be written to ' in errors_said[0]
  assert 'No space left on device' in errors_said[0] and 'Traceback' not in run.stderr


def test_damaged_data_shard_and_tokenizer_are_errors_naming_them(tmp_path):
  cache = str(tmp_path / 'data')
  train.run(tiny(cache, steps=1), str(tmp_path / 'first'))
  (shard,) = glob.glob(os.path.join(cache, 'code-*', 'train-00000.arrayrecord'))
  with open(shard, 'r+b') as f:
    f.seek(100)
    f.write(b'\xff' * 16)
  run = trainer.setup(tiny(cache, steps=1), str(tmp_path / 'second'))
  with pytest.raises(ValueError, match=f'data shard {shard!r} fails its checksum'):
    next(run.data_iter)  # a shard is checked when a row first reads it
  run.checkpointer.close()
  (model,) = glob.glob(os.path.join(cache, 'tokenizer-*.model'))
  with open(model, 'r+b') as f:
    f.truncate(50)
  with pytest.raises(ValueError, match=f'tokenizer model {model!r} is not a sentencepiece model'):
    trainer.setup(tiny(cache, steps=1), str(tmp_path / 'third'))


def _signal_a_run(cache, workdir: str, sig: int) -> tuple[int, str]:
  """(exit code, stderr) of a long tiny run sent `sig` once it has logged 3 steps."""
  proc = subprocess.Popen(
      [sys.executable, '-m', 'lmjax.train', '--config=configs/tiny.py:steps=100000', f'--workdir={workdir}',
       '--config.train.batch_size=8', '--config.train.seq_len=32', '--config.train.checkpoint_every=100000',
       '--config.train.log_every=1', f'--config.data.cache_dir={cache}'],
      cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.isfile(metrics) and len(open(metrics).readlines()) >= 3):
    time.sleep(0.5)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(cache, tmp_path):
  workdir = str(tmp_path / 'run')
  code, err = _signal_a_run(cache, workdir, signal.SIGTERM)
  assert code == 0, err[-2000:]
  last = train_steps(workdir)[-1]
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()) == [last]


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_step_and_exits_130(cache, tmp_path):
  workdir = str(tmp_path / 'run')
  code, err = _signal_a_run(cache, workdir, signal.SIGINT)
  last = train_steps(workdir)[-1]
  assert code == 130 and 'Traceback' not in err, err[-2000:]
  assert err.strip().splitlines()[-1] == (
      f'lmjax.train: error: interrupted: stopped at step {last} with a checkpoint in '
      f'{workdir}/checkpoints; the same command resumes from it')
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()) == [last]


@pytest.mark.slow
def test_ctrl_c_at_random_steps_loses_nothing(tmp_path):
  """scripts/fault_soak.py with SIGINT: each interrupted attempt checkpoints its step and exits 130;
  the resumed run's whole curve equals a straight run's."""
  figures = _soak_module().soak(str(tmp_path), kills=3, steps=12, seed=1, sig='INT')
  assert figures['kills'] == 3


@pytest.mark.slow
def test_a_finished_run_says_so_and_what_changed(cache, tmp_path):
  workdir = str(tmp_path / 'run')

  def train(steps):
    run = subprocess.run(
        [sys.executable, '-m', 'lmjax.train', f'--config=configs/tiny.py:steps={steps}',
         f'--workdir={workdir}', '--config.train.batch_size=8', '--config.train.seq_len=32',
         '--config.train.checkpoint_every=2', f'--config.data.cache_dir={cache}'],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr.strip().splitlines()

  last = train(4)[-1]
  loss = _losses(workdir)[4]
  assert last.startswith(f'done: step 4, final train loss {loss:.4f}; checkpoint {workdir}/checkpoints/4, '
                         f'metrics {workdir}/metrics.jsonl')
  assert train(4) == [f'the run is complete: step 4 of config.train.steps=4, final train loss '
                      f'{loss:.4f}; {last.split("; ", 1)[1]}']
  lowered = train(2)
  assert lowered[0] == ("config.train.steps: 4 -> 2 (changed from the run's config.json; recorded in "
                        'config_changes.jsonl)')
  assert lowered[1].startswith('the run is complete: step 4 of config.train.steps=2')


def test_resume_with_a_changed_config_is_refused_then_recorded(cache, tmp_path):
  workdir = str(tmp_path / 'run')
  train.run(tiny(cache), workdir)
  changed = tiny(cache, steps=6)  # extending the run: allowed and recorded
  changed.optim.lr = 1e-2         # a new LR: changes the optimizer's path
  with pytest.raises(ValueError, match=r'resuming at step 4 with a changed config \(config\.optim\.lr: '
                                       r'0\.003 -> 0\.01\).*--accept_config_changes'):
    trainer.setup(changed, workdir)
  run = trainer.setup(changed, workdir, accept_changes=True)
  run.checkpointer.close()
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    recorded = [json.loads(l) for l in f]
  assert recorded == [dict(field='optim.lr', old=0.003, new=0.01, step=4),
                      dict(field='train.steps', old=4, new=6, step=4)]
  free = tiny(cache, steps=6, log_every=3)  # logging intervals may change freely
  free.optim.lr = 1e-2
  trainer.setup(free, workdir).checkpointer.close()


def test_metrics_after_a_resume_read_as_one_run(cache, tmp_path):
  """A run killed at step 3 logged step 3 after its last checkpoint (2); the resumed run drops it
  and logs it again: each step once, in order."""
  workdir = str(tmp_path / 'run')

  def stop_at_3(info):
    if info.step == 3:
      raise KeyboardInterrupt  # dies without the final hooks, as a killed run would
  with pytest.raises(KeyboardInterrupt):
    train.run(tiny(cache), workdir, extra_hooks=[trainer.Hook(1, stop_at_3)])
  assert train_steps(workdir) == [1, 2, 3]
  train.run(tiny(cache), workdir)
  assert train_steps(workdir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_user_mistakes_are_one_line_naming_the_culprit(tmp_path):
  typo = tmp_path / 'my_tiny.py'  # a user's copy of a shipped config, with a typo inside
  typo.write_text(open(os.path.join(ROOT, 'configs', 'tiny.py')).read().replace(
      '  return c\n', '  c.train.stpes = 300\n  return c\n'))
  cases = [
      ([f'--config={typo}'],
       f'lmjax.train: error: {typo}: config.train.stpes: no such field (did you mean config.train.steps?)'),
      (['--config=configs/tiny.py', '--config.optim.lrr=1e-3'],
       'lmjax.train: error: configs/tiny.py: config.optim.lrr: no such field (did you mean config.optim.lr?)'),
      (['--config=configs/nope.py'], "lmjax.train: error: config file 'configs/nope.py' does not exist"),
      (['--config=configs/tiny.py', '--config.data.sources.web=x'],
       "lmjax.train: error: configs/tiny.py: config.data.sources.web: no such field; config.data.sources "
       "has ['code'] (new keys cannot be added from the command line; edit the config file)"),
      (['--config=configs/tiny.py', '--config.optim.lr=-1'],
       'lmjax.train: error: configs/tiny.py: config.optim.lr=-1.0: expected a number >= 0'),
  ]
  for flags, line in cases:
    run = subprocess.run([sys.executable, '-m', 'lmjax.train', *flags, f'--workdir={tmp_path}'], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=300)
    ours = [l for l in run.stderr.splitlines() if 'error' in l.lower() and 'lmjax' in l]
    assert run.returncode == 2 and ours == [line], run.stderr[-2000:]
    assert 'Traceback' not in run.stderr


def _error_lines(stderr: str) -> list[str]:
  """stderr without the progress bars (tqdm's carriage-return lines), blank lines and the line that
  says data preparation has started."""
  return [l for l in stderr.splitlines()
          if l.strip() and '\r' not in l and ' docs [' not in l and not l.startswith('preparing the data')]


def _own_data_config(tmp_path, name, corpora):
  """A user's config file `name`.py: the tiny model on their own source `corpora`."""
  path = tmp_path / f'{name}.py'
  path.write_text('from lmjax import config as config_lib\n\n\ndef get_config(arg=None):\n'
                  f'  c = config_lib.load({os.path.join(ROOT, "configs", "tiny.py")!r})\n'
                  f'  c.data.sources = {{"mine": dict(corpora={corpora!r}, max_chars=0)}}\n'
                  '  return c\n')
  return path


def _shim(tmp_path, code):
  """An environment whose Python runs `code` first (a sitecustomize module on PYTHONPATH)."""
  shim = tmp_path / 'shim'
  shim.mkdir()
  (shim / 'sitecustomize.py').write_text(code)
  return dict(ENV, PYTHONPATH=os.pathsep.join([str(shim), ROOT]))


def test_data_and_disk_mistakes_are_one_line_naming_the_culprit(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / 'empty.jsonl').write_text('')
  pq.write_table(pa.table({'content': ['some words here ' * 20] * 50}), tmp_path / 'docs.parquet')
  (tmp_path / 'a_file').write_text('not a directory')
  empty, parquet = f'jsonl:{tmp_path}/empty.jsonl', f'parquet:{tmp_path}/docs.parquet'
  no_pyarrow = _shim(tmp_path, "import sys\nsys.modules['pyarrow'] = None  # as if not installed\n")
  cases = [  # (config, workdir, environment, the one line)
      (_own_data_config(tmp_path, 'empty', empty), tmp_path / 'run1', ENV,
       f"lmjax.train: error: config.data.sources.mine.corpora={empty!r}: the source is empty (its files "
       "hold no document)"),
      (_own_data_config(tmp_path, 'column', parquet), tmp_path / 'run2', ENV,
       f"lmjax.train: error: config.data.sources.mine.corpora={parquet!r}: no record has the field 'text'; "
       f"{tmp_path}/docs.parquet has ['content'] (name the text field with #FIELD)"),
      (_own_data_config(tmp_path, 'column', parquet), tmp_path / 'run3', no_pyarrow,
       "lmjax.train: error: a parquet: source needs pyarrow, which is not installed: "
       "pip install -e '.[parquet]'"),
      (os.path.join(ROOT, 'configs', 'tiny.py'), tmp_path / 'a_file', ENV,
       f'lmjax.train: error: --workdir={tmp_path}/a_file is a file; expected a run directory or a new path'),
  ]
  for config, workdir, env, line in cases:
    run = subprocess.run([sys.executable, '-m', 'lmjax.train', f'--config={config}', f'--workdir={workdir}'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and _error_lines(run.stderr) == [line], run.stderr[-3000:]


def test_a_read_only_workdir_is_one_line(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  _mount_tmpfs(disk, '4m')
  try:
    subprocess.run(['mount', '-o', 'remount,ro', str(disk)], check=True)
    run = subprocess.run([sys.executable, '-m', 'lmjax.train', '--config=configs/tiny.py',
                          f'--workdir={disk}/run'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)
  assert run.returncode == 2, run.stderr[-3000:]
  assert _error_lines(run.stderr) == [f'lmjax.train: error: {disk}/run: Read-only file system']


@pytest.mark.parametrize('defect,shown', [('{}["no such key"]', "KeyError: 'no such key'"),
                                          ('open("/no/such/file")', 'FileNotFoundError: [Errno 2] No such '
                                                                   "file or directory: '/no/such/file'")])
def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(tmp_path, defect, shown):
  """A defect (here a KeyError, or an OSError that is not the disk's, injected inside the trainer) is
  not a user's mistake: the traceback is printed, then one line saying it is a bug; exit code 1."""
  env = _shim(tmp_path, 'import lmjax.trainer\n'
                        'def setup(*args, **kwargs):\n'
                        f'  return {defect}\n'
                        'lmjax.trainer.setup = setup\n')
  run = subprocess.run([sys.executable, '-m', 'lmjax.train', '--config=configs/tiny.py',
                        f'--workdir={tmp_path}/run'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  lines = _error_lines(run.stderr)
  assert lines[0] == 'Traceback (most recent call last):' and shown in lines
  assert lines[-1] == ('lmjax.train: error: the error above is a bug in lmjax, not a mistake in your '
                       'command: please report it with this traceback and the command line')


def test_libtpus_start_up_noise_is_filtered_off_a_tpu_host(tmp_path):
  """With libtpu installed and no TPU chips, JAX's backends start with ~5 lines of libtpu's warnings
  (host bounds, worker hostnames): the entry points drop them, so an error's lines come first."""
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): there is no noise to filter")
  env = _shim(tmp_path, 'import lmjax.trainer\n'
                        'def setup(*args, **kwargs):\n'
                        '  raise KeyError("after the backends started")\n'
                        'lmjax.trainer.setup = setup\n')
  env.pop('JAX_PLATFORMS')  # as a user runs it: JAX tries the TPU backend first
  run = subprocess.run([sys.executable, '-m', 'lmjax.train', '--config=configs/tiny.py',
                        f'--workdir={tmp_path}/run'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 1 and 'TPU_' not in run.stderr and 'InitGoogle' not in run.stderr, run.stderr
  assert _error_lines(run.stderr)[0] == 'Traceback (most recent call last):'


def test_startup_summary(cache, tmp_path):
  """What the run will do, before it starts: sizes, the phases, each source's share of its data."""
  from lmjax import model
  run = trainer.setup(tiny(cache, steps=4), str(tmp_path / 'run'))
  run.checkpointer.close()
  s = trainer.summary(run)
  assert s['parameters'] == model.param_count(run.steps.args) and s['tokens_per_step'] == 8 * 32
  assert [(p['name'], p['first_step'], p['last_step']) for p in s['phases']] == [('main', 1, 4)]
  rows_per_epoch = s['sources']['code']['rows_per_epoch']
  assert s['sources']['code']['epochs'] == pytest.approx(4 * 8 / rows_per_epoch)
  text = trainer.format_summary(s)
  assert 'phase main: steps 1-4, LR cosine 0->1->0.1 of peak' in text and 'source code:' in text
