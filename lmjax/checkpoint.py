"""Orbax checkpoints of the train state and the data-iterator state.

Each step directory holds `state` (params, optimizer state, step, empty_batches; sharded arrays written by every
process in parallel) and `data` (the data iterator's JSON state, for an exact resume of the stream).
Orbax writes into a temporary directory and renames it only once every item is complete, so a
process killed mid-write leaves no step directory that restores wrongly: `latest_step()` only sees
finished ones. Saves are asynchronous: training continues while arrays are written. A step directory that exists
but does not restore (damaged later, or its commit marker missing) is moved aside and the previous
checkpoint restored (`restore_latest`).

The directory is a local path or a gs:// URL: orbax reads and writes GCS itself (etils.epath and
tensorstore; on GCS it commits a step with commit_success.txt instead of a rename). Moving a damaged
step aside goes through lmjax/fs.py.
"""
from __future__ import annotations

import contextlib
import os

import orbax.checkpoint as ocp
from absl import logging

from lmjax import errors, fs


def orbax_path(directory: str) -> str:
  """`directory` as orbax takes it: a local path made absolute, a URL as it is, except file://
  (which etils.epath does not know): its local path."""
  return fs.abspath(directory.removeprefix('file://'))


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = orbax_path(directory)
    self._pending, self._failed = None, False  # the last step saved; whether a save failed
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict, data_state) -> None:
    """Starts writing checkpoint `step` (returns before the write completes when async). A failed
    write raises errors.CheckpointSaveError naming the directory and the disk's reason, here or, when
    async, from the next `check` or `wait`."""
    with self._failure(self._pending):  # orbax would wait for it too; its failure is its own
      self._manager.wait_until_finished()
    with self._failure(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    self._pending = step

  def check(self) -> None:
    """Raises errors.CheckpointSaveError if an asynchronous save has failed (cheap: once a step)."""
    with self._failure(self._pending):
      self._manager.check_for_errors()

  def restore_latest(self, abstract_state: dict) -> tuple[int, dict, object]:
    """(step, state, data_state) of the newest checkpoint that restores. One that does not (a file
    truncated or corrupt, its commit marker missing) is moved to `<directory>_corrupt/<step>` with a
    warning, and the one before it is tried; none restoring is an error naming the directory."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      if fs.isfile(os.path.join(path, 'commit_success.txt')):
        try:
          return step, *self.restore(step, abstract_state)
        except Exception as e:  # orbax and tensorstore raise many kinds for a damaged file
          problem = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
      else:
        problem = 'no commit_success.txt (the write did not finish)'
      aside = os.path.join(self.directory + '_corrupt', f'{step}')
      logging.warning('checkpoint %s is unreadable (%s); moved to %s, restoring the one before',
                      path, problem, aside)
      fs.makedirs(os.path.dirname(aside))
      fs.rmtree(aside)
      fs.replace(path, aside)
      self._manager.reload()
    raise errors.CheckpointError(f'no checkpoint in {self.directory} restores (the unreadable ones are in '
                            f'{self.directory}_corrupt); delete the run directory to start afresh')

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, object]:
    """Restores (state, data_state); `abstract_state` holds ShapeDtypeStructs with shardings, so
    each array is read straight into its shards on the mesh."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_params(self, step: int, abstract_params: dict) -> dict:
    """The params of checkpoint `step` alone, read into the shardings of `abstract_params`: what
    evaluation needs, whatever optimizer state the run kept."""
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={'params': abstract_params},
        restore_args=ocp.checkpoint_utils.construct_restore_args({'params': abstract_params}),
        partial_restore=True)))
    return restored['state']['params']

  def wait(self) -> None:
    """Waits for the save under way; raises as `check` (once: after a failure it only waits)."""
    with self._failure(self._pending):
      self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  @contextlib.contextmanager
  def _failure(self, step: int | None):
    """A failed write of checkpoint `step` as errors.CheckpointSaveError, its partial files gone:
    orbax's temporary step directories (`<step>.orbax-checkpoint-tmp*`, on a local disk; on GCS a
    step without commit_success.txt is what restore_latest sets aside) would otherwise hold the
    space a retry needs. The failure is raised once; the disk's error is never hidden by a failed
    removal."""
    try:
      yield
    except BaseException as e:
      try:
        for name in fs.listdir(self.directory):
          if '.orbax-checkpoint-tmp' in name:
            fs.rmtree(os.path.join(self.directory, name))
      except Exception as removal:  # pylint: disable=broad-except
        logging.warning('could not remove the failed checkpoint write under %s: %s', self.directory,
                        removal)
      if not isinstance(e, Exception) or isinstance(e, errors.CheckpointSaveError):
        raise
      if self._failed:  # already raised: the same failure seen again by wait or close
        return
      self._failed = True
      latest = self._manager.latest_step()
      raise errors.CheckpointSaveError(
          f'checkpoint {step} could not be written to {self.directory}: {errors.os_reason(e)} (the '
          f'last good checkpoint: {"none" if latest is None else latest}); free space or fix the '
          'directory, then rerun the same command to resume') from e
