"""Optimizer and learning-rate schedule: an optax chain and phase-joined schedules, both built from config.

Optimizer (per trainable leaf): clip by global norm -> AdamW (weight-decay mask) -> layer-wise LR scale.
Frozen leaves (path patterns) go through `optax.set_to_zero` via `optax.multi_transform`, so they get zero
updates and no Adam moments.

Schedule: `schedule.phases` is a sequence of phase dicts, run one after another over `total_steps`. Each
phase, of length P steps, is: linear warmup `init -> peak` over W steps, then `peak` for S steps, then a
decay `peak -> end` over D steps (W + S + D = P; all LR values are fractions of the peak LR):
  constant  D = 0                           (stays at `peak` after warmup)
  linear    S = 0, linear decay             (anneal: e.g. peak=0.1, end=0, warmup 0)
  cosine    S = 0, cosine decay
  wsd       D = round(decay_fraction * P), decay form `decay` in linear | cosine | exponential | 1-sqrt
            (warmup-stable-decay: Hu et al. 2024, MiniCPM; 1-sqrt: Hägele et al. 2024)
Re-warmup for continued pretraining is a phase with warmup from `init` (e.g. the previous phase's `end`)
back to `peak`. Example, pretrain then anneal:
  phases = (dict(name='wsd', fraction=0.9, warmup_steps=2000, decay_fraction=0.0),
            dict(name='linear', fraction=0.1, peak=1.0, end=0.0))
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

PHASE_NAMES = ('constant', 'linear', 'cosine', 'wsd')
DECAY_FORMS = ('linear', 'cosine', 'exponential', '1-sqrt')

# Keys of one phase dict and their defaults. A phase gives `steps` or `fraction` (of total_steps) or
# neither (then it takes the steps left over; at most one such phase).
PHASE_DEFAULTS = dict(
    name='cosine',
    steps=None,            # length in steps
    fraction=None,         # length as a fraction of total_steps
    warmup_steps=None,     # warmup length in steps (or warmup_fraction of this phase; neither: 0)
    warmup_fraction=None,
    init=0.0,              # LR fraction of peak at the phase's first step (start of warmup)
    peak=1.0,              # LR fraction after warmup
    end=0.1,               # LR fraction at the phase's end (unused by constant)
    decay='linear',        # wsd only: decay form
    decay_fraction=0.2,    # wsd only: decay length as a fraction of the phase
)


def defaults() -> ml_collections.ConfigDict:
  """config.optim: AdamW hyper-parameters, clipping, weight-decay mask, freezing, layer-wise LR."""
  return ml_collections.ConfigDict(dict(
      lr=3e-4,                # peak learning rate; the schedule scales it
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


def schedule_defaults() -> ml_collections.ConfigDict:
  """config.schedule: one phase over all steps, 1% linear warmup then cosine to 0.1 of peak."""
  return ml_collections.ConfigDict(dict(
      phases=(dict(name='cosine', fraction=1.0, warmup_fraction=0.01, init=0.0, peak=1.0, end=0.1),),
  ))


# ---------------------------------------------------------------------------------------------- schedule


def _check_fraction(field: str, value) -> float:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
    raise ValueError(f'{field}={value!r}: expected a number in [0, 1]')
  return float(value)


def _check_steps(field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f'{field}={value!r}: expected an integer >= 0')
  return int(value)


def _phase_lengths(phases: list[dict], total_steps: int) -> list[int]:
  """Resolves each phase's `steps` / `fraction` / rest into lengths that sum to total_steps."""
  rest = [i for i, p in enumerate(phases) if p['steps'] is None and p['fraction'] is None]
  if len(rest) > 1:
    raise ValueError(f'schedule.phases{rest}: at most one phase may leave both steps and fraction unset')
  given = []
  for i, p in enumerate(phases):
    if p['steps'] is not None and p['fraction'] is not None:
      raise ValueError(f'schedule.phases[{i}]: expected steps or fraction, not both')
    if p['steps'] is not None:
      given.append(float(_check_steps(f'schedule.phases[{i}].steps', p['steps'])))
    elif p['fraction'] is not None:
      given.append(_check_fraction(f'schedule.phases[{i}].fraction', p['fraction']) * total_steps)
    else:
      given.append(None)
  if rest:
    given[rest[0]] = total_steps - sum(g for g in given if g is not None)
    if given[rest[0]] < 0:
      raise ValueError(f'schedule.phases: the other phases take more than total_steps={total_steps}')
  # Round cumulative positions, so fractions that sum to 1 give exactly total_steps.
  bounds = [0] + [round(x) for x in np.cumsum(given)]
  if bounds[-1] != total_steps:
    raise ValueError(f'schedule.phases: lengths sum to {float(np.sum(given)):g} steps; expected '
                     f'total_steps={total_steps} (steps + fraction * total_steps over all phases)')
  return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _decay(form: str, u, peak: float, end: float):
  """LR fraction at decay progress u in [0, 1], from `peak` (u=0) to `end` (u=1)."""
  if form == 'linear':
    return peak + (end - peak) * u
  if form == 'cosine':
    return end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * u))
  if form == 'exponential':
    return peak * (end / peak) ** u
  return end + (peak - end) * (1.0 - jnp.sqrt(u))  # 1-sqrt


def _phase_schedule(i: int, p: dict, length: int, peak_lr: float) -> optax.Schedule:
  """Validates phase i and returns its schedule of the step within the phase."""
  field = f'schedule.phases[{i}]'
  unknown = sorted(set(p) - set(PHASE_DEFAULTS))
  if unknown:
    raise ValueError(f'{field}: unknown keys {unknown}; expected keys in {sorted(PHASE_DEFAULTS)}')
  name = p['name']
  if name not in PHASE_NAMES:
    raise ValueError(f'{field}.name={name!r}: expected one of {PHASE_NAMES}')
  if p['decay'] not in DECAY_FORMS:
    raise ValueError(f'{field}.decay={p["decay"]!r}: expected one of {DECAY_FORMS}')
  init, peak, end = (_check_fraction(f'{field}.{k}', p[k]) for k in ('init', 'peak', 'end'))
  if p['warmup_steps'] is not None and p['warmup_fraction'] is not None:
    raise ValueError(f'{field}: expected warmup_steps or warmup_fraction, not both')
  if p['warmup_fraction'] is not None:
    warmup = round(_check_fraction(f'{field}.warmup_fraction', p['warmup_fraction']) * length)
  else:
    warmup = _check_steps(f'{field}.warmup_steps', p['warmup_steps'] or 0)
  if warmup > length:
    raise ValueError(f'{field}.warmup_steps={warmup}: expected at most the phase length {length}')
  form = name
  if name == 'constant':
    decay = 0
  elif name == 'wsd':
    decay = round(_check_fraction(f'{field}.decay_fraction', p['decay_fraction']) * length)
    form = p['decay']
    if warmup + decay > length:
      raise ValueError(f'{field}: warmup ({warmup}) + decay ({decay}) steps exceed the phase length {length}')
  else:
    decay = length - warmup
  if form == 'exponential' and decay and (peak == 0 or end == 0):
    raise ValueError(f'{field}: exponential decay needs peak > 0 and end > 0, got peak={peak}, end={end}')
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


def make_schedule(schedule_cfg, peak_lr: float, total_steps: int) -> optax.Schedule:
  """Returns step -> LR (f32) for `schedule_cfg.phases` joined over total_steps (see module docstring).

  Past total_steps the last phase's value at its end holds.
  """
  if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
    raise ValueError(f'total_steps={total_steps!r}: expected an integer >= 1')
  if not isinstance(peak_lr, (int, float)) or peak_lr < 0:
    raise ValueError(f'peak_lr={peak_lr!r}: expected a number >= 0')
  given = schedule_cfg['phases']
  if not isinstance(given, (list, tuple)) or not given:
    raise ValueError(f'schedule.phases={given!r}: expected a non-empty sequence of phase dicts')
  phases = []
  for i, p in enumerate(given):
    if not isinstance(p, (dict, ml_collections.ConfigDict)):
      raise ValueError(f'schedule.phases[{i}]={p!r}: expected a dict with keys in {sorted(PHASE_DEFAULTS)}')
    phases.append({**PHASE_DEFAULTS, **dict(p)})
  lengths = _phase_lengths(phases, int(total_steps))
  schedules = [_phase_schedule(i, p, n, float(peak_lr)) for i, (p, n) in enumerate(zip(phases, lengths))]
  # Zero-length phases are validated above but never reached.
  kept = [(s, n) for s, n in zip(schedules, lengths) if n > 0]
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


def make_optimizer(optim_cfg, schedule_cfg, params, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation, LR schedule) for `params` (nested dict of arrays; stacked 'layers')."""
  c = optim_cfg
  for k, lo, hi in (('b1', 0.0, 1.0), ('b2', 0.0, 1.0)):
    if not lo <= c[k] < hi:
      raise ValueError(f'optim.{k}={c[k]!r}: expected a number in [{lo}, {hi})')
  if not c.eps > 0:
    raise ValueError(f'optim.eps={c.eps!r}: expected a number > 0')
  if not c.weight_decay >= 0:
    raise ValueError(f'optim.weight_decay={c.weight_decay!r}: expected a number >= 0')
  if c.clip_norm is not None and not c.clip_norm >= 0:
    raise ValueError(f'optim.clip_norm={c.clip_norm!r}: expected None, 0 (off) or a number > 0')
  if not 0 < c.layerwise_lr_decay <= 1:
    raise ValueError(f'optim.layerwise_lr_decay={c.layerwise_lr_decay!r}: expected a number in (0, 1]')
  schedule = make_schedule(schedule_cfg, c.lr, total_steps)

  chain = []
  if c.clip_norm:
    chain.append(optax.clip_by_global_norm(c.clip_norm))
  chain.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                           mask=_decay_mask(tuple(c.weight_decay_exclude))))
  if c.layerwise_lr_decay != 1:
    if 'layers' not in params:
      raise ValueError('optim.layerwise_lr_decay: expected params with a stacked "layers" subtree')
    num_layers = jax.tree_util.tree_leaves(params['layers'])[0].shape[0]
    chain.append(_layerwise_scale(float(c.layerwise_lr_decay), num_layers))
  tx = optax.chain(*chain)

  if c.freeze:
    paths = [_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    patterns = []
    for p in c.freeze:
      try:
        patterns.append(re.compile(p))
      except re.error as e:
        raise ValueError(f'optim.freeze pattern {p!r}: not a valid regex ({e})') from None
      if not any(patterns[-1].fullmatch(path) for path in paths):
        raise ValueError(f'optim.freeze pattern {p!r} matches no parameter path; paths are {paths}')
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: 'frozen' if any(r.fullmatch(_path(kp)) for r in patterns) else 'trained', params)
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule
