"""The training loop, one for every phase (pretrain, anneal, continued pretraining are configs).

`setup` builds a run from a config (written once, big_vision style, the resume order: a checkpoint in
the workdir, else `config.init_from` (another run's params), else scratch); `train` runs its steps.
Checkpointing, evaluation and metric logging are hooks with intervals (Levanter style); they all run
once more at the end. Every loss is the same loop: what a loss takes from the run (its record's
`Needs`, lmjax/losses.py) wraps the data iterator (offline distillation adds the teacher's stored top-k)
or is an extra argument of the train step (`Run.step_args`: online distillation's frozen teacher),
never donated, updated or checkpointed. The trainer knows the record's interface only. This is a
library: the CLI (`python -m lmjax.train`, lmjax/train.py) adds the progress bar and printing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np

from lmjax import (checkpoint, errors, fs, init_from, losses, model, phases as phases_lib, resume, sharding,
                   steps as steps_lib)
from lmjax.data import pipeline as data_pipeline
from lmjax.eval import heldout

# Dense bf16 peak FLOP/s per chip, for MFU (vendor datasheets).
PEAK_FLOPS = {
    'NVIDIA H200': 989e12, 'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA A100-SXM4-40GB': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5': 459e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


# ----------------------------------------------------------------------------- hooks


@dataclasses.dataclass
class StepInfo:
  """What a hook sees after a step: `metrics` holds device arrays until a hook fetches them."""
  step: int
  state: dict
  metrics: dict
  final: bool = False


@dataclasses.dataclass
class Hook:
  every: int
  fn: Callable[[StepInfo], None]
  at_start: bool = False  # also run once before the first step of a run that starts from step 0

  def __call__(self, info: StepInfo) -> None:
    if info.step % self.every == 0 or info.final:
      self.fn(info)


class MetricsWriter:
  """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to the trackers of
  `config.train.trackers` (TensorBoard under <workdir>/tb; Weights & Biases, whose run id is kept in
  <workdir>/wandb_id so a resumed run continues it); `echo(step, record)`, if given, also sees every
  record (the CLI prints evaluations with it).

  A resumed run first drops the records past the step it resumed from (they were logged by the run
  that was killed and are about to be logged again), from metrics.jsonl and TensorBoard alike, so
  both read as one clean run.

  With a workdir on an object store (gs://), each record rewrites metrics.jsonl (lmjax/fs.py), and
  TensorBoard writes its event files into a local temporary directory that is copied to <workdir>/tb
  after every record: one code path for any URL, which a memory:// test covers."""

  def __init__(self, run: 'Run', echo: Callable[[int, dict], None] | None = None):
    self.path = os.path.join(run.workdir, 'metrics.jsonl')
    self._tb = self._wandb = None
    self._tb_dir = os.path.join(run.workdir, 'tb')
    self._tb_local = None  # where TensorBoard writes when _tb_dir is a URL (copied there)
    self._echo = echo
    if jax.process_index() != 0:  # every process computes the (global) metrics; one writes them
      return
    resume.truncate_metrics(self.path, run.start_step)
    trackers = run.config.train.trackers
    if 'tensorboard' in trackers:
      from tensorboardX import SummaryWriter
      if not fs.is_local(self._tb_dir):
        self._tb_local = tempfile.mkdtemp(prefix='lmjax_tb_')
      self._tb = SummaryWriter(self._tb_local or self._tb_dir, purge_step=run.start_step + 1)
    if 'wandb' in trackers:
      self._wandb = _wandb_run(run)

  def write(self, step: int, record: dict) -> None:
    if jax.process_index() != 0:
      return
    record = {'step': step, **{k: float(v) if isinstance(v, (float, int, np.generic, np.ndarray, jax.Array))
                               else v for k, v in record.items()}}
    fs.append_text(self.path, json.dumps(record) + '\n')
    scalars = {k: v for k, v in record.items() if k != 'step' and isinstance(v, float)}
    if self._tb:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
      if self._tb_local:
        fs.upload(self._tb_local, self._tb_dir)
    if self._wandb:
      self._wandb.log(scalars, step=step)
    if self._echo:
      self._echo(step, record)

  def close(self) -> None:
    if self._tb:
      self._tb.close()
    if self._tb_local:
      fs.upload(self._tb_local, self._tb_dir)
      shutil.rmtree(self._tb_local, ignore_errors=True)
    if self._wandb:
      self._wandb.finish()


def _wandb_run(run: 'Run'):
  wandb = errors.require('wandb', 'wandb', "config.train.trackers with 'wandb'")
  id_path = os.path.join(run.workdir, 'wandb_id')
  if not fs.isfile(id_path):
    fs.write_atomic(id_path, secrets.token_hex(4))
  run_id = fs.read_text(id_path).strip()
  # W&B keeps its files in a local directory: the workdir, or (a URL workdir) its default, ./wandb.
  return wandb.init(project=run.config.train.wandb_project, id=run_id, resume='allow',
                    dir=run.workdir if fs.is_local(run.workdir) else None,
                    name=os.path.basename(fs.abspath(run.workdir).rstrip('/')),
                    config=json.loads(run.config.to_json_best_effort()))


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  """Everything `train` needs, built once from the config (see `setup`)."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  pipeline: data_pipeline.Pipeline
  steps: steps_lib.Steps
  state: dict
  checkpointer: checkpoint.Checkpointer
  data_iter: object
  start_step: int
  step_args: tuple = ()  # extra train-step arguments: the loss's (Needs.load: online distillation's teacher)
  config_changes: tuple = ()  # resuming: what changed from the run's config.json (resume.check)


def run_tokenizer(config: ml_collections.ConfigDict) -> str:
  """The tokenizer of the run of `config`, chosen here only: config.data.tokenizer.path, else the
  parent's (config.init_from, init_from.tokenizer_of: a different one set is an error), then the
  loss's say (Record.tokenizer: distillation takes the teacher's, which must be the one chosen, an
  error naming both); '' when none is given (prepare trains one)."""
  path = config.data.tokenizer.path
  if config.init_from:
    path = init_from.tokenizer_of(config.init_from, path)
  own = losses.record(config.loss.name).tokenizer
  return own(config.loss, path) if own is not None else path


def build_pipeline(config: ml_collections.ConfigDict, workdir: str, whole_batches: bool = False,
                   phases: list[phases_lib.Phase] | None = None) -> data_pipeline.Pipeline:
  """This process's data pipeline of the run (`whole_batches`: every process makes whole global
  batches), with the run's tokenizer (`run_tokenizer`) and phases (resolved here when not given).
  `config` is left as it is."""
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.tokenizer.path = run_tokenizer(config)
  if phases is None:
    phases = phases_lib.resolve(config.phases, config.train.steps, list(config.data.sources))
  return data_pipeline.build(
      data_cfg, phases, seq_len=config.train.seq_len,
      global_batch_size=config.train.batch_size, seed=config.seed, workdir=workdir,
      process_index=0 if whole_batches else jax.process_index(),
      process_count=1 if whole_batches else jax.process_count())


def setup(config: ml_collections.ConfigDict, workdir: str, accept_changes: bool = False) -> Run:
  """Builds mesh, data and steps, and restores (workdir checkpoint > init_from > scratch).

  A resumed run's config must equal the one it was started with in everything that changes the
  model, the data order or the optimizer state (lmjax/resume.py); `accept_changes` takes the
  changes anyway and records them in config_changes.jsonl. `workdir` is a local path or a URL
  (gs://; lmjax/fs.py)."""
  fs.makedirs(workdir)
  mesh = sharding.make_mesh(config.mesh)
  batch_shards = mesh.shape['data'] * mesh.shape['fsdp']
  if config.train.batch_size % (batch_shards * config.train.microbatches):
    raise errors.ConfigError(f'config.train.batch_size={config.train.batch_size} must be divisible by '
                     f'data x fsdp = {batch_shards} devices times microbatches='
                     f'{config.train.microbatches}')
  phases = phases_lib.resolve(config.phases, config.train.steps, list(config.data.sources))
  pipeline = build_pipeline(config, workdir, phases=phases)
  steps = steps_lib.build(config, mesh, pipeline.tokenizer.vocab_size, pipeline.sources,
                          pipeline.tokenizer.path, phases)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpoint)
  data_iter = pipeline.train_iter()
  config_path = os.path.join(workdir, 'config.json')
  if checkpointer.latest_step() is not None:
    saved = resume.read_config(config_path)
    step, state, data_state = checkpointer.restore_latest(steps.abstract_state)
    data_iter.set_state(data_state)
    changes = resume.check(saved, config, step, accept_changes)
    if changes and jax.process_index() == 0:
      resume.record(os.path.join(workdir, 'config_changes.jsonl'), changes)
  else:
    changes = []
    state = steps.init(config.seed)
    if config.init_from:
      state['params'] = init_from.load(config.init_from, config.init_skip, steps.args, state['params'],
                                       steps.abstract_state['params'], mesh)
  if jax.process_index() == 0:
    fs.write_atomic(config_path, config.to_json_best_effort(indent=1))
    _save_provenance(workdir, pipeline)
  start_step, needs = int(state['step']), steps.needs
  if needs.wrap is not None:
    data_iter = needs.wrap(data_iter, pipeline, start_step)
  step_args = (needs.load(),) if needs.load is not None else ()
  return Run(config, workdir, mesh, pipeline, steps, state, checkpointer, data_iter, start_step,
             step_args, tuple(changes))


def _save_provenance(workdir: str, pipeline) -> None:
  """Git revision and versions beside the checkpoints, so a run can be reproduced."""
  try:
    rev = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), check=False).stdout.strip()
  except OSError:
    rev = ''
  info = {'git_revision': rev, 'jax': jax.__version__, 'argv': sys.argv,
          'devices': [d.device_kind for d in jax.devices()], 'data_sources': list(pipeline.sources),
          'tokenizer': fs.abspath(pipeline.tokenizer.path)}
  fs.write_atomic(os.path.join(workdir, 'provenance.json'), json.dumps(info, indent=1))


def summary(run: Run) -> dict:
  """What the run will do, before it starts: model size and FLOPs, tokens per step, each phase's steps,
  LR shape and mixture, each source's tokens and the epochs of it the run reads. Saved as
  summary.json in the workdir by `setup`'s caller; the CLI prints it."""
  cfg, args = run.config.train, run.steps.args
  return dict(
      parameters=model.param_count(args), flops_per_token=model.flops_per_token(args, cfg.seq_len),
      tokens_per_step=cfg.batch_size * cfg.seq_len, steps=cfg.steps,
      tokens=cfg.steps * cfg.batch_size * cfg.seq_len, start_step=run.start_step,
      phases=[dict(name=p.name, first_step=p.start + 1, last_step=p.start + p.steps, lr=p.lr,
                   weights=p.weights) for p in run.steps.phases],
      sources=run.pipeline.plan(cfg.steps), missing_sources=dict(run.pipeline.missing))


def format_summary(s: dict) -> str:
  """summary() as lines of text."""
  lines = [f"model {s['parameters'] / 1e6:,.2f}M parameters, {s['flops_per_token'] / 1e6:,.1f} MFLOP/token; "
           f"{s['tokens_per_step']:,} tokens/step x {s['steps']:,} steps = {s['tokens'] / 1e6:,.2f}M tokens"]
  for p in s['phases']:
    lr = p['lr']
    shape = lr['shape'] + (f" ({lr['decay']} decay)" if lr['shape'] == 'wsd' else '')
    warm = lr['warmup_steps'] if lr['warmup_steps'] is not None else f"{lr['warmup_fraction'] or 0:g} of the phase"
    mix = ', '.join(f'{k} {v:g}' for k, v in p['weights'].items() if v)
    lines.append(f"phase {p['name']}: steps {p['first_step']}-{p['last_step']}, LR {shape} "
                 f"{lr['init']:g}->{lr['peak']:g}->{lr['end']:g} of peak, warmup {warm}; mixture {mix}")
  for name, src in s['sources'].items():
    lines.append(f"source {name}: {src['tokens'] / 1e6:,.2f}M train tokens, {src['epochs']:.2f} epochs "
                 'over the run')
  for name, line in s['missing_sources'].items():
    lines.append(f'source {name}: not installed, left out ({line})')
  return '\n'.join(lines)


def default_hooks(run: Run, writer: MetricsWriter) -> list[Hook]:
  """Logging (train metrics, tokens/s, MFU), per-source evaluation, checkpointing."""
  cfg = run.config.train
  tokens_per_step = cfg.batch_size * cfg.seq_len
  flops_per_step = model.flops_per_token(run.steps.args, cfg.seq_len) * tokens_per_step
  peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
  eval_batches = run.pipeline.eval_batches()
  clock = {'time': time.perf_counter(), 'step': run.start_step}

  def log(info: StepInfo):
    metrics = jax.device_get(info.metrics)
    source_loss, source_weight = metrics.pop('source_loss_sums'), metrics.pop('source_weight_sums')
    now = time.perf_counter()
    steps = info.step - clock['step']
    record = {**metrics, 'tokens': info.step * tokens_per_step, **run.pipeline.metrics(info.step)}
    record.update({f'train/{name}/loss': float(loss / w)
                   for name, loss, w in zip(run.steps.sources, source_loss, source_weight) if w > 0})
    if steps > 0:
      step_time = (now - clock['time']) / steps
      record.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time)
      if peak:
        record['mfu'] = flops_per_step / step_time / (peak * jax.device_count())
    clock.update(time=now, step=info.step)
    writer.write(info.step, record)

  def evaluate(info: StepInfo):
    metrics = heldout.measure(run.steps.eval_step, info.state['params'], eval_batches, run.mesh)
    record = {'tokens': info.step * tokens_per_step}
    record.update({f'eval/{source}/loss': m['loss'] for source, m in metrics.items()})
    writer.write(info.step, record)

  def save(info: StepInfo):
    if run.checkpointer.latest_step() != info.step:
      run.checkpointer.save(info.step, info.state, run.data_iter.get_state())

  # Evaluation also runs before the first step: the starting point of a continued-pretraining run's
  # forgetting report (lmjax/eval/forgetting.py), and the untrained baseline of any other.
  return [Hook(cfg.log_every, log), Hook(cfg.eval_every, evaluate, at_start=True),
          Hook(cfg.checkpoint_every, save)]


def train(run: Run, hooks: Iterable[Hook]) -> dict:
  """Runs steps start_step+1 .. config.train.steps; returns the final state.

  SIGTERM (preemption) and Ctrl-C (SIGINT) stop after the current step and run the final hooks,
  which checkpoint; after Ctrl-C it then raises errors.Interrupted (a second Ctrl-C aborts at once,
  losing the steps since the last checkpoint). A checkpoint that cannot be written stops training
  at its step (errors.CheckpointSaveError; an asynchronous save's failure is seen after the next
  step at the latest)."""
  hooks = list(hooks)
  stop = {'signal': None}

  def on_signal(signum, _):
    if signum == signal.SIGINT and stop['signal'] == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C
    stop['signal'] = signum

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  state, total, step = run.state, run.config.train.steps, run.start_step
  try:
    with jax.set_mesh(run.mesh):
      if run.start_step == 0:
        for hook in hooks:
          if hook.at_start:
            hook.fn(StepInfo(0, state, {}))
      for step in range(run.start_step + 1, total + 1):
        batch = sharding.global_batch(next(run.data_iter), run.mesh)
        state, metrics = run.steps.train_step(state, batch, *run.step_args)
        info = StepInfo(step, state, metrics, final=step == total or stop['signal'] is not None)
        for hook in hooks:
          hook(info)
        run.checkpointer.check()
        if stop['signal'] is not None:
          if not info.final:  # the signal came during this step's hooks: run the ones that did not
            for hook in hooks:
              if info.step % hook.every:
                hook.fn(info)
          break
    run.checkpointer.wait()
  except errors.CheckpointSaveError as e:
    raise errors.CheckpointSaveError(f'training stopped at step {step}: {e}') from e
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stop['signal'] == signal.SIGINT and step < total:
    raise errors.Interrupted(f'interrupted: stopped at step {step} with a checkpoint in '
                             f'{run.checkpointer.directory}; the same command resumes from it')
  return state
