"""Export a run's checkpoint as a Hugging Face (transformers Llama-family) model directory.

  python -m lmjax.export --workdir=RUN [--step=N] --out=DIR [--dtype=bfloat16] [--overwrite]

RUN is a run directory: its config.json gives the model, checkpoints/<step> the params (the latest
finished checkpoint, or --step) and provenance.json the tokenizer the run trained with. DIR gets
  model.safetensors (over 2 GiB: shards and model.safetensors.index.json), config.json   lmjax.convert
  generation_config.json                the bos, eos (and pad) token ids, as in config.json
  tokenizer.json, tokenizer_config.json   for transformers' AutoTokenizer
  tokenizer.model                       a sentencepiece run's model file, as it is
which `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load
(scripts/make_hf_golden.py checks logits and token ids against lmjax's). Neither torch nor
transformers is needed to export.

Tokenizer: a Hugging Face tokenizer.json is copied as it is. A sentencepiece model becomes the
tokenizer.json that gives its ids for every text (`sentencepiece_json`; tests/test_export.py checks it
against sentencepiece), rather than leaving transformers to convert the .model file: its LlamaTokenizer
prepends a space to every text unless told otherwise, which lmjax's models (no dummy prefix) do not.
tokenizer_config.json names PreTrainedTokenizerFast, the class that uses tokenizer.json unchanged, and
the special tokens: bos and eos are the ones lmjax put around every training document; pad is id 0,
which lmjax pads rows and prompts with, for a sentencepiece model (its unknown piece), and a Hugging
Face tokenizer's own pad token, if it names one. The sentencepiece tokenizer.json puts bos before a
text, as Llama's does (transformers' `add_special_tokens=True`, the default); lmjax's `encode` adds
nothing. Either matches special tokens written in a text ('<s>'), as transformers does and
sentencepiece does not.

Writing: everything goes into DIR.partial<pid> beside DIR, each file atomically with the mode of a new
file (0666 less the umask: 0644 as a rule), and that directory becomes DIR once complete, so an
interrupted export leaves no half-written DIR. An existing DIR must be empty, or hold an earlier export
and be named with --overwrite, which replaces it; a DIR holding anything an export does not write is
refused (the flag never deletes other files). DIR is a local path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tokenizers
from absl import flags
from tokenizers import decoders, normalizers, processors

from lmjax import checkpoint, convert, errors, fs, model
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.eval import runs

# The names an export writes, and so all that --overwrite may replace.
WRITTEN = re.compile(r'model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|'
                     r'generation_config\.json|tokenizer(_config)?\.json|tokenizer\.model')
# sentencepiece_model.proto: SentencePiece.Type and TrainerSpec.ModelType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
UNIGRAM, BPE = 1, 2


# ----------------------------------------------------------------------------- the run


def run_args(workdir: str) -> model.Args:
  """The run's model, from the config.json it wrote when it started."""
  path = os.path.join(workdir, 'config.json')
  if not fs.isfile(path):
    raise errors.CheckpointError(f'{workdir} is not an lmjax run directory: it has no config.json (a run '
                                 'writes one when it starts)')
  return model.resolve(ml_collections.ConfigDict(json.loads(fs.read_text(path))['model']))


def run_tokenizer(workdir: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer the run trained with, the file its provenance.json names."""
  return tokenizer_lib.load(runs.run_tokenizer_path(workdir))


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in key_path)


def restore_params(workdir: str, step: int, args: model.Args) -> dict:
  """The params of checkpoint `step` as numpy arrays on the host (the optimizer state is not read);
  a parameter whose shape is not `args`' is an error naming it."""
  path = checkpoint.orbax_path(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  with ocp.PyTreeCheckpointer() as ckpt:
    saved = ckpt.metadata(path).item_metadata.tree['params']
    found, want = ({_path(kp): tuple(m.shape) for kp, m in jax.tree_util.tree_leaves_with_path(tree)}
                   for tree in (saved, model.abstract(args)[1]))
    for name in sorted(set(found) | set(want)):
      if found.get(name) != want.get(name):
        raise errors.CheckpointError(f'{path}: params/{name} has shape {found.get(name)}, but the model of '
                                     f'{workdir}/config.json has {want.get(name)}')
    item = {'params': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    return ckpt.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                          partial_restore=True))['params']


# ----------------------------------------------------------------------------- the tokenizer


def tokenizer_files(tok: tokenizer_lib.Tokenizer) -> dict[str, str | bytes]:
  """{file name: contents} of `tok` for a Hugging Face directory (see the module docstring)."""
  if isinstance(tok, tokenizer_lib.HFTokenizer):
    return _hf_tokenizer_files(tok)
  with fs.open(tok.path, 'rb') as f:
    proto = f.read()
  pieces = _pieces(proto)
  unk = next(i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN)
  cfg = dict(tokenizer_class='PreTrainedTokenizerFast', bos_token=pieces[tok.bos_id][0],
             eos_token=pieces[tok.eos_id][0], unk_token=pieces[unk][0], clean_up_tokenization_spaces=False)
  if unk == 0:
    cfg['pad_token'] = pieces[unk][0]
  return {'tokenizer.json': sentencepiece_json(proto, tok.path, tok.bos_id),
          'tokenizer_config.json': json.dumps(cfg, indent=2, ensure_ascii=False), 'tokenizer.model': proto}


def _hf_tokenizer_files(tok: tokenizer_lib.HFTokenizer) -> dict[str, str]:
  """tokenizer.json as it is, and tokenizer_config.json: the keys of the files beside it with the class
  that uses tokenizer.json as it is and lmjax's bos and eos."""
  cfg = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # the latter's keys win
    path = os.path.join(os.path.dirname(tok.path), name)
    if fs.isfile(path):
      cfg.update(json.loads(fs.read_text(path)))
  cfg.update(tokenizer_class='PreTrainedTokenizerFast', bos_token=tok.id_to_piece(tok.bos_id),
             eos_token=tok.id_to_piece(tok.eos_id))
  cfg.setdefault('clean_up_tokenization_spaces', False)  # lmjax's decode; transformers 4's default: True
  return {'tokenizer.json': fs.read_text(tok.path),
          'tokenizer_config.json': json.dumps(cfg, indent=2, ensure_ascii=False)}


def token_ids(files: dict[str, str | bytes]) -> dict[str, int]:
  """{bos,eos,pad}_token_id of the tokens tokenizer_config.json names (pad only where it names one)."""
  vocab = tokenizers.Tokenizer.from_str(files['tokenizer.json'])
  cfg = json.loads(files['tokenizer_config.json'])
  ids = {}
  for kind in ('bos', 'eos', 'pad'):
    token = cfg.get(f'{kind}_token')
    token = token.get('content') if isinstance(token, dict) else token
    if token is not None:
      ids[f'{kind}_token_id'] = vocab.token_to_id(token)
  return ids


def sentencepiece_json(proto: bytes, path: str, bos_id: int) -> str:
  """The Hugging Face tokenizer.json that encodes any text to the ids of the sentencepiece model
  `proto` (read from `path`), bos in front.

  sentencepiece's encoding, rebuilt from the tokenizers library's parts: spaces become '▁' (and one
  is prepended with add_dummy_prefix); BPE merges the adjacent pair whose merged piece scores highest,
  as the `merges` below ranked by that score do, never merging a user-defined piece (one character:
  longer ones, which sentencepiece matches before merging, are refused); unigram takes the
  best-scoring segmentation; characters outside the vocabulary become byte pieces <0xNN>
  (byte_fallback). Settings it does not rebuild (other normalizations) are refused.
  """
  spec, pieces = _message(proto), _pieces(proto)
  # TrainerSpec and NormalizerSpec fields by number, with the proto's defaults.
  trainer, norm = _message(spec.get(2, [b''])[0]), _message(spec.get(3, [b''])[0])
  model_type, byte_fallback = trainer.get(3, [UNIGRAM])[0], trainer.get(35, [0])[0] == 1
  dummy_prefix = norm.get(3, [1])[0] == 1
  refused = dict(
      normalization_rule_name=norm.get(1, [b''])[0] not in (b'', b'identity'),
      precompiled_charsmap=norm.get(2, [b''])[0] != b'', remove_extra_whitespaces=norm.get(4, [1])[0] == 1,
      escape_whitespaces=norm.get(5, [1])[0] == 0, model_type=model_type not in (UNIGRAM, BPE),
      treat_whitespace_as_suffix=trainer.get(24, [0])[0] == 1,
      user_defined_symbols=any(kind == USER_DEFINED and len(piece) > 1 for piece, _, kind in pieces))
  if any(refused.values()):
    raise errors.ConfigError(f'tokenizer {path!r}: its {next(k for k, v in refused.items() if v)} setting '
                             'is not one export rebuilds as a tokenizer.json (it does: identity '
                             'normalization, spaces escaped and kept, BPE or unigram, one-character '
                             'user-defined symbols)')
  unk = next(i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN)
  if model_type == BPE:
    normal = {piece: score for piece, score, kind in pieces if kind == NORMAL}
    merges = sorted(((piece[:k], piece[k:]) for piece in normal for k in range(1, len(piece))
                     if piece[:k] in normal and piece[k:] in normal), key=lambda m: -normal[m[0] + m[1]])
    spm_model = tokenizers.models.BPE({piece: i for i, (piece, _, _) in enumerate(pieces)}, merges,
                                      unk_token=pieces[unk][0], fuse_unk=True, byte_fallback=byte_fallback)
  else:
    spm_model = tokenizers.models.Unigram([(piece, score) for piece, score, _ in pieces], unk,
                                          byte_fallback=byte_fallback)
  tok = tokenizers.Tokenizer(spm_model)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁')] * dummy_prefix
                                       + [normalizers.Replace(' ', '▁')])
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()]
                                  + [decoders.Strip(' ', 1, 0)] * dummy_prefix)
  tok.add_special_tokens([tokenizers.AddedToken(piece, special=True, normalized=False)
                          for piece, _, kind in pieces if kind in (UNKNOWN, CONTROL)])
  bos = pieces[bos_id][0]
  tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos}:1 $B:1',
                                                     special_tokens=[(bos, bos_id)])
  return tok.to_str(pretty=True)


def _pieces(proto: bytes) -> list[tuple[str, float, int]]:
  """(piece, score, type) of every id of a sentencepiece ModelProto (its field 1)."""
  out = []
  for piece in _message(proto).get(1, []):
    fields = _message(piece)
    out.append((fields[1][0].decode(), fields.get(2, [0.0])[0], fields.get(3, [NORMAL])[0]))
  return out


def _message(buf: bytes) -> dict[int, list]:
  """{field number: values} of a protobuf message: varints as ints, 32-bit fields as floats,
  length-delimited fields as bytes (sentencepiece's sentencepiece_model_pb2 needs protobuf 7, which
  lmjax's pinned requirements rule out)."""
  fields, i = {}, 0
  while i < len(buf):
    key, i = _varint(buf, i)
    wire = key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 2:
      size, i = _varint(buf, i)
      value, i = buf[i:i + size], i + size
    elif wire == 5:
      value, i = struct.unpack('<f', buf[i:i + 4])[0], i + 4
    else:
      raise ValueError(f'protobuf wire type {wire} at byte {i}: not a sentencepiece model')
    fields.setdefault(key >> 3, []).append(value)
  return fields


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buf[i]
    value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
    if byte < 0x80:
      return value, i


# ----------------------------------------------------------------------------- the directory


def export(workdir: str, out: str, step: int | None = None, dtype: str | None = None,
           overwrite: bool = False) -> int:
  """Writes the Hugging Face directory `out` of checkpoint `step` (None: the latest) of the run in
  `workdir`, tensors in `dtype` (None: the run's param dtype); returns the step."""
  if jax.process_count() > 1:
    raise errors.ConfigError('export runs in one process (it reads every parameter on this host)')
  if not fs.isdir(workdir):
    raise errors.MissingFile(f'run directory {workdir!r} does not exist')
  args = run_args(workdir)
  saved = runs.finished_steps(workdir)
  if not saved or (step is not None and step not in saved):
    want = 'a finished checkpoint' if step is None else f'checkpoint {step}'
    raise errors.CheckpointError(f'{os.path.join(workdir, "checkpoints")}: expected {want}; found steps '
                                 f'{saved}')
  step = saved[-1] if step is None else step
  _check_out(out, overwrite)
  files = tokenizer_files(run_tokenizer(workdir))
  ids = token_ids(files)
  params = restore_params(workdir, step, args)
  partial = f'{out.rstrip("/")}.partial{os.getpid()}'
  try:
    with fs.removed_on_error(partial):
      convert.save(partial, args, params, hf_config=ids, dtype=dtype)
      for name, contents in {**files, 'generation_config.json': json.dumps(ids, indent=2)}.items():
        fs.write_atomic(os.path.join(partial, name), contents)
      _move(partial, out)
  except OSError as e:
    if isinstance(e, errors.UserError) or e.errno not in errors.DISK_ERRNOS:
      raise
    raise errors.FileSystemError(f'could not write {out}: {errors.os_reason(e)}') from e
  return step


def _check_out(out: str, overwrite: bool) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.ConfigError(f'--out={out} is a file; expected a directory (created if missing)')
  names = fs.listdir(out)
  others = [n for n in names if not WRITTEN.fullmatch(n)]
  if others:
    raise errors.ConfigError(f'--out={out} holds {others[:3]}, which an export does not write: choose a new '
                             'or empty directory (--overwrite replaces an earlier export only)')
  if names and not overwrite:
    raise errors.ConfigError(f'--out={out} holds an export already ({", ".join(names[:3])}, ...): pass '
                             '--overwrite to replace it, or choose another directory')


def _move(partial: str, out: str) -> None:
  """Renames the finished directory `partial` to `out`; an earlier `out` is renamed aside first and
  then deleted (it holds an earlier export or nothing: `_check_out`)."""
  if not os.path.isdir(out):
    os.replace(partial, out)
    return
  aside = f'{out.rstrip("/")}.replaced{os.getpid()}'
  os.replace(out, aside)
  os.replace(partial, out)
  shutil.rmtree(aside)


# ----------------------------------------------------------------------------- the command


def main(config: ml_collections.ConfigDict) -> None:
  del config  # the run's config.json, checked by cli.run; export reads the model from it itself
  f = flags.FLAGS
  step = export(f.workdir, f.out, f.step, f.dtype, f.overwrite)
  print(f'exported step {step} of {f.workdir} to {f.out}')


if __name__ == '__main__':
  from lmjax import cli  # pylint: disable=g-import-not-at-top
  cli.define_flags('run directory (config.json, checkpoints/, provenance.json)', config_from_run=True)
  flags.DEFINE_integer('step', None, 'checkpoint to export (default: the latest)', lower_bound=0)
  flags.DEFINE_string('out', None, 'Hugging Face directory to write (new, empty, or with --overwrite an '
                      'earlier export)', required=True)
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'tensors on disk (default: the run\'s '
                    'config.model.param_dtype)')
  flags.DEFINE_bool('overwrite', False, 'replace the earlier export in --out')
  cli.run(main)
