"""Test setup: 8 fake CPU devices so sharding tests can build real meshes, on the CPU platform (both
must precede `import jax`)."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# CPU unless told otherwise (run tests/gpu with JAX_PLATFORMS=cuda): with libtpu installed for the
# compile-only TPU tests, JAX would otherwise try to open a TPU first in every process.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One clean store per (corpora, cleaning config) for the whole session, subprocesses and notebook
# kernels included (lmjax/data/prepare.py `_clean_store`): the tiny demo's corpora are cleaned once,
# not once per test that trains on them. tests/test_data_beam.py unsets it to clean with both runners.
if 'LMJAX_CLEAN_CACHE' not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ['LMJAX_CLEAN_CACHE'] = tempfile.mkdtemp(prefix='lmjax-test-clean-')
  atexit.register(shutil.rmtree, os.environ['LMJAX_CLEAN_CACHE'], ignore_errors=True)
