"""launch/: the Cloud TPU launcher against a fake gcloud that records every call and plays a scenario
(capacity that comes late, a failed install, a preemption, a dead worker, no quota); the sweep pool
and its queue file; the SLURM backend against a fake srun; --dry-run goldens; and a two-process
training run on CPU whose killed (kill -9) process is relaunched and ends with an uninterrupted run's
losses.

The goldens (tests/golden/launch/*.txt) are the exact --dry-run output; after an intended change,
regenerate them and review the diff:
  LMJAX_REGEN_GOLDEN=1 python -m pytest tests/test_launch_tpu.py -k golden
"""
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `launch` is a package at the repository root, not an installed one
from launch import pool, tpu_slice, workers  # pylint: disable=wrong-import-position

FAKES = os.path.join(ROOT, 'tests', 'fake_cloud')
GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'launch')
SLICE = ['lmjax-1b', '--zone=us-east5-a', '--accelerator=v5p-32', '--spot']
TRAIN = ['python', '-m', 'lmjax.train', '--config=configs/pretrain.py:size=1b',
         '--workdir=gs://bucket/lmjax/1b']


def flag(argv, name):
  return next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')), '')


def step(argv):
  """A recorded gcloud call in short: create, describe, delete, scp, install, stop, run <worker>..."""
  if argv[:3] == ['compute', 'tpus', 'queued-resources']:
    return argv[3]
  if argv[0] == 'storage':
    return ' '.join(argv[:2])
  if argv[3] in ('describe', 'scp'):
    return {'describe': 'vm describe', 'scp': 'scp'}[argv[3]]
  command = flag(argv, 'command')
  if 'pip install' in command:
    return 'install'
  return f'run {flag(argv, "worker")}' if 'exec ' in command else 'stop'


class Cloud:
  """The fake gcloud and srun (tests/fake_cloud/) on PATH, the scenario they play, their calls."""

  def __init__(self, tmp_path):
    self.dir, self.bin, self.log_dir = tmp_path / 'gcloud', tmp_path / 'bin', tmp_path / 'logs'
    self.dir.mkdir()
    self.bin.mkdir()
    for tool in ('gcloud', 'srun'):
      path = self.bin / tool
      path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {FAKES}/{tool}.py "$@"\n')
      path.chmod(0o755)

  def play(self, **scenario):
    (self.dir / 'scenario.json').write_text(json.dumps(scenario))

  def calls(self):
    path = self.dir / 'calls.jsonl'
    return [json.loads(line) for line in open(path)] if path.exists() else []

  def steps(self):
    return [step(c) for c in self.calls()]

  def runs(self):
    """The command of every run call, in call order."""
    return [flag(c, 'command').split('exec ')[-1] for c in self.calls() if step(c).startswith('run')]

  def launch(self, verb, *args, command=(), timeout=60):
    """python -m launch.tpu VERB ARGS -- COMMAND, with fast polls and logs under tmp_path."""
    extra = [f'--log_dir={self.log_dir}', '--poll=0.01']
    if verb in ('run', 'sweep'):
      extra.append('--grace=0.5')
    argv = [sys.executable, '-m', 'launch.tpu', verb, *args, *extra]
    if command:
      argv += ['--', *command]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cloud(tmp_path, monkeypatch):
  c = Cloud(tmp_path)
  monkeypatch.setenv('PATH', f'{c.bin}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_GCLOUD_DIR', str(c.dir))
  return c


# ------------------------------------------------------------------------------ flags

@pytest.mark.parametrize('value, name, workers', [
    ('v4-8', 'v4-8', 1), ('v5p-32', 'v5p-32', 4), ('v5e-8', 'v5litepod-8', 1),
    ('v5litepod-16', 'v5litepod-16', 4), ('v6e-64', 'v6e-64', 16), ('v3-32', 'v3-32', 4)])
def test_accelerator_types_and_their_workers(value, name, workers):
  assert tpu_slice.accelerator_type(value) == name
  assert tpu_slice.workers_of(name) == workers


@pytest.mark.parametrize('args, message', [
    (['lmjax-1b', '--zone=us-east5-a', '--accelerator=v5p-30'],
     '--accelerator=v5p-30: v5p sizes count cores; expected a multiple of 8 from 8 to 12288'),
    (['lmjax-1b', '--zone=us-east5-a', '--accelerator=v7-8'], '--accelerator=v7-8: expected FAMILY-SIZE'),
    (['lmjax-1b', '--zone=us-east5-a', '--accelerator=v6e-12'],
     "--accelerator=v6e-12: v6e sizes count chips; expected (1, 4, 8, 16"),
    (['lmjax-1b', '--zone=us-east5-a'], "--accelerator=: expected FAMILY-SIZE"),
    (['lmjax-1b', '--zone=useast5a', '--accelerator=v5p-8'], "--zone='useast5a': expected a zone"),
    (['lmjax-1b', '--accelerator=v5p-8'], "--zone='': expected a zone"),
    (['Lmjax', '--zone=us-east5-a', '--accelerator=v5p-8'], "NAME='Lmjax': expected a TPU name"),
    (['1b', '--zone=us-east5-a', '--accelerator=v5p-8'], "NAME='1b': expected a TPU name"),
    (['run-', '--zone=us-east5-a', '--accelerator=v5p-8'], "NAME='run-': expected a TPU name"),
    (['a' * 64, '--zone=us-east5-a', '--accelerator=v5p-8'], 'expected a TPU name: 1-63'),
])
def test_bad_flags_are_one_line_errors_before_any_gcloud_call(cloud, args, message):
  r = cloud.launch('run', *args, command=TRAIN)
  assert r.returncode == 1
  assert r.stderr.startswith('launch.tpu: error: ') and message in r.stderr, r.stderr
  assert cloud.calls() == []


def test_a_workdir_that_the_workers_do_not_share_is_an_error(cloud):
  r = cloud.launch('run', *SLICE, command=TRAIN[:-1] + ['--workdir=/tmp/1b'])
  assert r.returncode == 1 and '--workdir=/tmp/1b: every worker and every restart' in r.stderr
  assert cloud.calls() == []


# ------------------------------------------------------------------------------ run on a slice

def test_run_waits_for_capacity_then_starts_every_worker(cloud):
  cloud.play(states=['WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  r = cloud.launch('run', *SLICE, command=TRAIN)
  assert r.returncode == 0, r.stderr
  steps = cloud.steps()
  assert steps[:7] == ['describe', 'create', 'describe', 'describe', 'describe', 'scp', 'install']
  assert sorted(steps[7:]) == ['run 0', 'run 1', 'run 2', 'run 3']
  create = cloud.calls()[1]
  assert create[4:] == ['lmjax-1b', '--zone=us-east5-a', '--node-id=lmjax-1b',
                        '--accelerator-type=v5p-32', '--runtime-version=v2-alpha-tpuv5', '--spot']
  run = flag(cloud.calls()[-1], 'command')
  assert 'LMJAX_DISTRIBUTED=auto' in run and run.endswith('exec ' + shlex.join(TRAIN))
  assert 'waiting for capacity' in r.stderr
  # worker 0 streams here; every worker keeps its log
  assert 'fake run on worker 0' in r.stdout and 'worker 1' not in r.stdout
  for i in range(4):
    assert f'fake run on worker {i}' in (cloud.log_dir / 'lmjax-1b' / f'worker-{i}.log').read_text()
  logs = cloud.launch('logs', 'lmjax-1b', '--worker=3')
  assert 'fake run on worker 3' in logs.stdout


def test_preempted_slice_is_recreated_and_the_command_rerun(cloud):
  cloud.play(preempt={'lmjax-1b': 1})
  r = cloud.launch('run', *SLICE, command=TRAIN)
  assert r.returncode == 0, r.stderr
  steps = cloud.steps()
  creates = [i for i, s in enumerate(steps) if s == 'create']
  assert len(creates) == 2 and steps.count('delete') == 1
  assert creates[0] < steps.index('delete') < creates[1]
  assert steps.count('install') == 2
  runs = [i for i, s in enumerate(steps) if s.startswith('run')]
  assert sum(i > creates[1] for i in runs) == 4  # (a preempted attempt's other workers are stopped)
  assert any(i < creates[1] for i in runs)
  assert len(set(cloud.runs())) == 1  # the same command both times: it resumes from its checkpoint
  assert 'queued resource is SUSPENDED (preempted); restart 1/3' in r.stderr


def test_preemptions_beyond_the_restart_limit_end_the_run(cloud):
  cloud.play(preempt={'lmjax-1b': 10})
  r = cloud.launch('run', *SLICE, '--max_restarts=2', command=TRAIN)
  assert r.returncode == 1
  assert cloud.steps().count('create') == 3 and len(cloud.runs()) >= 3
  assert r.stderr.count('restart ') == 2
  assert 'no restarts left (--max_restarts=2)' in r.stderr.splitlines()[-1]


def test_failed_install_is_retried_on_the_same_slice(cloud):
  cloud.play(install_failures=1)
  r = cloud.launch('run', *SLICE, command=TRAIN)
  assert r.returncode == 0, r.stderr
  steps = cloud.steps()
  assert steps.count('create') == 1 and 'delete' not in steps
  assert steps.count('scp') == steps.count('install') == 2
  assert len(cloud.runs()) == 4
  assert 'installing failed (gcloud exit 1: worker 1: ERROR: Could not find' in r.stderr
  assert 'Could not find' in (cloud.log_dir / 'lmjax-1b' / 'setup.log').read_text()


def test_install_that_keeps_failing_never_starts_the_command(cloud):
  cloud.play(install_failures=10)
  r = cloud.launch('run', *SLICE, '--max_restarts=1', command=TRAIN)
  assert r.returncode == 1 and 'installing failed' in r.stderr.splitlines()[-1]
  assert cloud.runs() == [] and cloud.steps().count('install') == 2


def test_dead_worker_stops_the_others_and_reruns_on_the_same_slice(cloud):
  cloud.play(worker_dies=1)  # worker 1 exits 137, the others hang for 30 s unless stopped
  start = time.monotonic()
  r = cloud.launch('run', *SLICE, command=TRAIN)
  assert r.returncode == 0, r.stderr
  assert time.monotonic() - start < 15
  steps = cloud.steps()
  assert steps.count('create') == 1 and 'delete' not in steps and steps.count('install') == 1
  assert steps.count('stop') == 1  # leftovers of the first attempt, before the rerun
  assert steps.index('stop') > steps.index('vm describe')
  runs = [i for i, s in enumerate(steps) if s.startswith('run')]
  assert sum(i > steps.index('stop') for i in runs) == 4
  assert 'worker 1 exited with code 137; restart 1/3' in r.stderr


def test_quota_error_is_clear_and_not_retried(cloud):
  cloud.play(quota=True)
  r = cloud.launch('run', *SLICE, command=TRAIN)
  assert r.returncode == 1
  assert cloud.steps() == ['describe', 'create']
  error = r.stderr.splitlines()[-1]
  assert error.startswith('launch.tpu: error: lmjax-1b: creating a spot v5p-32 in us-east5-a '
                          'failed for lack of quota (ERROR: (gcloud.compute.tpus.queued-resources.'
                          'create) RESOURCE_EXHAUSTED'), error


def test_existing_slice_of_another_type_is_an_error(cloud):
  assert cloud.launch('create', 'lmjax-1b', '--zone=us-east5-a', '--accelerator=v5p-64').returncode == 0
  r = cloud.launch('run', *SLICE, command=TRAIN)
  assert r.returncode == 1 and 'the slice exists as v5p-64, not v5p-32' in r.stderr
  assert cloud.runs() == []


def test_status_stop_and_delete(cloud):
  assert cloud.launch('create', *SLICE).returncode == 0
  status = cloud.launch('status', 'lmjax-1b', '--zone=us-east5-a')
  assert 'lmjax-1b (us-east5-a): queued resource ACTIVE, TPU VM READY, v5p-32' in status.stdout
  assert cloud.launch('stop', 'lmjax-1b', '--zone=us-east5-a').returncode == 0
  assert cloud.steps()[-1] == 'stop' and flag(cloud.calls()[-1], 'worker') == 'all'
  assert cloud.launch('delete', 'lmjax-1b', '--zone=us-east5-a').returncode == 0
  assert cloud.calls()[-1][3:] == ['delete', 'lmjax-1b', '--zone=us-east5-a', '--force', '--quiet']
  status = cloud.launch('status', 'lmjax-1b', '--zone=us-east5-a')
  assert 'queued resource NOT_FOUND' in status.stdout


# ------------------------------------------------------------------------------ sweeps on a pool

JOBS = [dict(name=name, after=after, command=f'python -m lmjax.train --config=configs/x.py:run={name} '
             f'--workdir=gs://bucket/sweep/runs/{name}')
        for name, after in [('a-pre', []), ('b-pre', []), ('a-1', ['a-pre']), ('a-2', ['a-pre']),
                            ('b-1', ['b-pre'])]]


def make_pool(cloud, slices=2):
  gcloud = tpu_slice.Gcloud()
  return [tpu_slice.Slice(f'pool-{i}', 'us-west4-a', 'v5litepod-8', '', 'spot', gcloud,
                    str(cloud.log_dir / f'pool-{i}'), str(cloud.log_dir / 'lmjax.tar.gz'), poll=0.01,
                    echo=False) for i in range(slices)], gcloud


def run_names(cloud):
  return [c.split(':run=')[1].split()[0] for c in cloud.runs()]


def test_pool_runs_every_job_after_its_dependencies_and_retries_failures(cloud):
  cloud.play(fail_runs={':run=a-1 ': 1}, preempt={'pool-1': 1})
  slices, gcloud = make_pool(cloud)
  queue = pool.Queue('gs://bucket/sweep/launch_queue.json', JOBS, gcloud)
  pool.run(slices, queue, str(cloud.log_dir / 'runs'), max_restarts=2, poll=0.01, grace=0.5)
  names = run_names(cloud)
  assert sorted(names) == sorted(['a-pre', 'b-pre', 'b-pre', 'a-1', 'a-1', 'a-2', 'b-1'])
  last = {n: max(i for i, m in enumerate(names) if m == n) for n in names}
  first = {n: names.index(n) for n in names}
  assert first['a-1'] > last['a-pre'] and first['a-2'] > last['a-pre'] and first['b-1'] > last['b-pre']
  assert [c[4] for c in cloud.calls() if step(c) == 'create'].count('pool-1') == 2  # recreated
  saved = json.loads((cloud.dir / 'gcs' / 'bucket' / 'sweep' / 'launch_queue.json').read_text())
  assert [(j['name'], j['state']) for j in saved['runs']] == [(j['name'], 'done') for j in JOBS]
  assert {j['name']: j['attempts'] for j in saved['runs']}['a-1'] == 1
  assert 'fake run on worker 0' in (cloud.log_dir / 'runs' / 'a-2' / 'worker-0.log').read_text()


def test_pool_queue_file_resumes_a_stopped_sweep(cloud, tmp_path):
  cloud.play(fail_runs={':run=a-2 ': 5})
  path = str(tmp_path / 'sweep' / 'launch_queue.json')
  slices, gcloud = make_pool(cloud)
  with pytest.raises(workers.Error, match=r"1 of 5 runs did not finish \(failed: \['a-2'\]"):
    pool.run(slices, pool.Queue(path, JOBS, gcloud), str(cloud.log_dir / 'runs'), max_restarts=1,
             poll=0.01, grace=0.5)
  saved = {j['name']: j['state'] for j in json.load(open(path))['runs']}
  assert saved == {'a-pre': 'done', 'b-pre': 'done', 'a-1': 'done', 'a-2': 'failed', 'b-1': 'done'}
  assert os.listdir(tmp_path / 'sweep') == ['launch_queue.json']  # written by tmp + rename
  cloud.play()
  before = len(cloud.runs())
  slices, gcloud = make_pool(cloud)
  pool.run(slices, pool.Queue(path, JOBS, gcloud), str(cloud.log_dir / 'runs'), max_restarts=1,
           poll=0.01, grace=0.5)
  assert run_names(cloud)[before:] == ['a-2']  # done runs are skipped
  assert {j['state'] for j in json.load(open(path))['runs']} == {'done'}


def test_pool_with_no_quota_stops_with_the_reason(cloud):
  cloud.play(quota=True)
  slices, gcloud = make_pool(cloud)
  with pytest.raises(workers.Error, match='no slice of the pool can take runs .*lack of quota'):
    pool.run(slices, pool.Queue(str(cloud.dir / 'q.json'), JOBS, gcloud),
             str(cloud.log_dir / 'runs'), max_restarts=1, poll=0.01, grace=0.5)
  assert cloud.runs() == []


# ------------------------------------------------------------------------------ SLURM, goldens

def test_slurm_backend_splits_the_tasks_logs_and_restarts(cloud):
  show = 'import os; print("task", os.environ["SLURM_PROCID"], os.environ["LMJAX_DISTRIBUTED"])'
  r = cloud.launch('run', '--backend=slurm', '--tasks_per_node=2', command=['python', '-c', show])
  assert r.returncode == 0, r.stderr
  assert 'task 0 auto' in r.stdout and 'task 1' not in r.stdout
  assert 'task 1 auto' in (cloud.log_dir / 'slurm' / 'worker-1.log').read_text()
  fail = 'import os, sys; sys.exit(int(os.environ["SLURM_PROCID"]))'
  r = cloud.launch('run', '--backend=slurm', '--tasks_per_node=2', '--max_restarts=1',
                   command=['python', '-c', fail])
  assert r.returncode == 1 and 'srun exited with code 1; restart 1/1' in r.stderr
  dry = cloud.launch('run', '--backend=slurm', '--tasks_per_node=8', '--dry-run', command=TRAIN)
  assert dry.stdout == ('LMJAX_DISTRIBUTED=auto srun --ntasks-per-node=8 --kill-on-bad-exit=1 '
                        f'--label {shlex.join(TRAIN)}\n')


def check_golden(name, stdout):
  path = os.path.join(GOLDEN, name)
  if os.environ.get('LMJAX_REGEN_GOLDEN'):
    os.makedirs(GOLDEN, exist_ok=True)
    with open(path, 'w') as f:
      f.write(stdout)
  with open(path) as f:
    assert stdout == f.read(), f'--dry-run output differs from {path} (see the module docstring)'


def dry_run(*args):
  r = subprocess.run([sys.executable, '-m', 'launch.tpu', *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_golden_dry_run_of_a_1b_run_on_v5p_32(cloud):
  out = dry_run('run', *SLICE, '--dry-run', '--', 'python', '-m', 'lmjax.train',
                '--config=configs/pretrain.py:size=1b', '--workdir=gs://my-bucket/lmjax/1b')
  check_golden('run_1b_v5p-32.txt', out)
  assert cloud.calls() == []  # a dry run runs nothing


def test_golden_dry_run_of_a_sweep_on_a_v5e_8_pool(cloud):
  out = dry_run('sweep', 'dcpt', '--slices=4', '--zone=us-west4-a', '--accelerator=v5e-8', '--spot',
                '--config=configs/dcpt_sweep.py:runlocal=False',
                '--workdir=gs://my-bucket/lmjax/dcpt', '--dry-run')
  check_golden('sweep_dcpt_v5e-8.txt', out)
  assert cloud.calls() == []


# ------------------------------------------------------------------------------ end to end on CPU

def losses_by_step(workdir):
  """The last logged train loss of each step (a resumed run logs the replayed steps again)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def pid_of_worker(worker, workdir):
  """The pid of the training process with LMJAX_PROCESS_ID=worker that writes to workdir."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmdline = f.read()
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environ = f.read().split(b'\0')
    except OSError:
      continue
    if f'--workdir={workdir}'.encode() in cmdline and f'LMJAX_PROCESS_ID={worker}'.encode() in environ:
      return int(pid)
  return None


@pytest.mark.slow
def test_local_run_relaunches_a_killed_process_and_ends_with_the_same_losses(tmp_path):
  """Two processes train configs/tiny.py through `run --backend=local`; in one of two runs, process 1
  is killed with SIGKILL mid-run: the launcher stops process 0, relaunches both, they resume from
  the last checkpoint, and every step's loss equals the uninterrupted run's."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')

  def launch(name):
    return subprocess.Popen(
        [sys.executable, '-m', 'launch.tpu', 'run', name, '--backend=local', '--processes=2',
         '--max_restarts=1', '--poll=0.1', '--grace=5', f'--log_dir={tmp_path / "logs"}', '--',
         sys.executable, '-m', 'lmjax.train', '--config=configs/tiny.py:steps=16',
         f'--workdir={tmp_path / name}', '--config.train.checkpoint_every=2',
         '--config.train.log_every=1'],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  straight = launch('straight')
  _, err = straight.communicate(timeout=300)
  assert straight.returncode == 0, err[-3000:]
  killed = launch('killed')
  deadline = time.monotonic() + 240
  while max(losses_by_step(tmp_path / 'killed'), default=0) < 5:
    assert killed.poll() is None and time.monotonic() < deadline, 'the run ended before the kill'
    time.sleep(0.05)
  pid = pid_of_worker(1, tmp_path / 'killed')
  assert pid, 'no process 1'
  os.kill(pid, 9)
  _, err = killed.communicate(timeout=300)
  assert killed.returncode == 0, err[-3000:]
  assert 'worker 1 exited with code -9' in err and 'restart 1/1' in err, err[-3000:]
  assert 'resuming from step' in (tmp_path / 'logs' / 'killed' / 'worker-0.log').read_text()
  expected = losses_by_step(tmp_path / 'straight')
  assert sorted(expected) == list(range(1, 17))
  assert losses_by_step(tmp_path / 'killed') == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize('visible,processes,devices,expected', [
    ('', 2, 4, ['0,1,2,3', '4,5,6,7']), ('', 8, 1, [str(i) for i in range(8)]), ('3,5', 2, 1, ['3', '5'])])
def test_local_processes_each_see_their_own_gpus(monkeypatch, capsys, tmp_path, visible, processes, devices,
                                                 expected):
  """One process per GPU (or per group of GPUs) on a GPU machine: process i sees its slice of
  CUDA_VISIBLE_DEVICES (all GPUs when unset), printed by the dry run with the rest of its env."""
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', visible)
  workers.Local(processes, devices, str(tmp_path), dry_run=True).start(['python', '-m', 'lmjax.train'], 'h')
  lines = [l for l in capsys.readouterr().out.splitlines() if 'lmjax.train' in l]
  assert [l.split('CUDA_VISIBLE_DEVICES=')[1].split()[0] for l in lines] == expected
  assert [f'LMJAX_PROCESS_ID={i}' in l for i, l in enumerate(lines)] == [True] * processes


def test_local_processes_wanting_more_gpus_than_visible_is_an_error(monkeypatch, tmp_path):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1')
  with pytest.raises(workers.Error, match=r"--processes=2 x --devices_per_process=2 GPUs, but "
                                          r"CUDA_VISIBLE_DEVICES='0,1' names 2"):
    workers.Local(2, 2, str(tmp_path), dry_run=True).start(['python'], 'h')
