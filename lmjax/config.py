"""Configs as data: the base ConfigDict assembled from each part's defaults, knob parsing, validation.

A config file is `configs/<name>.py` with `get_config(arg=None) -> ConfigDict` (big_vision / flax lm1b
style). It starts from `base()` and overrides fields. Each part keeps its own defaults next to its
code; the run layer's sections, `train` (lmjax/trainer.py) and `eval` (lmjax/eval/hook.py), are
defined here, so that this module sits below the modules that read a config. The result is locked: a
typo such as `--config.optim.lrr=1` is an error, not a silent new key; so is one inside the file
(`c.train.stpes = 300`): `validate` checks every field against `base()` (`unknown_field`).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os

import ml_collections

from lmjax import errors, fs, losses, model, optim, phases
from lmjax.data import pipeline


def base() -> ml_collections.ConfigDict:
  """The full default config: every section that a run reads, with its part's defaults."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      model=model.defaults(),
      data=pipeline.defaults(),
      phases=phases.defaults(),  # the one timeline of learning rate and data mixture
      loss=losses.defaults(),
      optim=optim.defaults(),
      train=train_defaults(),
      eval=eval_defaults(),  # harness tasks during training (lmjax/eval/hook.py)
      mesh=dict(data=-1, fsdp=1, tensor=1),
      # '' (scratch) | 'lmjax:DIR' (another run's latest params) | 'hf:DIR' (Hugging Face weights);
      # the run inherits the parent's tokenizer (lmjax/init_from.py).
      init_from='',
      init_skip=(),  # regexes of parameter paths that start fresh instead (e.g. a replaced head)
  ))


# ----------------------------------------------------------------------------- the run layer's sections
TRACKERS = ('tensorboard', 'wandb')


def train_defaults() -> ml_collections.ConfigDict:
  """config.train: the training loop's (lmjax/trainer.py)."""
  return ml_collections.ConfigDict(dict(
      steps=200,
      batch_size=8,           # global batch, sequences
      seq_len=128,
      microbatches=1,         # gradient accumulation: the batch is split into this many parts
      log_every=10,
      eval_every=100,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoint=True,
      trackers=('tensorboard',),  # and/or 'wandb' (pip install -e '.[wandb]'; WANDB_MODE=offline works)
      wandb_project='lmjax',
  ))


def validate_train(cfg: ml_collections.ConfigDict) -> None:
  for field in ('steps', 'batch_size', 'seq_len', 'microbatches', 'log_every', 'eval_every',
                'checkpoint_every', 'keep_checkpoints'):
    if cfg[field] <= 0:
      raise errors.ConfigError(f'config.train.{field}={cfg[field]}: expected a positive integer')
  if cfg.batch_size % cfg.microbatches:
    raise errors.ConfigError(f'config.train.microbatches={cfg.microbatches} must divide '
                     f'config.train.batch_size={cfg.batch_size}')
  unknown = sorted(set(cfg.trackers) - set(TRACKERS))
  if unknown:
    raise errors.ConfigError(f'config.train.trackers: unknown {unknown}; expected some of {TRACKERS}')


def eval_defaults() -> ml_collections.ConfigDict:
  """config.eval: harness tasks run during training (lmjax/eval/harness.py; the [eval] extra)."""
  return ml_collections.ConfigDict(dict(
      harness_tasks=(),         # the harness's task names (or those under harness_include_path)
      harness_every=0,          # steps between runs (0: config.train.eval_every); also at the end
      harness_num_fewshot=-1,   # -1: each task's own
      harness_limit=0.0,        # examples a task (< 1: a fraction; 0: all)
      harness_include_path='',  # a directory of task YAMLs of your own
  ))


def validate_eval(cfg: ml_collections.ConfigDict) -> None:
  """config.eval's values; with harness tasks, the [eval] extra must be installed."""
  if cfg.harness_every < 0 or cfg.harness_limit < 0:
    raise errors.ConfigError(f'config.eval.harness_every={cfg.harness_every}, harness_limit='
                             f'{cfg.harness_limit}: expected >= 0 (0: eval_every; all examples)')
  if harness_task_names(cfg):
    errors.require('lm_eval', 'eval', 'config.eval.harness_tasks')


def harness_task_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """config.eval.harness_tasks as names: a tuple, or one comma-separated string (as a flag gives it)."""
  return [t.strip() for item in cfg.harness_tasks for t in item.split(',') if t.strip()]


# ----------------------------------------------------------------------------- files and knobs


def parse_arg(arg: str | None, **defaults):
  """Parses the `:knobs` part of `--config=configs/x.py:size=1b,runlocal=True` into a ConfigDict.

  Each knob takes the type of its default; an unknown knob or a value of the wrong type is an error.
  """
  knobs = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise errors.ConfigError(f'config knob {item!r}: expected name=value with name in {sorted(defaults)}')
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise errors.ConfigError(f'config knob {key}={value!r}: expected true or false')
      knobs[key] = value.lower() in ('true', '1')
    else:
      try:
        knobs[key] = type(default)(value)
      except ValueError:
        raise errors.ConfigError(f'config knob {key}={value!r}: expected type {type(default).__name__}') from None
  return knobs


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `configs/<name>.py` (optionally `path:arg`) and returns its locked, validated config."""
  if arg is None and ':' in path:
    path, arg = path.split(':', 1)
  if not os.path.isfile(path):
    raise errors.MissingFile(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location('_lmjax_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.lock()
  validate(config)
  return config


def from_run(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (its workdir's config.json), locked."""
  path = os.path.join(workdir, 'config.json')
  if not fs.isdir(workdir):
    raise errors.MissingFile(f'run directory {workdir!r} does not exist')
  if not fs.isfile(path):
    raise errors.MissingFile(f'{path} does not exist: --workdir is not a run directory')
  try:
    config = ml_collections.ConfigDict(json.loads(fs.read_text(path)))
  except ValueError as e:
    raise errors.CheckpointError(f'{path} is damaged (not a config a run wrote: {e})') from None
  config.lock()
  return config


def no_such_field(path: str, key: str, keys) -> str:
  """'<path>.<key>: no such field' with its close match among `keys`, else the fields `path` has."""
  close = difflib.get_close_matches(key, list(keys), n=1)
  hint = f' (did you mean {path}.{close[0]}?)' if close else f'; {path} has {sorted(keys)}'
  return f'{path}.{key}: no such field{hint}'


# Where a config names its own keys: {path: the fields each entry may have (None: any value)}.
_NAMED = {'config.data.sources': ('corpora', 'max_chars', 'kind', 'languages'),
          'config.phases': tuple(phases.phase().keys())}
_OPEN = ('config.sweep',)  # sections that are not the base's: a sweep config's own settings


def unknown_field(config: ml_collections.ConfigDict) -> str | None:
  """The first field `config` has that the base config (`base()`) does not, described with its
  close match: a typo in a config file (`c.train.stpes = 300`) adds a field the lock would refuse
  on the command line. Maps keyed by the user (sources, phases, weights) are checked entry by entry
  against their entries' fields. None when every field is known."""
  def walk(node, known, path):
    for key in node.keys():
      here = f'{path}.{key}'
      if here in _OPEN:
        continue
      if path in _NAMED and isinstance(node[key], (dict, ml_collections.ConfigDict)):
        allowed = _NAMED[path]  # an entry named by the user: check its fields
        for field in node[key].keys():
          if field not in allowed:
            close = difflib.get_close_matches(field, allowed, n=1)
            hint = f' (did you mean {here}.{close[0]}?)' if close else f'; expected one of {list(allowed)}'
            return f'{here}.{field}: no such field{hint}'
        if path == 'config.phases':  # a phase's own sections (lr) against the default phase's
          found = walk(node[key], known.main, here)
          if found:
            return found
        continue
      if len(known) == 0:  # an empty map in the base ({source: weight}): any key
        continue
      if key not in known:
        return no_such_field(path, key, known.keys())
      if isinstance(node[key], (dict, ml_collections.ConfigDict)) and isinstance(
          known[key], (dict, ml_collections.ConfigDict)):
        found = walk(node[key], known[key], here)
        if found:
          return found
    return None

  known = base()
  name = config.get('loss', {}).get('name')
  if isinstance(name, str) and losses.block(name) not in known.loss:  # a plugin loss's own block
    own = losses.record(name).defaults
    if own is not None:
      known.loss[losses.block(name)] = own()
  return walk(config, known, 'config')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that types alone cannot, and that every field is one the base config has;
  raises ValueError naming the field."""
  unknown = unknown_field(config)
  if unknown:
    raise errors.ConfigError(unknown)
  if 'eval' in config:  # a run's config.json from before config.eval has none
    validate_eval(config.eval)
  for axis in ('data', 'fsdp', 'tensor'):
    size = config.mesh[axis]
    if size == 0 or size < -1:
      raise errors.ConfigError(f'config.mesh.{axis}={size}: expected a positive size or -1 (the rest)')
  if sum(config.mesh[a] == -1 for a in ('data', 'fsdp', 'tensor')) > 1:
    raise errors.ConfigError('config.mesh: at most one axis may be -1')
  model.validate(config.model)
  validate_train(config.train)
  pipeline.validate(config.data)
  losses.validate(config.loss)
  optim.validate(config.optim)
  resolved = phases.resolve(config.phases, config.train.steps, list(config.data.sources))
  optim.make_schedule(resolved, config.optim.lr)  # raises on a bad lr shape
  tok, rows = config.data.tokenizer, model.resolve(config.model).vocab_size
  if not tok.path and tok.vocab_size > rows:
    raise errors.ConfigError(f'config.data.tokenizer.vocab_size={tok.vocab_size} exceeds config.model.vocab_size='
                     f'{rows}: expected the model to have a row for every token')
