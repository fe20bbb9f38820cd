"""Hugging Face safetensors checkpoints <-> lmjax parameters: Llama (2, 3, 3.1/3.2), Qwen2, Mistral.

Import: `model_fields(config.json)` gives the `model.Args` fields, `load_params` reads every tensor
straight into its shards on the mesh; `load(directory)` does both. Export: `save` writes safetensors
(one file, or shards with `model.safetensors.index.json`) and a `config.json` that transformers loads,
with the RoPE keys in the transformers 4 spelling (`rope_theta` + `rope_scaling`, read by 4 and 5)
or the transformers 5 one (`rope_parameters`, read by 5 only: 4 would ignore it and silently fall back
to theta 10000 without scaling). A run's checkpoint and tokenizer export from the command line with
`python -m lmjax.export`. A checkpoint lmjax cannot use is an errors.CheckpointError (a missing file an
errors.MissingFile) naming the file, tensor or config.json field.

RoPE layout: Hugging Face checkpoints of these families rotate the two halves of each head,
(x[i], x[i + Dh/2]) (`rotate_half`), which is the layout `model.apply_rope` uses, so q/k
projections load as they are. Meta's original checkpoints rotate adjacent pairs (x[2i], x[2i+1]);
transformers' conversion permutes their q/k rows once, so they reach us already permuted. The
parity tests (tests/test_convert.py) check this against transformers' logits.

Layout: HF Linear weights are [out, in]; lmjax weights are [in, ...out] with heads split out. Each
row of `TENSORS` names the lmjax axes and the HF axes with the same letters (v vocab, d d_model,
h heads, k kv heads, e head dim, f MLP hidden); letters written together are one merged HF dim,
heads outermost. Per-layer HF tensors `model.layers.{i}.*` stack on lmjax's leading layer axis.

Memory: tensors are memory-mapped, never read whole. Each device's shard is cut from the mapped
per-layer tensors, transposed, stacked over the layers it holds, and sent to that device before the
next shard is read, so a host holds one device shard at a time (shards repeated on several devices
are read once). The limit: the layer axis is never sharded (`sharding.RULES['layers']` is None), so
one shard spans all layers of its slice; on a single device that is a whole stacked tensor (e.g.
7.5 GB for Llama-3-8B's f32 w_gate). Export gathers one layer of one tensor at a time and holds one
output file (at most `max_shard_bytes`) on the host twice: its arrays and their serialised bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils

from lmjax import errors, fs, model, sharding

# (lmjax path, its axes without the layer axis, HF name, HF axes)
TENSORS = (
    ('embed_vd', 'vd', 'model.embed_tokens.weight', 'v,d'),
    ('layers/attn_norm', 'd', 'model.layers.{i}.input_layernorm.weight', 'd'),
    ('layers/wq_ldhe', 'dhe', 'model.layers.{i}.self_attn.q_proj.weight', 'he,d'),
    ('layers/wk_ldke', 'dke', 'model.layers.{i}.self_attn.k_proj.weight', 'ke,d'),
    ('layers/wv_ldke', 'dke', 'model.layers.{i}.self_attn.v_proj.weight', 'ke,d'),
    ('layers/bq_lhe', 'he', 'model.layers.{i}.self_attn.q_proj.bias', 'he'),
    ('layers/bk_lke', 'ke', 'model.layers.{i}.self_attn.k_proj.bias', 'ke'),
    ('layers/bv_lke', 'ke', 'model.layers.{i}.self_attn.v_proj.bias', 'ke'),
    ('layers/wo_lhed', 'hed', 'model.layers.{i}.self_attn.o_proj.weight', 'd,he'),
    ('layers/mlp_norm', 'd', 'model.layers.{i}.post_attention_layernorm.weight', 'd'),
    ('layers/w_gate_ldf', 'df', 'model.layers.{i}.mlp.gate_proj.weight', 'f,d'),
    ('layers/w_up_ldf', 'df', 'model.layers.{i}.mlp.up_proj.weight', 'f,d'),
    ('layers/w_down_lfd', 'fd', 'model.layers.{i}.mlp.down_proj.weight', 'd,f'),
    ('final_norm', 'd', 'model.norm.weight', 'd'),
    ('head_dv', 'dv', 'lm_head.weight', 'v,d'),
)
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'mistral': 'MistralForCausalLM'}
ROPE_SPELLINGS = ('transformers4', 'transformers5')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'generation_config.json')
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter in both layouts; `hf_name(i)` for layer i (None outside the layers)."""
  path: str
  hf: str
  hf_shape: tuple
  split_shape: tuple  # HF shape with merged dims split, HF order
  perm: tuple         # split HF axes in lmjax order

  @property
  def layered(self) -> bool:
    return '{i}' in self.hf

  def hf_name(self, i: int | None) -> str:
    return self.hf.format(i=i)

  def to_lmjax(self, x_hf: np.ndarray) -> np.ndarray:
    """A view when x_hf is one (memory-mapped tensors stay unread until indexed)."""
    return x_hf.reshape(self.split_shape).transpose(self.perm)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


def tensors(args: model.Args) -> list[Tensor]:
  """The tensors of a model with `args`: `TENSORS` less the biases without qkv_bias and the head
  when tied."""
  sizes = dict(v=args.vocab_size, d=args.d_model, h=args.n_heads, k=args.n_kv_heads,
               e=args.head_dim, f=args.d_ff)
  out = []
  for path, axes, hf, hf_axes in TENSORS:
    if (path.startswith('layers/b') and not args.qkv_bias) or (path == 'head_dv' and args.tie_embeddings):
      continue
    letters = hf_axes.replace(',', '')
    out.append(Tensor(path, hf, tuple(math.prod(sizes[c] for c in g) for g in hf_axes.split(',')),
                      tuple(sizes[c] for c in letters), tuple(letters.index(c) for c in axes)))
  return out


# ----------------------------------------------------------------------------- config.json


_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')


def directory(name: str) -> str:
  """The local directory of a Hugging Face checkpoint: `name` itself when it is a directory (or a
  URL), else a Hub id 'ORG/NAME[@REVISION]' found in the Hub cache or downloaded there by
  huggingface_hub.snapshot_download (HF_HUB_OFFLINE=1 reads the cache only; HF_HUB_CACHE and HF_TOKEN
  as huggingface_hub reads them); only the files a checkpoint needs are downloaded."""
  if '://' in name or fs.isdir(name):
    return name
  repo, _, revision = name.partition('@')
  if not _HUB_ID.fullmatch(repo):
    raise errors.MissingFile(f'{name!r}: neither a directory nor a Hugging Face Hub id ORG/NAME[@REVISION]')
  hub = errors.require('huggingface_hub', '', f'the Hugging Face Hub id {name!r}')
  try:
    return hub.snapshot_download(repo, revision=revision or None, allow_patterns=[
        '*.json', '*.safetensors', 'tokenizer.model', '*.tiktoken'])
  except (hub.errors.LocalEntryNotFoundError, hub.errors.RepositoryNotFoundError,
          hub.errors.RevisionNotFoundError) as e:
    raise errors.MissingFile(f'{name!r} is not a local directory, and the Hugging Face Hub gives no '
                             f'checkpoint for it: {str(e).splitlines()[0]}') from None


def read_config(directory: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise errors.MissingFile(f'{path} does not exist (a Hugging Face checkpoint directory has one)')
  with open(path) as f:
    return json.load(f)


def model_fields(cfg: dict) -> dict:
  """`model.Args` architecture fields (values for config.model) from a config.json dict.

  Refuses what lmjax does not compute (sliding-window attention, o_proj/MLP biases, other RoPE
  scalings, other activations) with an error naming the config.json field.
  """
  model_type = cfg.get('model_type')
  if model_type not in ARCHITECTURES:
    raise errors.CheckpointError(f'config.json model_type={model_type!r}: expected one of '
                                 f'{sorted(ARCHITECTURES)}')
  for key in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
              'vocab_size'):
    if not isinstance(cfg.get(key), int):
      raise errors.CheckpointError(f'config.json {key}={cfg.get(key)!r}: expected an integer')
  if cfg.get('hidden_act', 'silu') != 'silu':
    raise errors.CheckpointError(f'config.json hidden_act={cfg["hidden_act"]!r}: lmjax computes silu '
                                 '(SwiGLU)')
  for key in ('attention_bias', 'mlp_bias'):
    if model_type == 'llama' and cfg.get(key):
      raise errors.CheckpointError(f'config.json {key}=true: lmjax has no o_proj or MLP biases')
  if cfg.get('use_sliding_window'):
    raise errors.CheckpointError('config.json use_sliding_window=true: lmjax has no sliding-window attention')
  window, max_pos = cfg.get('sliding_window'), cfg.get('max_position_embeddings')
  if model_type == 'mistral' and window is not None and (max_pos is None or window < max_pos):
    raise errors.CheckpointError(f'config.json sliding_window={window}: lmjax has no sliding-window '
                                 f'attention (expected null or >= max_position_embeddings={max_pos})')
  if any(t != 'full_attention' for t in cfg.get('layer_types') or ()):
    raise errors.CheckpointError(f'config.json layer_types={cfg["layer_types"]}: expected only '
                                 'full_attention')
  d, heads = cfg['hidden_size'], cfg['num_attention_heads']
  head_dim = cfg.get('head_dim') or d // heads
  return dict(
      d_model=d, n_layers=cfg['num_hidden_layers'], n_heads=heads,
      n_kv_heads=cfg.get('num_key_value_heads') or heads, d_ff=cfg['intermediate_size'],
      vocab_size=cfg['vocab_size'], tie_embeddings=bool(cfg.get('tie_word_embeddings', False)),
      norm_eps=float(cfg.get('rms_norm_eps', 1e-6)), qkv_bias=model_type == 'qwen2',
      d_head=None if head_dim * heads == d else head_dim, **_rope_fields(cfg))


def _rope_fields(cfg: dict) -> dict:
  """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
  if cfg.get('rope_parameters') is not None:
    where, rope = 'rope_parameters', cfg['rope_parameters']
    if any(isinstance(v, dict) for v in rope.values()):
      raise errors.CheckpointError(f'config.json rope_parameters={rope}: expected one set for every layer')
    theta = rope.get('rope_theta', cfg.get('rope_theta', 10_000.0))
  else:
    where, rope = 'rope_scaling', cfg.get('rope_scaling') or {}
    theta = cfg.get('rope_theta', 10_000.0)
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if cfg.get('partial_rotary_factor', rope.get('partial_rotary_factor', 1.0)) != 1.0:
    raise errors.CheckpointError('config.json partial_rotary_factor: lmjax rotates the whole head')
  if rope_type == 'default':
    return dict(rope_theta=float(theta), rope_scaling_factor=1.0)
  if rope_type != 'llama3':
    raise errors.CheckpointError(f'config.json {where}.rope_type={rope_type!r}: expected default or llama3')
  keys = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
  for key in keys:
    if key not in rope:
      raise errors.CheckpointError(f'config.json {where}.{key} is missing (rope_type llama3 needs {keys})')
  return dict(rope_theta=float(theta), rope_scaling_factor=float(rope['factor']),
              rope_low_freq_factor=float(rope['low_freq_factor']),
              rope_high_freq_factor=float(rope['high_freq_factor']),
              rope_original_max_position=int(rope['original_max_position_embeddings']))


def config_dict(args: model.Args, hf_config: dict | None = None, *, dtype: str = 'float32',
                rope_spelling: str = 'transformers4') -> dict:
  """config.json for `args`: `hf_config`'s keys (token ids, max_position_embeddings, ...) with the
  architecture keys written from `args`. The family is hf_config's model_type, else qwen2 with
  q/k/v biases and llama without; max_position_embeddings is 8192 unless hf_config has one (it does
  not change the model's numbers: lmjax and transformers' default and llama3 RoPE ignore it)."""
  if rope_spelling not in ROPE_SPELLINGS:
    raise errors.ConfigError(f'rope_spelling={rope_spelling!r}: expected one of {ROPE_SPELLINGS}')
  cfg = dict(hf_config or {})
  model_type = cfg.get('model_type') or ('qwen2' if args.qkv_bias else 'llama')
  if model_type not in ARCHITECTURES:
    raise errors.CheckpointError(f'model_type={model_type!r}: expected one of {sorted(ARCHITECTURES)}')
  if args.qkv_bias != (model_type == 'qwen2'):
    raise errors.CheckpointError(f'model_type={model_type!r} with qkv_bias={args.qkv_bias}: q/k/v '
                                 f'biases without an o_proj bias are Qwen2\'s alone')
  for key in ('rope_theta', 'rope_scaling', 'rope_parameters', 'torch_dtype', 'dtype', 'layer_types',
              'transformers_version'):
    cfg.pop(key, None)
  cfg.setdefault('max_position_embeddings', 8192)
  cfg.update(
      architectures=[ARCHITECTURES[model_type]], model_type=model_type, hidden_act='silu',
      hidden_size=args.d_model, intermediate_size=args.d_ff, num_hidden_layers=args.n_layers,
      num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
      head_dim=args.head_dim, vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps,
      tie_word_embeddings=args.tie_embeddings)
  if model_type == 'llama':
    cfg.update(attention_bias=False, mlp_bias=False)
  elif model_type == 'qwen2':
    cfg.update(sliding_window=None, use_sliding_window=False)
  else:
    cfg.update(sliding_window=None)
  scaling = dict(rope_type='llama3', factor=args.rope_scaling_factor,
                 low_freq_factor=args.rope_low_freq_factor,
                 high_freq_factor=args.rope_high_freq_factor,
                 original_max_position_embeddings=args.rope_original_max_position)
  if rope_spelling == 'transformers4':
    cfg.update(rope_theta=args.rope_theta, rope_scaling=scaling if args.rope_scaled else None,
               torch_dtype=dtype)
  else:
    rope = scaling if args.rope_scaled else dict(rope_type='default')
    cfg.update(rope_parameters=dict(rope, rope_theta=args.rope_theta), dtype=dtype)
  return cfg


# ----------------------------------------------------------------------------- import


def _mmap_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file as a read-only memory-mapped array (nothing read yet).

  The format: an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
  data_offsets}}, then the data; offsets count from the end of the header.
  """
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(size))
  data = np.memmap(path, np.uint8, 'r')
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _DTYPES:
      raise errors.CheckpointError(f'{path}: tensor {name!r} has dtype {info["dtype"]}; expected one '
                                   f'of {sorted(_DTYPES)}')
    begin, end = (8 + size + o for o in info['data_offsets'])
    out[name] = data[begin:end].view(_DTYPES[info['dtype']]).reshape(info['shape'])
  return out


def checkpoint_tensors(directory: str) -> dict[str, tuple[str, np.ndarray]]:
  """{name: (file, memory-mapped array)} of `model.safetensors` or of the shards named by
  `model.safetensors.index.json`."""
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(directory, 'model.safetensors')):
    weight_map, files = None, ['model.safetensors']
  else:
    raise errors.MissingFile(f'{directory}: no model.safetensors or model.safetensors.index.json')
  out = {}
  for file in files:
    path = os.path.join(directory, file)
    if not os.path.isfile(path):
      raise errors.MissingFile(f'{index} names {file}, which does not exist')
    out.update({name: (path, x) for name, x in _mmap_safetensors(path).items()})
  for name, file in (weight_map or {}).items():
    if name not in out:
      raise errors.CheckpointError(f'{index} maps tensor {name!r} to {file}, which does not hold it')
  return out


def check_tensors(found: dict[str, tuple[str, np.ndarray]], args: model.Args, directory: str) -> None:
  """Raises naming the first tensor that is missing, has the wrong shape, or is unexpected."""
  expected = {}
  for t in tensors(args):
    for i in range(args.n_layers) if t.layered else (None,):
      expected[t.hf_name(i)] = t.hf_shape
  for name, shape in expected.items():
    if name not in found:
      raise errors.CheckpointError(f'{directory}: tensor {name!r} is missing (expected shape {shape})')
    file, x = found[name]
    if tuple(x.shape) != shape:
      raise errors.CheckpointError(f'{file}: tensor {name!r} has shape {tuple(x.shape)}, expected '
                                   f'{shape} from the model config')
  for name in found:
    # Tied checkpoints may repeat the head; old ones saved RoPE frequency buffers.
    ignored = name.endswith('rotary_emb.inv_freq') or (name == 'lm_head.weight' and args.tie_embeddings)
    if name not in expected and not ignored:
      raise errors.CheckpointError(f'{found[name][0]}: unexpected tensor {name!r} for the model config')


def _check_config(args: model.Args, cfg: dict, directory: str) -> None:
  for field, value in model_fields(cfg).items():
    if getattr(args, field) != value:
      raise errors.CheckpointError(f'config.model.{field}={getattr(args, field)!r} but '
                                   f'{directory}/config.json gives {value!r}')


def _get(tree: dict, path: str):
  for key in path.split('/'):
    tree = tree[key]
  return tree


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('/')
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _put(shape: tuple, shard: jax.sharding.Sharding, read) -> jax.Array:
  """A global array whose shards come from `read(index)`, one device shard on the host at a time."""
  by_index = {}
  for device, index in shard.addressable_devices_indices_map(shape).items():
    key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    by_index.setdefault(key, (index, []))[1].append(device)
  arrays = {}
  for index, devices in by_index.values():
    host = read(index)
    for device in devices:
      arrays[device] = jax.device_put(host, device)
  return jax.make_array_from_single_device_arrays(shape, shard, list(arrays.values()))


def load_params(directory: str, args: model.Args, shardings: dict | None = None) -> dict:
  """Params (the nested dict `model.create` returns) from a Hugging Face checkpoint directory.

  Args:
    directory: holds model.safetensors or model.safetensors.index.json (+ shards); its config.json,
      when present, must agree with `args` (an error names the first differing field).
    args: the model; parameters are cast to args.param_dtype.
    shardings: a Sharding per parameter, same nested structure (e.g. `sharding.param_shardings(
      shapes, axes, mesh)` of `model.abstract(args)`); None puts everything on the first device.
  """
  found = checkpoint_tensors(directory)
  if os.path.isfile(os.path.join(directory, 'config.json')):
    _check_config(args, read_config(directory), directory)
  check_tensors(found, args, directory)
  _, shapes, _ = model.abstract(args)
  dtype = jnp.dtype(args.param_dtype)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {}
  for t in tensors(args):
    views = [t.to_lmjax(found[t.hf_name(i)][1]) for i in (range(args.n_layers) if t.layered else [None])]

    def read(index, views=views, layered=t.layered):
      if not layered:
        return np.asarray(views[0][index], dtype)
      layers = range(args.n_layers)[index[0]]
      out = np.empty((len(layers), *views[0][index[1:]].shape), dtype)
      for j, i in enumerate(layers):
        out[j] = views[i][index[1:]]
      return out

    shard = _get(shardings, t.path) if shardings is not None else one_device
    _set(params, t.path, _put(_get(shapes, t.path).shape, shard, read))
  return params


def load(directory: str, mesh: jax.sharding.Mesh | None = None, **overrides) -> tuple[model.Args, dict]:
  """(args, params) of a checkpoint directory; `overrides` set non-architecture Args fields
  (compute_dtype, attention, ...); params sharded over `mesh` by the logical-axis rules."""
  args = model.Args(**{**model_fields(read_config(directory)), **overrides})
  shardings = None
  if mesh is not None:
    _, shapes, axes = model.abstract(args)
    shardings = sharding.param_shardings(shapes, axes, mesh)
  return args, load_params(directory, args, shardings)


# ----------------------------------------------------------------------------- export


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save(directory: str, args: model.Args, params: dict, *, hf_config: dict | None = None,
         dtype: str | None = None, rope_spelling: str = 'transformers4',
         tokenizer_from: str | None = None, max_shard_bytes: int = 2 << 30) -> None:
  """Writes a Hugging Face checkpoint: config.json (`config_dict`) and safetensors, each file
  atomically (`fs.write_atomic`: a reader never sees part of one) with the mode of a new file (0666
  less the umask).

  Args:
    directory: a local path or a URL (lmjax/fs.py); created if needed; must not hold a checkpoint
      already.
    args, params: the model (params may be sharded over processes: every process calls `save`,
      process 0 writes).
    hf_config: the source checkpoint's config.json, whose other keys are kept; for a model trained
      here, e.g. {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id}.
    dtype: 'float32' or 'bfloat16' on disk (default args.param_dtype).
    rope_spelling: 'transformers4' (default; read by transformers 4 and 5) or 'transformers5'.
    tokenizer_from: a directory whose tokenizer and generation-config files are copied along.
    max_shard_bytes: above this, tensors go into several files named by an index.
  """
  dtype = dtype or args.param_dtype
  if dtype not in ('float32', 'bfloat16'):
    raise errors.ConfigError(f'dtype={dtype!r}: expected float32 or bfloat16')
  np_dtype = jnp.dtype(dtype)
  cfg = config_dict(args, hf_config, dtype=dtype, rope_spelling=rope_spelling)
  writer = jax.process_index() == 0
  if writer:
    fs.makedirs(directory)
    if any(f.endswith('.safetensors') or f == 'model.safetensors.index.json' for f in fs.listdir(directory)):
      raise FileExistsError(f'{directory} already holds a checkpoint; export into an empty directory')
  # Tensors in HF order (embedding, layer 0, layer 1, ..., norm, head), grouped into files.
  layer_tensors = [t for t in tensors(args) if t.layered]
  entries = [(t, None) for t in tensors(args) if t.path == 'embed_vd']
  entries += [(t, i) for i in range(args.n_layers) for t in layer_tensors]
  entries += [(t, None) for t in tensors(args) if not t.layered and t.path != 'embed_vd']
  files, size = [[]], 0
  for t, i in entries:
    nbytes = math.prod(t.hf_shape) * np_dtype.itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append((t, i))
    size += nbytes
  names = (['model.safetensors'] if len(files) == 1 else
           [f'model-{k + 1:05d}-of-{len(files):05d}.safetensors' for k in range(len(files))])
  weight_map, total = {}, 0
  for name, group in zip(names, files):
    out = {}
    for t, i in group:
      x = _get(params, t.path)
      out[t.hf_name(i)] = np.ascontiguousarray(t.to_hf(_host(x if i is None else x[i])).astype(np_dtype))
      weight_map[t.hf_name(i)] = name
      total += out[t.hf_name(i)].nbytes
    if writer:
      fs.write_atomic(os.path.join(directory, name), safetensors.numpy.save(out, metadata={'format': 'pt'}))
  if not writer:
    return
  if len(files) > 1:
    fs.write_atomic(os.path.join(directory, 'model.safetensors.index.json'),
                    json.dumps(dict(metadata=dict(total_size=total), weight_map=weight_map), indent=2))
  fs.write_atomic(os.path.join(directory, 'config.json'), json.dumps(cfg, indent=2))
  for file in TOKENIZER_FILES if tokenizer_from else ():
    if fs.isfile(os.path.join(tokenizer_from, file)):
      with fs.open(os.path.join(tokenizer_from, file), 'rb') as f:
        fs.write_atomic(os.path.join(directory, file), f.read())


if __name__ == '__main__':  # a library: without this, `python -m lmjax.convert` does nothing and exits 0
  print('lmjax.convert: error: a library, not a command; to export a run as a Hugging Face model: '
        'python -m lmjax.export --workdir=RUN --out=DIR', file=sys.stderr)
  sys.exit(2)
