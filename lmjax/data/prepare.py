"""Turns the configured sources into a tokenizer and ArrayRecord shards of token ids (cached).

Layout under the cache dir (`config.data.cache_dir`, else `<workdir>/data`; a local path):

  tokenizer-<key>.model                   trained sentencepiece model (unless tokenizer.path is set)
  <source>-<key>/train-00000.arrayrecord  one record per document: its token ids (no BOS/EOS)
  <source>-<key>/eval.arrayrecord         the held-out documents
  <source>-<key>/stats.json               documents, tokens, chars, shard files with sizes and checksums
  <source>-<key>/train_lengths.npy        token count per train document (the pipeline packs from these)
  <source>-<key>/eval_lengths.npy

Each key hashes everything the files depend on (corpus files, caps, hold-out, tokenizer bytes), so a
changed config prepares anew and runs with the same config share the files. Directories appear
atomically (written under a temporary name, then renamed), so concurrent processes are safe.

Held-out documents are chosen by document: the documents in content-hash order (see corpora.py) are
held out until `eval.holdout_chars` characters, at most `eval.max_holdout_fraction` of the documents.

CLI: python -m lmjax.prepare --config=configs/tiny_mix.py --workdir=/tmp/run
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
from array_record.python import array_record_module

from lmjax.data import corpora
from lmjax.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 2  # bump when the documents or the shard format change
WRITER_OPTIONS = 'group_size:1,uncompressed'  # one record per chunk: cheap random access by document


def cache_dir(data_cfg, workdir: str) -> str:
  """`data_cfg.cache_dir`, else `<workdir>/data`, else (workdir a URL such as gs://) ~/.cache/lmjax/data."""
  if data_cfg.cache_dir:
    return data_cfg.cache_dir
  if '://' in workdir:
    return os.path.join(os.path.expanduser('~'), '.cache', 'lmjax', 'data')
  return os.path.join(workdir, 'data')


def _hash(obj) -> str:
  return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def file_checksum(path: str) -> str:
  h = hashlib.blake2b(digest_size=16)
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def _corpus_fingerprint(spec: str) -> list:
  """Names, sizes and mtimes of the corpus files: a cheap key that changes when they change."""
  out = []
  for name in corpora.corpus_names(spec):
    for p in corpora.corpus(name).paths():
      st = os.stat(p)
      out.append([name, p, st.st_size, int(st.st_mtime)])
  return out


def split_documents(docs: list[str], eval_cfg, max_chars: int) -> tuple[list[str], list[str]]:
  """(train, held-out) documents; `docs` are in content-hash order. max_chars=0: no cap on train."""
  limit = max(1, int(len(docs) * eval_cfg.max_holdout_fraction)) if len(docs) > 1 else 0
  n_eval, chars = 0, 0
  while n_eval < limit and chars < eval_cfg.holdout_chars:
    chars += len(docs[n_eval])
    n_eval += 1
  train = docs[n_eval:]
  if max_chars:
    total, n = 0, 0
    while n < len(train) and total < max_chars:
      total += len(train[n])
      n += 1
    train = train[:n]
  return train, docs[:n_eval]


def available_sources(data_cfg) -> tuple[list[str], dict[str, str]]:
  """(names of sources with at least one installed corpus, {missing source: install lines}).

  Only the optional named corpora (those with an install line) may be missing; a file glob the user
  named that matches nothing is an error naming it (a typo must not drop a source silently)."""
  present, missing = [], {}
  for name, src in data_cfg.sources.items():
    gone = corpora.missing(src.corpora)
    for corpus_name in gone:
      if corpora.corpus(corpus_name).is_glob:
        raise FileNotFoundError(f'config.data.sources.{name}.corpora: {corpus_name!r} matches no file')
    if len(gone) == len(corpora.corpus_names(src.corpora)):
      missing[name] = ' ; '.join(sorted(set(gone.values())))
    else:
      present.append(name)
  return present, missing


def _source_spec(data_cfg, name: str) -> dict:
  src = data_cfg.sources[name]
  return dict(name=name, corpora=src.corpora, max_chars=int(src.max_chars),
              files=_corpus_fingerprint(src.corpora),
              holdout=[int(data_cfg.eval.holdout_chars), float(data_cfg.eval.max_holdout_fraction)])


def _load_split(data_cfg, name: str) -> tuple[list[str], list[str]]:
  return split_documents(corpora.source_documents(data_cfg.sources[name].corpora), data_cfg.eval,
                         int(data_cfg.sources[name].max_chars))


def prepare_tokenizer(data_cfg, root: str, names: list[str]) -> tokenizer_lib.Tokenizer:
  """Loads `tokenizer.path`, or trains (once; cached by key) on a weighted sample of train docs."""
  tcfg = data_cfg.tokenizer
  if tcfg.path:
    return tokenizer_lib.load(tcfg.path)
  weights = {k: float(v) for k, v in tcfg.sample_weights.items()}
  for k in weights:
    if k not in data_cfg.sources:
      raise ValueError(f'config.data.tokenizer.sample_weights: unknown source {k!r}; '
                       f'expected one of {sorted(data_cfg.sources)}')
  key = _hash(dict(v=FORMAT_VERSION, sources=[_source_spec(data_cfg, n) for n in names],
                   vocab_size=int(tcfg.vocab_size), model_type=tcfg.model_type,
                   sample_chars=int(tcfg.sample_chars), weights=weights,
                   coverage=float(tcfg.character_coverage)))
  path = os.path.join(root, f'tokenizer-{key}.model')
  if os.path.isfile(path):
    return tokenizer_lib.load(path)
  docs = {n: _load_split(data_cfg, n)[0] for n in names}
  sentences = tokenizer_lib.sample(docs, weights, int(tcfg.sample_chars))
  return tokenizer_lib.train(sentences, path, vocab_size=int(tcfg.vocab_size),
                             model_type=tcfg.model_type, character_coverage=tcfg.character_coverage,
                             num_threads=int(data_cfg.num_threads) or 1)


def _write_shards(token_docs: list[np.ndarray], directory: str, prefix: str,
                  shard_bytes: int) -> list[dict]:
  shards, writer, path, size, count = [], None, '', 0, 0

  def close():
    writer.close()
    shards.append(dict(file=os.path.basename(path), records=count, bytes=os.path.getsize(path),
                       checksum=file_checksum(path)))

  for ids in token_docs:
    if writer is None or (size >= shard_bytes and shard_bytes > 0):
      if writer is not None:
        close()
      path = os.path.join(directory, f'{prefix}-{len(shards):05d}.arrayrecord')
      writer, size, count = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS), 0, 0
    data = ids.tobytes()
    writer.write(data)
    size += len(data)
    count += 1
  if writer is not None:
    close()
  return shards


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def prepare_source(data_cfg, root: str, name: str, tok: tokenizer_lib.Tokenizer) -> str:
  """Writes (or finds) the shards of source `name`; returns their directory."""
  with open(tok.path, 'rb') as f:
    tok_hash = hashlib.blake2b(f.read(), digest_size=8).hexdigest()
  key = _hash(dict(v=FORMAT_VERSION, spec=_source_spec(data_cfg, name), tokenizer=tok_hash,
                   shard_bytes=int(data_cfg.shard_bytes)))
  final = os.path.join(root, f'{name}-{key}')
  if os.path.isfile(os.path.join(final, 'stats.json')):
    return final
  tmp = f'{final}.tmp{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  train, held = _load_split(data_cfg, name)
  dtype = token_dtype(tok.vocab_size)
  threads = int(data_cfg.num_threads) or 1
  stats = dict(source=name, corpora=data_cfg.sources[name].corpora,
               missing_corpora=corpora.missing(data_cfg.sources[name].corpora),
               dtype=dtype.name, tokenizer=os.path.basename(tok.path), tokenizer_hash=tok_hash)
  for split, docs in (('train', train), ('eval', held)):
    ids = [np.asarray(x, dtype) for x in tok.encode_batch(docs, num_threads=threads)]
    lengths = np.array([len(x) for x in ids], np.int64)
    np.save(os.path.join(tmp, f'{split}_lengths.npy'), lengths)
    shard_bytes = int(data_cfg.shard_bytes) if split == 'train' else 0
    stats[split] = dict(documents=len(docs), tokens=int(lengths.sum()),
                        chars=sum(len(d) for d in docs),
                        shards=_write_shards(ids, tmp, split, shard_bytes))
  with open(os.path.join(tmp, 'stats.json'), 'w') as f:
    json.dump(stats, f, indent=1)
  try:
    os.rename(tmp, final)
  except OSError:  # another process finished first; its files are identical
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def prepare(data_cfg, workdir: str) -> tuple[tokenizer_lib.Tokenizer, dict[str, str], dict[str, str]]:
  """Prepares every available source.

  Returns:
    (tokenizer, {source: shard directory}, {missing source: install line}).
  Raises:
    FileNotFoundError if a source is missing and `data_cfg.allow_missing` is False, or none is present.
  """
  names, missing = available_sources(data_cfg)
  if missing and not data_cfg.allow_missing:
    raise FileNotFoundError(f'data sources not installed: {missing}')
  if not names:
    raise FileNotFoundError(f'no data source is installed: {missing}')
  root = cache_dir(data_cfg, workdir)
  os.makedirs(root, exist_ok=True)
  tok = prepare_tokenizer(data_cfg, root, names)
  dirs = {n: prepare_source(data_cfg, root, n, tok) for n in names}
  return tok, dirs, missing

