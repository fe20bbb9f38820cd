"""Two JAX processes (launch/local.py, 4 fake CPU devices each, one 2x2x2 mesh over both) train
exactly like one process with 8 devices: each process feeds only its slice of every batch."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ['-m', 'lmjax.train', '--config=configs/tiny.py:steps=4', '--config.mesh.data=2',
         '--config.mesh.fsdp=2', '--config.mesh.tensor=2', '--config.train.log_every=1',
         '--config.train.batch_size=8', '--config.train.seq_len=64', '--config.model.d_ff=256']


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  subprocess.run([sys.executable, *TRAIN, f'--workdir={tmp_path / "one"}'], cwd=ROOT, env=env,
                 check=True, capture_output=True, timeout=600)
  run = subprocess.run([sys.executable, 'launch/local.py', '--processes=2', '--devices_per_process=4',
                        f'--log_dir={tmp_path / "logs"}', '--', sys.executable, *TRAIN,
                        f'--workdir={tmp_path / "two"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert len(one) == 4
  assert two == pytest.approx(one, rel=1e-5)
