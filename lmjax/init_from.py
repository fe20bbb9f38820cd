"""Starting a run from an existing model: `config.init_from`.

  init_from = 'lmjax:DIR'   another lmjax run's workdir (its latest checkpoint's params); a bare DIR too
  init_from = 'hf:DIR'      a Hugging Face checkpoint (safetensors + config.json; lmjax/convert.py)
  init_from = 'hf:ORG/NAME[@REVISION]'   the same by its Hub id (meta-llama/Llama-3.2-1B), from the
                            Hub cache or downloaded into it (HF_HUB_OFFLINE=1: the cache only)

An lmjax DIR may be a URL (gs://bucket/runs/1b): its provenance.json and tokenizer are read through
lmjax/fs.py, its checkpoint by orbax.

The run inherits the parent's tokenizer (`tokenizer_of`): with `config.data.tokenizer.path` unset it takes the parent's
(an lmjax run records its tokenizer in provenance.json; a Hugging Face directory holds tokenizer.json);
a different tokenizer is an error naming both, since the parent's weights mean its token ids.

Parameters are matched by name and shape. The vocabulary may grow: rows of the embedding (and columns
of an untied head) past the parent's start at the mean of the parent's rows. `config.init_skip`
(regexes on '/'-joined parameter paths) keeps matching parameters at their fresh initialisation, e.g.
a replaced head. Anything else that differs is an error naming the first mismatching tensor.
Only the parameters come from the parent: optimizer state and step start fresh.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lmjax import checkpoint, convert, errors, fs, model, sharding
from lmjax.data import tokenizer as tokenizer_lib

KINDS = ('lmjax', 'hf')
# Parameters with a vocabulary axis, and which axis it is: they may grow (see the module docstring).
VOCAB_AXIS = {'embed_vd': 0, 'head_dv': 1}


def parse(spec: str) -> tuple[str, str]:
  """'hf:DIR' -> ('hf', DIR); 'hf:ORG/NAME[@REVISION]' -> ('hf', its directory in the Hugging Face
  Hub cache, downloaded if missing: convert.directory); 'lmjax:DIR' or a bare 'DIR' (a URL too) ->
  ('lmjax', DIR)."""
  kind, sep, rest = spec.partition(':')
  if sep and kind == 'hf':
    return kind, convert.directory(rest)
  if sep and kind in KINDS:
    return kind, rest
  if sep and '/' not in kind and not rest.startswith('//'):
    raise errors.ConfigError(f'config.init_from={spec!r}: expected lmjax:DIR, hf:DIR or a run directory')
  return 'lmjax', spec


def parent_tokenizer(spec: str) -> str | None:
  """The parent's tokenizer file, or None where it has none (a Hugging Face dir without one)."""
  kind, directory = parse(spec)
  if kind == 'hf':
    path = os.path.join(directory, 'tokenizer.json')
    return path if os.path.isfile(path) else None
  provenance = os.path.join(directory, 'provenance.json')
  if not fs.isfile(provenance):
    raise errors.MissingFile(f'config.init_from={spec!r}: {provenance} does not exist (not an lmjax run '
                             'directory?)')
  path = json.loads(fs.read_text(provenance)).get('tokenizer')
  if not path or not fs.isfile(path):
    raise errors.MissingFile(f'config.init_from={spec!r}: the run records no tokenizer that exists '
                             f'({path!r} in {provenance}); set config.data.tokenizer.path to it')
  return path


def tokenizer_of(spec: str, own: str) -> str:
  """The tokenizer of a run whose parent is `spec` (config.init_from): `own` (config.data.tokenizer.path)
  when set, which must be the parent's (an error names both), else the parent's; `own` where the
  parent records none."""
  parent = parent_tokenizer(spec)
  if parent is None:
    return own
  if own and tokenizer_lib.digest(own) != tokenizer_lib.digest(parent):
    raise errors.ConfigError(f'config.data.tokenizer.path={own!r} is not the tokenizer of config.init_from='
                             f'{spec!r} ({parent}): its weights mean that tokenizer\'s ids; '
                             'leave config.data.tokenizer.path empty to inherit it')
  return own or parent


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in key_path)


def lmjax_params(directory: str, target_abstract: dict, mesh) -> dict:
  """The latest checkpoint's params, each read onto the target's sharding (or replicated, where its
  shape differs: it is adapted afterwards)."""
  ckpt = checkpoint.Checkpointer(os.path.join(directory, 'checkpoints'))
  try:
    step = ckpt.latest_step()
    if step is None:
      raise errors.CheckpointError(f'config.init_from={directory!r}: no finished checkpoint in '
                                   f'{ckpt.directory}')
    state_dir = os.path.join(ckpt.directory, str(step), 'state')
    found = {_path(kp): m for kp, m in jax.tree_util.tree_leaves_with_path(
        ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree['params'])}
    targets = {_path(kp): t for kp, t in jax.tree_util.tree_leaves_with_path(target_abstract)}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = {}
    for path, m in found.items():
      t = targets.get(path)
      sh = t.sharding if t is not None and tuple(t.shape) == tuple(m.shape) else replicated
      _set(abstract, path, jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sh))
    return ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()


def _hf_params(directory: str, args: model.Args, mesh) -> dict:
  fields = convert.model_fields(convert.read_config(directory))
  parent = model.Args(**{**{f: getattr(args, f) for f in ('norm_eps', 'attention', 'remat',
                                                          'compute_dtype', 'param_dtype')}, **fields})
  _, shapes, axes = model.abstract(parent)
  return convert.load_params(directory, parent, sharding.param_shardings(shapes, axes, mesh))


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def adapt(parent: dict, fresh: dict, skip: tuple[str, ...] = (), where: str = 'init_from') -> dict:
  """The run's params from the parent's: same names; vocabulary rows appended at the parent's mean;
  `skip` patterns kept fresh. Raises ValueError naming the first tensor that does not fit."""
  patterns = [re.compile(p) for p in skip]
  have = {_path(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(parent)}
  want = {_path(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(fresh)}
  extra = sorted(set(have) - set(want))
  if extra:
    raise errors.CheckpointError(f'{where}: tensor {extra[0]!r} {tuple(have[extra[0]].shape)} of the '
                                 'checkpoint is not in the model')
  for p in patterns:
    if not any(p.fullmatch(name) for name in want):
      raise errors.ConfigError(f'config.init_skip pattern {p.pattern!r} matches no parameter; paths are '
                               f'{sorted(want)}')
  out = {}
  for name, target in want.items():
    if any(p.fullmatch(name) for p in patterns):
      _set(out, name, target)
      continue
    if name not in have:
      raise errors.CheckpointError(f'{where}: the model\'s tensor {name!r} {tuple(target.shape)} is not in '
                                   'the checkpoint (add it to config.init_skip to start it fresh)')
    value = have[name]
    if tuple(value.shape) != tuple(target.shape):
      value = _grow_vocab(name, value, target, where)
    _set(out, name, jax.device_put(value.astype(target.dtype), target.sharding))
  return out


def _grow_vocab(name: str, value, target, where: str):
  axis = VOCAB_AXIS.get(name.split('/')[-1])
  same_elsewhere = axis is not None and all(
      a == b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != axis)
  if not same_elsewhere or value.shape[axis] > target.shape[axis]:
    raise errors.CheckpointError(f'{where}: tensor {name!r} has shape {tuple(value.shape)} in the '
                                 f'checkpoint, the model expects {tuple(target.shape)}')
  extra = target.shape[axis] - value.shape[axis]
  mean = jnp.mean(value, axis=axis, keepdims=True)
  return jnp.concatenate([value, jnp.repeat(mean, extra, axis=axis)], axis=axis)


def load(spec: str, skip: tuple[str, ...], args: model.Args, fresh_params: dict, abstract_params: dict,
         mesh) -> dict:
  """The run's starting params from its parent `spec` (config.init_from), the parameters matching
  `skip` (config.init_skip) left fresh (see the module docstring)."""
  kind, directory = parse(spec)
  if kind == 'hf':
    parent = _hf_params(directory, args, mesh)
  else:
    parent = lmjax_params(directory, abstract_params, mesh)
  return adapt(parent, fresh_params, tuple(skip), f'config.init_from={spec!r}')
