"""The command-line layer every entry point shares: the `--config` and `--workdir` flags, loading and
validating the config, and quiet logs. Entry points (`python -m lmjax.train`, `lmjax.prepare`,
`lmjax.aot`, `lmjax.scaling.sweep`) sit on top of the library and call this; library modules never
import it.

  python -m lmjax.<entry> --config=configs/<name>.py[:knobs] --workdir=DIR [--config.a.b=value ...]
"""
from __future__ import annotations

from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lmjax import config as config_lib


def define_flags(workdir_help: str | None) -> None:
  """Defines --config (locked: a typo is an error) and, unless workdir_help is None, a required
  --workdir; call in an entry point's `if __name__ == '__main__'`."""
  config_flags.DEFINE_config_file('config', None, 'configs/<name>.py[:knobs]', lock_config=True)
  required = ['config']
  if workdir_help is not None:
    flags.DEFINE_string('workdir', None, workdir_help)
    required.append('workdir')
  flags.mark_flags_as_required(required)


def config_file() -> str:
  """The --config file path with its knobs, as given (for commands that re-launch it)."""
  return config_flags.get_config_filename(flags.FLAGS['config'])


def run(main: Callable[[ml_collections.ConfigDict], None]) -> None:
  """Parses flags, validates the config (the same checks for every entry point), runs main(config)."""

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
    config = flags.FLAGS.config
    config_lib.validate(config)
    main(config)

  app.run(wrapped)
