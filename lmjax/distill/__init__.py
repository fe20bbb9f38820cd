"""Distillation from a teacher's top-k next-token distribution (docs/distillation.md).

  teacher.py    the teacher run: its model, params and tokenizer (which must be the student's)
  store.py      the offline top-k store (tensorstore), keyed by the run's global rows
  dump.py       python -m lmjax.distill.dump: the teacher over the run's rows into a store
  sequences.py  python -m lmjax.distill.sequences: sequence-level distillation (teacher samples -> jsonl)
The losses are lmjax/losses.py's 'kd'; the online teacher runs in the train step (lmjax/steps.py).
"""
