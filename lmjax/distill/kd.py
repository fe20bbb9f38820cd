"""The distillation loss, `config.loss.name='kd'`: its record (lmjax.losses.Record), its settings block
`config.loss.kd`, its math and what it takes from the run.

The teacher's top-k next-token distribution comes as three batch fields (BATCH_FIELDS): offline from a
store (lmjax/distill/store.py; `attach` wraps the data iterator, which adds them to every batch), or
online from the frozen teacher inside the train step (`attach` gives the step its params as an extra
argument and `teacher_topk_chunked` of each micro-batch). Alpha and temperature change by phase
(`config.phases.<name>.kd`, lmjax/phases.py): `at_step` sets those of the step's phase.

The exact loss is `kd_from_logits`'s docstring; `kd_materialize`, `kd_chunked` and `kd_pallas` (the fused
head + loss kernel's top-k path, forward divergence only) compute it with the head (lmjax/losses.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmjax import errors, losses, model, phases as phases_lib, steps as steps_lib
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.distill import store as store_lib, teacher as teacher_lib

DIVERGENCES = ('forward', 'reverse')
TAILS = ('renormalize', 'bucket')
MODES = ('offline', 'online')
ENCODINGS = ('full', 'compact')
TAIL_FLOOR = 1e-9  # bucket: the teacher's tail mass is at least this (reverse KL stays finite)
_NEG = -1e30       # stands for -inf where a gradient must stay finite

# The teacher's top-k, per row ('K' is config.loss.kd.k; lmjax/batch.py has the batch's own fields).
BATCH_FIELDS = {
    'teacher_ids': (np.dtype(np.int32), ('B', 'T', 'K')),       # its k most likely next tokens, most likely first
    'teacher_logprobs': (np.dtype(np.float32), ('B', 'T', 'K')),  # their log-probabilities (-inf: no mass)
    'teacher_tail': (np.dtype(np.float32), ('B', 'T')),           # its probability of every other token
}


def defaults() -> ml_collections.ConfigDict:
  """config.loss.kd (docs/distillation.md)."""
  return ml_collections.ConfigDict(dict(
      alpha=0.5,               # weight of the KD term; 1 - alpha weighs the hard-label CE
      temperature=1.0,         # teacher and student logits / T; the KD term is scaled by T^2
      divergence='forward',    # forward KL(teacher||student) | reverse KL(student||teacher)
      tail='renormalize',      # renormalize over the top-k (MaxText) | bucket: the rest is one outcome
      k=64,                    # teacher tokens kept per position
      teacher='',              # lmjax:DIR, the teacher run (its latest checkpoint)
      mode='offline',          # offline: read `store` | online: the teacher runs in the step
      store='',                # offline: the top-k store (python -m lmjax.distill.dump writes it)
      encoding='compact',      # full (int32 ids, f32 log-probs) | compact (packed ids, uint16)
  ))


def validate(loss_cfg: ml_collections.ConfigDict) -> None:
  """config.loss with name='kd'."""
  kd = loss_cfg.get('kd')
  if kd is None:
    raise errors.ConfigError("config.loss.kd: loss 'kd' needs its settings block (lmjax.distill.kd.defaults())")
  phases_lib.check_kd_scalars('config.loss.kd', kd.alpha, kd.temperature)
  for field, allowed in (('divergence', DIVERGENCES), ('tail', TAILS), ('mode', MODES),
                         ('encoding', ENCODINGS)):
    if kd[field] not in allowed:
      raise errors.ConfigError(f'config.loss.kd.{field}={kd[field]!r}: expected one of {allowed}')
  if not kd.k >= 1:
    raise errors.ConfigError(f'config.loss.kd.k={kd.k!r}: expected a positive integer')
  if loss_cfg.implementation == 'pallas' and kd.divergence != 'forward':
    raise errors.ConfigError(f"config.loss.kd.divergence={kd.divergence!r}: the pallas implementation "
                             "computes the forward KL; use implementation='chunked' or 'materialize'")
  if not kd.teacher:
    raise errors.ConfigError("config.loss.kd.teacher='': loss 'kd' needs a teacher run (lmjax:DIR)")
  if kd.mode == 'offline' and not kd.store:
    raise errors.ConfigError("config.loss.kd.store='': offline distillation reads the teacher's top-k from a "
                             'store (python -m lmjax.distill.dump writes it); or set '
                             'config.loss.kd.mode=online')


@dataclasses.dataclass(frozen=True)
class Options:
  """KD's resolved settings (lmjax.losses.Args.options). Inside a step `alpha` and `temperature` are
  traced scalars, those of the step's phase, and `pair` indexes them in `pairs` (`at_step`)."""
  alpha: float | jax.Array = 0.5
  temperature: float | jax.Array = 1.0
  divergence: str = 'forward'
  tail: str = 'renormalize'
  pairs: tuple[tuple[float, float], ...] = ()   # the run's distinct (alpha, temperature), phase order
  phase_pairs: tuple[int, ...] = ()             # each phase with steps: its index into `pairs`
  phase_starts: tuple[int, ...] = ()            # each phase with steps: its first step (0-based)
  pair: int | jax.Array | None = None


def options(loss_cfg: ml_collections.ConfigDict, phases) -> Options:
  """The run's KD settings; each phase's alpha and temperature are its own `kd` or config.loss.kd's."""
  kd = loss_cfg.kd
  live = [p for p in phases if p.steps]
  values = [(float(kd.alpha if p.kd['alpha'] is None else p.kd['alpha']),
             float(kd.temperature if p.kd['temperature'] is None else p.kd['temperature'])) for p in live]
  pairs = tuple(dict.fromkeys(values))
  return Options(float(kd.alpha), float(kd.temperature), kd.divergence, kd.tail, pairs,
                 tuple(pairs.index(v) for v in values), tuple(p.start for p in live))


def at_step(args: losses.Args, step: jax.Array) -> losses.Args:
  """The args of train step `step` (0-based): alpha and temperature of the phase it is in."""
  o = args.options
  phase = jnp.searchsorted(jnp.asarray(o.phase_starts[1:], jnp.int32), step, side='right')
  pair = jnp.asarray(o.phase_pairs, jnp.int32)[phase]
  table = jnp.asarray(o.pairs, jnp.float32)
  return dataclasses.replace(args, options=dataclasses.replace(
      o, alpha=table[pair, 0], temperature=table[pair, 1], pair=pair))


# ----------------------------------------------------------------------------- the math


def _in_ids(shape_btv: tuple, ids_btk: jax.Array, valid_btk: jax.Array) -> jax.Array:
  """[B, T, V] bool: v is one of the valid ids of its position."""
  b, t, _ = shape_btv
  bi = jnp.arange(b)[:, None, None]
  ti = jnp.arange(t)[None, :, None]
  return jnp.zeros(shape_btv, bool).at[bi, ti, ids_btk].max(valid_btk)


def _lse(a, mask, axis=-1):
  """logsumexp of `a` where `mask` (_NEG where nothing is), with finite gradients."""
  return jax.nn.logsumexp(jnp.where(mask, a, _NEG), axis=axis)


def kd_from_logits(logits_btv: jax.Array, batch: dict, args: losses.Args) -> jax.Array:
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
  (alpha, T, the divergence and the tail are args.options').
  """
  o = args.options
  z = losses.mask_vocab(logits_btv.astype(jnp.float32), args.vocab_size)
  temperature, vocab = o.temperature, min(args.vocab_size, z.shape[-1])
  ids, lp = batch['teacher_ids'], batch['teacher_logprobs'].astype(jnp.float32)
  valid = lp > -jnp.inf
  lse_bt = jax.nn.logsumexp(z, axis=-1)
  ce_bt = lse_bt - jnp.take_along_axis(z, batch['targets'][..., None], axis=-1)[..., 0]
  s = z / temperature
  a = jnp.where(valid, lp, _NEG) / temperature
  if o.tail == 'renormalize':
    log_q, log_p, mask = _renormalized_outcomes(s, a, ids, valid)
  else:
    if 'teacher_tail' in batch:
      tail = batch['teacher_tail'].astype(jnp.float32)
    else:
      tail = jnp.clip(1 - jnp.sum(jnp.where(valid, jnp.exp(lp), 0.0), -1), 0.0, 1.0)
    log_q, log_p, mask = _bucket_outcomes(s, a, ids, valid, tail, temperature, vocab)
  log_q, log_p = jnp.where(mask, log_q, 0.0), jnp.where(mask, log_p, 0.0)
  if o.divergence == 'forward':
    terms = jnp.exp(log_p) * (log_p - log_q)
  else:
    terms = jnp.exp(log_q) * (log_q - log_p)
  kd_bt = jnp.sum(jnp.where(mask, terms, 0.0), -1)
  return o.alpha * temperature ** 2 * kd_bt + (1 - o.alpha) * ce_bt + args.z_loss * jnp.square(lse_bt)


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


def kd_materialize(x_btd, w_dv, batch, args: losses.Args) -> jax.Array:
  return kd_from_logits(losses.logits(x_btd, w_dv), batch, args)


def kd_chunked(x_btd, w_dv, batch, args: losses.Args) -> jax.Array:
  """`kd_materialize` a block of positions at a time (`losses.chunked`): no [B, T, V] array is live."""
  fields = {k: batch[k] for k in ('targets', *BATCH_FIELDS) if k in batch}
  return losses.chunked(lambda logits_bcv, f: kd_from_logits(logits_bcv, f, args), x_btd, w_dv, fields,
                        args.chunk_tokens)


def kd_pallas(x_btd, w_dv, batch, args: losses.Args) -> jax.Array:
  """`kd_from_logits` by the fused head + loss kernel's top-k path (pallas_kernels/linear_cross_entropy:
  the teacher's ids and log-probs, and its `teacher_tail` for tail='bucket'): the same per-token loss and
  gradients, no [B, T, V] array (forward divergence only; `validate` refuses 'reverse'). The kernel takes
  alpha and temperature as constants; inside a step they are traced (they change by phase), so it is
  compiled for each of the run's distinct pairs (Options.pairs) and `lax.switch` runs the step's
  (Options.pair). The kernel's weight gradient holds for a cotangent proportional to the weights (the
  train step's weighted sum) and is NaN for any other (losses.ce_pallas)."""
  from pallas_kernels.linear_cross_entropy import linear_cross_entropy  # pylint: disable=import-outside-toplevel
  o = args.options
  b, t, d = x_btd.shape
  k = batch['teacher_ids'].shape[-1]
  tail_n = batch['teacher_tail'].reshape(b * t) if o.tail == 'bucket' and 'teacher_tail' in batch else None

  def fused(alpha, temperature):
    return lambda: linear_cross_entropy(
        x_btd.reshape(b * t, d), w_dv, batch['targets'].reshape(b * t), weights_n=batch['weights'].reshape(b * t),
        z_loss=args.z_loss, vocab_size=args.vocab_size, teacher_ids_nk=batch['teacher_ids'].reshape(b * t, k),
        teacher_logprobs_nk=batch['teacher_logprobs'].reshape(b * t, k), teacher_tail_n=tail_n,
        tail=o.tail, temperature=temperature, alpha=alpha,
        implementation='xla' if losses.mesh_devices(x_btd) > 1 else None).reshape(b, t)

  if o.pair is None:
    return fused(float(o.alpha), float(o.temperature))()
  return jax.lax.switch(o.pair, [fused(a, tt) for a, tt in o.pairs])


def teacher_topk(logits_btv: jax.Array, k: int, vocab_size: int) -> dict:
  """The teacher's top-k of its logits [B, T, V]: teacher_ids [B, T, k] int32, teacher_logprobs
  [B, T, k] f32 (log-softmax at temperature 1 over the first `vocab_size` rows; -inf past them) and
  teacher_tail [B, T] f32, the mass outside the top-k (exp(logsumexp of the rest - logsumexp),
  exact where 1 - sum would cancel)."""
  z = losses.mask_vocab(logits_btv.astype(jnp.float32), vocab_size)
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
  return losses.chunked(lambda logits_bcv, _: teacher_topk(logits_bcv, k, vocab_size), x_btd, w_dv, {},
                        chunk_tokens)


# ----------------------------------------------------------------------------- what it takes from the run


def tokenizer(loss_cfg: ml_collections.ConfigDict, chosen: str) -> str:
  """The run's tokenizer: the teacher's, which a chosen one ('' = none) must equal (an error names both)."""
  teacher = teacher_lib.tokenizer_path(loss_cfg.kd.teacher)
  if chosen:
    teacher_lib.check_tokenizer(teacher, chosen)
  return chosen or teacher


def attach(ctx: losses.Context) -> losses.Needs:
  """Online: the teacher's params as the train step's extra argument (sharded like the student's, by
  the same logical axes) and its top-k made in the step. Offline: the store's top-k added to each
  batch by the data iterator, after checking the store was dumped for this run's teacher, k,
  tokenizer and data stream."""
  kd = ctx.loss.kd
  k = int(kd.k)
  if kd.mode == 'online':
    teacher_dir = teacher_lib.directory(kd.teacher)
    args = teacher_lib.model_args(teacher_dir)
    steps_lib.check_vocab(args, ctx.vocab_size, ctx.tokenizer_path)
    graphdef, abstract = teacher_lib.abstract(args, ctx.mesh)

    def in_step(teacher_params, batch, loss_args: losses.Args) -> dict:
      x_btd, w_dv = model.hidden_and_head(graphdef, teacher_params, batch)  # top-k: no gradient
      return teacher_topk_chunked(x_btd, w_dv, k, loss_args.vocab_size, loss_args.chunk_tokens)

    return losses.Needs(step_arg=abstract, in_step=in_step,
                        load=lambda: teacher_lib.load_params(teacher_dir, args, ctx.mesh))
  fields = {name: (dtype, tuple(k if a == 'K' else a for a in axes))
            for name, (dtype, axes) in BATCH_FIELDS.items()}
  return losses.Needs(batch_fields=fields, wrap=lambda data_iter, pipeline, start_step: _with_store(
      kd, ctx.batch_size, pipeline, data_iter, start_step))


def _with_store(kd: ml_collections.ConfigDict, batch_size: int, pipeline, data_iter,
                start_step: int) -> store_lib.WithTeacher:
  """data_iter with the store's top-k added (config.loss.kd.store), once the store is checked."""
  store = store_lib.Store.open(kd.store)
  store_lib.check_stream(store, pipeline)
  if store.meta.get('teacher') != kd.teacher:
    raise errors.ConfigError(f'config.loss.kd.store={kd.store!r} holds the top-k of teacher '
                             f'{store.meta.get("teacher")!r}; the run has config.loss.kd.teacher={kd.teacher!r}')
  digest = tokenizer_lib.digest(pipeline.tokenizer.path)
  if store.k != kd.k or store.tokenizer_digest() != digest:
    raise errors.ConfigError(f'config.loss.kd.store={kd.store!r} holds k={store.k} for the tokenizer with digest '
                             f'{store.meta["tokenizer_digest"]}; the run has config.loss.kd.k={kd.k} and '
                             f'{pipeline.tokenizer.path} ({digest})')
  return store_lib.WithTeacher(data_iter, store, batch_size, pipeline.row_offset, start_step)


RECORD = losses.Record(
    implementations={'materialize': kd_materialize, 'chunked': kd_chunked, 'pallas': kd_pallas},
    defaults=defaults, validate=validate, options=options, at_step=at_step, tokenizer=tokenizer,
    attach=attach)
