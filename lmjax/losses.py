"""Losses on the head/loss seam: a named loss maps the model's final hidden states and head weight to a
per-token loss, `(x_btd, w_dv, batch, args) -> loss_bt` (f32); the train step weights and sums it.

The loss, not the model, makes the logits, so an implementation may avoid ever holding them whole
(Levanter's `activations()` + `get_lm_head()`, Cut Cross-Entropy, Liger's fused linear CE):

  materialize  logits [B, T, V] in f32, then the loss (the reference; 8.4 GB at 1b x B4 x T4096)
  chunked      a scan over chunks of positions, each computing its [B, c, V] block of logits and
               recomputing it in the backward pass (jax.checkpoint): at most one block is live
  pallas       pallas_kernels/linear_cross_entropy: head + loss fused, the gradients made in the
               forward pass (3 matmuls, no recompute, one block of logits live): a Pallas kernel on
               TPU, a fused XLA scan elsewhere. At 1b on an H200: 23.1 ms / 0.88 GB extra for the head
               fwd+bwd against materialize's 40.0 ms / 8.4 GB (benchmarks/RESULTS.md). Its weight
               gradient is exact for the train step's weighted sum of the per-token losses (the only
               cotangent a step gives it) and NaN for any other, never silently wrong.

Rows of w_dv at or past `Args.vocab_size` (the tokenizer's vocabulary; the model may pad its head to
a multiple of 128) are padding: their logits are masked to -inf, so they are never predicted.

A loss is a `Record`: its implementations, its own settings block (config.loss.<name>), the batch
fields it adds and what it takes from the run (`Needs`). The step builder and the trainer know only
the record, which `record(config.loss.name)` finds: a built-in name (BUILTIN) or the dotted path of
any module that defines RECORD (docs/ARCHITECTURE.md, "A new loss"). The built-ins:
  ce  next-token cross-entropy (+ PaLM's z-loss): this module's RECORD
  kd  knowledge distillation from a teacher's top-k, mixed with ce: lmjax/distill/kd.py

The weighting contract: an implementation returns the per-token loss; the step sums
`weights * loss` and divides by the sum of the weights (lmjax/steps.py). The fused kernel's weight
gradient assumes exactly that cotangent and checks it itself (ce_pallas).

config.loss: name, implementation (one of the record's), z_loss, chunk_tokens, and the built-in losses'
own blocks (config.loss.kd).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmjax import errors

BUILTIN = {'ce': 'lmjax.losses', 'kd': 'lmjax.distill.kd'}  # config.loss.name -> the module of its RECORD


def defaults() -> ml_collections.ConfigDict:
  """config.loss, with each built-in loss's own block (config.loss.kd) so flags reach it."""
  cfg = ml_collections.ConfigDict(dict(
      name='ce',                   # BUILTIN, or the dotted path of a module with a RECORD
      # materialize | chunked | pallas. Materialize is the default: faster at 1b on an H200 (46.7k vs
      # 41.2k tokens/s at B4 x T4096, benchmarks/RESULTS.md); chunked saves [tokens, vocab] f32 of memory.
      implementation='materialize',
      z_loss=0.0,                  # PaLM's z-loss coefficient (section 5): z * logsumexp^2 per token
      chunk_tokens=1024,           # chunked: tokens (batch rows x positions) per block of logits
  ))
  for name in BUILTIN:
    own = record(name).defaults
    if own is not None:
      cfg[name] = own()
  return cfg


@dataclasses.dataclass(frozen=True)
class Args:
  """Resolved loss settings (the step builder closes over them). `options` are the loss's own (its
  record's `options`; None for ce); inside a step they may hold traced values (`Record.at_step`)."""
  name: str
  implementation: str
  z_loss: float
  chunk_tokens: int
  vocab_size: int  # rows of w_dv that can be predicted (the tokenizer's vocabulary)
  options: Any = None


@dataclasses.dataclass(frozen=True)
class Context:
  """What a record's `attach` sees of the run: config.loss, the mesh, the tokenizer (path, vocabulary)
  and the global batch size."""
  loss: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  vocab_size: int
  tokenizer_path: str
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a loss takes from the run beyond the pipeline's batch (nothing, for ce)."""
  # Fields the data iterator adds to each batch: name -> (dtype, per-row shape of 'B', 'T' and sizes).
  batch_fields: Mapping[str, tuple[np.dtype, tuple]] = dataclasses.field(default_factory=dict)
  # (data_iter, pipeline, start_step) -> the iterator whose batches carry batch_fields (and which
  # keeps data_iter's get_state/set_state: `MapBatches` for a per-batch function).
  wrap: Callable | None = None
  step_arg: Any = None            # the train step's extra argument: ShapeDtypeStructs with shardings
  load: Callable[[], Any] | None = None  # its value, read when the run starts (e.g. a teacher's params)
  # (step_arg, batch, args) -> fields added to each micro-batch inside the step; no gradient flows.
  in_step: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Record:
  """A loss, as the step builder and the trainer know it. Only `implementations` is required."""
  implementations: Mapping[str, Callable]  # name -> fn(x_btd, w_dv, batch, args) -> loss_bt [B, T] f32
  defaults: Callable[[], ml_collections.ConfigDict] | None = None  # its block, config.loss.<block(name)>
  validate: Callable[[ml_collections.ConfigDict], None] | None = None  # (config.loss) when chosen
  options: Callable[[ml_collections.ConfigDict, Any], Any] | None = None  # (config.loss, phases) -> Args.options
  at_step: Callable[[Args, jax.Array], Args] | None = None  # the args of a (0-based) step, by phase
  tokenizer: Callable[[ml_collections.ConfigDict, str], str] | None = None  # (config.loss, chosen) -> the run's
  attach: Callable[[Context], Needs] | None = None  # what it takes from the run


def record(name: str) -> Record:
  """The record of `config.loss.name`: BUILTIN's, or the RECORD of the module `name` names."""
  module_name = BUILTIN.get(name, name)
  expected = (f'expected one of {sorted(BUILTIN)} or the dotted path of a module that defines RECORD '
              '(an lmjax.losses.Record)')
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if not (module_name == e.name or module_name.startswith(f'{e.name}.')):
      raise  # the module exists; something it imports does not
    raise errors.ConfigError(f'config.loss.name={name!r}: no module {module_name!r}; {expected}') from None
  found = getattr(module, 'RECORD', None)
  if not isinstance(found, Record):
    raise errors.ConfigError(f'config.loss.name={name!r}: module {module_name!r} has no RECORD; {expected}')
  return found


def block(name: str) -> str:
  """The key of a loss's settings block under config.loss: its name's last dotted part
  ('kd' -> config.loss.kd; 'mypkg.digits_ce' -> config.loss.digits_ce)."""
  return name.rpartition('.')[2]


def validate(cfg: ml_collections.ConfigDict) -> None:
  own = record(cfg.name)
  if cfg.implementation not in own.implementations:
    raise errors.ConfigError(f'config.loss.implementation={cfg.implementation!r}: expected one of '
                             f'{sorted(own.implementations)} for loss {cfg.name!r}')
  if not cfg.z_loss >= 0:
    raise errors.ConfigError(f'config.loss.z_loss={cfg.z_loss!r}: expected a number >= 0')
  if not cfg.chunk_tokens >= 1:
    raise errors.ConfigError(f'config.loss.chunk_tokens={cfg.chunk_tokens!r}: expected a positive integer')
  if own.validate is not None:
    own.validate(cfg)


def resolve(cfg: ml_collections.ConfigDict, vocab_size: int, phases=()) -> Args:
  """config.loss as Args, for a tokenizer of `vocab_size` tokens and the run's resolved phases."""
  validate(cfg)
  own = record(cfg.name)
  return Args(cfg.name, cfg.implementation, float(cfg.z_loss), int(cfg.chunk_tokens), int(vocab_size),
              own.options(cfg, phases) if own.options is not None else None)


def attach(config: ml_collections.ConfigDict, mesh, vocab_size: int, tokenizer_path: str = '') -> Needs:
  """What the run's loss takes from it (its record's `attach`, given the run's `Context`)."""
  own = record(config.loss.name)
  if own.attach is None:
    return Needs()
  return own.attach(Context(config.loss, mesh, vocab_size, tokenizer_path, int(config.train.batch_size)))


class MapBatches:
  """A data iterator whose batches pass through `fn` (batch -> batch), keeping `data_iter`'s state."""

  def __init__(self, data_iter, fn: Callable[[dict], dict]):
    self._it, self._fn = data_iter, fn

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self._fn(next(self._it))

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state) -> None:
    self._it.set_state(state)


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float = 0.0,
                  vocab_size: int | None = None) -> jax.Array:
  """Next-token cross-entropy -log softmax(logits)[target] per token, in f32, plus
  z_loss * logsumexp^2 (PaLM section 5: keeps the softmax normaliser near 1 for stability).
  Logits at or past `vocab_size` (padding rows of the head) are masked out."""
  logits = mask_vocab(logits_btv.astype(jnp.float32), vocab_size)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return lse_bt - target_logit_bt + z_loss * jnp.square(lse_bt)


def mask_vocab(logits_btv: jax.Array, vocab_size: int | None) -> jax.Array:
  if vocab_size is not None and vocab_size < logits_btv.shape[-1]:
    return jnp.where(jnp.arange(logits_btv.shape[-1]) < vocab_size, logits_btv, -jnp.inf)
  return logits_btv


def logits(x_btd: jax.Array, w_dv: jax.Array) -> jax.Array:
  """x_btd @ w_dv in the hidden states' dtype (bf16 on accelerators), accumulated and returned in f32."""
  return jnp.einsum('btd,dv->btv', x_btd, w_dv.astype(x_btd.dtype), preferred_element_type=jnp.float32)


def chunked(fn: Callable, x_btd, w_dv, fields: dict, chunk_tokens: int):
  """fn(logits [B, c, V], fields' [B, c, ...] blocks) over blocks of positions, B * c ~ chunk_tokens:
  the outputs ([B, c, ...] each, a pytree) put back to [B, T, ...].

  The scan keeps the batch axis (and its sharding) and walks the positions; `jax.checkpoint` makes
  the backward pass recompute each block's logits instead of storing them. The weight gradient is
  summed over blocks in f32 (w_dv is cast inside the block)."""
  b, t, d = x_btd.shape
  c = max(1, min(t, chunk_tokens // b))
  n = -(-t // c)
  pad = n * c - t

  def split(v):  # [B, T, ...] -> [n, B, c, ...]
    v = jnp.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2))
    return v.reshape(b, n, c, *v.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def block(x_bcd, blocks):
    return fn(logits(x_bcd, w_dv), blocks)

  out = jax.lax.map(lambda xs: block(*xs), (split(x_btd), jax.tree.map(split, fields)))
  return jax.tree.map(lambda v: v.swapaxes(0, 1).reshape(b, n * c, *v.shape[3:])[:, :t], out)


def ce_materialize(x_btd, w_dv, batch, args: Args) -> jax.Array:
  return cross_entropy(logits(x_btd, w_dv), batch['targets'], args.z_loss, args.vocab_size)


def ce_chunked(x_btd, w_dv, batch, args: Args) -> jax.Array:
  """`ce_materialize` a block of positions at a time (`chunked`)."""
  fn = lambda logits_bcv, f: cross_entropy(logits_bcv, f['targets'], args.z_loss, args.vocab_size)
  return chunked(fn, x_btd, w_dv, {'targets': batch['targets']}, args.chunk_tokens)


def target_scores(x_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array,
                  args: Args) -> tuple[jax.Array, jax.Array]:
  """For scoring, not training: per token, -log p(target) [B, T] f32 (`cross_entropy` without
  z-loss, as ce_materialize computes it) and whether the target is the most likely of the first
  args.vocab_size tokens [B, T] bool (argmax: a tie goes to the lowest id). `materialize` holds the
  logits [B, T, V] whole; any other implementation takes a block of positions at a time (`chunked`)."""
  def fn(logits_btv, f):
    z = mask_vocab(logits_btv.astype(jnp.float32), args.vocab_size)
    return cross_entropy(z, f['targets']), jnp.argmax(z, axis=-1) == f['targets']
  if args.implementation == 'materialize':
    return fn(logits(x_btd, w_dv), {'targets': targets_bt})
  return chunked(fn, x_btd, w_dv, {'targets': targets_bt}, args.chunk_tokens)


def mesh_devices(x) -> int:
  """Devices of the mesh `x` is laid out on (the one set by jax.set_mesh, else its own); 1 if none."""
  for mesh in (jax.sharding.get_abstract_mesh(), jax.typeof(x).sharding.mesh):
    if not mesh.empty:
      return mesh.size
  return 1


def ce_pallas(x_btd, w_dv, batch, args: Args) -> jax.Array:
  """The fused head + CE (pallas_kernels/linear_cross_entropy) on the tokens of the batch. The
  kernel picks its backend from the target (Pallas on TPU, the fused XLA scan elsewhere); on a mesh
  of several devices the XLA scan, which the compiler partitions like any jnp code (the Pallas TPU
  kernel would need a shard_map around it: benchmarks/linear_cross_entropy_NOTES.md)."""
  from pallas_kernels.linear_cross_entropy import linear_cross_entropy  # pylint: disable=import-outside-toplevel
  b, t, d = x_btd.shape
  loss_n = linear_cross_entropy(x_btd.reshape(b * t, d), w_dv, batch['targets'].reshape(b * t),
                                weights_n=batch['weights'].reshape(b * t), z_loss=args.z_loss,
                                vocab_size=args.vocab_size,
                                implementation='xla' if mesh_devices(x_btd) > 1 else None)
  return loss_n.reshape(b, t)


def per_token(x_btd: jax.Array, w_dv: jax.Array, batch: dict, args: Args) -> jax.Array:
  """The loss of `args` per token [B, T] (f32), by its record's implementation."""
  return record(args.name).implementations[args.implementation](x_btd, w_dv, batch, args)


RECORD = Record(implementations={'materialize': ce_materialize, 'chunked': ce_chunked, 'pallas': ce_pallas})
