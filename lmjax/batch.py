"""The batch spec, defined once: the fields of a training batch, their dtypes and shapes.

The data pipeline produces these fields, the train and eval steps read them, `lmjax.aot` compiles for
them and the throughput benchmark and the tests make synthetic batches of them. Shapes are per row:
every field has a leading batch axis B; 'T' is the sequence length.

  inputs       [B, T] int32    token ids the model reads
  targets      [B, T] int32    the next token of each position
  weights      [B, T] float32  1 where the target counts in the loss, 0 at padding and document ends
  segment_ids  [B, T] int32    1, 2, ... per document piece of a packed row; 0 = padding
  positions    [B, T] int32    position within the piece (restarts at 0 at each piece; RoPE reads it)
  source_id    [B]    int32    index of the mixture source the row came from (per-source train loss)

A loss may add fields of its own (its record's `Needs.batch_fields`, lmjax/losses.py: distillation's
teacher top-k, lmjax/distill/kd.py): the functions below take them as `extra`, name -> (dtype, per-row
axes), an axis 'B', 'T' or a size.
"""
from __future__ import annotations

import jax
import numpy as np

FIELDS: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    'inputs': (np.dtype(np.int32), ('B', 'T')),
    'targets': (np.dtype(np.int32), ('B', 'T')),
    'weights': (np.dtype(np.float32), ('B', 'T')),
    'segment_ids': (np.dtype(np.int32), ('B', 'T')),
    'positions': (np.dtype(np.int32), ('B', 'T')),
    'source_id': (np.dtype(np.int32), ('B',)),
}

Spec = dict[str, tuple[np.dtype, tuple]]


def fields(extra: Spec | None = None) -> Spec:
  """The batch's fields: FIELDS and a loss's `extra` ones."""
  return {**FIELDS, **(extra or {})}


def shape(field: str, batch_size: int, seq_len: int, extra: Spec | None = None) -> tuple[int, ...]:
  sizes = {'B': batch_size, 'T': seq_len}
  return tuple(sizes.get(a, a) for a in fields(extra)[field][1])


def abstract(batch_size: int, seq_len: int, sharding=None, extra: Spec | None = None
             ) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a global batch (for ahead-of-time compilation)."""
  return {name: jax.ShapeDtypeStruct(shape(name, batch_size, seq_len, extra), dtype, sharding=sharding)
          for name, (dtype, _) in fields(extra).items()}


def check(batch: dict, batch_size: int, seq_len: int, extra: Spec | None = None) -> None:
  """Raises ValueError naming the first field whose name, dtype or shape is not the spec's."""
  spec = fields(extra)
  if set(batch) != set(spec):
    raise ValueError(f'batch fields {sorted(batch)}: expected {sorted(spec)}')
  for name, (dtype, _) in spec.items():
    want = shape(name, batch_size, seq_len, extra)
    got = batch[name]
    if got.dtype != dtype or tuple(got.shape) != want:
      raise ValueError(f'batch field {name!r}: {got.dtype}{list(got.shape)}, expected {dtype}{list(want)}')


def synthetic(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
              docs_per_row: int = 1) -> dict[str, np.ndarray]:
  """A batch of uniformly random tokens, `docs_per_row` packed documents a row (cut at random
  points), fields and dtypes as the pipeline makes them: for benchmarks, aot and tests."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1))
  cuts = np.sort(rng.integers(1, seq_len, (batch_size, docs_per_row - 1)), axis=1)
  seg = 1 + (np.arange(seq_len + 1)[None, :, None] >= cuts[:, None, :]).sum(-1)
  starts = np.concatenate([np.zeros((batch_size, 1), np.int64), cuts], axis=1)
  pos = np.arange(seq_len + 1)[None] - np.take_along_axis(starts, seg - 1, axis=1)
  out = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
             weights=(seg[:, 1:] == seg[:, :-1]), segment_ids=seg[:, :-1], positions=pos[:, :-1],
             source_id=np.zeros(batch_size))
  return {name: out[name].astype(dtype) for name, (dtype, _) in FIELDS.items()}
