"""Evaluation of a run (`python -m lmjax.evaluate`, lmjax/evaluate.py, is the command line).

  heldout.py     held-out loss and bits per byte: the one held-out forward pass (`measure`; the
                 trainer's eval/<source>/loss runs it too), token bytes, the Evaluator
  runs.py        a run's Evaluator and params from its workdir (or from a run set up by the trainer)
  hook.py        the trainer hook that records eval/<source>/bpb
  choice.py      multiple-choice tasks from jsonl, scored by continuation log-likelihood
  records.py     a checkpoint's record of scores; evaluations.jsonl written and, with metrics.jsonl, read
  forgetting.py  the forgetting report of continued pretraining and its plot
The trainer imports heldout.py, so whatever this file imports, every training run imports too.
"""
