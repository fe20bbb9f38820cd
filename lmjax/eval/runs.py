"""A run's Evaluator (lmjax/eval/heldout.py) and params: built from the run's config and workdir as
`trainer.setup` builds it (`build`), or from a run already set up (`of_run`, for hooks); the params of
one of its checkpoints or those it started from (`load_params`); the tokenizer it trained with
(`run_tokenizer_path`). Reads the workdir, writes nothing but prepared data. The entry points
lmjax.evaluate, lmjax.sample and lmjax.export load runs through it.
"""
from __future__ import annotations

import json
import os

import ml_collections

from lmjax import checkpoint, errors, fs, init_from, sharding, steps as steps_lib, trainer
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.eval import heldout


def of_run(run: trainer.Run) -> heldout.Evaluator:
  """The Evaluator of a run set up by `trainer.setup` (for hooks)."""
  return heldout.Evaluator(run.config, run.mesh, run.steps, run.pipeline.tokenizer,
                           run.pipeline.eval_batches())


def build(config: ml_collections.ConfigDict, workdir: str, data: bool = True) -> heldout.Evaluator:
  """The Evaluator of the run of `config` in `workdir`, built as `trainer.setup` builds it (the same
  tokenizer, held-out data and steps) but restoring and writing nothing except prepared data.

  data=False skips the data (no held-out batches): the tokenizer is the one the run recorded in its
  provenance.json, so the run must have started."""
  mesh = sharding.make_mesh(config.mesh)
  if data:
    pipeline = trainer.build_pipeline(config, workdir)
    tok, sources, batches = pipeline.tokenizer, pipeline.sources, pipeline.eval_batches()
  else:
    tok, sources, batches = tokenizer_lib.load(run_tokenizer_path(workdir)), None, {}
  steps = steps_lib.build(config, mesh, tok.vocab_size, sources, tok.path)
  return heldout.Evaluator(config, mesh, steps, tok, batches)


def run_tokenizer_path(workdir: str) -> str:
  """The tokenizer file a run trained with, as its provenance.json records it."""
  path = os.path.join(workdir, 'provenance.json')
  if not fs.isfile(path):
    raise errors.MissingFile(f'{path} does not exist: expected the directory of a run that has started')
  tok = json.loads(fs.read_text(path)).get('tokenizer')
  if not tok or not fs.exists(tok):
    raise errors.MissingFile(f'{path}: the tokenizer it records ({tok!r}) does not exist')
  return tok


def finished_steps(workdir: str) -> list[int]:
  """The steps of the run's finished checkpoints (a save in flight has no commit marker yet);
  nothing is moved or deleted."""
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in fs.listdir(directory)
                if d.isdigit() and fs.isfile(os.path.join(directory, d, 'commit_success.txt')))


def load_params(ev: heldout.Evaluator, workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, params) of the run in `workdir`: its latest checkpoint (step None), checkpoint `step`,
  or for step 0 the params it started from (config.init_from's, else the seed's initialisation)."""
  if step == 0:
    params = ev.steps.init(ev.config.seed)['params']
    if ev.config.init_from:
      params = init_from.load(ev.config.init_from, ev.config.init_skip, ev.steps.args, params,
                              ev.steps.abstract_state['params'], ev.mesh)
    return 0, params
  directory = os.path.join(workdir, 'checkpoints')
  saved = finished_steps(workdir)
  if not saved or (step is not None and step not in saved):
    want = 'a finished checkpoint' if step is None else f'checkpoint {step}'
    raise errors.CheckpointError(f'{directory}: expected {want}; found steps {saved} '
                                 '(0 = the starting params)')
  step = saved[-1] if step is None else step
  ckpt = checkpoint.Checkpointer(directory)
  try:
    params = ckpt.restore_params(step, ev.steps.abstract_state['params'])
  finally:
    ckpt.close()
  return int(step), params
