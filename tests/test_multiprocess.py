"""Two JAX processes (launch/local.py, 4 fake CPU devices each, one mesh over both) train exactly
like one process with 8 devices: each process feeds only its slice of every batch. Each mesh of the
multi-device issue (data-parallel, fsdp, fsdp x tensor, all three) is laid across the two processes
and compared with the same one-process run (sharded == one device is tests/test_train_step.py's)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ['-m', 'lmjax.train', '--config=configs/tiny.py:steps=4', '--config.train.log_every=1',
         '--config.train.batch_size=8', '--config.train.seq_len=64', '--config.model.d_ff=256']
MESHES = {'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'fsdp_x_tensor': (1, 4, 2), 'data_fsdp_tensor': (2, 2, 2)}


def mesh_flags(data, fsdp, tensor):
  return [f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}', f'--config.mesh.tensor={tensor}']


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  """Losses of the 8-device run in one process (2x2x2 mesh)."""
  workdir = tmp_path_factory.mktemp('one')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  subprocess.run([sys.executable, *TRAIN, *mesh_flags(2, 2, 2), f'--workdir={workdir}'], cwd=ROOT,
                 env=env, check=True, capture_output=True, timeout=600)
  return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES, ids=list(MESHES))
def test_two_processes_equal_one_process(one_process, mesh, tmp_path):
  run = subprocess.run([sys.executable, 'launch/local.py', '--processes=2', '--devices_per_process=4',
                        f'--log_dir={tmp_path / "logs"}', '--', sys.executable, *TRAIN,
                        *mesh_flags(*MESHES[mesh]), f'--workdir={tmp_path / "two"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert len(one_process) == 4
  assert losses(tmp_path / 'two') == pytest.approx(one_process, rel=1e-5)
