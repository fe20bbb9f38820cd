"""How the data stages cut text: character classes of code points, words, and the Han fraction.

Shared by langid.py (the CJK rule), quality.py (words and characters) and dedup.py (shingles), so
all three agree on what a word and a Chinese document are.

Words: English and code are cut at whitespace (as Gopher and C4 count words). Chinese has no spaces,
so in CJK mode every Han character is a word of its own and other runs of non-space, non-CJK-
punctuation characters (English words, numbers) are words as usual: '我们用JAX训练' -> ['我', '们',
'用', 'JAX', '训', '练'].
"""
from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

# Han ideographs: CJK Unified Ideographs, extension A, compatibility ideographs, extensions B-F and
# the compatibility supplement.
HAN_RANGES = '\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f'
# CJK punctuation: CJK symbols and punctuation (、。「」 and the ideographic space) and the full-width
# punctuation of the halfwidth/fullwidth forms block (，！？：；（）) -- not the full-width letters.
CJK_PUNCT_RANGES = '\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65'
_CJK_WORD = re.compile(f'[{HAN_RANGES}]|[^\\s{HAN_RANGES}{CJK_PUNCT_RANGES}]+')

# Classes of code points (values of `char_classes`).
OTHER, LETTER, HAN, DIGIT, SPACE, PUNCT, CONTROL = range(7)
_TABLE_SIZE = 0x30000  # the planes of all scripts in use; code points above are OTHER
_CLASS_OF_CATEGORY = {'L': LETTER, 'M': LETTER, 'N': DIGIT, 'Z': SPACE, 'P': PUNCT, 'S': PUNCT,
                      'C': CONTROL}


@functools.cache
def _class_table() -> np.ndarray:
  """uint8[_TABLE_SIZE + 1]: the class of each code point (the last: all code points above)."""
  table = np.array([_CLASS_OF_CATEGORY[unicodedata.category(chr(i))[0]]
                    for i in range(_TABLE_SIZE)] + [OTHER], np.uint8)
  table[[ord(c) for c in '\t\n\r\v\f']] = SPACE  # categories call these Cc
  for lo, hi in re.findall(r'(.)-(.)', HAN_RANGES):
    if ord(lo) < _TABLE_SIZE:
      table[ord(lo):min(ord(hi), _TABLE_SIZE - 1) + 1] = HAN
  return table


def code_points(text: str) -> np.ndarray:
  """uint32[len(text)]: the code points of `text`."""
  return np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), np.uint32)


def char_classes(cps: np.ndarray) -> np.ndarray:
  """uint8[n]: the class (OTHER, LETTER, HAN, ..., CONTROL) of each of code points uint32[n]."""
  return np.take(_class_table(), cps, mode='clip')  # code points above the table: its last entry


def class_counts(text: str) -> np.ndarray:
  """int64[7]: how many code points of `text` fall in each class (indexed by OTHER ... CONTROL)."""
  return np.bincount(char_classes(code_points(text)), minlength=7)


def han_fraction(text: str) -> float:
  """Han characters / (Han characters + other letters); 0 when `text` has no letters.

  Letters, not characters: digits, punctuation and spaces say nothing about the language. An
  English word is ~5 letters against ~1.5 Han characters per Chinese word, so at a fraction of 0.2
  about half of the *words* are Chinese.
  """
  counts = class_counts(text)
  letters = int(counts[LETTER] + counts[HAN])
  return int(counts[HAN]) / letters if letters else 0.0


def words(text: str, cjk: bool) -> list[str]:
  """The words of `text`: whitespace-separated tokens, or (cjk) Han characters and non-CJK runs."""
  return _CJK_WORD.findall(text) if cjk else text.split()

