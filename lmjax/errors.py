"""The project's own exceptions for what is not a bug: a cause the user can act on, raised where it
is known, with the field, file or extra named in the message. The entry points (lmjax/cli.py) print
them as one line with their exit code; anything else is a bug and keeps its traceback.

Each also derives from the built-in a caller would catch (ValueError, FileNotFoundError, OSError,
ImportError), so library users keep their `except ValueError`.
"""
from __future__ import annotations

import errno
import importlib
import re
from types import ModuleType


class UserError(Exception):
  """A cause the user can act on, named in the message; exit code 2."""
  exit_code = 2


class ConfigError(UserError, ValueError):
  """A config field or a command-line flag has a value the code cannot use."""


class DataError(UserError, ValueError):
  """A data source, file or record is not what `config.data` says it is (empty, missing a field)."""


class MissingFile(UserError, FileNotFoundError):
  """A file or directory the config or a flag names does not exist."""


class CheckpointError(UserError, ValueError):
  """A checkpoint or run directory cannot be used (damaged, another model's, not a run)."""


class FileSystemError(UserError, OSError):
  """The file system refuses a write or a read (read-only, full, a file where a directory goes)."""


class CheckpointSaveError(FileSystemError):
  """A checkpoint could not be written (a full or read-only disk): training stopped at that step."""


class MissingExtra(UserError, ImportError):
  """A dependency is not installed; the message names the one install line: the setup.py extra that
  brings it, or (extra '') the package's own requirements."""

  def __init__(self, what: str, extra: str, module: str):
    line = f"pip install -e '.[{extra}]'" if extra else 'pip install -e .'
    super().__init__(f'{what} needs {module}, which is not installed: {line}')


class Interrupted(UserError):
  """Ctrl-C: the step finished and a checkpoint was written; exit code 130, as a shell's SIGINT."""
  exit_code = 130


def require(module: str, extra: str, what: str) -> ModuleType:
  """`import module`, or MissingExtra naming the setup.py extra that installs it."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is None or module.split('.')[0] != e.name.split('.')[0]:
      raise  # the module is there and one of its own imports is broken: not a missing extra
    raise MissingExtra(what, extra, module) from e


# What the file system answers that no code can fix: a full, read-only or forbidden disk.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)

# The operating system's reason inside an error message: orbax and tensorstore wrap it in their own.
_OS_REASON = re.compile(r'No space left on device|Read-only file system|Permission denied|'
                        r'Disk quota exceeded|Input/output error|File exists|Not a directory')


def os_reason(error: BaseException) -> str:
  """The operating system's reason for `error` ("No space left on device"), else its first line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error)
  found = _OS_REASON.search(text)
  return found.group(0) if found else (text.splitlines()[0][:300] if text else type(error).__name__)
