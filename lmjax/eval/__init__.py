"""Evaluation of a run (`python -m lmjax.evaluate`, lmjax/evaluate.py, is the command line).

  heldout.py     held-out loss and bits per byte: the one held-out forward pass (`measure`; the
                 trainer's eval/<source>/loss runs it too), token bytes, the Evaluator
  runs.py        a run's Evaluator and params from its workdir (or from a run set up by the trainer)
  hook.py        the trainer hooks: eval/<source>/bpb, and config.eval's harness tasks
  choice.py      multiple-choice tasks from jsonl, scored by continuation log-likelihood (score_pairs)
  harness.py     lm-evaluation-harness's model type 'lmjax' (the [eval] extra; import it where used)
  tasks/         the local harness tasks that ship with lmjax (YAML and data)
  records.py     a checkpoint's record of scores; evaluations.jsonl written and, with metrics.jsonl, read
  forgetting.py  the forgetting report of continued pretraining and its plot
The trainer imports heldout.py, so whatever this file imports, every training run imports too.
"""
