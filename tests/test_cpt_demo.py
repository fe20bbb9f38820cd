"""The continued-pretraining recipe (configs/cpt_domain.py): its mixture shares and phases, and its
acceptance, the CPU demo (scripts/cpt_demo.py): the tiny_mix model pretrained on the real corpora,
then continued on legal text with 0% and 20% general replay. In both runs the legal loss falls and
the general sources' mean loss rises over the starting model; it rises less with replay. Checked in
loss and in bits per byte, at the last step."""
import os

import numpy as np
import pytest

from lmjax import config as config_lib, optim, phases, sharding, steps as steps_lib
from lmjax.eval import forgetting, records as records_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPT_STEPS = 30  # scripts/cpt_demo.py's default, as 100 pretraining steps


@pytest.mark.slow
def test_domain_loss_falls_general_loss_rises_and_replay_forgets_less(cpt_demo):
  workdir, stdout = cpt_demo  # scripts/cpt_demo.py with its defaults (tests/conftest.py)
  runs = {'r0': str(workdir / 'replay0'), 'r20': str(workdir / 'replay0.2')}
  for metric in ('loss', 'bpb'):
    rows = forgetting.forgetting(runs, 'legal', metric=metric)
    final = {r['run']: r for r in rows if r['step'] == CPT_STEPS}
    assert sorted(final) == ['r0', 'r20'], rows
    for r in final.values():
      assert r['domain_gain'] > 0.05, r
      assert r['general_change'] > 0, r
    assert final['r20']['general_change'] < 0.5 * final['r0']['general_change'], final
  records = records_lib.eval_records(runs['r20'])
  for step in (0, CPT_STEPS):
    assert 0 <= records[step]['task/legal_cloze/acc'] <= 1
  assert 'legal_cloze acc' in stdout and (workdir / 'forgetting.png').is_file()


def test_recipe_mixture_shares_and_phases():
  for replay in (0.0, 0.2):
    config = config_lib.load(os.path.join(ROOT, 'configs', 'cpt_domain.py'), f'replay={replay},steps=100')
    (p,) = phases.resolve(config.phases, config.train.steps, list(config.data.sources))
    assert p.weights['legal'] == pytest.approx(1 - replay)
    general = {s: w for s, w in p.weights.items() if s != 'legal'}
    assert sum(general.values()) == pytest.approx(replay)
    if replay:  # in tiny_mix's pretraining proportions
      assert general['zh'] / general['math'] == pytest.approx(3.0)
    assert (p.lr['shape'], p.lr['init'], p.lr['peak'], p.lr['end']) == ('cosine', 0.0, 0.3, 0.0)
  with pytest.raises(ValueError, match=r'config knob replay=1\.0'):
    config_lib.load(os.path.join(ROOT, 'configs', 'cpt_domain.py'), 'replay=1.0')


def test_recipe_embed_steps_freeze_the_layers_first():
  config = config_lib.load(os.path.join(ROOT, 'configs', 'cpt_domain.py'), 'steps=100,embed_steps=20')
  embed, cpt = phases.resolve(config.phases, config.train.steps, list(config.data.sources))
  assert (embed.steps, embed.freeze, cpt.start, cpt.steps, cpt.freeze) == (20, ('layers/.*',), 20, 80, ())
  schedule = optim.make_schedule([embed, cpt], config.optim.lr)
  peak = 0.3 * config.optim.lr
  np.testing.assert_allclose([schedule(0), schedule(19), schedule(20), schedule(100)],
                             [0.0, peak, peak, 0.0], atol=1e-9)
  steps_lib.build(config, sharding.make_mesh(config.mesh), 4096)  # the freeze patterns match
