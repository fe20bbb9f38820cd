"""The training loop, one for every phase (pretrain, anneal, continued pretraining are configs).

    python -m lmjax.train --config=configs/tiny.py --workdir=/tmp/tiny [--config.optim.lr=1e-3 ...]

Re-running the same command resumes from the latest checkpoint in the workdir. Resume order (written
once, big_vision style): a checkpoint in the workdir, else `config.init_from` (another run's params),
else scratch. Checkpointing, evaluation and metric logging are hooks with intervals (Levanter style);
they all run once more at the end. Library code does not print: the CLI adds the progress bar.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmjax import checkpoint, losses, model, optim, sharding

# Dense bf16 peak FLOP/s per chip, for MFU (vendor datasheets).
PEAK_FLOPS = {
    'NVIDIA H200': 989e12, 'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA A100-SXM4-40GB': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5': 459e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def defaults() -> ml_collections.ConfigDict:
  """config.train."""
  return ml_collections.ConfigDict(dict(
      steps=200,
      batch_size=8,           # global batch, sequences
      seq_len=128,
      microbatches=1,         # gradient accumulation: the batch is split into this many parts
      z_loss=0.0,
      log_every=10,
      eval_every=100,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoint=True,
  ))


def validate(cfg: ml_collections.ConfigDict) -> None:
  for field in ('steps', 'batch_size', 'seq_len', 'microbatches', 'log_every', 'eval_every',
                'checkpoint_every', 'keep_checkpoints'):
    if cfg[field] <= 0:
      raise ValueError(f'config.train.{field}={cfg[field]}: expected a positive integer')
  if cfg.batch_size % cfg.microbatches:
    raise ValueError(f'config.train.microbatches={cfg.microbatches} must divide '
                     f'config.train.batch_size={cfg.batch_size}')


# ----------------------------------------------------------------------------- the jitted steps


def loss_sums(graphdef, params, batch, z_loss: float):
  """(sum of weighted per-token losses, sum of weights) for one (micro-)batch."""
  logits_btv = model.apply(graphdef, params, batch)
  per_token_bt = losses.cross_entropy(logits_btv, batch['targets'], z_loss)
  return jnp.sum(per_token_bt * batch['weights']), jnp.sum(batch['weights'])


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, train_cfg) -> Callable:
  """state, batch -> state, metrics. The batch [B, T] is split into `microbatches` parts whose
  gradients are summed in a scan; dividing by the total target count makes the result equal to
  one step on the whole batch."""
  n_micro, z_loss = train_cfg.microbatches, train_cfg.z_loss
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b, z_loss), has_aux=True)

  def step(state, batch):
    micro = jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)

    def accumulate(carry, mb):
      (loss_sum, weight_sum), grads = grad_fn(state['params'], mb)
      return jax.tree.map(jnp.add, carry, (loss_sum, weight_sum, grads)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state['params']))
    (loss_sum, weight_sum, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    grads = jax.tree.map(lambda g: g / weight_sum, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = dict(state, params=optax.apply_updates(state['params'], updates),
                     opt_state=opt_state, step=state['step'] + 1)
    metrics = {'loss': loss_sum / weight_sum, 'grad_norm': optax.global_norm(grads),
               'lr': schedule(state['step']), 'target_tokens': weight_sum}
    return new_state, metrics

  return step


def make_eval_step(graphdef) -> Callable:
  return jax.jit(lambda params, batch: loss_sums(graphdef, params, batch, 0.0))


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

  def __call__(self, info: StepInfo) -> None:
    if info.step % self.every == 0 or info.final:
      self.fn(info)


class MetricsWriter:
  """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to TensorBoard;
  `echo(step, record)`, if given, also sees every record (the CLI prints evaluations with it)."""

  def __init__(self, workdir: str, echo: Callable[[int, dict], None] | None = None):
    from tensorboardX import SummaryWriter
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = SummaryWriter(os.path.join(workdir, 'tb')) if jax.process_index() == 0 else None
    self._echo = echo

  def write(self, step: int, record: dict) -> None:
    if jax.process_index() != 0:  # every process computes the (global) metrics; one writes them
      return
    record = {'step': step, **{k: float(v) if isinstance(v, (float, int, np.generic, np.ndarray, jax.Array))
                               else v for k, v in record.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for k, v in record.items():
      if k != 'step' and isinstance(v, float):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._echo:
      self._echo(step, record)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  """Everything `train` needs, built once from the config (see `setup`)."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  args: model.Args
  pipeline: object
  graphdef: object
  state: dict
  train_step: Callable
  checkpointer: checkpoint.Checkpointer
  data_iter: object
  start_step: int


def init_state(config, args: model.Args, mesh) -> tuple[object, Callable, dict, dict, Callable]:
  """(graphdef, tx, abstract state, state shardings, init fn). Parameters and optimizer state are
  created directly into their shards: nothing is materialised whole on one device."""
  graphdef, shapes, axes = model.abstract(args)
  param_sh = sharding.param_shardings(shapes, axes, mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.schedule, shapes, config.train.steps)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_abstract = jax.eval_shape(tx.init, shapes)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = {'params': param_sh, 'opt_state': opt_sh, 'step': replicated, 'rng': replicated}

  def init(seed):
    _, params = model.create(args, seed)
    # `rng` (raw key data, so orbax can save it): the run's base key; a step's key is fold_in(rng, step).
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32),
            'rng': jax.random.key_data(jax.random.key(seed))}

  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(lambda: init(0)), state_sh)
  return graphdef, (tx, schedule), abstract_state, state_sh, jax.jit(init, static_argnums=0,
                                                                     out_shardings=state_sh)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Builds mesh, data, model and optimizer, and restores (workdir checkpoint > init_from > scratch)."""
  from lmjax import config as config_lib
  from lmjax.data import pipeline as data_pipeline

  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  batch_shards = mesh.shape['data'] * mesh.shape['fsdp']
  if config.train.batch_size % (batch_shards * config.train.microbatches):
    raise ValueError(f'config.train.batch_size={config.train.batch_size} must be divisible by '
                     f'data x fsdp = {batch_shards} devices times microbatches='
                     f'{config.train.microbatches}')
  pipeline = data_pipeline.build(
      config.data, seq_len=config.train.seq_len, global_batch_size=config.train.batch_size,
      seed=config.seed, workdir=workdir, process_index=jax.process_index(),
      process_count=jax.process_count())
  args = model.resolve(config.model, vocab_size=pipeline.tokenizer.vocab_size)
  graphdef, (tx, schedule), abstract_state, state_sh, init = init_state(config, args, mesh)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpoint)
  data_iter = pipeline.train_iter()
  latest = checkpointer.latest_step()
  if latest is not None:
    state, data_state = checkpointer.restore(latest, abstract_state)
    data_iter.set_state(data_state)
  else:
    state = init(config.seed)
    if config.init_from:
      state['params'] = checkpoint.restore_params(
          os.path.join(config.init_from, 'checkpoints'), abstract_state['params'])
  if jax.process_index() == 0:
    config_lib.save(config, os.path.join(workdir, 'config.json'))
    _save_provenance(workdir, pipeline)
  train_step = jax.jit(make_train_step(graphdef, tx, schedule, config.train),
                       out_shardings=(state_sh, None), donate_argnums=0)
  return Run(config, workdir, mesh, args, pipeline, graphdef, state, train_step,
             checkpointer, data_iter, int(state['step']))


def _save_provenance(workdir: str, pipeline) -> None:
  """Git revision and versions beside the checkpoints, so a run can be reproduced."""
  try:
    rev = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), check=False).stdout.strip()
  except OSError:
    rev = ''
  info = {'git_revision': rev, 'jax': jax.__version__, 'argv': sys.argv,
          'devices': [d.device_kind for d in jax.devices()], 'data_sources': list(pipeline.sources)}
  with open(os.path.join(workdir, 'provenance.json'), 'w') as f:
    json.dump(info, f, indent=1)


def default_hooks(run: Run, writer: MetricsWriter) -> list[Hook]:
  """Logging (train metrics, tokens/s, MFU), per-source evaluation, checkpointing."""
  cfg = run.config.train
  tokens_per_step = cfg.batch_size * cfg.seq_len
  flops_per_step = model.flops_per_token(run.args, cfg.seq_len) * tokens_per_step
  peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
  eval_step = make_eval_step(run.graphdef)
  eval_batches = run.pipeline.eval_batches()
  clock = {'time': time.perf_counter(), 'step': run.start_step}

  def log(info: StepInfo):
    metrics = jax.device_get(info.metrics)
    now = time.perf_counter()
    steps = info.step - clock['step']
    record = {**metrics, 'tokens': info.step * tokens_per_step, **run.pipeline.metrics(info.step)}
    if steps > 0:
      step_time = (now - clock['time']) / steps
      record.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time)
      if peak:
        record['mfu'] = flops_per_step / step_time / (peak * jax.device_count())
    clock.update(time=now, step=info.step)
    writer.write(info.step, record)

  def evaluate(info: StepInfo):
    record = {'tokens': info.step * tokens_per_step}
    for source, batches in eval_batches.items():
      sums = [eval_step(info.state['params'], sharding.global_batch(b, run.mesh)) for b in batches]
      loss_sum, weight_sum = np.sum(jax.device_get(sums), axis=0)
      record[f'eval/{source}/loss'] = float(loss_sum / max(weight_sum, 1.0))
    writer.write(info.step, record)

  def save(info: StepInfo):
    if run.checkpointer.latest_step() != info.step:
      run.checkpointer.save(info.step, info.state, run.data_iter.get_state())

  return [Hook(cfg.log_every, log), Hook(cfg.eval_every, evaluate),
          Hook(cfg.checkpoint_every, save)]


def train(run: Run, hooks: Iterable[Hook]) -> dict:
  """Runs steps start_step+1 .. config.train.steps; returns the final state.

  SIGTERM (preemption) stops after the current step and runs the final hooks, which checkpoint."""
  hooks = list(hooks)
  stop = {'now': False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
  state, total = run.state, run.config.train.steps
  try:
    with jax.set_mesh(run.mesh):
      for step in range(run.start_step + 1, total + 1):
        batch = sharding.global_batch(next(run.data_iter), run.mesh)
        state, metrics = run.train_step(state, batch)
        info = StepInfo(step, state, metrics, final=step == total or stop['now'])
        for hook in hooks:
          hook(info)
        if stop['now']:
          break
  finally:
    signal.signal(signal.SIGTERM, previous)
    run.checkpointer.wait()
  return state


def run(config: ml_collections.ConfigDict, workdir: str, extra_hooks: Iterable[Hook] = ()) -> dict:
  """Trains `config` in `workdir` (resuming if possible) with the default hooks plus `extra_hooks`."""
  r = setup(config, workdir)
  try:
    return train(r, default_hooks(r, MetricsWriter(workdir)) + list(extra_hooks))
  finally:
    r.checkpointer.close()


def main(argv):
  del argv
  from absl import flags, logging
  from tqdm import tqdm
  from lmjax import config as config_lib, distributed
  distributed.initialize()
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  config_lib.validate(config)
  r = setup(config, workdir)
  if r.start_step:
    print(f'resuming from step {r.start_step} (checkpoint in {r.checkpointer.directory})',
          file=sys.stderr)
  bar = tqdm(total=config.train.steps, initial=r.start_step, unit='step', dynamic_ncols=True,
             disable=jax.process_index() != 0)

  def progress(info: StepInfo):
    bar.update(1)
    if info.step % config.train.log_every == 0 or info.final:
      bar.set_postfix(loss=f"{float(info.metrics['loss']):.3f}")

  def print_eval(step: int, record: dict):
    losses = {k.split('/')[1]: v for k, v in record.items() if k.startswith('eval/')}
    if losses:
      bar.write(f'step {step} eval loss: ' + '  '.join(f'{k} {v:.3f}' for k, v in losses.items()))

  try:
    train(r, default_hooks(r, MetricsWriter(workdir, echo=print_eval)) + [Hook(1, progress)])
  finally:
    bar.close()
    r.checkpointer.close()


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'configs/<name>.py[:knobs]', lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, tokenizer)')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
