"""Held-out loss and bits per byte: the one held-out forward pass, which the trainer's
`eval/<source>/loss` (lmjax/trainer.py), the bits-per-byte hook (lmjax/eval/hook.py) and
`python -m lmjax.evaluate` all run (`measure`).

Held-out sets are the run's own: `Pipeline.eval_batches`, each source's held-out documents packed in
stored order into rows of `config.train.seq_len` tokens (`--config.data.eval.num_batches` bounds
them).

Bits per byte, a loss that does not depend on the tokenizer. Over the targets of a source's held-out
batches (each document's tokens after its BOS, and its EOS; the context of a target is its
document's tokens before it in the same row),
    bpb = sum of -ln p(target | context) / (ln 2 x sum of bytes(target)),
where bytes(t) is the number of UTF-8 bytes that token t adds to the decoded text (`token_bytes`: a
piece's text with '\u2581' read as a space, a byte-fallback piece <0xNN> 1, a byte-level BPE token its
length in the byte alphabet, BOS/EOS/UNK and special tokens 0). Over whole documents the denominator
is therefore the UTF-8 size of their text whatever the tokenizer (one that prepends a space to each
text, as Llama 2's does, counts that space too), and models with different tokenizers compare on the
same documents (let num_batches cover all held-out documents: a batch budget covers different text
under different tokenizers).

This module sits below the trainer (the trainer imports it): it imports no entry point, trainer or
other lmjax.eval module. A run's Evaluator is built by lmjax/eval/runs.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from lmjax import sharding, steps as steps_lib
from lmjax.data import tokenizer as tokenizer_lib

_BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')


def token_bytes(tok: tokenizer_lib.Tokenizer) -> np.ndarray:
  """[V] int64: the UTF-8 bytes each token id adds to decoded text (see the module docstring)."""
  special = {tok.bos_id, tok.eos_id}
  byte_level = False
  if isinstance(tok, tokenizer_lib.HFTokenizer):
    with open(tok.path) as f:
      spec = json.load(f)
    special |= {t['id'] for t in spec.get('added_tokens', []) if t.get('special')}
    byte_level = 'ByteLevel' in json.dumps(spec.get('decoder'))
  else:
    special.add(tokenizer_lib.UNK_ID)
  out = np.zeros(tok.vocab_size, np.int64)
  for i in range(tok.vocab_size):
    piece = tok.id_to_piece(i)
    if i in special or piece is None:
      continue
    if byte_level:
      out[i] = len(piece)  # one character of the byte alphabet per byte
    elif _BYTE_PIECE.fullmatch(piece):
      out[i] = 1
    else:
      out[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
  return out


@dataclasses.dataclass
class Evaluator:
  """What evaluating a run's params needs: its mesh, steps (model graph, eval step), tokenizer and
  held-out batches by source (empty when built without data). lmjax/eval/runs.py builds one."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  steps: steps_lib.Steps
  tokenizer: tokenizer_lib.Tokenizer
  eval_batches: dict[str, list[dict[str, np.ndarray]]]

  @functools.cached_property
  def bytes_v(self) -> jax.Array:
    """[V] `token_bytes` of the tokenizer, replicated on the mesh."""
    return jax.device_put(token_bytes(self.tokenizer),
                          jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))


@jax.jit
def _target_bytes(batch: dict, bytes_v: jax.Array) -> jax.Array:
  return (bytes_v[batch['targets']] * batch['weights']).sum()


def measure(eval_step: Callable, params: dict, eval_batches: Mapping[str, Sequence[dict]],
            mesh: jax.sharding.Mesh, bytes_v: jax.Array | None = None) -> dict[str, dict[str, float]]:
  """The held-out forward pass. Per source: `loss` (nats per target token) and the `tokens` (summed
  target weights) over its batches; with `bytes_v` ([V] `token_bytes` on the mesh) also `bpb` (bits
  per byte) and the targets' `bytes`.

  eval_step: `steps.Steps.eval_step`, (params, global batch) -> (loss sum, weight sum).
  eval_batches: {source: this process's part of each batch} (`Pipeline.eval_batches`), placed on
    `mesh` with `sharding.global_batch` one at a time. Every batch of a source is dispatched before
    any result is read; the per-batch sums (f32) are added on the host in float64 (math.fsum)."""
  out = {}
  with jax.set_mesh(mesh):
    for source, batches in eval_batches.items():
      sums, target_bytes = [], []
      for b in batches:
        placed = sharding.global_batch(b, mesh)
        sums.append(eval_step(params, placed))
        if bytes_v is not None:
          target_bytes.append(_target_bytes(placed, bytes_v))
      sums, target_bytes = jax.device_get((sums, target_bytes))
      nats, tokens = (math.fsum(float(s[i]) for s in sums) for i in (0, 1))
      out[source] = dict(loss=nats / max(tokens, 1.0), tokens=tokens)
      if bytes_v is not None:
        nbytes = math.fsum(float(b) for b in target_bytes)
        out[source].update(bpb=nats / (math.log(2) * max(nbytes, 1.0)), bytes=nbytes)
  return out


def heldout(ev: Evaluator, params: dict) -> dict[str, dict[str, float]]:
  """Per source: `loss` (nats per target token), `bpb` (bits per byte), and the `tokens` and `bytes`
  of the targets, over its held-out batches."""
  return measure(ev.steps.eval_step, params, ev.eval_batches, ev.mesh, ev.bytes_v)
