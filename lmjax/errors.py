"""The project's own exceptions for what is not a bug: the entry points (lmjax/cli.py) print them as
one line with their exit code; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re


class UserError(Exception):
  """A cause the user can act on, named in the message; exit code 2."""
  exit_code = 2


class CheckpointSaveError(UserError, OSError):
  """A checkpoint could not be written (a full or read-only disk): training stopped at that step."""


class Interrupted(UserError):
  """Ctrl-C: the step finished and a checkpoint was written; exit code 130, as a shell's SIGINT."""
  exit_code = 130


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
