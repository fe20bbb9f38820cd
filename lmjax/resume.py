"""What a resumed run may change, and metrics that read as one run after a resume.

A run resumed from its workdir compares its config with the one it was started with (config.json).
Fields in FREE change neither the model, the data order nor the optimizer state (logging intervals,
kernels, sharding, reader threads) and may differ; `train.steps` may change (extending a finished
run) and is recorded. Any other change is an error listing the changed fields, unless the user
accepts it (`python -m lmjax.train ... --accept_config_changes`); accepted changes are recorded in
config_changes.jsonl with the step they took effect.
"""
from __future__ import annotations

import json

from lmjax import errors, fs

# Dotted config paths (a path and everything under it) that a resume may change freely.
FREE = ('train.log_every', 'train.eval_every', 'train.checkpoint_every', 'train.keep_checkpoints',
        'train.async_checkpoint', 'train.trackers', 'train.wandb_project', 'data.num_threads',
        'data.prefetch', 'data.verify_checksums', 'data.cache_dir', 'data.eval.num_batches', 'model.attention',
        'model.remat', 'mesh', 'init_from', 'init_skip', 'loss.implementation', 'loss.chunk_tokens',
        'loss.kd.store', 'loss.kd.mode',  # where the teacher's top-k comes from, not what it is
        'eval')  # what is measured along the way
RECORDED = ('train.steps',)


def flatten(tree, prefix: str = '') -> dict:
  """{'a.b.c': value} of a nested dict (lists and tuples are values)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f'{prefix}.{key}' if prefix else str(key)))
  return out


def _under(field: str, paths) -> bool:
  return any(field == p or field.startswith(p + '.') for p in paths)


def read_config(path: str) -> dict | None:
  if not fs.isfile(path):
    return None
  return json.loads(fs.read_text(path))


def check(saved: dict | None, config, step: int, accept: bool) -> list[dict]:
  """The changes from the saved config to `config` as [{field, old, new, step}] (free ones left
  out); raises ValueError listing them when one is neither free, recorded nor accepted."""
  if saved is None:
    return []
  old, new = flatten(saved), flatten(json.loads(config.to_json_best_effort()))
  changes = [dict(field=f, old=old.get(f), new=new.get(f), step=step)
             for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f) and not _under(f, FREE)]
  refused = [c for c in changes if not _under(c['field'], RECORDED)]
  if refused and not accept:
    listed = '; '.join(f"config.{c['field']}: {c['old']!r} -> {c['new']!r}" for c in refused)
    raise errors.ConfigError(f'resuming at step {step} with a changed config ({listed}): these change the '
                             'model, the data order or the optimizer state; rerun with the config of the '
                             'run, or pass --accept_config_changes to take them from this step on')
  return changes


def record(path: str, changes: list[dict]) -> None:
  fs.append_text(path, ''.join(json.dumps(c) + '\n' for c in changes))


def truncate_metrics(path: str, start_step: int) -> None:
  """Drops the records of steps after `start_step` from metrics.jsonl (atomically)."""
  if not fs.isfile(path):
    return
  lines = fs.read_text(path).splitlines(keepends=True)
  kept = [l for l in lines if l.strip() and json.loads(l).get('step', 0) <= start_step]
  if len(kept) == len(lines):
    return
  fs.write_atomic(path, ''.join(kept))
