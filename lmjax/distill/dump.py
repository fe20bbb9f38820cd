"""The teacher over the run's rows into a top-k store (lmjax/distill/store.py).

  python -m lmjax.distill.dump --config=configs/distill.py:teacher=RUN --workdir=STUDENT_RUN \
      [--steps=N --chunk_steps=1]

For global batches 0 .. steps-1 of the student's data stream (the run's config: seed, batch,
sequence length, mixture; `steps` defaults to config.train.steps), the teacher (config.loss.kd.teacher,
an lmjax run; its latest checkpoint) computes its top-k next-token distribution
(lmjax.distill.kd.teacher_topk, k = config.loss.kd.k) and the store at config.loss.kd.store keeps it in
config.loss.kd.encoding. Chunk c holds `chunk_steps` batches. One process writes the store (on all of
its devices); a multi-process dump is refused: the teacher's step would need every process on every
chunk. A rerun writes only the chunks that are not finished (a killed dump resumes), and the result is the
same store. The data comes from the student's workdir cache (config.data.cache_dir, else
<workdir>/data), prepared there if needed.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from lmjax import errors, model, sharding, trainer
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.distill import kd as kd_lib, store as store_lib, teacher as teacher_lib


def dump(config, workdir: str, steps: int | None = None, chunk_steps: int = 1,
         on_chunk: Callable[[int], None] | None = None) -> store_lib.Store:
  """Writes the store (see the module docstring); `on_chunk(c)` runs after each chunk is written.
  Returns the store."""
  kd = config.loss.kd
  if jax.process_count() > 1:
    raise errors.ConfigError(f'lmjax.distill.dump runs in one process, got {jax.process_count()}: run it on '
                             'one host (the store is then read by every process of the student run)')
  if not kd.teacher or not kd.store:
    raise errors.ConfigError('config.loss.kd.teacher and config.loss.kd.store: expected the teacher run and '
                             f'the store directory, got {kd.teacher!r} and {kd.store!r}')
  steps = int(config.train.steps if steps is None else steps)
  pipeline = trainer.build_pipeline(config, workdir, whole_batches=True)
  teacher_dir = teacher_lib.directory(kd.teacher)
  args = teacher_lib.model_args(teacher_dir)
  vocab = pipeline.tokenizer.vocab_size
  batch_rows = config.train.batch_size
  store = store_lib.Store.create(
      kd.store, k=kd.k, encoding=kd.encoding, vocab_size=vocab, stream=pipeline.stream,
      rows=steps * batch_rows, chunk_rows=chunk_steps * batch_rows, teacher=kd.teacher,
      tokenizer_digest=tokenizer_lib.digest(pipeline.tokenizer.path))
  todo = store.missing()
  if not todo:
    return store
  mesh = sharding.make_mesh(config.mesh)
  params = teacher_lib.load_params(teacher_dir, args, mesh)
  graphdef = model.abstract(args)[0]
  topk = jax.jit(lambda p, b: kd_lib.teacher_topk_chunked(
      *model.hidden_and_head(graphdef, p, b), kd.k, vocab, config.loss.chunk_tokens))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh):
    for c in todo:
      parts = []
      for step in range(c * chunk_steps, min((c + 1) * chunk_steps, steps)):
        batch = jax.device_put(pipeline.batch(step), replicated)
        parts.append(jax.device_get(topk(params, batch)))
      store.write_chunk(c, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
      if on_chunk:
        on_chunk(c)
  return store


def main(config) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  start = time.perf_counter()
  store = dump(config, f.workdir, f.steps, f.chunk_steps)
  tokens = store.rows * store.seq_len
  print(f'{store.path}: {store.rows} rows x {store.seq_len} positions, k={store.k}, {store.encoding} '
        f'({store_lib.bytes_per_token(store.k, store.encoding, store.vocab_size)} bytes/token); '
        f'{tokens / (time.perf_counter() - start):,.0f} tokens/s')


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags("the student's run directory (its data cache)")
  flags.DEFINE_integer('steps', None, 'global batches to cover (default: config.train.steps)')
  flags.DEFINE_integer('chunk_steps', 1, 'global batches per store chunk', lower_bound=1)
  cli.run(main)
