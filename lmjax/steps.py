"""The step builder: from a config, a mesh and the vocabulary, everything that runs on the devices.

`build(config, mesh, vocab_size)` gives the model graph, the optimizer and schedule, the abstract train
state with its shardings, a sharded init, the jitted train step and the jitted eval step. The trainer,
`lmjax.aot`, the throughput benchmark and the tests all build their steps here, so what is measured and
compiled ahead of time is what trains.

State: {'params', 'opt_state', 'step', 'empty_batches'} (steps whose batch had no target to learn:
they change neither params nor opt_state); parameters and optimizer state are created directly into their
shards, nothing is materialised whole on one device.

The loss is its record's (lmjax/losses.py): its args may change by phase (`Record.at_step`: distillation's
alpha and temperature), and what it takes from the run (`Needs`, its record's `attach`) is built here:
fields computed inside the step from an extra train-step argument (online distillation's frozen
teacher: (state, batch, teacher_params) -> (state, metrics); the argument is neither donated, returned
nor differentiated) and the batch fields the data iterator adds (offline: the teacher's stored top-k).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lmjax import errors, losses, model, optim, phases as phases_lib, sharding


@dataclasses.dataclass(frozen=True)
class Steps:
  args: model.Args
  loss: losses.Args
  phases: list[phases_lib.Phase]
  sources: tuple[str, ...]          # names of source_id 0, 1, ... (the per-source train loss)
  graphdef: object
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  abstract_state: dict              # ShapeDtypeStructs with shardings
  state_shardings: dict
  init: Callable[[int], dict]       # seed -> state (sharded)
  train_step: Callable              # (state, batch[, teacher_params]) -> (state, metrics); donates state
  eval_step: Callable               # (params, batch) -> (loss sum, weight sum), plain CE
  needs: losses.Needs               # what the loss takes from the run (its record's `attach`)


def check_vocab(args: model.Args, vocab_size: int, tokenizer_path: str = '') -> None:
  """The model's vocabulary is the config's; the tokenizer's must fit in it."""
  if vocab_size > args.vocab_size:
    at = f' ({tokenizer_path})' if tokenizer_path else ''
    raise errors.ConfigError(f'the tokenizer{at} has {vocab_size} tokens but config.model.vocab_size='
                             f'{args.vocab_size}: expected model rows >= tokenizer tokens (set '
                             f'config.model.vocab_size, ideally to a multiple of 128, or use a smaller '
                             'tokenizer: config.data.tokenizer.vocab_size)')


def loss_sums(graphdef, params, batch, loss_args: losses.Args, num_sources: int,
              in_step: Callable | None = None, step_arg=None):
  """(sum of weighted per-token losses, sum of weights, per-source loss sums [S], per-source
  weight sums [S]) for one (micro-)batch, S = num_sources (0: the two totals alone); `in_step`
  (Needs.in_step) adds the loss's fields from `step_arg` to the batch first."""
  if in_step is not None:
    batch = {**batch, **in_step(step_arg, batch, loss_args)}
  x_btd, w_dv = model.hidden_and_head(graphdef, params, batch)
  weighted_bt = losses.per_token(x_btd, w_dv, batch, loss_args) * batch['weights']
  row_loss_b, row_weight_b = weighted_bt.sum(-1), batch['weights'].sum(-1)
  if not num_sources:
    return row_loss_b.sum(), row_weight_b.sum()
  by_source = lambda v: jax.ops.segment_sum(v, batch['source_id'], num_segments=num_sources)
  return row_loss_b.sum(), row_weight_b.sum(), by_source(row_loss_b), by_source(row_weight_b)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, loss_args: losses.Args,
                    microbatches: int, num_sources: int, at_step: Callable | None = None,
                    in_step: Callable | None = None) -> Callable:
  """state, batch[, step_arg] -> state, metrics. The batch [B, T] is split into `microbatches` parts
  whose gradients are summed in a scan; dividing by the total target count makes the result equal
  to one step on the whole batch: the weighting contract (lmjax/losses.py). `at_step`: (args, step) ->
  the loss's args of the step (Record.at_step); `in_step`: the loss's in-step fields (Needs.in_step)."""

  def sums(params, mb, args, step_arg):
    loss_sum, weight_sum, *by_source = loss_sums(graphdef, params, mb, args, num_sources, in_step, step_arg)
    return loss_sum, (weight_sum, *by_source)

  grad_fn = jax.value_and_grad(sums, has_aux=True)

  def step(state, batch, step_arg=None):
    micro = jax.tree.map(lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:]),
                         batch)
    args = loss_args if at_step is None else at_step(loss_args, state['step'])

    def accumulate(carry, mb):
      (loss_sum, aux), grads = grad_fn(state['params'], mb, args, step_arg)
      return jax.tree.map(jnp.add, carry, ((loss_sum, *aux), grads)), None

    zeros = ((jnp.zeros(()), jnp.zeros(()), jnp.zeros(num_sources), jnp.zeros(num_sources)),
             jax.tree.map(jnp.zeros_like, state['params']))
    ((loss_sum, weight_sum, source_loss, source_weight), grads), _ = jax.lax.scan(
        accumulate, zeros, micro)
    # A batch whose targets are all padding (weight 0) moves nothing: the parameters and the
    # optimizer state stay as they were (AdamW's momentum and decay would move them), the step
    # counts on and `empty_batches` counts it. Dividing by at least 1 keeps the unused update finite.
    empty = weight_sum == 0
    denominator = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    moved = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}
    kept = jax.tree.map(lambda new, old: jnp.where(empty, old, new), moved,
                        {'params': state['params'], 'opt_state': state['opt_state']})
    new_state = dict(state, **kept, step=state['step'] + 1,
                     empty_batches=state['empty_batches'] + empty.astype(jnp.int32))
    metrics = {'loss': loss_sum / denominator, 'grad_norm': optax.global_norm(grads),
               'lr': schedule(state['step']), 'target_tokens': weight_sum,
               'empty_batches': new_state['empty_batches'],
               'source_loss_sums': source_loss, 'source_weight_sums': source_weight}
    return new_state, metrics

  return step


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, vocab_size: int,
          sources: Sequence[str] | None = None, tokenizer_path: str = '',
          phases: Sequence[phases_lib.Phase] | None = None) -> Steps:
  """Builds the steps of `config` on `mesh` for a tokenizer of `vocab_size` tokens (at `tokenizer_path`).

  `sources`: the mixture's source names in source_id order (default: config.data.sources).
  `phases`: the run's resolved phases (default: resolved here from config.phases).
  """
  sources = tuple(config.data.sources if sources is None else sources)
  args = model.resolve(config.model)
  check_vocab(args, vocab_size, tokenizer_path)
  if phases is None:
    phases = phases_lib.resolve(config.phases, config.train.steps, list(config.data.sources))
  loss_args = losses.resolve(config.loss, vocab_size, phases)
  needs = losses.attach(config, mesh, vocab_size, tokenizer_path)
  schedule = optim.make_schedule(phases, config.optim.lr)
  graphdef, shapes, axes = model.abstract(args)
  param_sh = sharding.param_shardings(shapes, axes, mesh)
  tx = optim.make_optimizer(config.optim, schedule, shapes, phases)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, shapes), param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = {'params': param_sh, 'opt_state': opt_sh, 'step': replicated, 'empty_batches': replicated}

  def init(seed):
    _, params = model.create(args, seed)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32),
            'empty_batches': jnp.zeros((), jnp.int32)}

  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(lambda: init(0)), state_sh)
  train_step = make_train_step(graphdef, tx, schedule, loss_args, config.train.microbatches,
                               len(sources), losses.record(config.loss.name).at_step, needs.in_step)
  # The held-out loss is plain CE whatever the run trains on, by the run's implementation when CE has it.
  eval_implementation = (loss_args.implementation if loss_args.implementation in losses.RECORD.implementations
                         else 'chunked')
  eval_args = losses.Args('ce', eval_implementation, 0.0, loss_args.chunk_tokens, vocab_size)
  eval_step = lambda params, batch: loss_sums(graphdef, params, batch, eval_args, 0)
  return Steps(args, loss_args, list(phases), sources, graphdef, schedule, tx, abstract_state, state_sh,
               jax.jit(init, static_argnums=0, out_shardings=state_sh),
               jax.jit(train_step, out_shardings=(state_sh, None), donate_argnums=0),
               jax.jit(eval_step), needs)
