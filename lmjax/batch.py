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

Offline distillation (config.loss.name='kd', lmjax/distill/store.py) adds the teacher's top-k
(TEACHER_FIELDS; 'K' is config.loss.kd.k):

  teacher_ids       [B, T, K] int32    the teacher's k most likely next tokens, most likely first
  teacher_logprobs  [B, T, K] float32  their log-probabilities (-inf: no mass; padding)
  teacher_tail      [B, T]    float32  the teacher's probability of every other token
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

TEACHER_FIELDS: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    'teacher_ids': (np.dtype(np.int32), ('B', 'T', 'K')),
    'teacher_logprobs': (np.dtype(np.float32), ('B', 'T', 'K')),
    'teacher_tail': (np.dtype(np.float32), ('B', 'T')),
}


def fields(k: int = 0) -> dict[str, tuple[np.dtype, tuple[str, ...]]]:
  """The batch's fields: FIELDS, plus TEACHER_FIELDS with k > 0 (offline distillation)."""
  return {**FIELDS, **(TEACHER_FIELDS if k else {})}


def shape(field: str, batch_size: int, seq_len: int, k: int = 0) -> tuple[int, ...]:
  sizes = {'B': batch_size, 'T': seq_len, 'K': k}
  return tuple(sizes[a] for a in {**FIELDS, **TEACHER_FIELDS}[field][1])


def abstract(batch_size: int, seq_len: int, sharding=None, k: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a global batch (for ahead-of-time compilation)."""
  return {name: jax.ShapeDtypeStruct(shape(name, batch_size, seq_len, k), dtype, sharding=sharding)
          for name, (dtype, _) in fields(k).items()}


def check(batch: dict, batch_size: int, seq_len: int, k: int = 0) -> None:
  """Raises ValueError naming the first field whose name, dtype or shape is not the spec's."""
  spec = fields(k)
  if set(batch) != set(spec):
    raise ValueError(f'batch fields {sorted(batch)}: expected {sorted(spec)}')
  for name, (dtype, _) in spec.items():
    want = shape(name, batch_size, seq_len, k)
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
