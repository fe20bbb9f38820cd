"""The distillation demo (scripts/distill_demo.py) end to end in its quick setting, on the real corpora:
the teacher trained, its top-k dumped over the student's rows, the student trained with and without KD,
the teacher's text mixed in as a source, the report. At 20 student steps KD's margin is noise, so this
checks what must hold at any scale (the full setting's numbers are in docs/distillation.md):
the store's rows are the KD student's rows (the teacher's top-k holds the student's next tokens far
more often there than at other rows), both students saw the same tokens, the teacher is better than
the students, and the report and curves cover every source."""
import json
import os
import sys

import numpy as np
import pytest

from lmjax import config as config_lib, trainer
from lmjax.distill import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import distill_demo  # noqa: E402  pylint: disable=wrong-import-position

SOURCES = ['code', 'en', 'legal', 'math', 'zh']


def _target_hits(store, pipeline, steps, shift: int) -> float:
  """Fraction of the student's targets (batch `step`) inside the store's top-k of batch step + shift."""
  batch_rows, hits = store.meta['stream']['batch_size'], []
  for step in range(steps):
    batch = pipeline.batch(step)
    ids = store.read(((step + shift) % steps) * batch_rows, batch_rows)['teacher_ids']
    hit_bt = (ids == batch['targets'][..., None]).any(-1)
    hits.append(hit_bt[batch['weights'] > 0])
  return float(np.concatenate(hits).mean())


@pytest.mark.slow
def test_quick_demo_dumps_the_students_rows_and_trains_both_on_equal_tokens(distill_demo_quick):
  workdir, _ = distill_demo_quick  # scripts/distill_demo.py --quick (tests/conftest.py)
  quick = distill_demo.SETTINGS['quick']
  steps = quick['steps']
  report = json.loads((workdir / 'report.json').read_text())
  assert sorted(report['sources']) == SOURCES
  assert (workdir / 'eval_loss.png').stat().st_size > 10_000
  # Equal tokens: every student ran `steps` steps of batch x seq_len tokens.
  config = config_lib.load(distill_demo.CONFIG, f"kd=false,steps={steps},max_chars={quick['max_chars']}")
  tokens = steps * config.train.batch_size * config.train.seq_len
  assert report['tokens'] == {'ce_s0': tokens, 'kd_s0': tokens, 'seq_s0': tokens}
  # The teacher (longer and bigger) beats every student on every source.
  for src, r in report['sources'].items():
    assert r['teacher'] < min(r['ce'], r['kd'], r['seq']) - 0.1, (src, r)
  # The store holds the KD student's rows: its top-k covers that run's targets at the same rows
  # far more often than at the rows of other batches.
  kd_dir = workdir / 'kd_s0'
  kd_config = config_lib.load(distill_demo.CONFIG, ','.join(
      f'{k}={v}' for k, v in dict(teacher=workdir / 'teacher', store=kd_dir / 'topk', steps=steps,
                                  max_chars=quick['max_chars']).items()))
  kd_config.data.cache_dir = str(workdir / 'data')
  store = store_lib.Store.open(str(kd_dir / 'topk'))
  pipeline = trainer.build_pipeline(kd_config, str(kd_dir), whole_batches=True)
  store_lib.check_stream(store, pipeline)
  assert store.rows == steps * config.train.batch_size and store.missing() == []
  aligned, shifted = _target_hits(store, pipeline, steps, 0), _target_hits(store, pipeline, steps, 1)
  assert aligned > 1.5 * shifted, (aligned, shifted)  # quick run: about 0.43 against 0.19
  # The sequence-level student read the teacher's text as a source of its own.
  with open(workdir / 'teacher_text.jsonl') as f:
    lines = [json.loads(line)['text'] for line in f]
  assert len(lines) == quick['prompts'] * len(SOURCES) and all(lines)
  assert 'teacher' in distill_demo.curves(str(workdir / 'seq_s0'))[steps]
