"""Normalisation: Unicode form, escapes and invisible characters, prose and code whitespace."""
import pytest

from lmjax.data import normalize
from lmjax.data.records import Doc, Drop


def test_prose_whitespace_line_ends_and_invisible_characters():
  text = '\ufeff  Hello\u00a0\u3000 world \r\n\r\n\r\n\n second\tline\u200b\x00 \rthird\u2028fourth  '
  assert normalize.normalize_text(text) == 'Hello world\n\nsecond line\nthird\nfourth\n'


def test_ansi_escapes_nested_and_osc():
  assert normalize.strip_ansi('\x1b[;\x1b[34;1mm red\x1b[0m \x1b]0;title\x07x') == ' red x'
  assert normalize.normalize_text('\x1b[1mbold\x1b[0m and \x1b(Bplain') == 'bold and plain\n'


def test_code_keeps_indentation_and_up_to_two_blank_lines():
  code = 'def f():\n\tif x:  \n        return 1\t\n\n\n\n\n\nclass A:\n    pass'
  assert normalize.normalize_text(code, code=True) == (
      'def f():\n\tif x:\n        return 1\n\n\nclass A:\n    pass\n')
  assert normalize.normalize_text('    x = 1\n', code=True) == '    x = 1\n'


def test_unicode_forms():
  assert normalize.normalize_text('cafe\u0301') == 'caf\u00e9\n'  # NFC composes
  assert normalize.normalize_text('x\u00b2 ，') == 'x\u00b2 ，\n'  # NFC keeps compatibility forms
  assert normalize.normalize_text('x\u00b2 ，', form='NFKC') == 'x2 ,\n'
  with pytest.raises(ValueError, match="normalize.form='NFX'"):
    normalize.normalize_text('a', form='NFX')


def test_batch_drops_documents_left_empty():
  docs = [Doc('s', '1', ' text '), Doc('s', '2', '\x1b[0m \u200b\n\t')]
  kept, drops = normalize.normalize_batch(docs, normalize.defaults())
  assert kept == [Doc('s', '1', 'text\n')]
  assert drops == [Drop('s', '2', 'normalize', 'empty', 8)]
