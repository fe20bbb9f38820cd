"""seqio interop: seqio Tasks and Mixtures as lmjax sources, lmjax's prepared sources as seqio Tasks.

Needs the `[seqio]` extra (seqio pulls TensorFlow, which stays out of the base install); without it
this module imports, and a `seqio:` source is reported missing with INSTALL. Usage: docs/seqio.md.

Reading. A source spec, beside readers.py's `txt:`/`jsonl:`/`parquet:`:

  seqio:[MODULE/]NAME[#FEATURE]
    MODULE   imported first; it registers NAME (T5X's MIXTURE_OR_TASK_MODULE), e.g. my_lab.tasks
    NAME     a registered seqio Task, or a Mixture (all its Tasks; `rates` gives its mixing rates)
    FEATURE  the example feature that holds the document (default 'targets'): a string feature is
             the text; an integer feature is token ids, decoded to text with the feature's vocabulary

A seqio name may hold '.', ':' and '#' but no '/', so the last '/' ends MODULE; a NAME containing
'#' must name its FEATURE. prepare reads a source file by file (corpora.files, file_records): here a
file is one shard of a Task's 'train' split (its local files, e.g. a TextLineDataSource's or a
TFExampleDataSource's), read unshuffled through all the Task's preprocessors (seqio's ShardInfo;
a preprocessor that combines examples therefore combines them within a file). Documents come out as
text, so that prepare's stages (normalize, langid, quality, dedup) apply and lmjax's tokenizer
encodes them: with the same SentencePiece model, decoding the Task's ids and encoding again gives the
same ids (lmjax's models keep decode(encode(t)) == t; lmjax/data/tokenizer.py). Like a source of
your own files, a seqio source is only deduplicated unless its config sets `kind` (prepare.source_kind).
Tasks that require seqio's offline cache, or read no local file (a FunctionDataSource), are errors
naming them.

A Mixture becomes lmjax's mixture: one lmjax source per Task (`task_specs`) with the Mixture's rates
as phase weights (`rates`); lmjax then draws rows in exact block proportions (data/pipeline.py).

Export. `register_task(name, directory)` registers a prepared source (prepare.py's
`<cache>/<source>-<key>`) as a seqio Task whose FileDataSource reads the ArrayRecord shards, one
example {'targets': int32 token ids} per document, with lmjax's SentencePiece model as its
`seqio.SentencePieceVocabulary`, so seqio's evaluation and caching tools read lmjax's data.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from typing import Callable, Iterator, NamedTuple

import ml_collections
import numpy as np
from array_record.python import array_record_module

from lmjax import errors
from lmjax.data import readers
from lmjax.data.records import Doc, Drop

KIND = 'seqio'
INSTALL = "pip install -e '.[seqio]'  (seqio==0.0.20 tensorflow==2.21.0 tensorflow-text==2.21.1)"
SPLIT = 'train'  # the split read; prepare holds out its own eval documents
SPLITS = {'train': 'train', 'validation': 'eval'}  # exported: seqio split -> lmjax split
_READ_RECORDS = 1024  # records per ArrayRecord read while exporting


class Spec(NamedTuple):
  module: str  # '' = NAME is registered already
  name: str  # a seqio Task or Mixture
  feature: str


def parse_spec(spec: str) -> Spec:
  """'seqio:my_lab.tasks/c4_lm#text' -> Spec('my_lab.tasks', 'c4_lm', 'text')."""
  kind, sep, rest = spec.partition(':')
  module, _, rest = rest.rpartition('/')
  name, hash_, feature = rest.rpartition('#')
  if not hash_:
    name, feature = rest, 'targets'
  if kind != KIND or not sep or not name or not feature:
    raise errors.ConfigError(f'source spec {spec!r}: expected seqio:[MODULE/]NAME[#FEATURE]')
  return Spec(module, name, feature)


@functools.cache
def _seqio():
  """The seqio module. TensorFlow is kept off the GPUs, which belong to JAX (as big_vision's train.py
  does); a TensorFlow that already started on them is left as it is."""
  try:
    import seqio  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as e:  # seqio, or one of the packages the extra brings with it
    raise errors.MissingExtra('seqio sources', 'seqio', e.name or 'seqio') from None
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow's devices were initialized before this call
    pass
  return seqio


def provider(spec: str):
  """The registered seqio Task or Mixture of `spec` (importing its MODULE first)."""
  seqio = _seqio()
  s = parse_spec(spec)
  if s.module:
    try:
      importlib.import_module(s.module)
    except ImportError as e:
      raise errors.ConfigError(f'source spec {spec!r}: cannot import module {s.module!r}: {e}') from None
  try:
    return seqio.get_mixture_or_task(s.name)
  except ValueError as e:
    raise errors.ConfigError(f'source spec {spec!r}: {e}') from None


def tasks(spec: str) -> list:
  """The seqio Tasks of `spec`: the Task itself, or a Mixture's Tasks (sub-mixtures flattened)."""
  p = provider(spec)
  return list(p.tasks) if isinstance(p, _seqio().Mixture) else [p]


def rates(spec: str) -> dict[str, float]:
  """{task name: mixing rate} of a Mixture (rate functions evaluated, sub-mixtures flattened as seqio
  mixes them), {task: 1.0} for a Task: phase weights over the sources of `task_specs(spec)`."""
  p = provider(spec)
  if not isinstance(p, _seqio().Mixture):
    return {p.name: 1.0}
  return {t.name: float(p.get_rate(t)) for t in p.tasks}


def task_specs(spec: str) -> dict[str, str]:
  """{task name: its own source spec} (same MODULE and FEATURE): one lmjax source per Task."""
  s = parse_spec(spec)
  module = f'{s.module}/' if s.module else ''
  return {t.name: f'{KIND}:{module}{t.name}#{s.feature}' for t in tasks(spec)}


def _shards(spec: str) -> list[tuple[object, int, int, str]]:
  """(task, shard index, shard count, file) of each file the Tasks of `spec` read for SPLIT."""
  out, reader = [], {}
  for task in tasks(spec):
    if task.requires_caching:
      raise errors.DataError(f'source spec {spec!r}: Task {task.name!r} requires seqio\'s offline cache; '
                             'expected a Task lmjax can read on the fly (its cached TFRecords can be the '
                             'files of a seqio.TFExampleDataSource)')
    if SPLIT not in task.splits:
      raise errors.DataError(f'source spec {spec!r}: Task {task.name!r} has splits {list(task.splits)}; '
                             f'expected {SPLIT!r}')
    paths = list(task.source.list_shards(SPLIT))
    for i, path in enumerate(paths):
      if not os.path.isfile(path):
        raise errors.DataError(f'source spec {spec!r}: Task {task.name!r} reads {path!r} '
                               f'({task.source!r}); expected local files (lmjax keys prepared data on '
                               'them and reads them one at a time)')
      if path in reader:
        raise errors.ConfigError(f'source spec {spec!r}: Tasks {reader[path]!r} and {task.name!r} both read '
                                 f'{path!r}; make one source per Task (task_specs)')
      reader[path] = task.name
      out.append((task, i, len(paths), path))
  return out


def files(spec: str) -> list[str]:
  """The local files the Tasks of `spec` read for the 'train' split, a Task's shards in seqio's
  (sorted) order: the units prepare reads and keys its cache on. [] when seqio is not installed."""
  try:
    _seqio()
  except ImportError:
    return []
  return [path for *_, path in _shards(spec)]


def shard_texts(spec: str, path: str) -> Iterator[str | bytes]:
  """The document of each example its Task makes of file `path` of `spec`, in the Task's order
  (seqio's shard of that one file, after every preprocessor); a string that is not UTF-8 stays bytes."""
  seqio = _seqio()
  feature = parse_spec(spec).feature
  for task, i, n, p in _shards(spec):
    if p == path:
      ds = task.get_dataset(sequence_length=None, split=SPLIT, shuffle=False, num_epochs=1,
                            shard_info=seqio.ShardInfo(index=i, num_shards=n),
                            trim_output_features=False, try_in_mem_cache=False)
      to_text = _feature_reader(spec, task, ds.element_spec, feature)
      for example in ds.as_numpy_iterator():
        yield to_text(example[feature])
      return
  raise ValueError(f'{path!r} is not a file of source spec {spec!r}; expected one of files(spec)')


def file_records(spec: str, path: str, source: str,
                 cfg: ml_collections.ConfigDict) -> Iterator[Doc | Drop]:
  """The records of file `path` of `spec` as readers.read_file yields them: Docs of `source` named
  'PATH:INDEX' (the example's index in the file's shard, from 0), and a Drop(stage='read') for each
  example that is no document ('empty', 'invalid_utf8', 'too_large' over `cfg.max_doc_bytes`;
  readers.defaults())."""
  max_bytes = int(cfg.max_doc_bytes)
  for i, text in enumerate(shard_texts(spec, path)):
    yield readers.value_record(text, f'{path}:{i}', source, max_bytes)


def documents(spec: str, source: str, cfg: ml_collections.ConfigDict) -> Iterator[Doc | Drop]:
  """Every record of `spec` as readers.read yields them: `file_records` of each of `files(spec)`."""
  _seqio()
  for path in files(spec):
    yield from file_records(spec, path, source, cfg)


def corpus_parts(spec: str) -> tuple[str, Callable[[], list[str]], Callable[[list[str]], list[str]]]:
  """`spec`'s (install line, paths, read), the fields corpora.corpus makes its Corpus of: its paths
  are `files(spec)`; `read` gives the texts of the examples of each file (bytes that are not UTF-8
  replaced, as the named corpora read theirs)."""
  parse_spec(spec)

  def read(paths: list[str]) -> list[str]:
    return [t if isinstance(t, str) else t.decode('utf-8', 'replace')
            for path in paths for t in shard_texts(spec, path)]
  return INSTALL, functools.partial(files, spec), read


def _feature_reader(spec: str, task, element_spec, feature: str):
  """A function from the feature's numpy value to its text (str; bytes when it is not UTF-8)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if feature not in element_spec:
    raise errors.ConfigError(f'source spec {spec!r}: Task {task.name!r} yields features '
                             f'{sorted(element_spec)}, not {feature!r}')
  ts = element_spec[feature]
  if ts.dtype == tf.string and ts.shape.rank == 0:
    return _utf8
  if ts.dtype.is_integer and ts.shape.rank == 1 and feature in task.output_features:
    vocab = task.output_features[feature].vocabulary

    def decode(ids):
      text = vocab.decode(ids.tolist())
      if not isinstance(text, str):
        raise errors.DataError(f'source spec {spec!r}: the vocabulary of feature {feature!r} of Task '
                               f'{task.name!r} ({type(vocab).__name__}) does not decode ids to text')
      return text
    return decode
  raise errors.DataError(f'source spec {spec!r}: feature {feature!r} of Task {task.name!r} is {ts}; '
                         'expected a string, or token ids that are an output feature with a vocabulary')


def _utf8(value: bytes) -> str | bytes:
  try:
    return value.decode('utf-8')
  except UnicodeDecodeError:
    return value


def register_task(name: str, directory: str, *, vocabulary_path: str = '', preprocessors=()):
  """Registers prepared source `directory` as seqio Task `name` and returns it.

  Args:
    name: the seqio Task name (must not be registered yet).
    directory: a prepared source on a local disk, `<cache>/<source>-<key>` of prepare.py (its
      stats.json lists the shards; `prepare.prepare(config.data, workdir).dirs` names them).
    vocabulary_path: lmjax's SentencePiece model of the ids; '' = the `tokenizer` named in
      stats.json, beside `directory` in the cache. Its hash must be stats.json's `tokenizer_hash`.
    preprocessors: seqio preprocessors after reading, e.g. (seqio.preprocessors.append_eos,).
  Returns:
    The seqio.Task: splits 'train' and 'validation' (lmjax's held-out documents; left out when there
    are none), each example {'targets': int32[n]} the ids of one document (no BOS/EOS) in stored
    order, shards read one after another.
  """
  seqio = _seqio()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  stats_path = os.path.join(directory, 'stats.json')
  if '://' in directory:
    raise errors.ConfigError(f'directory={directory!r}: expected a local directory (ArrayRecord reads local '
                             'files; copy the source directory and its tokenizer to this host first)')
  if not os.path.isfile(stats_path):
    raise errors.MissingFile(f'{stats_path!r} does not exist: expected a source directory that '
                             'lmjax.data.prepare wrote')
  with open(stats_path) as f:
    stats = json.load(f)
  vocabulary_path = vocabulary_path or os.path.join(os.path.dirname(directory), stats['tokenizer'])
  if not os.path.isfile(vocabulary_path) or vocabulary_path.endswith('.json'):
    raise errors.MissingFile(f'vocabulary_path={vocabulary_path!r}: expected the SentencePiece model '
                             f'{stats["tokenizer"]!r} that {directory!r} was tokenized with')
  with open(vocabulary_path, 'rb') as f:
    if hashlib.blake2b(f.read(), digest_size=8).hexdigest() != stats['tokenizer_hash']:
      raise errors.ConfigError(f'vocabulary_path={vocabulary_path!r} is not the tokenizer {directory!r} was '
                               f'tokenized with ({stats["tokenizer"]}, hash {stats["tokenizer_hash"]})')
  split_files, examples = {}, {}
  for split, ours in SPLITS.items():
    if stats[ours]['shards']:
      split_files[split] = [os.path.join(directory, s['file']) for s in stats[ours]['shards']]
      examples[split] = int(stats[ours]['documents'])
  source = seqio.FileDataSource(
      read_file_fn=functools.partial(_shard_dataset, dtype=np.dtype(stats['dtype'])),
      split_to_filepattern=split_files, num_input_examples=examples, cycle_length=1)
  vocab = seqio.SentencePieceVocabulary(vocabulary_path)
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=list(preprocessors),
      output_features={'targets': seqio.Feature(vocab, add_eos=True, dtype=tf.int32)})


def _shard_dataset(path, dtype: np.dtype):
  """tf.data of one ArrayRecord shard (`path` a string tensor): {'targets': int32[n]} per record."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def records(p: bytes):
    reader = array_record_module.ArrayRecordReader(p.decode())
    try:
      n = reader.num_records()
      for start in range(0, n, _READ_RECORDS):
        for r in reader.read(list(range(start, min(start + _READ_RECORDS, n)))):
          yield {'targets': np.frombuffer(r, dtype).astype(np.int32)}
    finally:
      reader.close()
  return tf.data.Dataset.from_generator(
      records, args=(path,), output_signature={'targets': tf.TensorSpec([None], tf.int32)})
