"""The command-line layer every entry point shares: the `--config` and `--workdir` flags, loading and
validating the config, quiet logs, and user mistakes as one line. Entry points (`python -m
lmjax.train`, `lmjax.prepare`, `lmjax.aot`, `lmjax.scaling.sweep`) sit on top of the library and call
this; library modules never import it.

  python -m lmjax.<entry> --config=configs/<name>.py[:knobs] --workdir=DIR [--config.a.b=value ...]

A mistake in the flags or the config, a missing or bad data file or checkpoint, a checkpoint that
cannot be written (lmjax/errors.py) ends the command with one line naming the culprit
(`lmjax.train: error: configs/tiny.py: config.optim.lrr: ...`), exit code 2; Ctrl-C with one line and
exit code 130 (training checkpoints first). `--verbose` (or LMJAX_VERBOSE=1) shows the whole
traceback and orbax's logs instead.
"""
from __future__ import annotations

import difflib
import logging as stdlib_logging
import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lmjax import config as config_lib
from lmjax import errors

# What a user's mistake raises: a config field, a data file, a checkpoint, a tokenizer.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)


def define_flags(workdir_help: str | None) -> None:
  """Defines --config (locked: a typo is an error), --verbose and, unless workdir_help is None, a
  required --workdir; call in an entry point's `if __name__ == '__main__'`."""
  config_flags.DEFINE_config_file('config', None, 'configs/<name>.py[:knobs]', lock_config=True)
  flags.DEFINE_bool('verbose', False, 'on an error, print the whole traceback (also LMJAX_VERBOSE=1)')
  required = ['config']
  if workdir_help is not None:
    flags.DEFINE_string('workdir', None, workdir_help)
    required.append('workdir')
  flags.mark_flags_as_required(required)


def config_file() -> str:
  """The --config file path with its knobs, as given (for commands that re-launch it)."""
  return config_flags.get_config_filename(flags.FLAGS['config'])


def _verbose(argv) -> bool:
  return os.environ.get('LMJAX_VERBOSE') == '1' or any(a in ('--verbose', '--verbose=true') for a in argv)


def _fail(message: str, code: int = 2) -> None:
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  prog = spec.name if spec else os.path.basename(sys.argv[0])
  print(f'{prog}: error: {message}', file=sys.stderr)
  sys.exit(code)


class _QuietOrbax(stdlib_logging.Filter):
  """Drops orbax's own log records: a failed save logs hundreds of lines from its threads, and the
  run's one line (errors.CheckpointSaveError) says what failed. --verbose keeps them."""

  def filter(self, record: stdlib_logging.LogRecord) -> bool:
    return f'{os.sep}orbax{os.sep}' not in record.pathname


def _first_unknown_override(argv) -> str | None:
  """The first --config.a.b=... whose path the config file does not have, described with close
  matches; None when every override path exists (or the file itself does not load)."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    return f'config file {path!r} does not exist'
  try:
    config = config_lib.load(path, arg or None)
  except USER_ERRORS as e:
    return f'{path}: {e}'
  for a in argv:
    if not a.startswith('--config.'):
      continue
    node, walked = config, 'config'
    for key in a[len('--config.'):].split('=', 1)[0].split('.'):
      keys = list(node.keys()) if isinstance(node, (dict, ml_collections.ConfigDict)) else []
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean {walked}.{close[0]}?)" if close else f'; {walked} has {sorted(keys)}'
        new = ' (new keys cannot be added from the command line; edit the config file)' if keys and not close else ''
        return f'{path}: {walked}.{key}: no such field{hint}{new}'
      node, walked = node[key], f'{walked}.{key}'
  return None


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise many kinds for a bad flag or config file
    if _verbose(argv):
      raise
    _fail(_first_unknown_override(argv) or str(e).strip().splitlines()[-1])


def run(main: Callable[[ml_collections.ConfigDict], None]) -> None:
  """Parses flags, validates the config (the same checks for every entry point), runs main(config);
  a user's mistake ends it with one line (see the module docstring)."""

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
    if not _verbose(sys.argv):
      logging.get_absl_handler().addFilter(_QuietOrbax())
      # What a failed async save leaves in orbax's threads (asyncio callbacks on a closed loop) is
      # printed as "Exception ignored in ..." after the run's one line; --verbose shows it.
      sys.unraisablehook = lambda _: None
    path = config_file().partition(':')[0]
    if not os.path.isfile(path):  # ml_collections then hands over a config that fails on first use
      _fail(f'config file {path!r} does not exist')
    config = flags.FLAGS.config
    try:
      try:
        config_lib.validate(config)
      except USER_ERRORS as e:
        raise ValueError(f'{config_file().partition(":")[0]}: {e}') from e
      main(config)
    except KeyboardInterrupt:
      if _verbose(sys.argv):
        raise
      _fail('interrupted (Ctrl-C)', 130)
    except (errors.UserError, *USER_ERRORS) as e:
      if _verbose(sys.argv):
        raise
      _fail(str(e).strip('"\'').splitlines()[0] if str(e) else type(e).__name__,
            getattr(e, 'exit_code', 2))

  app.run(wrapped, flags_parser=_parse_flags)
