"""The teacher of a distillation run (config.loss.kd.teacher = 'lmjax:DIR', another lmjax run): its
model args (from its config.json), its latest params (sharded like the student's, by the same logical
axes) and its tokenizer, which must be the student's: logit distillation compares distributions over
the same token ids, so a different tokenizer file or vocabulary is an error naming both.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from lmjax import errors, fs, init_from, model, sharding
from lmjax.data import tokenizer as tokenizer_lib


def directory(spec: str) -> str:
  """The run directory of a teacher `spec` (config.loss.kd.teacher, lmjax:DIR)."""
  kind, path = init_from.parse(spec)
  if kind != 'lmjax':
    raise errors.ConfigError(f'config.loss.kd.teacher={spec!r}: expected lmjax:DIR (a run)')
  return path


def model_args(teacher_dir: str) -> model.Args:
  """The teacher's model.Args, from the config.json its run wrote."""
  path = os.path.join(teacher_dir, 'config.json')
  if not fs.isfile(path):
    raise errors.MissingFile(f'teacher {teacher_dir!r}: {path} does not exist (not an lmjax run directory?)')
  return model.resolve(ml_collections.ConfigDict(json.loads(fs.read_text(path))['model']))


def abstract(args: model.Args, mesh) -> tuple[object, dict]:
  """(graphdef, params as ShapeDtypeStructs) of a teacher of `args`, sharded on `mesh` as the student's
  would be (by the same logical axes)."""
  graphdef, shapes, axes = model.abstract(args)
  shardings = sharding.param_shardings(shapes, axes, mesh)
  return graphdef, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, shardings)


def load_params(teacher_dir: str, args: model.Args, mesh) -> dict:
  """The teacher's latest params, each array read into its shards (`abstract`)."""
  return init_from.lmjax_params(teacher_dir, abstract(args, mesh)[1], mesh)


def tokenizer_path(spec: str) -> str:
  """The tokenizer file of the teacher `spec` (its run's provenance.json names it)."""
  return init_from.parent_tokenizer('lmjax:' + directory(spec))


def check_tokenizer(teacher_tokenizer: str, student_tokenizer: str) -> None:
  """Raises ValueError naming both when the files or the vocabularies differ."""
  teacher, student = tokenizer_lib.load(teacher_tokenizer), tokenizer_lib.load(student_tokenizer)
  if (teacher.vocab_size != student.vocab_size
      or tokenizer_lib.digest(teacher_tokenizer) != tokenizer_lib.digest(student_tokenizer)):
    raise errors.ConfigError(
        f'distillation needs the teacher\'s tokenizer: the teacher has {teacher_tokenizer} '
        f'({teacher.vocab_size} tokens), the student {student_tokenizer} ({student.vocab_size} tokens); '
        'leave config.data.tokenizer.path empty to take the teacher\'s')
