"""Normalisation of a document's text before filters and dedup: Unicode form, invisible characters,
terminal escapes and whitespace.

Steps, in order:
1. Line ends: CRLF, CR, NEL, LINE and PARAGRAPH SEPARATOR become '\n'.
2. ANSI escape sequences (colours, cursor moves, OSC titles) are removed, also nested broken ones
   such as '\x1b[;\x1b[34;1mm' (seen in fortunes-zh).
3. Control and invisible format characters are removed (C0/C1 controls but tab and newline; BOM,
   zero-width space, word joiner, soft hyphen). The zero-width (non-)joiners stay: emoji sequences
   and Persian and Indic scripts need them.
4. The Unicode normal form, NFC by default: canonical composition only (e + U+0301 -> é), which
   never changes what a text says. NFKC would also fold compatibility characters: full-width CJK
   punctuation to ASCII ('，' -> ','), 'x²' to 'x2' and '①' to '1', which loses meaning in math and
   breaks the CJK terminal-punctuation rules of quality.py. Choose 'NFKC' per source if you want it.
5. Whitespace. Prose: runs of spaces and tabs (any Unicode space, e.g. NBSP and the ideographic
   space) become one ' ', lines are stripped, and more than one blank line becomes one. Code
   (`code=True`) keeps indentation and inner spacing: only trailing whitespace is cut and runs of
   more than two blank lines become two (PEP 8's spacing between top-level definitions).
The result has no leading or trailing blank lines and ends with one '\n', or is '' when nothing is
left (the stage drops those as 'empty').
"""
from __future__ import annotations

import re
import unicodedata

import ml_collections

from lmjax import errors
from lmjax.data.records import Doc, Drop

_LINE_ENDS = re.compile('\r\n|[\r\x85\u2028\u2029]')
# CSI (ESC [ params intermediates final), OSC (ESC ] ... BEL or ESC \), character-set and other
# nF escapes (ESC intermediates final, e.g. ESC ( B) and two-character escapes (ESC 7, ESC M).
_ANSI = re.compile(r'\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[ -/]+[0-~]'
                   r'|\x1b[0-Z\\^_`-~]')  # all final bytes but [ and ], which open CSI and OSC
_INVISIBLE = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff]')
_PROSE_SPACES = re.compile(r'[^\S\n]+')  # any whitespace but newline
_BLANK_LINES = re.compile(r'\n{3,}')
_CODE_BLANK_LINES = re.compile(r'\n{4,}')
_TRAILING_SPACES = re.compile(r'[^\S\n]+\n')

FORMS = ('NFC', 'NFKC', 'NFD', 'NFKD')


def defaults() -> ml_collections.ConfigDict:
  """The normalize stage's config (one per source)."""
  return ml_collections.ConfigDict(dict(
      form='NFC',  # Unicode normal form, one of FORMS (see the module docstring for why NFC)
      code=False,  # True: keep indentation and inner spacing (code, and text where layout matters)
  ))


def strip_ansi(text: str) -> str:
  """`text` without ANSI escape sequences, nested ones included."""
  while True:
    text, n = _ANSI.subn('', text)
    if not n:
      return text


def normalize_text(text: str, form: str = 'NFC', code: bool = False) -> str:
  """`text` normalised as described in the module docstring."""
  if form not in FORMS:
    raise errors.ConfigError(f'normalize.form={form!r}: expected one of {FORMS}')
  text = _LINE_ENDS.sub('\n', text)
  if '\x1b' in text:
    text = strip_ansi(text)
  text = _INVISIBLE.sub('', text)
  text = unicodedata.normalize(form, text)
  if code:
    text = _TRAILING_SPACES.sub('\n', text + '\n')
    text = _CODE_BLANK_LINES.sub('\n\n\n', text)
  else:
    text = _PROSE_SPACES.sub(' ', text)
    text = text.replace(' \n', '\n').replace('\n ', '\n')
    text = _BLANK_LINES.sub('\n\n', text)
  text = text.strip('\n')
  if not code:
    text = text.strip(' ')
  return text + '\n' if text.strip() else ''


def normalize_batch(docs: list[Doc],
                    cfg: ml_collections.ConfigDict) -> tuple[list[Doc], list[Drop]]:
  """(normalised docs, docs left empty by normalisation as Drop(reason='empty'))."""
  kept, drops = [], []
  for doc in docs:
    text = normalize_text(doc.text, cfg.form, cfg.code)
    if text:
      kept.append(doc._replace(text=text))
    else:
      drops.append(Drop(doc.source, doc.doc_id, 'normalize', 'empty', len(doc.text)))
  return kept, drops
