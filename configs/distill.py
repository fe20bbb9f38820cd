"""Logit distillation on tiny_mix's zh/en/code/math/legal mixture: a teacher of the tiny family, and a
smaller student trained with or without KD from the teacher's top-k (docs/distillation.md).

  T=/tmp/lmjax_teacher S=/tmp/lmjax_student
  python -m lmjax.train --config=configs/distill.py:role=teacher --workdir=$T
  python -m lmjax.distill.dump --config=configs/distill.py:teacher=$T,store=$S/topk --workdir=$S
  python -m lmjax.train --config=configs/distill.py:teacher=$T,store=$S/topk --workdir=$S
  python -m lmjax.train --config=configs/distill.py:kd=false --workdir=/tmp/lmjax_student_ce

The teacher is tiny_mix's `tiny` model (d 128, 4 layers, 1.3M parameters) trained `teacher_steps`;
the student is smaller (d 64, 2 layers, 0.36M parameters, most of them the tied 4,096 x 64 embedding)
and trained `steps` on the same stream with the teacher's tokenizer. KD: forward KL against the top-k
(k=64) with the tail as one bucket, alpha 0.5 (half the loss is the hard-label CE), temperature 1;
`mode=online` runs the teacher in the step instead of reading the store. One phase: 10% warmup, then
cosine decay to 0.1 of peak. scripts/distill_demo.py runs all of this, with 3 seeds, and reports; its
`quick` setting is the CI test's.

Knobs: role=student|teacher, teacher=DIR, store=DIR, kd=true, mode=offline|online, steps=150,
teacher_steps=300, seed=0, k=64, tail=bucket, alpha=0.5, temperature=1.0, max_chars=1000000.
"""
import os

from lmjax import config as config_lib, phases

PARENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny_mix.py')
STUDENT = dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=192)


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, role='student', teacher='', store='', kd=True, mode='offline',
                               steps=150, teacher_steps=300, seed=0, k=64, tail='bucket', alpha=0.5,
                               temperature=1.0, max_chars=1_000_000)
  if knobs.role not in ('student', 'teacher'):
    raise ValueError(f'config knob role={knobs.role!r}: expected student or teacher')
  c = config_lib.load(PARENT, f'max_chars={knobs.max_chars}')  # model, sources, tokenizer, held-out split
  c.unlock()
  c.seed = knobs.seed
  steps = knobs.teacher_steps if knobs.role == 'teacher' else knobs.steps
  c.train.steps = steps
  c.train.eval_every = max(1, steps // 6)
  c.train.checkpoint_every = steps
  c.phases = phases.timeline(main=phases.phase(fraction=1.0, warmup_fraction=0.1, shape='cosine',
                                               weights=dict(c.phases.pretrain.weights)))
  if knobs.role == 'student':
    c.model.update(STUDENT)
    if knobs.kd:
      c.loss.name = 'kd'
      c.loss.kd.update(teacher=f'lmjax:{knobs.teacher}' if knobs.teacher else '', store=knobs.store,
                       mode=knobs.mode, k=knobs.k, tail=knobs.tail, alpha=knobs.alpha,
                       temperature=knobs.temperature)
  c.lock()
  return c
