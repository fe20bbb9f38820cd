"""The command-line layer every entry point shares: the `--config` and `--workdir` flags, loading and
validating the config, quiet logs, and user mistakes as one line. Entry points (`python -m
lmjax.train`, `lmjax.prepare`, `lmjax.aot`, `lmjax.evaluate`, `lmjax.sample`, `lmjax.export`,
`lmjax.scaling.sweep`) sit on top of the library and call this; library modules never import it.

  python -m lmjax.<entry> --config=configs/<name>.py[:knobs] --workdir=DIR [--config.a.b=value ...]

A mistake in the flags or the config, a missing or bad data file or checkpoint, a missing extra, a
disk that refuses a write (the types in lmjax/errors.py, raised where the cause is known) ends the
command with one line naming the culprit (`lmjax.train: error: configs/tiny.py: config.optim.lrr:
...`), exit code 2; Ctrl-C with one line and exit code 130 (training checkpoints first). Any other
exception is a bug: its traceback is printed, then one line saying so, exit code 1. `--verbose` (or
LMJAX_VERBOSE=1) shows the whole traceback and orbax's logs for a user's mistake too.
"""
from __future__ import annotations

import importlib.util
import logging as stdlib_logging
import os
import re
import sys
import tempfile
import traceback
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lmjax import config as config_lib
from lmjax import errors, fs

def define_flags(workdir_help: str | None, config_from_run: bool = False) -> None:
  """Defines --config (locked: a typo is an error), --verbose and, unless workdir_help is None, a
  required --workdir; call in an entry point's `if __name__ == '__main__'`. With `config_from_run`
  (commands that read a run: sample, evaluate) --config may be left out for the run's config.json."""
  config_flags.DEFINE_config_file(
      'config', None, 'configs/<name>.py[:knobs]' + (" (default: the run's config.json in --workdir)"
                                                     if config_from_run else ''), lock_config=True)
  flags.DEFINE_bool('verbose', False, 'on an error, print the whole traceback (also LMJAX_VERBOSE=1)')
  required = [] if config_from_run else ['config']
  if workdir_help is not None:
    flags.DEFINE_string('workdir', None, workdir_help)
    required.append('workdir')
  flags.mark_flags_as_required(required)
  for name in ('config', 'verbose', 'workdir')[:3 if workdir_help is not None else 2]:
    flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS[name])  # listed by the entry's --help


def config_file() -> str | None:
  """The --config file path with its knobs, as given (for commands that re-launch it); None when it
  was left out (the run's config.json is used)."""
  if flags.FLAGS['config'].value is None and not flags.FLAGS['config'].present:
    return None
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


# What libtpu prints when it loads on a machine without TPU chips (it looks for a TPU VM's metadata).
_LIBTPU_NOISE = re.compile(r'TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|'
                           r'Source Location Trace|libtpu_init_utils|^\s*$')


def _init_backends_quietly() -> None:
  """Starts JAX's backends with stderr captured when libtpu is installed on a machine without TPU
  chips, and prints back all but libtpu's start-up noise: its lines were the first of every
  command's output and error. On a TPU VM (chips present) or without libtpu this does nothing."""
  if importlib.util.find_spec('libtpu') is None or _verbose(sys.argv):
    return
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    return
  import jax  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      jax.devices()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors='replace').splitlines()
              if not _LIBTPU_NOISE.search(line)]
      if kept:
        print('\n'.join(kept), file=sys.stderr)


def _check_workdir() -> None:
  """FileSystemError when --workdir names a file: every entry point reads or writes a run there."""
  workdir = flags.FLAGS['workdir'].value if 'workdir' in flags.FLAGS else None
  if workdir and fs.exists(workdir) and not fs.isdir(workdir):
    raise errors.FileSystemError(f'--workdir={workdir} is a file; expected a run directory or a new path')


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
  except Exception as e:  # the user's own file: any exception is theirs to fix
    return f'{path}: {type(e).__name__}: {e}'
  for a in argv:
    if not a.startswith('--config.'):
      continue
    node, walked = config, 'config'
    for key in a[len('--config.'):].split('=', 1)[0].split('.'):
      keys = list(node.keys()) if isinstance(node, (dict, ml_collections.ConfigDict)) else []
      if key not in keys:
        message = config_lib.no_such_field(walked, key, keys)
        if keys and 'did you mean' not in message:
          message += ' (new keys cannot be added from the command line; edit the config file)'
        return f'{path}: {message}'
      node, walked = node[key], f'{walked}.{key}'
  return None


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise many kinds for a bad flag or config file
    if _verbose(argv):
      raise
    if any(a.startswith('--config.') for a in argv) and not any(a.startswith('--config=') for a in argv):
      _fail('--config.* overrides need --config=configs/<name>.py (without it a run\'s config.json is '
            'used as it was saved)')
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
    spec = config_file()
    path = spec.partition(':')[0] if spec else None
    if path and not os.path.isfile(path):  # ml_collections then hands over a config that fails on use
      _fail(f'config file {path!r} does not exist')
    try:
      _check_workdir()
      config = flags.FLAGS.config if spec else config_lib.from_run(flags.FLAGS.workdir)
      try:
        config_lib.validate(config)
      except errors.ConfigError as e:
        raise errors.ConfigError(f'{path or os.path.join(flags.FLAGS.workdir, "config.json")}: {e}') from e
      _init_backends_quietly()
      main(config)
    except KeyboardInterrupt:
      if _verbose(sys.argv):
        raise
      _fail('interrupted (Ctrl-C)', 130)
    except Exception as e:  # pylint: disable=broad-except
      user = isinstance(e, errors.UserError)
      disk = isinstance(e, OSError) and e.errno in errors.DISK_ERRNOS  # the disk, not the code
      if (user or disk) and _verbose(sys.argv):
        raise
      if user:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, e.exit_code)
      if disk:
        _fail(f'{e.filename}: {e.strerror}' if e.filename else e.strerror)
      traceback.print_exc()  # not a cause the code knows: a bug, whose stack is the report
      _fail('the error above is a bug in lmjax, not a mistake in your command: please report it '
            'with this traceback and the command line', 1)

  app.run(wrapped, flags_parser=_parse_flags)
