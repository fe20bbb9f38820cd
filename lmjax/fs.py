"""One filesystem layer for a run's files: local paths and URLs (gs://; memory:// and file:// in tests).

A path without a `scheme://` is local and goes through `os` as always (atomic renames, real appends).
A URL goes through fsspec; gs:// needs gcsfs (`pip install -e '.[gcs]'`). Object stores differ from
a disk in two ways that these functions hide:
  - No rename. A single object appears whole when its write finishes, so `write_atomic` writes the
    object directly; `replace` copies then deletes, so a moved directory is not moved all at once.
  - No append. `append_text` reads the object and writes it again: its cost grows with the file,
    fine for metrics.jsonl (a few MB at most).
A file:// URL takes the object-store route on a local disk, which is how tests stand in for GCS
(with memory://). Paths join with os.path.join, which keeps a URL's slashes (POSIX).
"""
from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil

import fsspec

from lmjax import errors


def is_local(path: str) -> bool:
  return '://' not in path


def abspath(path: str) -> str:
  """An absolute local path, or the URL as it is."""
  return os.path.abspath(path) if is_local(path) else path


def _fs(path: str):
  """(fsspec filesystem, path within it) of a URL."""
  # file:// writes create their parent directories, as writes to an object store need none.
  options = dict(auto_mkdir=True) if path.startswith('file://') else {}
  try:
    return fsspec.core.url_to_fs(path, **options)
  except ImportError as e:  # gcsfs (or another scheme's package) is missing
    if path.startswith(('gs://', 'gcs://')):
      raise errors.MissingExtra(repr(path), 'gcs', 'gcsfs') from None
    raise errors.ConfigError(f"{path!r}: {e} (for gs:// paths: pip install -e '.[gcs]')") from None
  except ValueError as e:
    raise errors.ConfigError(f'{path!r}: {e}; expected a local path or a gs:// URL') from None


def open(path: str, mode: str = 'r'):  # pylint: disable=redefined-builtin
  """A file object; text modes read and write UTF-8."""
  text = {} if 'b' in mode else dict(encoding='utf-8')
  if is_local(path):
    return builtins.open(path, mode, **text)
  fs, p = _fs(path)
  return fs.open(p, mode, **text)


def isfile(path: str) -> bool:
  if is_local(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return fs.isfile(p)


def isdir(path: str) -> bool:
  if is_local(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def exists(path: str) -> bool:
  if is_local(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def listdir(path: str) -> list[str]:
  """Names (not paths) of the entries of the directory `path`; a missing directory has none."""
  if is_local(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = _fs(path)
  if not fs.isdir(p):
    return []
  return sorted(os.path.basename(e.rstrip('/')) for e in fs.ls(p, detail=False))


def makedirs(path: str) -> None:
  """Creates `path` and its parents where missing (on GCS directories are implicit: it only checks
  that the bucket exists)."""
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  else:
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def rmtree(path: str) -> None:
  """Deletes the directory `path` and everything under it; a missing one is not an error."""
  if is_local(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, p = _fs(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)


def replace(src: str, dst: str) -> None:
  """Moves the file or directory `src` to `dst` on the same filesystem (a file `dst` is replaced).
  One atomic rename on a local disk; on an object store a copy of each object, then the deletion
  of `src`."""
  if is_local(src):
    os.replace(src, dst)
    return
  fs, p = _fs(src)
  fs.mv(p, _fs(dst)[1], recursive=fs.isdir(p))


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` so that a reader sees the old file or the new one, never a part: a
  temporary file renamed over it on a local disk; one object write on an object store."""
  mode = 'w' if isinstance(data, str) else 'wb'
  if not is_local(path):
    with open(path, mode) as f:
      f.write(data)
    return
  tmp = f'{path}.tmp{os.getpid()}'
  with removed_on_error(tmp), open(tmp, mode) as f:
    f.write(data)
  os.replace(tmp, path)


@contextlib.contextmanager
def removed_on_error(local_path: str):
  """Removes the local file or directory `local_path` (a temporary being written) if the block
  raises (a KeyboardInterrupt too), so a failed write leaves no half-written scratch behind."""
  try:
    yield
  except BaseException:
    if os.path.isdir(local_path):
      shutil.rmtree(local_path, ignore_errors=True)
    elif os.path.lexists(local_path):
      os.unlink(local_path)
    raise


def write_figure(fig, path: str, dpi: int = 110) -> None:
  """A matplotlib figure as a PNG at `path`, written atomically (write_atomic)."""
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=dpi)
  write_atomic(path, png.getvalue())


def append_text(path: str, text: str) -> None:
  """Appends `text` to the file `path` (created if missing). On an object store the object is read
  and written again whole (see the module docstring)."""
  if is_local(path):
    with open(path, 'a') as f:
      f.write(text)
    return
  old = read_text(path) if isfile(path) else ''
  write_atomic(path, old + text)


def read_text(path: str) -> str:
  with open(path) as f:
    return f.read()


def upload_file(local_path: str, path: str) -> None:
  """Copies the local file `local_path` to `path` (a local path or a URL; overwriting)."""
  if is_local(path):
    os.makedirs(os.path.dirname(abspath(path)), exist_ok=True)
    shutil.copyfile(local_path, path)
  else:
    fs, p = _fs(path)
    fs.put_file(local_path, p)


def upload(local_dir: str, url: str) -> None:
  """Copies every file under the local directory `local_dir` to the same relative path under `url`
  (overwriting)."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      src = os.path.join(root, name)
      upload_file(src, os.path.join(url, os.path.relpath(src, local_dir)))
