"""Optimizer and learning-rate schedule: an optax chain and a phase-joined schedule, both built from config.

Optimizer (per trainable leaf): clip by global norm -> AdamW (weight-decay mask) -> layer-wise LR scale.
Frozen leaves (path patterns) go through `optax.set_to_zero` via `optax.multi_transform`, so they get zero
updates and no Adam moments.

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
from typing import Sequence

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
  ))


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


def _decay_mask(exclude):
  """Mask function: True where weight decay applies (no path component contains an excluded string)."""
  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: not any(s in c for c in _path(kp).split('/') for s in exclude), params)
  return mask


def _layerwise_scale(gamma: float, num_layers: int) -> optax.GradientTransformation:
  """Scales updates: leaf under 'layers' (layer axis 0) by gamma**(L-1-l), under 'embed' by gamma**L.

  Layer-wise LR decay as in ELECTRA / BEiT fine-tuning: layers near the input move least.
  """
  layer_scale = gamma ** (num_layers - 1 - np.arange(num_layers))

  def scale(key_path, u):
    top = _path(key_path).split('/')[0]
    if top == 'layers':
      return u * jnp.asarray(layer_scale, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    if top.startswith('embed'):
      return u * jnp.asarray(gamma ** num_layers, u.dtype)
    return u

  return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(scale, updates))


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


def make_optimizer(optim_cfg, schedule: optax.Schedule, params,
                   phases: Sequence[phases_lib.Phase] = ()) -> optax.GradientTransformation:
  """The optax transformation for `params` (nested dict of arrays; stacked 'layers') and an LR schedule;
  `phases` with a `freeze` add progressive unfreezing."""
  c = optim_cfg
  for k, lo, hi in (('b1', 0.0, 1.0), ('b2', 0.0, 1.0)):
    if not lo <= c[k] < hi:
      raise errors.ConfigError(f'optim.{k}={c[k]!r}: expected a number in [{lo}, {hi})')
  if not c.eps > 0:
    raise errors.ConfigError(f'optim.eps={c.eps!r}: expected a number > 0')
  if not c.weight_decay >= 0:
    raise errors.ConfigError(f'optim.weight_decay={c.weight_decay!r}: expected a number >= 0')
  if c.clip_norm is not None and not c.clip_norm >= 0:
    raise errors.ConfigError(f'optim.clip_norm={c.clip_norm!r}: expected None, 0 (off) or a number > 0')
  if not 0 < c.layerwise_lr_decay <= 1:
    raise errors.ConfigError(f'optim.layerwise_lr_decay={c.layerwise_lr_decay!r}: expected a number in (0, 1]')
  progressive = any(p.freeze for p in phases)
  chain = [_phase_freeze(phases, params)] if progressive else []
  if c.clip_norm:
    chain.append(optax.clip_by_global_norm(c.clip_norm))
  chain.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                           mask=_decay_mask(tuple(c.weight_decay_exclude))))
  if c.layerwise_lr_decay != 1:
    if 'layers' not in params:
      raise ValueError('optim.layerwise_lr_decay: expected params with a stacked "layers" subtree')
    num_layers = jax.tree_util.tree_leaves(params['layers'])[0].shape[0]
    chain.append(_layerwise_scale(float(c.layerwise_lr_decay), num_layers))
  if progressive:
    chain.append(_phase_freeze(phases, params))
  tx = optax.chain(*chain)

  if c.freeze:
    paths = [_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    patterns = _compile_patterns('optim.freeze', c.freeze, paths)
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: 'frozen' if any(r.fullmatch(_path(kp)) for r in patterns) else 'trained', params)
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx
