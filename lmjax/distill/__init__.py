"""Distillation from a teacher's top-k next-token distribution (docs/distillation.md).

  kd.py         the loss 'kd' (its record, settings block config.loss.kd, math, and what it takes from
                the run: the offline store's top-k in the batch, or the online teacher in the step)
  teacher.py    the teacher run: its model, params and tokenizer (which must be the student's)
  store.py      the offline top-k store (tensorstore), keyed by the run's global rows
  dump.py       python -m lmjax.distill.dump: the teacher over the run's rows into a store
  sequences.py  python -m lmjax.distill.sequences: sequence-level distillation (teacher samples -> jsonl)
"""
