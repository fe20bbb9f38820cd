"""Orbax checkpoints of the train state and the data-iterator state.

Each step directory holds `state` (params, optimizer state, step, rng; sharded arrays written by every
process in parallel) and `data` (the data iterator's JSON state, for an exact resume of the stream).
Orbax writes into a temporary directory and renames it only once every item is complete, so a
process killed mid-write leaves no step directory that restores wrongly: `latest_step()` only sees
finished ones. Saves are asynchronous: training continues while arrays are written.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict, data_state) -> None:
    """Starts writing checkpoint `step` (returns before the write completes when async)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, object]:
    """Restores (state, data_state); `abstract_state` holds ShapeDtypeStructs with shardings, so
    each array is read straight into its shards on the mesh."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, abstract_params: dict) -> dict:
  """Params of the latest checkpoint of another run (`init_from`), read onto the given shardings."""
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'config.init_from={directory!r}: no finished checkpoint in it')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={'params': abstract_params},
          restore_args=ocp.checkpoint_utils.construct_restore_args({'params': abstract_params}),
          partial_restore=True)))
  manager.close()
  return restored['state']['params']
