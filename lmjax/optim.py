"""Optimizer and learning-rate schedule: an optax chain and a phase-joined schedule, both built from config.

Optimizer (per trainable leaf): clip by global norm -> AdamW (weight-decay mask, layer-wise LR scale).
Frozen leaves (path patterns) go through `optax.set_to_zero` via `optax.multi_transform`, so they get zero
updates and no Adam moments.

AdamW is optax.adamw followed by the layer-wise scale, or, with `config.optim.moments_dtype='bfloat16'`,
`fused_adamw`: one elementwise function per leaf (moments, bias correction, decoupled weight decay, LR
and layer scale) that computes what the optax chain computes, in the same order, and stores m and v in
bf16 (half the optimizer state); the math stays f32 and the params (the f32 master copy) are untouched by it. bf16 moments are
rounded to nearest (no stochastic rounding): a decay step `(1 - b) * m` smaller than half a bf16 ulp
(2**-8 relative at worst) would round back to m and the moment would never decay, so b1 and b2 must be
at most 1 - 2**-8 (b2=0.95, the default, moves v by 5% a step; b2=0.999 does not fit).
Measured on an H100 (2026-12-07), clip + AdamW + apply on the `1b` tree (1.24B f32 params): 13.9 ms
with f32 moments, the same as optax.adamw's chain (XLA fuses both down to the byte floor: 32 B/param,
reading g for the norm and again with m, v, p, and writing m, v, p, at ~2.85 TB/s), and 10.4 ms with
bf16 moments (24 B/param at the same rate). The fusion alone gains nothing, so f32 moments keep
optax's AdamW and its state, which every earlier checkpoint holds.

Schedule: the phases of `config.phases` (lmjax/phases.py), one after another. Each phase, of length P
steps, is: linear warmup `init -> peak` over W steps, then `peak` for S steps, then a decay
`peak -> end` over D steps (W + S + D = P; all LR values are fractions of the peak LR):
  constant                                D = 0 (stays at `peak` after warmup)
  linear | cosine | exponential | 1-sqrt  S = 0, decay of that form (an anneal: peak=0.1, end=0)
  wsd                                     D = round(decay_fraction * P), decay form `decay`
                                          (warmup-stable-decay: Hu et al. 2024, MiniCPM;
                                          1-sqrt: Hägele et al. 2024)
Re-warmup for continued pretraining is a phase whose warmup starts from `init` (e.g. the previous
phase's `end`) back to `peak`.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmjax import errors
from lmjax import phases as phases_lib


def defaults() -> ml_collections.ConfigDict:
  """config.optim: AdamW hyper-parameters, clipping, weight-decay mask, freezing, layer-wise LR."""
  return ml_collections.ConfigDict(dict(
      lr=3e-4,                # peak learning rate; the phases' lr shapes scale it
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,          # global-norm clipping; None or 0 disables
      # A leaf gets no weight decay when any component of its path contains one of these strings.
      weight_decay_exclude=('norm', 'bias', 'embed'),
      # Regexes (re.fullmatch) on '/'-joined paths ('embed/.*', 'layers/attn/.*'); matches get no update.
      freeze=(),
      # gamma: layer l of L scaled by gamma**(L-1-l), embeddings by gamma**L, the rest by 1; 1.0 disables.
      layerwise_lr_decay=1.0,
      # Storage of Adam's m and v: 'float32' | 'bfloat16' (half the state; math in f32, round to nearest).
      moments_dtype='float32',
  ))


MOMENTS_DTYPES = ('float32', 'bfloat16')
# bf16 keeps 8 significant bits: (1 - b) * m below half an ulp (2**-9..2**-8 of m) rounds back to m.
BF16_MAX_BETA = 1 - 2 ** -8


def validate(optim_cfg) -> None:
  """Checks config.optim's values (make_optimizer calls it too); raises errors.ConfigError naming the
  field."""
  c = optim_cfg
  for k in ('b1', 'b2'):
    if not 0.0 <= c[k] < 1.0:
      raise errors.ConfigError(f'config.optim.{k}={c[k]!r}: expected a number in [0.0, 1.0)')
  if not c.eps > 0:
    raise errors.ConfigError(f'config.optim.eps={c.eps!r}: expected a number > 0')
  if not c.weight_decay >= 0:
    raise errors.ConfigError(f'config.optim.weight_decay={c.weight_decay!r}: expected a number >= 0')
  if c.clip_norm is not None and not c.clip_norm >= 0:
    raise errors.ConfigError(f'config.optim.clip_norm={c.clip_norm!r}: expected None, 0 (off) or a number '
                             '> 0')
  if not 0 < c.layerwise_lr_decay <= 1:
    raise errors.ConfigError(f'config.optim.layerwise_lr_decay={c.layerwise_lr_decay!r}: expected a number '
                             'in (0, 1]')
  if c.moments_dtype not in MOMENTS_DTYPES:
    raise errors.ConfigError(f'config.optim.moments_dtype={c.moments_dtype!r}: expected one of '
                             f'{MOMENTS_DTYPES}')
  if c.moments_dtype == 'bfloat16':
    for k in ('b1', 'b2'):
      if c[k] > BF16_MAX_BETA:
        raise errors.ConfigError(
            f"config.optim.{k}={c[k]!r} with config.optim.moments_dtype='bfloat16': expected {k} <= "
            f'1 - 2**-8 (~{BF16_MAX_BETA:.4f}); a smaller step (1 - {k}) * m rounds back to m in bf16 and '
            "the moment never decays (use moments_dtype='float32')")


# ---------------------------------------------------------------------------------------------- schedule


def _check_fraction(field: str, value) -> float:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
    raise errors.ConfigError(f'{field}={value!r}: expected a number in [0, 1]')
  return float(value)


def _check_steps(field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise errors.ConfigError(f'{field}={value!r}: expected an integer >= 0')
  return int(value)


def _decay(form: str, u, peak: float, end: float):
  """LR fraction at decay progress u in [0, 1], from `peak` (u=0) to `end` (u=1)."""
  if form == 'linear':
    return peak + (end - peak) * u
  if form == 'cosine':
    return end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * u))
  if form == 'exponential':
    return peak * (end / peak) ** u
  return end + (peak - end) * (1.0 - jnp.sqrt(u))  # 1-sqrt


def _phase_schedule(phase: phases_lib.Phase, peak_lr: float) -> optax.Schedule:
  """Validates the phase's `lr` and returns its schedule of the step within the phase."""
  field, p, length = f'config.phases.{phase.name}.lr', phase.lr, phase.steps
  shape = p['shape']
  if shape not in phases_lib.SHAPES:
    raise errors.ConfigError(f'{field}.shape={shape!r}: expected one of {phases_lib.SHAPES}')
  if p['decay'] not in phases_lib.DECAY_FORMS:
    raise errors.ConfigError(f'{field}.decay={p["decay"]!r}: expected one of {phases_lib.DECAY_FORMS}')
  init, peak, end = (_check_fraction(f'{field}.{k}', p[k]) for k in ('init', 'peak', 'end'))
  # warmup_steps, when set, wins over warmup_fraction (as a phase's steps win over its fraction).
  if p['warmup_steps'] is not None:
    warmup = _check_steps(f'{field}.warmup_steps', p['warmup_steps'])
  else:
    warmup = round(_check_fraction(f'{field}.warmup_fraction', p['warmup_fraction'] or 0.0) * length)
  if warmup > length:
    raise errors.ConfigError(f'{field}.warmup_steps={warmup}: expected at most the phase length {length}')
  form = shape
  if shape == 'constant':
    decay = 0
  elif shape == 'wsd':
    decay = round(_check_fraction(f'{field}.decay_fraction', p['decay_fraction']) * length)
    form = p['decay']
    if warmup + decay > length:
      raise errors.ConfigError(f'{field}: warmup ({warmup}) + decay ({decay}) steps exceed the phase length '
                               f'{length}')
  else:
    decay = length - warmup
  if form == 'exponential' and decay and (peak == 0 or end == 0):
    raise errors.ConfigError(f'{field}: exponential decay needs peak > 0 and end > 0, got peak={peak}, '
                             f'end={end}')
  decay_start = length - decay

  def schedule(step):
    t = jnp.asarray(step).astype(jnp.float32)
    warm = init + (peak - init) * t / max(warmup, 1)
    lr = jnp.where(t < warmup, warm, peak)
    if decay:
      u = jnp.clip((t - decay_start) / decay, 0.0, 1.0)
      lr = jnp.where(t < decay_start, lr, _decay(form, u, peak, end))
    return (peak_lr * lr).astype(jnp.float32)

  return schedule


def make_schedule(phases: Sequence[phases_lib.Phase], peak_lr: float) -> optax.Schedule:
  """Returns step -> LR (f32): the phases' shapes joined (see the module docstring).

  Past the last phase its value at its end holds.
  """
  if isinstance(peak_lr, bool) or not isinstance(peak_lr, (int, float)) or not peak_lr >= 0:
    raise errors.ConfigError(f'config.optim.lr={peak_lr!r}: expected a number >= 0')
  schedules = [_phase_schedule(p, float(peak_lr)) for p in phases]
  # Zero-length phases are validated above but never reached.
  kept = [(s, p.steps) for s, p in zip(schedules, phases) if p.steps > 0]
  boundaries = np.cumsum([n for _, n in kept])[:-1].tolist()
  return optax.join_schedules([s for s, _ in kept], boundaries)


# --------------------------------------------------------------------------------------------- optimizer


def _path(key_path) -> str:
  """'/'-joined path of a tree_map_with_path key path ('layers/attn/q/kernel'); int keys become digits."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in key_path)


def _decayed(exclude):
  """path -> True where weight decay applies (no component of the '/'-path contains an excluded string)."""
  return lambda path: not any(s in c for c in path.split('/') for s in exclude)


def _layer_scale(gamma: float, num_layers: int):
  """(path, leaf) -> its LR factor: under 'layers' (layer axis 0) gamma**(L-1-l), under 'embed' gamma**L,
  else None (1).

  Layer-wise LR decay as in ELECTRA / BEiT fine-tuning: layers near the input move least.
  """
  layer_scale = gamma ** (num_layers - 1 - np.arange(num_layers))

  def scale(path, u):
    top = path.split('/')[0]
    if top == 'layers':
      return jnp.asarray(layer_scale, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    if top.startswith('embed'):
      return jnp.asarray(gamma ** num_layers, u.dtype)
    return None

  return scale


class AdamWState(NamedTuple):
  """count: steps taken (int32 []); mu, nu: Adam's first and second moments, the params' shapes, in
  config.optim.moments_dtype."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def fused_adamw(schedule: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                decayed=lambda path: True, lr_scale=None, moments_dtype='float32') -> optax.GradientTransformation:
  """AdamW as one elementwise function per leaf (path: '/'-joined, as `_path`):

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g**2          (f32, stored in moments_dtype)
    u = -lr(t) [(m / (1 - b1**(t+1))) / (sqrt(v / (1 - b2**(t+1))) + eps) + wd p] * lr_scale(path)

  with `wd p` only where `decayed(path)`, t the step count and lr_scale(path, u) an array broadcasting
  against the leaf or None (no scale; so is lr_scale=None). The same operations in the same order as optax.adamw (scale_by_adam ->
  add_decayed_weights(mask) -> scale_by_learning_rate) followed by a scale, so with f32 moments it
  equals that chain to the bit on CPU. One function a leaf states the kernel we want (read g, m, v, p;
  write m, v, u; XLA fuses the apply into it) rather than leaving it to XLA to fuse four tree maps,
  and holds the moments in their own dtype. This step's update uses the f32 moments; only their
  stored copy is rounded (to nearest) to moments_dtype.
  """
  dtype = jnp.dtype(moments_dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, dtype)
    return AdamWState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                      nu=jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    if weight_decay and params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    count = optax.safe_increment(state.count)
    step_size = -schedule(state.count)
    c1, c2 = 1 - b1 ** count, 1 - b2 ** count  # f32 scalars: b**count in f32, as optax does

    def leaf(key_path, grad, m, v, p):
      path = _path(key_path)
      g = grad.astype(jnp.float32)
      m = (1 - b1) * g + b1 * m.astype(jnp.float32)
      v = (1 - b2) * g ** 2 + b2 * v.astype(jnp.float32)
      u = (m / c1) / (jnp.sqrt(v / c2) + eps)
      if weight_decay and decayed(path):
        u = u + weight_decay * p.astype(jnp.float32)
      u = step_size * u
      scale = lr_scale(path, u) if lr_scale is not None else None
      if scale is not None:
        u = u * scale
      return u.astype(grad.dtype), m.astype(dtype), v.astype(dtype)

    # Without weight decay the params are not read: the grads stand in for them.
    out = jax.tree_util.tree_map_with_path(leaf, grads, state.mu, state.nu,
                                           grads if params is None else params)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
    return pick(0), AdamWState(count=count, mu=pick(1), nu=pick(2))

  return optax.GradientTransformation(init, update)


def _compile_patterns(field: str, patterns, paths: list[str]) -> list[re.Pattern]:
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise errors.ConfigError(f'{field} pattern {p!r}: not a valid regex ({e})') from None
    if not any(out[-1].fullmatch(path) for path in paths):
      raise errors.ConfigError(f'{field} pattern {p!r} matches no parameter path; paths are {paths}')
  return out


def _phase_freeze(phases: Sequence[phases_lib.Phase], params) -> optax.GradientTransformation:
  """Zeroes the leaves frozen in the current phase (`phase.freeze`), by the optimizer's step count.

  The chain applies it first (frozen gradients do not move Adam's moments) and last (AdamW's decoupled
  weight decay does not move a frozen parameter either)."""
  paths = [_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
  starts = jnp.asarray([p.start for p in phases])
  masks = []
  for p in phases:
    patterns = _compile_patterns(f'config.phases.{p.name}.freeze', p.freeze, paths)
    masks.append(jax.tree_util.tree_map_with_path(
        lambda kp, _: any(r.fullmatch(_path(kp)) for r in patterns), params))
  frozen_by_phase = jax.tree.map(lambda *m: jnp.asarray(m), *masks)  # leaf -> [phases] bool

  def init(_):
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    phase = jnp.searchsorted(starts, state.count, side='right') - 1
    updates = jax.tree.map(lambda u, f: jnp.where(f[phase], jnp.zeros_like(u), u), updates, frozen_by_phase)
    return updates, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def _adamw(c, schedule: optax.Schedule, decayed, lr_scale, fused: bool) -> list:
  """AdamW with the weight-decay mask and the layer-wise LR: `fused_adamw`, or optax.adamw followed by
  the scale. The fused one holds bf16 moments; with f32 moments both take the same time on an H100
  (module docstring), so optax's stays the default: its state is every earlier checkpoint's."""
  if fused:
    return [fused_adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                        decayed=decayed, lr_scale=lr_scale, moments_dtype=c.moments_dtype)]
  mask = lambda tree: jax.tree_util.tree_map_with_path(lambda kp, _: decayed(_path(kp)), tree)
  chain = [optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)]
  if lr_scale is not None:
    def scale(key_path, u):
      factor = lr_scale(_path(key_path), u)
      return u if factor is None else u * factor
    chain.append(optax.stateless(lambda updates, _: jax.tree_util.tree_map_with_path(scale, updates)))
  return chain


def make_optimizer(optim_cfg, schedule: optax.Schedule, params, phases: Sequence[phases_lib.Phase] = (),
                   fused: bool = False) -> optax.GradientTransformation:
  """The optax transformation for `params` (nested dict of arrays; stacked 'layers') and an LR schedule;
  `phases` with a `freeze` add progressive unfreezing. AdamW is `fused_adamw` when `fused` or
  config.optim.moments_dtype is bfloat16, else optax.adamw (`_adamw`)."""
  c = optim_cfg
  validate(c)
  progressive = any(p.freeze for p in phases)
  chain = [_phase_freeze(phases, params)] if progressive else []
  if c.clip_norm:
    chain.append(optax.clip_by_global_norm(c.clip_norm))
  lr_scale = None
  if c.layerwise_lr_decay != 1:
    if 'layers' not in params:
      raise ValueError('optim.layerwise_lr_decay: expected params with a stacked "layers" subtree')
    num_layers = jax.tree_util.tree_leaves(params['layers'])[0].shape[0]
    lr_scale = _layer_scale(float(c.layerwise_lr_decay), num_layers)
  fused = fused or c.moments_dtype != 'float32'
  chain += _adamw(c, schedule, _decayed(tuple(c.weight_decay_exclude)), lr_scale, fused)
  if progressive:
    chain.append(_phase_freeze(phases, params))
  tx = optax.chain(*chain)

  if c.freeze:
    paths = [_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    patterns = _compile_patterns('config.optim.freeze', c.freeze, paths)
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: 'frozen' if any(r.fullmatch(_path(kp)) for r in patterns) else 'trained', params)
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx
