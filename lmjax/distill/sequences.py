"""Sequence-level distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): the teacher's
sampled continuations of prompts become training text, a `jsonl:` source a phase can mix in.

  python -m lmjax.distill.sequences --config=configs/distill.py:teacher=T --workdir=S \
      --out=/tmp/teacher_en.jsonl --source=en [--prompts=256 --prompt_tokens=32 --new_tokens=96]

Prompts are the first `prompt_tokens` tokens of the run's own training rows (lmjax/data/pipeline.py)
that come from `source`, in stream order; the teacher (config.loss.kd.teacher) continues each with
`new_tokens` tokens sampled at `temperature` (lmjax/decode.py), and each prompt + continuation is one
line {"text": ...} of `out` (written atomically). Then add it to the student's sources, e.g.
`c.data.sources['teacher'] = dict(corpora='jsonl:/tmp/teacher_en.jsonl', max_chars=0)` and give it a
weight in a phase.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from lmjax import decode, errors, fs, model, sharding, trainer
from lmjax.distill import teacher as teacher_lib


def prompts(pipeline, source: str, n: int, prompt_tokens: int, steps: int) -> np.ndarray:
  """[n, prompt_tokens] token ids: the starts of the first n training rows of `source` within the
  run's first `steps` global batches."""
  if source not in pipeline.sources:
    raise errors.ConfigError(f'--source={source!r}: expected one of {list(pipeline.sources)}')
  want, out = pipeline.sources.index(source), []
  for step in range(steps):
    if len(out) >= n:
      break
    batch = pipeline.batch(step)
    out += [row[:prompt_tokens] for row, s in zip(batch['inputs'], batch['source_id']) if s == want]
  if len(out) < n:
    raise errors.ConfigError(f'--source={source!r}: {len(out)} of its rows in the run\'s {steps} steps, '
                             f'expected at least {n} prompts (is its weight 0 in config.phases?)')
  return np.stack(out[:n])


def write(config, workdir: str, out: str, source: str, n: int = 256, prompt_tokens: int = 32,
          new_tokens: int = 96, temperature: float = 1.0, seed: int = 0, batch: int = 64) -> int:
  """Writes the teacher's continuations as jsonl (see the module docstring); returns the lines."""
  pipeline = trainer.build_pipeline(config, workdir, whole_batches=True)
  teacher_dir = teacher_lib.directory(config.loss.kd.teacher)
  args = teacher_lib.model_args(teacher_dir)
  params = teacher_lib.load_params(teacher_dir, args, sharding.make_mesh(config.mesh))
  graphdef, tok = model.abstract(args)[0], pipeline.tokenizer
  ids = prompts(pipeline, source, n, prompt_tokens, int(config.train.steps))
  lines = []
  for i in range(0, n, batch):
    new = decode.generate(graphdef, params, ids[i:i + batch], new_tokens, temperature=temperature,
                          seed=seed + i, eos_id=tok.eos_id)
    for p, c in zip(ids[i:i + batch], new):
      c = c.tolist()
      c = c[:c.index(tok.eos_id)] if tok.eos_id in c else c
      text = tok.decode([t for t in p.tolist() + c
                         if t < tok.vocab_size and t not in (tok.bos_id, tok.eos_id)])
      lines.append(json.dumps({'text': text}, ensure_ascii=False))
  if jax.process_index() == 0:
    fs.write_atomic(out, '\n'.join(lines) + '\n')
  return len(lines)


def main(config) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  n = write(config, f.workdir, f.out, f.source, f.prompts, f.prompt_tokens, f.new_tokens,
            f.temperature, f.seed)
  print(f'wrote {n} teacher continuations to {f.out}')


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags("the student's run directory (its data cache)")
  flags.DEFINE_string('out', None, 'the jsonl file to write', required=True)
  flags.DEFINE_string('source', None, 'the source whose training rows give the prompts', required=True)
  flags.DEFINE_integer('prompts', 256, 'prompts (lines)')
  flags.DEFINE_integer('prompt_tokens', 32, 'tokens of each prompt')
  flags.DEFINE_integer('new_tokens', 96, 'tokens the teacher samples after each prompt')
  flags.DEFINE_float('temperature', 1.0, 'sampling temperature')
  flags.DEFINE_integer('seed', 0, 'sampling seed')
  cli.run(main)
