"""The sentencepiece tokenizer: exact round trips, per-source sampling weights, loading .model files."""
import pytest

from lmjax import errors
from lmjax.data import corpora
from lmjax.data import tokenizer

# Public-domain classical Chinese (Tang poems) and modern Chinese sentences.
ZH = ('床前明月光，疑是地上霜。举头望明月，低头思故乡。\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n'
      '春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n今天天气很好，我们一起去公园散步吧。\n'
      '这本书的内容非常丰富，适合初学者阅读。\n人民日报报道，经济发展取得了新的成就。\n')
EN = 'The quick brown fox jumps over the lazy dog.  Twice-spaced, trailing  \nCRLF line\r\nend\n'
CODE = 'def f(x, *args):\n\tif x:\n        return {"a": [1, 2.5e-3]}  # comment\n\n\n    pass \\\n'
ODD = '\x00\x01 é ü ß 😀 \u200b \ufeff tab\tend  \n'


@pytest.fixture(scope='module')
def docs():
  code = corpora.source_documents('python_stdlib')[:40]
  en = corpora.source_documents('pydoc_topics')[:40]
  zh = [ZH * 3] * 20
  return {'code': code, 'en': en, 'zh': zh}


@pytest.fixture(scope='module')
def tok(docs, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'm.model')
  lines = tokenizer.sample(docs, {'code': 1, 'en': 1, 'zh': 1}, 200_000)
  return tokenizer.train(lines, path, vocab_size=1000)


@pytest.mark.parametrize('text', [ZH, EN, CODE, ODD, ZH + EN + CODE, '', ' ', '\n\n'])
def test_round_trip_is_exact(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_held_out_corpus_documents(tok):
  for d in corpora.source_documents('python_stdlib')[-5:] + corpora.source_documents('common_licenses')[:3]:
    assert tok.decode(tok.encode(d)) == d


def test_sampling_weights_decide_coverage(docs, tmp_path):
  """With Chinese in the sample its characters get pieces; without, they fall back to 3 UTF-8 bytes."""
  with_zh = tokenizer.train(tokenizer.sample(docs, {'code': 1, 'en': 1, 'zh': 1}, 200_000),
                            str(tmp_path / 'a.model'), vocab_size=1000)
  without = tokenizer.train(tokenizer.sample(docs, {'code': 1, 'en': 1, 'zh': 0}, 200_000),
                            str(tmp_path / 'b.model'), vocab_size=1000)
  n_chars = len(ZH)
  assert len(without.encode(ZH)) > 2.5 * n_chars  # mostly <0xE5>-style byte pieces
  assert len(with_zh.encode(ZH)) < n_chars
  assert without.decode(without.encode(ZH)) == ZH


def test_sample_respects_weights_and_budget(docs):
  lines = tokenizer.sample(docs, {'code': 3, 'en': 1}, 100_000)
  code_chars = sum(len(d) for d in docs['code'])
  zh_lines = [l for l in lines if '明月' in l]
  assert not zh_lines  # weight 0 (not given)
  chars = sum(len(l) for l in lines)
  assert 100_000 <= chars + len(lines) <= 100_000 + max(map(len, docs['code'] + docs['en'])) * 2
  assert code_chars > 75_000  # enough code to fill its 3/4 share


def test_load_existing_model_and_errors_name_the_file(tok, tmp_path):
  again = tokenizer.load(tok.path)
  assert again.vocab_size == tok.vocab_size == 1000
  assert again.encode(CODE) == tok.encode(CODE)
  assert (again.bos_id, again.eos_id) == (tokenizer.BOS_ID, tokenizer.EOS_ID)
  with pytest.raises(errors.MissingFile, match='nope.model'):
    tokenizer.load(str(tmp_path / 'nope.model'))
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(errors.DataError, match='bad.model'):
    tokenizer.load(str(bad))
