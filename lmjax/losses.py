"""Losses on the head/loss seam: a named loss maps the model's final hidden states and head weight to a
per-token loss, `(x_btd, w_dv, batch, args) -> loss_bt` (f32); the train step weights and sums it.

The loss, not the model, makes the logits, so an implementation may avoid ever holding them whole
(Levanter's `activations()` + `get_lm_head()`, Cut Cross-Entropy, Liger's fused linear CE):

  materialize  logits [B, T, V] in f32, then the loss (the reference; 8.4 GB at 1b x B4 x T4096)
  chunked      a scan over chunks of positions, each computing its [B, c, V] block of logits and
               recomputing it in the backward pass (jax.checkpoint): at most one block is live
  pallas       pallas_kernels/linear_cross_entropy: head + loss fused (ce; kd with the forward
               divergence, its top-k path, `kd_pallas`), the gradients made in
               the forward pass (3 matmuls, no recompute, one block of logits live): a Pallas kernel on
               TPU, a fused XLA scan elsewhere. At 1b on an H200: 23.1 ms / 0.88 GB extra for the head
               fwd+bwd against materialize's 40.0 ms / 8.4 GB (benchmarks/RESULTS.md). Its weight
               gradient is exact for the train step's weighted sum of the per-token losses (the only
               cotangent a step gives it) and NaN for any other, never silently wrong.

Rows of w_dv at or past `Args.vocab_size` (the tokenizer's vocabulary; the model may pad its head to
a multiple of 128) are padding: their logits are masked to -inf, so they are never predicted.

Losses:
  ce  next-token cross-entropy (+ PaLM's z-loss)
  kd  knowledge distillation from a teacher's top-k next-token distribution, mixed with ce; the
      exact math is `kd_from_logits`'s docstring. The teacher comes as three batch fields (offline
      from a store, lmjax/distill/store.py, or online from a frozen teacher in the step,
      `teacher_topk_chunked`): teacher_ids [B, T, k] int32, teacher_logprobs [B, T, k] f32 (-inf =
      no mass), teacher_tail [B, T] f32 (optional).

config.loss: name (LOSSES), implementation, z_loss, chunk_tokens, kd (the distillation settings).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from lmjax import batch as batch_lib
from lmjax import errors

DIVERGENCES = ('forward', 'reverse')
TAILS = ('renormalize', 'bucket')
MODES = ('offline', 'online')
ENCODINGS = ('full', 'compact')
TAIL_FLOOR = 1e-9  # bucket: the teacher's tail mass is at least this (reverse KL stays finite)
_NEG = -1e30       # stands for -inf where a gradient must stay finite


def defaults() -> ml_collections.ConfigDict:
  """config.loss."""
  return ml_collections.ConfigDict(dict(
      name='ce',                   # one of LOSSES
      # materialize | chunked. Materialize is the default: faster at 1b on an H200 (46.7k vs 41.2k
      # tokens/s at B4 x T4096, benchmarks/RESULTS.md); chunked saves [tokens, vocab] f32 of memory.
      implementation='materialize',
      z_loss=0.0,                  # PaLM's z-loss coefficient (section 5): z * logsumexp^2 per token
      chunk_tokens=1024,           # chunked: tokens (batch rows x positions) per block of logits
      kd=dict(                     # name='kd' (docs/distillation.md)
          alpha=0.5,               # weight of the KD term; 1 - alpha weighs the hard-label CE
          temperature=1.0,         # teacher and student logits / T; the KD term is scaled by T^2
          divergence='forward',    # forward KL(teacher||student) | reverse KL(student||teacher)
          tail='renormalize',      # renormalize over the top-k (MaxText) | bucket: the rest is one outcome
          k=64,                    # teacher tokens kept per position
          teacher='',              # lmjax:DIR, the teacher run (its latest checkpoint)
          mode='offline',          # offline: read `store` | online: the teacher runs in the step
          store='',                # offline: the top-k store (python -m lmjax.distill.dump writes it)
          encoding='compact',      # full (int32 ids, f32 log-probs) | compact (packed ids, uint16)
      ),
  ))


@dataclasses.dataclass(frozen=True)
class Args:
  """Resolved loss settings (the step builder closes over them). `alpha` and `temperature` may be
  traced scalars inside a step (they change by phase: lmjax/phases.py)."""
  name: str
  implementation: str
  z_loss: float
  chunk_tokens: int
  vocab_size: int  # rows of w_dv that can be predicted (the tokenizer's vocabulary)
  alpha: float = 0.0
  temperature: float = 1.0
  divergence: str = 'forward'
  tail: str = 'renormalize'
  # The run's (alpha, temperature) pairs, one a phase (phases.kd_values): kd's pallas implementation
  # compiles its kernel for each and picks by the traced alpha and temperature of the step.
  kd_values: tuple = ()


def resolve(cfg: ml_collections.ConfigDict, vocab_size: int) -> Args:
  validate(cfg)
  kd = cfg.kd
  return Args(cfg.name, cfg.implementation, float(cfg.z_loss), int(cfg.chunk_tokens), int(vocab_size),
              float(kd.alpha), float(kd.temperature), kd.divergence, kd.tail)


def validate(cfg: ml_collections.ConfigDict) -> None:
  if cfg.name not in LOSSES:
    raise errors.ConfigError(f'config.loss.name={cfg.name!r}: expected one of {sorted(LOSSES)}')
  if cfg.implementation not in LOSSES[cfg.name]:
    raise errors.ConfigError(f'config.loss.implementation={cfg.implementation!r}: expected one of '
                             f'{sorted(LOSSES[cfg.name])} for loss {cfg.name!r}')
  if not cfg.z_loss >= 0:
    raise errors.ConfigError(f'config.loss.z_loss={cfg.z_loss!r}: expected a number >= 0')
  if not cfg.chunk_tokens >= 1:
    raise errors.ConfigError(f'config.loss.chunk_tokens={cfg.chunk_tokens!r}: expected a positive integer')
  kd = cfg.kd
  check_kd_scalars('config.loss.kd', kd.alpha, kd.temperature)
  for field, allowed in (('divergence', DIVERGENCES), ('tail', TAILS), ('mode', MODES),
                         ('encoding', ENCODINGS)):
    if kd[field] not in allowed:
      raise errors.ConfigError(f'config.loss.kd.{field}={kd[field]!r}: expected one of {allowed}')
  if not kd.k >= 1:
    raise errors.ConfigError(f'config.loss.kd.k={kd.k!r}: expected a positive integer')
  if cfg.name == 'kd' and cfg.implementation == 'pallas' and kd.divergence != 'forward':
    raise errors.ConfigError(f"config.loss.kd.divergence={kd.divergence!r}: the pallas implementation "
                             "computes the forward KL; use implementation='chunked' or 'materialize'")
  if cfg.name == 'kd' and not kd.teacher:
    raise errors.ConfigError("config.loss.kd.teacher='': loss 'kd' needs a teacher run (lmjax:DIR)")
  if cfg.name == 'kd' and kd.mode == 'offline' and not kd.store:
    raise errors.ConfigError("config.loss.kd.store='': offline distillation reads the teacher's top-k from a "
                             'store (python -m lmjax.distill.dump writes it); or set '
                             'config.loss.kd.mode=online')


def check_kd_scalars(field: str, alpha, temperature) -> None:
  if alpha is not None and not 0 <= alpha <= 1:
    raise errors.ConfigError(f'{field}.alpha={alpha!r}: expected a weight in [0, 1]')
  if temperature is not None and not temperature > 0:
    raise errors.ConfigError(f'{field}.temperature={temperature!r}: expected a number > 0')


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, z_loss: float = 0.0,
                  vocab_size: int | None = None) -> jax.Array:
  """Next-token cross-entropy -log softmax(logits)[target] per token, in f32, plus
  z_loss * logsumexp^2 (PaLM section 5: keeps the softmax normaliser near 1 for stability).
  Logits at or past `vocab_size` (padding rows of the head) are masked out."""
  logits = _mask_vocab(logits_btv.astype(jnp.float32), vocab_size)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return lse_bt - target_logit_bt + z_loss * jnp.square(lse_bt)


def _mask_vocab(logits_btv: jax.Array, vocab_size: int | None) -> jax.Array:
  if vocab_size is not None and vocab_size < logits_btv.shape[-1]:
    return jnp.where(jnp.arange(logits_btv.shape[-1]) < vocab_size, logits_btv, -jnp.inf)
  return logits_btv


def _in_ids(shape_btv: tuple, ids_btk: jax.Array, valid_btk: jax.Array) -> jax.Array:
  """[B, T, V] bool: v is one of the valid ids of its position."""
  b, t, _ = shape_btv
  bi = jnp.arange(b)[:, None, None]
  ti = jnp.arange(t)[None, :, None]
  return jnp.zeros(shape_btv, bool).at[bi, ti, ids_btk].max(valid_btk)


def _lse(a, mask, axis=-1):
  """logsumexp of `a` where `mask` (_NEG where nothing is), with finite gradients."""
  return jax.nn.logsumexp(jnp.where(mask, a, _NEG), axis=axis)


def kd_from_logits(logits_btv: jax.Array, batch: dict, args: Args) -> jax.Array:
  """Per-token distillation loss [B, T] from the student's logits and the teacher's top-k.

  Per position, with z the student logits (rows >= vocab_size masked out), the teacher's ids i_j,
  log-probabilities l_j (at temperature 1; -inf marks a slot without mass, so k may exceed the
  teacher's support) and tail mass r (`teacher_tail`; when absent r = max(0, 1 - sum_j exp l_j)).
  Valid slots J = {j : l_j > -inf} (their ids are distinct). Outcomes O:
    tail='renormalize'  O = J (MaxText: teacher and student renormalised over the top-k ids)
    tail='bucket'       O = J + {tail}: the tail is one outcome, every other vocabulary id; it
                        exists when some id is outside J; l_tail = log max(r, TAIL_FLOOR)
  Temperature T: teacher p_o = softmax_{o in O}(l_o / T); student s = z / T and
    renormalize  log q_j = s_{i_j} - logsumexp_{m in J} s_{i_m}
    bucket       log q_j = s_{i_j} - logsumexp_v s_v,  log q_tail = logsumexp_{v not in i_J} s_v - logsumexp_v s_v
  Divergence:
    forward  KD = sum_O p_o (log p_o - log q_o)   (soft cross-entropy minus the teacher's entropy:
             the same gradient as soft CE)
    reverse  KD = sum_O q_o (log q_o - log p_o)
  A position with no outcome (renormalize, every slot -inf: padding) has KD = 0.
  The loss (Hinton et al. 2015, "Distilling the knowledge in a neural network": T^2 keeps the
  soft term's gradient scale as T changes):
    loss = alpha * T^2 * KD + (1 - alpha) * (logsumexp_v z_v - z_target) + z_loss * (logsumexp_v z_v)^2
  """
  z = _mask_vocab(logits_btv.astype(jnp.float32), args.vocab_size)
  temperature, vocab = args.temperature, min(args.vocab_size, z.shape[-1])
  ids, lp = batch['teacher_ids'], batch['teacher_logprobs'].astype(jnp.float32)
  valid = lp > -jnp.inf
  lse_bt = jax.nn.logsumexp(z, axis=-1)
  ce_bt = lse_bt - jnp.take_along_axis(z, batch['targets'][..., None], axis=-1)[..., 0]
  s = z / temperature
  a = jnp.where(valid, lp, _NEG) / temperature
  if args.tail == 'renormalize':
    log_q, log_p, mask = _renormalized_outcomes(s, a, ids, valid)
  else:
    if 'teacher_tail' in batch:
      tail = batch['teacher_tail'].astype(jnp.float32)
    else:
      tail = jnp.clip(1 - jnp.sum(jnp.where(valid, jnp.exp(lp), 0.0), -1), 0.0, 1.0)
    log_q, log_p, mask = _bucket_outcomes(s, a, ids, valid, tail, temperature, vocab)
  log_q, log_p = jnp.where(mask, log_q, 0.0), jnp.where(mask, log_p, 0.0)
  if args.divergence == 'forward':
    terms = jnp.exp(log_p) * (log_p - log_q)
  else:
    terms = jnp.exp(log_q) * (log_q - log_p)
  kd_bt = jnp.sum(jnp.where(mask, terms, 0.0), -1)
  return (args.alpha * temperature ** 2 * kd_bt + (1 - args.alpha) * ce_bt
          + args.z_loss * jnp.square(lse_bt))


def _renormalized_outcomes(s_btv, a_btk, ids_btk, valid_btk):
  """(log q, log p, mask) [B, T, k] of kd_from_logits' tail='renormalize': both over the top-k."""
  s_ids = jnp.take_along_axis(s_btv, ids_btk, axis=-1)
  return (s_ids - _lse(s_ids, valid_btk)[..., None], a_btk - _lse(a_btk, valid_btk)[..., None],
          valid_btk)


def _bucket_outcomes(s_btv, a_btk, ids_btk, valid_btk, tail_bt, temperature, vocab: int):
  """(log q, log p, mask) [B, T, k + 1] of kd_from_logits' tail='bucket': the top-k and the tail."""
  s_lse = jax.nn.logsumexp(s_btv, axis=-1)
  s_ids = jnp.take_along_axis(s_btv, ids_btk, axis=-1)
  log_q_tail = _lse(s_btv, ~_in_ids(s_btv.shape, ids_btk, valid_btk)) - s_lse
  a_tail = jnp.log(jnp.maximum(tail_bt, TAIL_FLOOR)) / temperature
  a_all = jnp.concatenate([a_btk, a_tail[..., None]], -1)
  has_tail = jnp.sum(valid_btk, -1) < vocab
  mask = jnp.concatenate([valid_btk, has_tail[..., None]], -1)
  log_q = jnp.concatenate([s_ids - s_lse[..., None], log_q_tail[..., None]], -1)
  return log_q, a_all - _lse(a_all, mask)[..., None], mask


def logits(x_btd: jax.Array, w_dv: jax.Array) -> jax.Array:
  """x_btd @ w_dv in the hidden states' dtype (bf16 on accelerators), accumulated and returned in f32."""
  return jnp.einsum('btd,dv->btv', x_btd, w_dv.astype(x_btd.dtype), preferred_element_type=jnp.float32)


def _chunked(fn: Callable, x_btd, w_dv, fields: dict, chunk_tokens: int):
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
  """`ce_materialize` a block of positions at a time (`_chunked`)."""
  fn = lambda logits_bcv, f: cross_entropy(logits_bcv, f['targets'], args.z_loss, args.vocab_size)
  return _chunked(fn, x_btd, w_dv, {'targets': batch['targets']}, args.chunk_tokens)


def target_scores(x_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array,
                  args: Args) -> tuple[jax.Array, jax.Array]:
  """For scoring, not training: per token, -log p(target) [B, T] f32 (`cross_entropy` without
  z-loss, as ce_materialize computes it) and whether the target is the most likely of the first
  args.vocab_size tokens [B, T] bool (argmax: a tie goes to the lowest id). `materialize` holds the
  logits [B, T, V] whole; any other implementation takes a block of positions at a time (`_chunked`)."""
  def fn(logits_btv, f):
    z = _mask_vocab(logits_btv.astype(jnp.float32), args.vocab_size)
    return cross_entropy(z, f['targets']), jnp.argmax(z, axis=-1) == f['targets']
  if args.implementation == 'materialize':
    return fn(logits(x_btd, w_dv), {'targets': targets_bt})
  return _chunked(fn, x_btd, w_dv, {'targets': targets_bt}, args.chunk_tokens)


def _mesh_devices(x) -> int:
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
                                implementation='xla' if _mesh_devices(x_btd) > 1 else None)
  return loss_n.reshape(b, t)




def kd_materialize(x_btd, w_dv, batch, args: Args) -> jax.Array:
  return kd_from_logits(logits(x_btd, w_dv), batch, args)


def kd_chunked(x_btd, w_dv, batch, args: Args) -> jax.Array:
  """`kd_materialize` a block of positions at a time (`_chunked`): no [B, T, V] array is live."""
  fields = {k: batch[k] for k in ('targets', *batch_lib.TEACHER_FIELDS) if k in batch}
  return _chunked(lambda logits_bcv, f: kd_from_logits(logits_bcv, f, args), x_btd, w_dv, fields,
                  args.chunk_tokens)


def kd_pallas(x_btd, w_dv, batch, args: Args) -> jax.Array:
  """`kd_from_logits` by the fused head + loss kernel's top-k path (pallas_kernels/linear_cross_entropy:
  the teacher's ids and log-probs, and its `teacher_tail` for tail='bucket'): the same per-token loss and
  gradients, no [B, T, V] array (forward divergence only; `validate` refuses 'reverse'). The kernel takes
  alpha and temperature as constants; inside a step they are traced (they change by phase), so it is
  compiled for each distinct pair of `args.kd_values` and `lax.switch` picks the one equal to the step's. The kernel's
  weight gradient holds for a cotangent proportional to the weights (the train step's weighted sum) and
  is NaN for any other (ce_pallas)."""
  from pallas_kernels.linear_cross_entropy import linear_cross_entropy  # pylint: disable=import-outside-toplevel
  b, t, d = x_btd.shape
  k = batch['teacher_ids'].shape[-1]
  tail_n = batch['teacher_tail'].reshape(b * t) if args.tail == 'bucket' and 'teacher_tail' in batch else None

  def fused(alpha, temperature):
    return lambda: linear_cross_entropy(
        x_btd.reshape(b * t, d), w_dv, batch['targets'].reshape(b * t), weights_n=batch['weights'].reshape(b * t),
        z_loss=args.z_loss, vocab_size=args.vocab_size, teacher_ids_nk=batch['teacher_ids'].reshape(b * t, k),
        teacher_logprobs_nk=batch['teacher_logprobs'].reshape(b * t, k), teacher_tail_n=tail_n,
        tail=args.tail, temperature=temperature, alpha=alpha,
        implementation='xla' if _mesh_devices(x_btd) > 1 else None).reshape(b, t)

  if all(isinstance(v, (int, float)) for v in (args.alpha, args.temperature)):
    return fused(float(args.alpha), float(args.temperature))()
  if not args.kd_values:
    raise ValueError('kd_pallas with traced alpha and temperature needs Args.kd_values (steps.build sets them)')
  values = tuple(dict.fromkeys(args.kd_values))  # phases with the same values share a kernel
  gap = jnp.asarray([jnp.abs(args.alpha - a) + jnp.abs(args.temperature - tt) for a, tt in values])
  return jax.lax.switch(jnp.argmin(gap), [fused(a, tt) for a, tt in values])


def teacher_topk(logits_btv: jax.Array, k: int, vocab_size: int) -> dict:
  """The teacher's top-k of its logits [B, T, V]: teacher_ids [B, T, k] int32, teacher_logprobs
  [B, T, k] f32 (log-softmax at temperature 1 over the first `vocab_size` rows; -inf past them) and
  teacher_tail [B, T] f32, the mass outside the top-k (exp(logsumexp of the rest - logsumexp),
  exact where 1 - sum would cancel)."""
  z = _mask_vocab(logits_btv.astype(jnp.float32), vocab_size)
  lse_bt = jax.nn.logsumexp(z, axis=-1)
  top_btk, ids_btk = jax.lax.top_k(z, k)
  in_ids = _in_ids(z.shape, ids_btk, top_btk > -jnp.inf)
  rest_bt = jax.nn.logsumexp(jnp.where(in_ids, -jnp.inf, z), axis=-1)
  return {'teacher_ids': ids_btk.astype(jnp.int32), 'teacher_logprobs': top_btk - lse_bt[..., None],
          'teacher_tail': jnp.exp(rest_bt - lse_bt)}


def teacher_topk_chunked(x_btd, w_dv, k: int, vocab_size: int, chunk_tokens: int) -> dict:
  """`teacher_topk` of x_btd @ w_dv a block of positions at a time (no [B, T, V] array is live);
  no gradient flows back (the teacher is frozen)."""
  x_btd, w_dv = jax.lax.stop_gradient(x_btd), jax.lax.stop_gradient(w_dv)
  return _chunked(lambda logits_bcv, _: teacher_topk(logits_bcv, k, vocab_size), x_btd, w_dv, {},
                  chunk_tokens)


# name -> implementation -> fn(x_btd, w_dv, batch, args) -> loss_bt
LOSSES: dict[str, dict[str, Callable]] = {
    'ce': {'materialize': ce_materialize, 'chunked': ce_chunked, 'pallas': ce_pallas},
    'kd': {'materialize': kd_materialize, 'chunked': kd_chunked, 'pallas': kd_pallas},
}


def per_token(x_btd: jax.Array, w_dv: jax.Array, batch: dict, args: Args) -> jax.Array:
  """The configured loss per token [B, T] (f32)."""
  return LOSSES[args.name][args.implementation](x_btd, w_dv, batch, args)
