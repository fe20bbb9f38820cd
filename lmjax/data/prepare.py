"""Turns the configured sources into cleaned documents, a tokenizer and ArrayRecord shards (cached).

Steps (docs/data.md has the whole story):
1. Clean (`clean`): every source's files stream through normalize -> langid -> quality filters
   (lmjax/data/stages.py), then exact and near-duplicates are removed across all sources, by the
   local runner (stages.run, the default) or by Apache Beam (beam.py; config.data.clean.runner or
   `python -m lmjax.prepare --runner=beam`). Both write a *clean store*:
     docs/<source>-NNNNN-of-NNNNN.jsonl    the kept documents, {"id", "text"} per line
     drops-NNNNN-of-NNNNN.jsonl            every dropped document (records.drop_record)
     counters.json                         documents and characters per (source, stage, outcome)
   Beam's also has beam-files.json and beam-summary.json (clean_store.py), and its docs files are
   ranges of the content-hash order, so with the Beam runner the steps below run as Beam pipelines
   too (beam_shards.py): no machine holds a source's documents. Otherwise (a local runner's store,
   or a Beam store reused by the local runner) they run here (`_rest_local`).
2. Split (shards.py: `split`, `split_files`): a source's kept documents in content-hash order
   (dedup.content_key) are held out until `eval.holdout_chars` characters (at most
   `eval.max_holdout_fraction` of them); the train documents are the next ones, up to the source's
   `max_chars` (0: all).
3. The tokenizer is trained on a weighted sample of the cleaned train documents (or loaded from
   `tokenizer.path`, a local path or URL).
4. Shards: each source's train and held-out documents tokenized into ArrayRecord files; a document
   goes to the shard its offset in the split names (shards.py `shard_of`), whoever writes it.
5. The report (report.py): per stage and source, documents and tokens in, kept and dropped by
   reason, example drops and duplicate clusters; JSON and a PNG bar chart.

Layout under the cache dir (`config.data.cache_dir`, else `<workdir>/data`; a local path or a URL
such as gs://, through lmjax/fs.py):

  clean-<key>/                            the clean store (for a URL cache dir: the Beam runner's
                                          workers write it there; the local runner's is built in a
                                          local temporary directory and removed; under
                                          $LMJAX_CLEAN_CACHE instead when that is set)
  tokenizer-<key>.model                   the trained sentencepiece model (unless tokenizer.path)
  <source>-<key>/train-00000.arrayrecord  one record per document: its token ids (no BOS/EOS); shard
                                          k holds the documents starting in [k, k+1) x shard_bytes
  <source>-<key>/train-00000.starts.npy   int64 [records + 1]: where each document of the shard starts
                                          in the shard's stream of `[BOS] ids [EOS]` documents (the
                                          pipeline reads it on demand: lmjax/data/pipeline.py)
  <source>-<key>/eval-00000.arrayrecord   the held-out documents (one shard), eval-00000.starts.npy
  <source>-<key>/stats.json               documents, tokens, chars; per shard its file, records,
                                          tokens, bytes and checksum
  report-<key>.json, report-<key>.png     the report (also copied to <workdir>/data_report.json, .png)

Each key hashes everything the files depend on (corpus files, cleaning config, caps, hold-out,
tokenizer bytes), so a changed config prepares anew and runs with the same config share the files.
A directory appears whole: on a disk it is written under a temporary name and renamed; on an object
store its stats.json (or counters.json) is written last and marks it complete. Concurrent processes
are safe (they write identical files).

CLI: python -m lmjax.prepare --config=configs/tiny_mix.py --workdir=/tmp/run [--runner=beam]
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator, NamedTuple

import fsspec
import numpy as np
import tqdm

from lmjax import errors, fs
from lmjax.data import clean_store
from lmjax.data import corpora
from lmjax.data import readers
from lmjax.data import report as report_lib
from lmjax.data import shards as shards_lib
from lmjax.data import stages
from lmjax.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 4  # bump when the clean store changes (4: a Beam store's files are key ranges)
RUNNERS = ('local', 'beam')
# config.data.clean fields that choose how the store is made, not what it holds (not in its key)
_RUNNER_FIELDS = ('runner', 'beam_args', 'cc_rounds', 'beam_files')
# A source's kind and languages when its config does not say: by the domain of its first corpus;
# your own files ('' domain) are taken as they are. Formal math (metamath) is filtered as code.
_KIND_OF_DOMAIN = {'code': 'code', 'math': 'code', 'zh': 'zh', 'en': 'en', 'legal': 'en', '': 'raw'}
_LANGUAGES_OF_KIND = {'code': '', 'zh': 'zh', 'en': 'en', 'raw': ''}


def defaults():
  """`config.data.clean`: the runner and every stage's thresholds (stages.defaults: normalize,
  langid, quality per kind, dedup) plus the readers' limit."""
  cfg = stages.defaults()
  cfg.runner = 'local'  # local | beam (DirectRunner unless beam_args names another)
  cfg.beam_args = ''  # Beam pipeline options, e.g. '--runner=DataflowRunner --project=P --region=R'
  cfg.cc_rounds = 20  # Beam: Hash-to-Min rounds for near-duplicate clusters (~log2 of the widest)
  cfg.beam_files = 16  # Beam: docs files per source (and drops files): one file's docs in a worker
  cfg.read = readers.defaults()
  return cfg


def cache_dir(data_cfg, workdir: str) -> str:
  """`data_cfg.cache_dir`, else `<workdir>/data` (a local path or a URL)."""
  return data_cfg.cache_dir or os.path.join(workdir, 'data')


def _hash(obj) -> str:
  return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def split_rows(data_cfg, name: str, index: clean_store.SourceIndex) -> dict[str, range]:
  """Rows of source `name`'s clean index by split (`split`): 'eval', 'train' and 'unseen' (past
  max_chars: what training never reads)."""
  n_eval, n_train = shards_lib.split(index.chars, data_cfg.eval, int(data_cfg.sources[name].max_chars))
  return dict(eval=range(n_eval), train=range(n_eval, n_eval + n_train),
              unseen=range(n_eval + n_train, len(index.chars)))


def available_sources(data_cfg) -> tuple[list[str], dict[str, str]]:
  """(names of sources with at least one installed corpus, {missing source: install lines}).

  Only the optional named corpora (those with an install line) may be missing; a file glob the user
  named that matches nothing is an error naming it (a typo must not drop a source silently)."""
  present, missing = [], {}
  for name, src in data_cfg.sources.items():
    gone = corpora.missing(src.corpora)
    for corpus_name in gone:
      if corpora.corpus(corpus_name).is_glob:
        raise errors.MissingFile(f'config.data.sources.{name}.corpora: {corpus_name!r} matches no file')
    if len(gone) == len(corpora.corpus_names(src.corpora)):
      missing[name] = ' ; '.join(sorted(set(gone.values())))
    else:
      present.append(name)
  return present, missing


def source_kind(data_cfg, name: str) -> tuple[str, str]:
  """(kind, languages) of source `name`: its config's `kind` and `languages` if set, else by the
  domain of its first corpus (code and math: 'code', no langid; zh: 'zh'; en and legal: 'en'; your
  own txt:/jsonl:/parquet: files: 'raw', only deduplicated -- set kind to filter them)."""
  src = data_cfg.sources[name]
  domain = corpora.corpus(corpora.corpus_names(src.corpora)[0]).domain
  kind = src.get('kind') or _KIND_OF_DOMAIN[domain]
  if kind not in stages.KINDS:
    raise errors.ConfigError(f'config.data.sources.{name}.kind={kind!r}: expected one of {stages.KINDS}')
  languages = src.get('languages')
  return kind, _LANGUAGES_OF_KIND[kind] if languages is None else languages


def _fingerprint(spec: str) -> list:
  """Names, sizes and mtimes of the corpus files: a cheap key that changes when they change."""
  out = []
  for name, path, _ in corpora.files(spec):
    if fs.is_local(path):
      st = os.stat(path)
      out.append([name, path, st.st_size, int(st.st_mtime)])
    else:  # size and version (generation, etag or mtime) as the object store reports them
      info = fsspec.core.url_to_fs(path)[0].info(path)
      out.append([name, path, info.get('size'),
                  str(info.get('generation') or info.get('etag') or info.get('mtime') or '')])
  return out


def _clean_key(data_cfg, names: list[str]) -> str:
  return _hash(dict(v=FORMAT_VERSION, clean={k: v for k, v in data_cfg.clean.to_dict().items()
                                             if k not in _RUNNER_FIELDS},
                    sources=[[n, data_cfg.sources[n].corpora, *source_kind(data_cfg, n),
                              _fingerprint(data_cfg.sources[n].corpora)] for n in names]))


def _split_spec(data_cfg, name: str) -> list:
  return [name, int(data_cfg.sources[name].max_chars), int(data_cfg.eval.holdout_chars),
          float(data_cfg.eval.max_holdout_fraction)]


# ----------------------------------------------------------------------------- 1. clean
def clean(data_cfg, names: list[str], store: str, runner: str, verbose: bool) -> None:
  """Writes the clean store of sources `names` to `store` (see the module docstring) with the local
  runner (a local directory) or the Beam runner (a local directory or a URL its workers write to);
  counters.json is written last and marks the store complete."""
  if runner not in RUNNERS:
    raise errors.ConfigError(f'config.data.clean.runner={runner!r}: expected one of {RUNNERS}')
  specs = [(n, data_cfg.sources[n].corpora, *source_kind(data_cfg, n)) for n in names]
  fs.makedirs(os.path.join(store, 'docs'))
  if runner == 'beam':
    errors.require('apache_beam', 'beam', 'config.data.clean.runner=beam')
    from lmjax.data import beam  # pylint: disable=import-outside-toplevel  (the [beam] extra)
    counters = beam.run(specs, data_cfg.clean, store)
  else:
    counters = _clean_local(specs, data_cfg.clean, store, verbose)
  for n, spec, *_ in specs:
    check_source(n, spec, counters.rows())
  fs.write_atomic(os.path.join(store, 'counters.json'), json.dumps(counters.rows(), indent=0))


def check_source(name: str, spec: str, counter_rows: list[dict]) -> None:
  """DataError when source `name` (corpora `spec`) kept no document: it is empty, no record has
  its field (the message lists the fields its first file has), or cleaning dropped every one."""
  docs = collections.Counter()
  for r in counter_rows:
    if r['source'] == name:
      docs[r['stage'], r['outcome']] += r['docs']
  read = sum(n for (stage, outcome), n in docs.items() if stage == 'read')
  where = f'config.data.sources.{name}.corpora={spec!r}'
  if read == 0:
    raise errors.DataError(f'{where}: the source is empty (its files hold no document)')
  if docs['read', 'kept'] == 0 and docs['read', 'missing_field']:
    own = next((c for c in corpora.corpus_names(spec) if corpora.corpus(c).is_glob
                and readers.parse_spec(c).kind != 'txt' and readers.list_files(c)), None)
    if own is None:
      raise errors.DataError(f'{where}: no record has its text field')
    first = readers.list_files(own)[0]
    has = readers.fields(first, own)
    raise errors.DataError(f'{where}: no record has the field {readers.parse_spec(own).field!r}; {first} '
                           f'has {has or "no fields"} (name the text field with #FIELD)')
  if docs['dedup', 'kept'] == 0:
    drops = ', '.join(f'{stage} {outcome} {n}' for (stage, outcome), n in docs.most_common()
                      if outcome not in ('in', 'kept', 'edited'))
    raise errors.DataError(f'{where}: all {read} documents were dropped ({drops}); see its cleaning '
                           f'settings (config.data.sources.{name}.kind, config.data.clean)')


def _clean_local(specs, cfg, store: str, verbose: bool) -> stages.Counters:
  counters = stages.Counters()
  sources = [stages.Source(n, corpora.records(spec, n, cfg.read), kind, languages)
             for n, spec, kind, languages in specs]
  with contextlib.ExitStack() as stack:
    bar = stack.enter_context(tqdm.tqdm(desc='prepare: clean', unit=' docs', disable=not verbose,
                                        file=sys.stderr, mininterval=1.0))  # closed before an error
    out = {n: stack.enter_context(open(os.path.join(store, 'docs', f'{n}-00000-of-00001.jsonl'), 'w',
                                       encoding='utf-8')) for n, *_ in specs}
    drops = stack.enter_context(open(os.path.join(store, 'drops-00000-of-00001.jsonl'), 'w',
                                     encoding='utf-8'))
    write_drop = lambda record: drops.write(json.dumps(record, ensure_ascii=False) + '\n')
    for doc in stages.run(sources, cfg, counters, spill_dir=store, on_drop=write_drop,
                          progress=bar.update):
      out[doc.source].write(clean_store.doc_line(doc.doc_id, doc.text))
  return counters


def read_counters(store: str) -> stages.Counters:
  counters = stages.Counters()
  for row in json.loads(fs.read_text(os.path.join(store, 'counters.json'))):
    counters.add(row['source'], row['stage'], row['outcome'], row['docs'], row['chars'])
  return counters


# ----------------------------------------------------------------------------- 3. tokenizer
def _tokenizer_path(data_cfg, root: str, key: str, names: list[str]) -> str:
  tcfg = data_cfg.tokenizer
  weights = {k: float(v) for k, v in tcfg.sample_weights.items()}
  for k in weights:
    if k not in data_cfg.sources:
      raise errors.ConfigError(f'config.data.tokenizer.sample_weights: unknown source {k!r}; '
                       f'expected one of {sorted(data_cfg.sources)}')
  tkey = _hash(dict(clean=key, splits=[_split_spec(data_cfg, n) for n in names],
                    vocab_size=int(tcfg.vocab_size), model_type=tcfg.model_type,
                    sample_chars=int(tcfg.sample_chars), weights=weights,
                    coverage=float(tcfg.character_coverage)))
  return os.path.join(root, f'tokenizer-{tkey}.model')


# ----------------------------------------------------------------------------- 4. shards


def _tokenizer_hash(tok) -> str:
  with fs.open(tok.path, 'rb') as f:
    return hashlib.blake2b(f.read(), digest_size=8).hexdigest()


def source_dir(data_cfg, root: str, key: str, name: str, tok_hash: str) -> str:
  skey = _hash(dict(clean=key, split=_split_spec(data_cfg, name), tokenizer=tok_hash,
                    shard_bytes=int(data_cfg.shard_bytes), shards=shards_lib.SHARD_FORMAT))
  return os.path.join(root, f'{name}-{skey}')


def write_source(data_cfg, final: str, name: str, index: clean_store.SourceIndex, tok, tok_hash: str,
                 missing_corpora: dict) -> None:
  """Writes the shards, their starts and stats.json of source `name` to the directory `final`."""
  local = fs.is_local(final)
  tmp = f'{final}.tmp{os.getpid()}' if local else tempfile.mkdtemp(prefix='lmjax-shards-')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with fs.removed_on_error(tmp):
    _write_source(data_cfg, tmp, name, index, tok, tok_hash, missing_corpora)
    if not local:  # copied file by file, stats.json last: its presence marks the source done
      for entry in sorted(os.listdir(tmp), key=lambda e: e == 'stats.json'):
        with open(os.path.join(tmp, entry), 'rb') as src, fs.open(os.path.join(final, entry), 'wb') as dst:
          shutil.copyfileobj(src, dst, 1 << 22)
  if local:
    try:
      os.rename(tmp, final)
      return
    except OSError:  # another process finished first; its files are identical
      pass
  shutil.rmtree(tmp, ignore_errors=True)


def _write_source(data_cfg, tmp: str, name: str, index: clean_store.SourceIndex, tok, tok_hash: str,
                  missing_corpora: dict) -> None:
  """write_source's files, into the local directory `tmp`."""
  dtype = shards_lib.token_dtype(tok.vocab_size)
  threads = int(data_cfg.num_threads) or 1
  rows_by_split = split_rows(data_cfg, name, index)
  splits = {}
  for split_name in ('train', 'eval'):
    rows = rows_by_split[split_name]

    def encoded():
      batch = []
      for doc in clean_store.read_docs(index, rows):
        batch.append(doc['text'])
        if len(batch) == shards_lib.ENCODE_BATCH:
          yield from (np.asarray(x, dtype) for x in tok.encode_batch(batch, num_threads=threads))
          batch = []
      yield from (np.asarray(x, dtype) for x in tok.encode_batch(batch, num_threads=threads))

    shard_bytes = int(data_cfg.shard_bytes) if split_name == 'train' else 0
    splits[split_name] = (len(rows), int(index.chars[rows.start:rows.stop].sum()),
                          shards_lib.write_shards(encoded(), tmp, split_name, shard_bytes))
  stats = shards_lib.source_stats(data_cfg, name, tok, tok_hash, missing_corpora, splits)
  with open(os.path.join(tmp, 'stats.json'), 'w') as f:
    json.dump(stats, f, indent=1)


def _report_path(root: str, dirs: dict[str, str]) -> str:
  """The report of the sources prepared in `dirs`, named by their directories' names (not paths: a
  cache dir copied elsewhere, to a bucket say, stays complete)."""
  return os.path.join(root, f'report-{_hash(sorted(os.path.basename(d) for d in dirs.values()))}.json')


# ----------------------------------------------------------------------------- all of it
class Prepared(NamedTuple):
  tokenizer: tokenizer_lib.Tokenizer
  dirs: dict[str, str]  # {source: shard directory}
  missing: dict[str, str]  # {missing source: install line}
  report: dict | None  # the report (report.py) when this call prepared anything, else None
  report_path: str  # where its JSON is (also when it was cached)


def prepare(data_cfg, workdir: str, verbose: bool = False) -> Prepared:
  """Prepares every available source (or finds it prepared).

  verbose: show a progress bar and print the report's table to stderr when something is prepared.
  Raises:
    FileNotFoundError if a source is missing and `data_cfg.allow_missing` is False, or none is present.
  """
  names, missing = available_sources(data_cfg)
  if missing and not data_cfg.allow_missing:
    raise errors.MissingFile(f'data sources not installed: {missing}')
  if not names:
    raise errors.MissingFile(f'no data source is installed: {missing}')
  root = cache_dir(data_cfg, workdir)
  fs.makedirs(root)
  key = _clean_key(data_cfg, names)
  if data_cfg.tokenizer.path:  # given: it must exist (a typo is an error, never a new tokenizer)
    try:
      tok_path, tok = data_cfg.tokenizer.path, tokenizer_lib.load(data_cfg.tokenizer.path)
    except errors.UserError as e:  # missing or damaged
      kind = errors.MissingFile if isinstance(e, FileNotFoundError) else errors.ConfigError
      raise kind(f'config.data.tokenizer.path: {e}') from None
  else:
    tok_path = _tokenizer_path(data_cfg, root, key, names)
    tok = tokenizer_lib.load(tok_path) if fs.isfile(tok_path) else None
  if tok is not None:
    tok_hash = _tokenizer_hash(tok)
    dirs = {n: source_dir(data_cfg, root, key, n, tok_hash) for n in names}
    report_path = _report_path(root, dirs)
    if all(fs.isfile(os.path.join(d, 'stats.json')) for d in dirs.values()) and fs.isfile(report_path):
      return Prepared(tok, dirs, missing, None, report_path)
  if verbose:
    print(f'preparing the data in {root} (cleaning, tokenizer, shards: once, it takes a while)',
          file=sys.stderr)
  with _cleaned_store(data_cfg, names, root, key, verbose) as store:
    sizes = clean_store.read_sizes(store)  # None: a local runner's store (indexed whole here)
    rest = _rest_beam if sizes is not None and data_cfg.clean.runner == 'beam' else _rest_local
    tok, dirs, summary = rest(data_cfg, names, root, key, store, sizes, tok, tok_path)
    stats = {n: json.loads(fs.read_text(os.path.join(d, 'stats.json'))) for n, d in dirs.items()}
    kinds = {n: dict(zip(('kind', 'languages'), source_kind(data_cfg, n))) for n in names}
    report = report_lib.build(kinds, read_counters(store), summary, stats,
                              runner=data_cfg.clean.runner)
  report_path = _report_path(root, dirs)
  for path in (report_path, os.path.join(workdir, 'data_report.json')):
    report_lib.save(report, path)
  if verbose:
    print(report_lib.table(report), file=sys.stderr)
  return Prepared(tok, dirs, missing, report, report_path)


def _rest_local(data_cfg, names: list[str], root: str, key: str, store: str, _, tok, tok_path: str):
  """Steps 2-5 on this machine over a store indexed whole (the local runner's): (tokenizer,
  {source: shard directory}, the report's summary of the drops)."""
  indexes = {n: clean_store.index_source(store, n) for n in names}
  if tok is None:
    tok = shards_lib.train_tokenizer(data_cfg, tok_path, {
        n: (d['text'] for d in clean_store.read_docs(indexes[n], split_rows(data_cfg, n, i)['train']))
        for n, i in indexes.items()})
  tok_hash = _tokenizer_hash(tok)
  dirs = {n: source_dir(data_cfg, root, key, n, tok_hash) for n in names}
  for n, d in dirs.items():
    if not fs.isfile(os.path.join(d, 'stats.json')):
      write_source(data_cfg, d, n, indexes[n], tok, tok_hash,
                   corpora.missing(data_cfg.sources[n].corpora))

  def find_kept(content: bytes):
    for name, index in indexes.items():
      doc = clean_store.find_doc(index, content)
      if doc is not None:
        return name, doc
    return None

  return tok, dirs, report_lib.summarize(lambda: report_lib.drops(store), find_kept)


def _rest_beam(data_cfg, names: list[str], root: str, key: str, store: str,
               sizes: clean_store.Sizes, tok, tok_path: str):
  """Steps 2-5 as Beam pipelines over a Beam store (beam_shards.py; the report's summary was made
  in the clean pipeline); returns as _rest_local."""
  from lmjax.data import beam_shards  # pylint: disable=import-outside-toplevel  (the [beam] extra)
  split = beam_shards.splits(data_cfg, names, store, sizes)
  if tok is None:
    tok = beam_shards.train_tokenizer(data_cfg, tok_path, store, sizes, split)
  tok_hash = _tokenizer_hash(tok)
  dirs = {n: source_dir(data_cfg, root, key, n, tok_hash) for n in names}
  todo = {n: d for n, d in dirs.items() if not fs.isfile(os.path.join(d, 'stats.json'))}
  if todo:
    beam_shards.write_sources(data_cfg, todo, store, sizes, split, tok, tok_hash,
                              {n: corpora.missing(data_cfg.sources[n].corpora) for n in todo})
  return tok, dirs, json.loads(fs.read_text(os.path.join(store, clean_store.SUMMARY)))


def cleaned_documents(data_cfg, workdir: str, name: str) -> dict[str, list[str]]:
  """Source `name`'s documents after cleaning, by split, in content-hash order: 'eval' (held out),
  'train' (what training reads) and 'unseen' (past the source's max_chars: what training never
  reads, e.g. for an evaluation task). Cleans the corpora first if no clean store has them."""
  names, _ = available_sources(data_cfg)
  root = cache_dir(data_cfg, workdir)
  with _cleaned_store(data_cfg, names, root, _clean_key(data_cfg, names), False) as store:
    index = clean_store.index_source(store, name)
    return {k: [d['text'] for d in clean_store.read_docs(index, r)]
            for k, r in split_rows(data_cfg, name, index).items()}


@contextlib.contextmanager
def _cleaned_store(data_cfg, names: list[str], root: str, key: str, verbose: bool) -> Iterator[str]:
  """The clean store of sources `names` (see _clean_store), cleaned first unless it was."""
  def make(store: str) -> None:
    clean(data_cfg, names, store, data_cfg.clean.runner, verbose)

  with _clean_store(root, key, data_cfg.clean.runner, make) as store:
    yield store


@contextlib.contextmanager
def _clean_store(root: str, key: str, runner: str, make: Callable[[str], None]) -> Iterator[str]:
  """The clean store's directory, made by `make(directory)` unless it is complete (counters.json):
  clean-<key> in a local cache dir (written under a temporary name and renamed once complete, so
  a failure in a later step keeps it); in a URL cache dir, clean-<key> there for the Beam runner
  (its workers write it; kept) and a local temporary directory for the local runner (removed
  afterwards). LMJAX_CLEAN_CACHE, a local directory, holds the clean stores of every cache dir
  instead: the key names everything a store depends on, so runs and tests that clean the same
  corpora the same way clean them once (tests/conftest.py sets it)."""
  root = os.environ.get('LMJAX_CLEAN_CACHE') or root
  if not fs.is_local(root) and runner == 'beam':
    store = os.path.join(root, f'clean-{key}')
    if not fs.isfile(os.path.join(store, 'counters.json')):
      fs.rmtree(store)  # what a failed or killed run left: its files would be read with the new ones
      make(store)
    yield store
    return
  if fs.is_local(root):
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f'clean-{key}')
    if not os.path.isfile(os.path.join(final, 'counters.json')):
      tmp = f'{final}.tmp{os.getpid()}'
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
      with fs.removed_on_error(tmp):
        make(tmp)
      try:
        os.rename(tmp, final)
      except OSError:  # another process finished first; its store is identical
        shutil.rmtree(tmp, ignore_errors=True)
    yield final
    return
  with tempfile.TemporaryDirectory(prefix='lmjax-clean-') as tmp:
    make(tmp)
    yield tmp
