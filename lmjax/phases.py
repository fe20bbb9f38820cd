"""One timeline for the learning rate and the data mixture: `config.phases`.

A run is a sequence of phases: `config.phases = phases.timeline(pretrain=phase(...), anneal=phase(...))`
keys each phase by its name, so each is reachable from the command line
(`--config.phases.anneal.steps=500`, `--config.phases.anneal.weights.math=0.4`), and keeps their order
in `config.phases.order` (a ConfigDict does not keep the order of its keys). Each phase has
  - a length: `steps`, or `fraction` of `config.train.steps`, or neither (it takes the steps the
    others leave; at most one such phase). When both are set, `steps` wins, so a length given as a
    fraction can be overridden in steps from the command line.
  - `lr`: the learning-rate shape over the phase, as fractions of `config.optim.lr` (see
    `lmjax.optim.make_schedule`): warmup from `init` to `peak`, then
      constant                                  stays at `peak`
      linear | cosine | exponential | 1-sqrt    decays to `end` over the rest of the phase
      wsd                                       stable, then a `decay`-form decay over `decay_fraction`
    A re-warm (continued pretraining) is a phase whose warmup starts at `init` > 0.
  - `weights`: the data mixture `{source: weight}` (proportions, or repeats with
    `config.data.weights_are='repeats'`); empty = the previous phase's (the first phase: equal).
  - `freeze`: regexes (re.fullmatch on '/'-joined parameter paths) of parameters that get no update
    during the phase: progressive unfreezing is phases that freeze less and less (ULMFiT). Parameters
    frozen for the whole run belong in `config.optim.freeze` instead (they then hold no Adam state).
  - `kd`: `alpha` and `temperature` of the distillation loss (config.loss.name='kd', lmjax/distill/kd.py)
    during the phase; None = the previous phase's (the first phase: config.loss.kd's).
The anneal of the playbook is one phase: the LR decays while the high-quality sources are upsampled,
both from the same step, with nothing kept aligned by hand.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections
import numpy as np

from lmjax import errors

DECAY_FORMS = ('linear', 'cosine', 'exponential', '1-sqrt')
SHAPES = ('constant', 'wsd') + DECAY_FORMS


def lr_defaults() -> dict:
  """Keys of a phase's `lr` and their defaults (None fields are typed so flags can set them)."""
  return dict(
      shape='cosine',
      warmup_steps=ml_collections.FieldReference(None, field_type=int),
      warmup_fraction=ml_collections.FieldReference(None, field_type=float),  # of this phase
      init=0.0,             # LR fraction of peak at the phase's first step (start of warmup)
      peak=1.0,             # after warmup
      end=0.1,              # at the phase's end (unused by constant)
      decay='linear',       # wsd only: decay form, one of DECAY_FORMS
      decay_fraction=0.2,   # wsd only: decay length as a fraction of the phase
  )


def phase(*, steps: int | None = None, fraction: float | None = None, weights: dict | None = None,
          freeze: tuple[str, ...] = (), kd_alpha: float | None = None,
          kd_temperature: float | None = None, **lr) -> ml_collections.ConfigDict:
  """One phase entry for `config.phases`, every field present (so each can be overridden by flag).

  phase(fraction=0.2, weights={'math': 0.5, 'en': 0.5}, shape='linear', end=0.0)
  """
  unknown = sorted(set(lr) - set(lr_defaults()))
  if unknown:
    raise errors.ConfigError(f'phase lr keys {unknown}: expected keys in {sorted(lr_defaults())}')
  entry = ml_collections.ConfigDict(dict(
      steps=ml_collections.FieldReference(None, field_type=int),
      fraction=ml_collections.FieldReference(None, field_type=float),
      lr=lr_defaults(),
      weights=dict(weights or {}),
      freeze=tuple(freeze),
      kd=dict(alpha=ml_collections.FieldReference(None, field_type=float),
              temperature=ml_collections.FieldReference(None, field_type=float)),
  ))
  entry.steps, entry.fraction = steps, fraction
  entry.kd.alpha, entry.kd.temperature = kd_alpha, kd_temperature
  entry.lr.update(lr)
  return entry


def timeline(**entries: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.phases: the phases in the order given, `order` naming them (a phase cannot be 'order')."""
  return ml_collections.ConfigDict(dict(order=tuple(entries), **entries))


def defaults() -> ml_collections.ConfigDict:
  """config.phases: one phase over all steps, 1% linear warmup then cosine to 0.1 of peak."""
  return timeline(main=phase(fraction=1.0, warmup_fraction=0.01))


@dataclasses.dataclass(frozen=True)
class Phase:
  """A resolved phase: it covers steps [start, start + steps) (0-based, the step counter the train
  step reads) and the global batches of those steps."""
  name: str
  start: int
  steps: int
  lr: dict
  weights: dict[str, float]
  freeze: tuple[str, ...] = ()
  kd: dict = dataclasses.field(default_factory=lambda: dict(alpha=None, temperature=None))


def _length(field: str, entry, total_steps: int) -> float | None:
  steps, fraction = entry.get('steps'), entry.get('fraction')
  if steps is not None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
      raise errors.ConfigError(f'{field}.steps={steps!r}: expected an integer >= 0')
    return float(steps)
  if fraction is not None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
      raise errors.ConfigError(f'{field}.fraction={fraction!r}: expected a number in [0, 1]')
    return fraction * total_steps
  return None


def resolve(phases_cfg, total_steps: int, sources: Sequence[str]) -> list[Phase]:
  """Validated phases with start steps; lengths sum to `total_steps`, weights name only `sources`.

  Raises ValueError naming the phase and field at fault.
  """
  if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
    raise errors.ConfigError(f'config.train.steps={total_steps!r}: expected an integer >= 1')
  if not isinstance(phases_cfg, (dict, ml_collections.ConfigDict)) or not phases_cfg.get('order'):
    raise errors.ConfigError(f'config.phases={phases_cfg!r}: expected '
                             'lmjax.phases.timeline(name=phase(...), ...): '
                             'the phases by name and their `order`')
  names = list(phases_cfg['order'])
  entries = sorted(set(phases_cfg.keys()) - {'order'})
  if sorted(names) != entries:
    raise errors.ConfigError(f'config.phases.order={tuple(names)}: expected each phase of {entries} once')
  given = []
  for name in names:
    entry = phases_cfg[name]
    field = f'config.phases.{name}'
    if not isinstance(entry, (dict, ml_collections.ConfigDict)):
      raise errors.ConfigError(f'{field}={entry!r}: expected lmjax.phases.phase(...)')
    unknown = sorted(set(entry.keys()) - {'steps', 'fraction', 'lr', 'weights', 'freeze', 'kd'})
    if unknown:
      raise errors.ConfigError(f'{field}: unknown keys {unknown}; expected steps, fraction, lr, weights, '
                               'freeze, kd')
    given.append(_length(field, entry, int(total_steps)))
  rest = [n for n, g in zip(names, given) if g is None]
  if len(rest) > 1:
    raise errors.ConfigError(f'config.phases.{rest[1]}: at most one phase may leave both steps and fraction '
                             f'unset ({rest[0]} does too)')
  if rest:
    i = names.index(rest[0])
    given[i] = total_steps - sum(g for g in given if g is not None)
    if given[i] < 0:
      raise errors.ConfigError(f'config.phases: the phases other than {rest[0]} take '
                               f'{total_steps - given[i]:g} steps, more than '
                               f'config.train.steps={total_steps}')
  # Round cumulative positions, so fractions that sum to 1 give exactly total_steps.
  bounds = [0] + [round(x) for x in np.cumsum(given)]
  if bounds[-1] != total_steps:
    lengths = ', '.join(f'{n}={g:g}' for n, g in zip(names, given))
    raise errors.ConfigError(f'config.phases: lengths ({lengths}) sum to {float(np.sum(given)):g} steps; '
                             f'expected config.train.steps={total_steps}')
  out, weights, kd = [], {s: 1.0 for s in sources}, dict(alpha=None, temperature=None)
  for name, start, end in zip(names, bounds[:-1], bounds[1:]):
    entry = phases_cfg[name]
    lr = {**lr_defaults(), **dict(entry.get('lr') or {})}
    lr = {k: v.get() if isinstance(v, ml_collections.FieldReference) else v for k, v in lr.items()}
    unknown = sorted(set(lr) - set(lr_defaults()))
    if unknown:
      raise errors.ConfigError(f'config.phases.{name}.lr: unknown keys {unknown}; expected keys in '
                               f'{sorted(lr_defaults())}')
    if entry.get('weights'):
      weights = _weights(f'config.phases.{name}.weights', dict(entry['weights']), sources)
    kd = _kd(f'config.phases.{name}.kd', dict(entry.get('kd') or {}), kd)
    out.append(Phase(name, start, end - start, lr, weights, tuple(entry.get('freeze') or ()), kd))
  return out


def _kd(field: str, given: dict, previous: dict) -> dict:
  """The phase's distillation alpha and temperature: those given, else the previous phase's."""
  unknown = sorted(set(given) - {'alpha', 'temperature'})
  if unknown:
    raise errors.ConfigError(f'{field}: unknown keys {unknown}; expected alpha, temperature')
  given = {k: v.get() if isinstance(v, ml_collections.FieldReference) else v for k, v in given.items()}
  check_kd_scalars(field, given.get('alpha'), given.get('temperature'))
  return {k: previous[k] if given.get(k) is None else float(given[k]) for k in ('alpha', 'temperature')}


def check_kd_scalars(field: str, alpha, temperature) -> None:
  """A distillation alpha (a weight in [0, 1]) and temperature (> 0); None = not given."""
  if alpha is not None and not 0 <= alpha <= 1:
    raise errors.ConfigError(f'{field}.alpha={alpha!r}: expected a weight in [0, 1]')
  if temperature is not None and not temperature > 0:
    raise errors.ConfigError(f'{field}.temperature={temperature!r}: expected a number > 0')


def _weights(field: str, weights: dict, sources: Sequence[str]) -> dict[str, float]:
  for k, v in weights.items():
    if k not in sources:
      raise errors.ConfigError(f'{field}: unknown source {k!r}; expected one of {sorted(sources)} '
                               '(config.data.sources)')
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
      raise errors.ConfigError(f'{field}.{k}={v!r}: expected a number >= 0')
  if not sum(weights.values()) > 0:
    raise errors.ConfigError(f'{field}={weights}: expected at least one weight > 0')
  return {s: float(weights.get(s, 0.0)) for s in sources}

