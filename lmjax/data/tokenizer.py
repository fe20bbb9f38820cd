"""Tokenizers behind one interface: sentencepiece models (trained here or loaded from a .model file)
and Hugging Face `tokenizer.json` files (the tokenizer of a checkpoint we continue from).

`load(path)` picks by file: a `tokenizer.json` (or a directory holding one) is a Hugging Face
tokenizer, anything else a sentencepiece model; paths are local or URLs (gs://; lmjax/fs.py).
`encode` never adds BOS/EOS: the data pipeline places them around each document.

The sentencepiece trainer settings make `decode(encode(text)) == text` for any text: identity
normalization, no whitespace collapsing, no dummy prefix, byte fallback for characters outside the
vocabulary, and whitespace-only pieces (code indentation). Newline and tab are user-defined pieces
because training sentences are lines, so the trainer itself never sees them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Protocol

import numpy as np
import sentencepiece as spm
import tokenizers

from lmjax import errors, fs

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Where a Hugging Face checkpoint names its special tokens, most specific first.
HF_SPECIAL_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json',
                    'config.json')


class Tokenizer(Protocol):
  """What the data pipeline and sampling use. `path` is the file the ids depend on (data
  preparation hashes it)."""
  path: str
  vocab_size: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]: ...

  def decode(self, ids) -> str: ...

  def id_to_piece(self, i: int) -> str: ...


class SentencePieceTokenizer:
  """A loaded sentencepiece model."""

  def __init__(self, model_proto: bytes, path: str = ''):
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes many texts at once (sentencepiece's own thread pool; 0 = all cores)."""
    return self._sp.encode(texts, num_threads=num_threads)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


class HFTokenizer:
  """A Hugging Face `tokenizer.json`; BOS/EOS from the files beside it (`HF_SPECIAL_FILES`).

  A checkpoint that names no BOS (Qwen2's tokenizer files name none) gets its EOS as BOS, so each
  packed document still starts with a separator token.
  """

  def __init__(self, path: str):
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_str(fs.read_text(path))
    except Exception as e:  # the library raises a bare Exception
      raise errors.DataError(f'tokenizer {path!r} is not a Hugging Face tokenizer.json: {e}') from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    directory = os.path.dirname(fs.abspath(path))
    self.eos_id = self._special_id(directory, 'eos')
    if self.eos_id is None:
      raise errors.DataError(f'tokenizer {path!r}: no EOS token named by {", ".join(HF_SPECIAL_FILES)} '
                             f'in {directory}')
    bos = self._special_id(directory, 'bos')
    self.bos_id = self.eos_id if bos is None else bos

  def _special_id(self, directory: str, kind: str) -> int | None:
    """The first of `{kind}_token` (a string or {content: ...}) and `{kind}_token_id` (an int or a
    list, first taken) found in the special-token files."""
    for file in HF_SPECIAL_FILES:
      path = os.path.join(directory, file)
      if not fs.isfile(path):
        continue
      cfg = json.loads(fs.read_text(path))
      token = cfg.get(f'{kind}_token')
      if isinstance(token, dict):
        token = token.get('content')
      if isinstance(token, str):
        i = self._tok.token_to_id(token)
        if i is None:
          raise errors.DataError(f'{path}: {kind}_token={token!r} is not in the vocabulary of {self.path}')
        return int(i)
      i = cfg.get(f'{kind}_token_id')
      if isinstance(i, list):
        i = i[0] if i else None
      if isinstance(i, int):
        return i
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  @property
  def adds_bos(self) -> bool:
    """Whether tokenizer.json's own post-processing puts BOS before a text (Llama's does, Qwen2's, with
    no BOS, does not): what transformers' encode does by default. `encode` never adds it."""
    return self._tok.encode('a', add_special_tokens=True).ids[:1] == [self.bos_id]

  def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes many texts at once on the tokenizers library's own thread pool (its size is the
    RAYON_NUM_THREADS environment variable; `num_threads` is accepted for the interface)."""
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))


def load(path: str) -> Tokenizer:
  """Loads a tokenizer.json (or a directory holding one) or a sentencepiece .model file; a missing
  or unreadable file is an error naming it."""
  if fs.isdir(path):
    if not fs.isfile(os.path.join(path, 'tokenizer.json')):
      raise errors.MissingFile(f'tokenizer directory {path!r} holds no tokenizer.json')
    path = os.path.join(path, 'tokenizer.json')
  if not fs.isfile(path):
    raise errors.MissingFile(f'tokenizer model {path!r} does not exist')
  if path.endswith('.json'):
    return HFTokenizer(path)
  with fs.open(path, 'rb') as f:
    proto = f.read()
  try:
    return SentencePieceTokenizer(proto, path)
  except RuntimeError as e:
    raise errors.DataError(f'tokenizer model {path!r} is not a sentencepiece model: {e}') from None


def sample(docs_by_source: dict[str, list[str]], weights: dict[str, float], total_chars: int) -> list[str]:
  """Training sentences: per source, whole documents (in their given order) up to its share of chars.

  Args:
    docs_by_source: documents of each source, in a deterministic order.
    weights: sampling weight per source (missing sources get 0; all zero -> equal weights).
    total_chars: characters to draw in all.
  Returns:
    The non-empty lines of the drawn documents.
  """
  w = {s: float(weights.get(s, 0.0)) for s in docs_by_source}
  if sum(w.values()) <= 0:
    w = {s: 1.0 for s in docs_by_source}
  norm = sum(w.values())
  lines = []
  for s, docs in docs_by_source.items():
    budget = total_chars * w[s] / norm
    taken = 0
    for d in docs:
      if taken >= budget:
        break
      lines.extend(line for line in d.split('\n') if line)
      taken += len(d)
  return lines


def train(sentences: list[str], path: str, *, vocab_size: int, model_type: str = 'bpe',
          character_coverage: float = 0.9995, num_threads: int = 2) -> Tokenizer:
  """Trains a sentencepiece model on `sentences` and writes it to `path` (atomically)."""
  if model_type not in ('bpe', 'unigram'):
    raise errors.ConfigError(f'tokenizer.model_type={model_type!r}: expected bpe or unigram')
  model = io.BytesIO()
  try:
    _train(sentences, model, vocab_size, model_type, character_coverage, num_threads)
  except RuntimeError as e:
    if 'required_chars' in str(e):
      raise errors.ConfigError(f'tokenizer: vocab_size={vocab_size} is smaller than the characters that '
                               f'character_coverage={character_coverage} keeps; raise config.data.tokenizer.'
                               f'vocab_size or lower its character_coverage ({e})') from None
    raise
  fs.makedirs(os.path.dirname(fs.abspath(path)))
  fs.write_atomic(path, model.getvalue())
  return SentencePieceTokenizer(model.getvalue(), path)


def _train(sentences, model, vocab_size, model_type, character_coverage, num_threads):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
      normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
      allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=['\n', '\t'],
      max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
      unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, num_threads=num_threads,
      minloglevel=2)


def digest(path: str) -> str:
  """Content hash of a tokenizer file (a directory: its tokenizer.json): two runs whose digests agree
  mean the same token ids."""
  with fs.open(os.path.join(path, 'tokenizer.json') if fs.isdir(path) else path, 'rb') as f:
    return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
