"""Quality filters: every rule both ways (a document it keeps, one it drops) on hand-made English,
Chinese and code, with measured values checked against hand-computed ones."""
import pytest

from lmjax.data import quality
from lmjax.data.records import Doc

EN = '''The river town woke slowly under a pale winter sky, and the bakers were the first to light their ovens.
Children walked to school along the frozen canal while their parents argued about the price of coal.

By noon the market square was crowded with farmers who had travelled from the hills with cheese and wool.
A young teacher bought two loaves of bread and a small jar of honey for her grandmother.
She wanted to reach the old stone bridge before the light began to fade over the water.

Nobody in the town remembered exactly when the bridge had been built, but everyone agreed that it was older than the church.
Some said that a merchant paid for it after his cart fell through the ice during a storm.
Others believed the story was invented by the innkeeper to entertain travellers on long evenings.
'''
ZH = '''清晨的小镇笼罩在薄雾之中，面包师傅最先点燃了炉火。孩子们沿着结冰的运河走向学校，父母们还在讨论煤炭的价格。

到了中午，集市广场上挤满了从山里赶来的农民，他们带来了奶酪和羊毛。一位年轻的老师买了两个面包和一小罐蜂蜜。

她想在天黑之前赶到那座古老的石桥，因为祖母就住在河的另一边。没有人记得这座桥是什么时候修建的，但大家都说它比教堂还要古老。
'''
CODE = '''"""Small helpers for reading configuration files."""
import json
import os


def load(path):
  """Returns the parsed JSON object stored at path."""
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def merge(base, override):
  """Returns a copy of base with the keys of override replacing its own."""
  out = dict(base)
  out.update(override)
  return out


def exists(path):
  return os.path.isfile(path)
'''
EN_WORDS = EN.split()
UNIQUE = [f'{w}{i}' for i, w in enumerate('quiet harbour morning window garden letter summer village '
                                          'mountain orchard lantern meadow kitchen'.split() * 60)]


def _unique(n, start=0):
  """n words that occur nowhere else (unless the same range is asked for twice)."""
  return ' '.join(UNIQUE[start:start + n])


def _spread(phrase, copies, total):
  """`copies` of `phrase`, each after 3 unique words, then unique words up to `total` words."""
  parts = [f'{_unique(3, 100 + 3 * i)} {phrase}' for i in range(copies)]
  return ' '.join(parts) + ' ' + _unique(total - copies * (3 + len(phrase.split())), 400)


def _paragraphs(copies):
  """A 10-line paragraph, 4 one-line paragraphs, and `copies` copies of another one between them."""
  unique = [f'{_unique(3, 500 + 3 * i)}.' for i in range(4)]
  body = [_lines(10).strip(), 'Harbour lantern glows.']
  for i in range(4):
    body += [unique[i]] + (['Harbour lantern glows.'] if i < copies else [])
  return '\n\n'.join(body) + '\n'
FILLER = ('quiet harbour morning window garden letter summer village mountain orchard lantern '
          'meadow kitchen ribbon candle thunder blanket pepper silver marble copper saddle').split()


def _lines(n, words=8, end='.'):
  """n distinct English lines of `words` words, each ending with `end`."""
  return '\n'.join(' '.join(FILLER[(i + j) % len(FILLER)] + str(i) for j in range(words)) + end
                   for i in range(n)) + '\n'


def _cfg(variant, **overrides):
  cfg = quality.defaults()[variant]
  for path, value in overrides.items():
    node = cfg
    *parents, leaf = path.split('__')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize('variant,text', [('en', EN), ('zh', ZH), ('code', CODE)])
def test_clean_documents_pass_every_filter_of_their_variant(variant, text):
  verdict = quality.check(text, quality.defaults()[variant])
  assert verdict.keep and verdict.reason is None, verdict
  assert verdict.text == text  # C4 found no line to remove


# (variant, filter, rule, kept document, dropped document, config overrides)
_REPEAT_LINE = 'The same sentence about the weather appears on this line again.'
CASES = [
    # Gopher quality (Rae et al. 2021, A.1.1), English.
    ('en', 'gopher_quality', 'word_count', ' '.join(EN_WORDS[:50]), ' '.join(EN_WORDS[:49]), {}),
    ('en', 'gopher_quality', 'word_count', 'the ' * 100_000, 'the ' * 100_001, {}),
    ('en', 'gopher_quality', 'mean_word_length', 'the ox and ' * 20 + 'wonderful ' * 10,
     'the ox and ' * 20 + 'wonderful ' * 2, {}),  # mean 3.0 (kept) vs 2.56 (dropped)
    ('en', 'gopher_quality', 'mean_word_length', 'the extraordinarily ' * 30,
     'the extraordinarily uncharacteristically ' * 20, {}),  # 10.0 vs 14.3
    # EN has 145 words: 14/159 = 0.088 vs 19/164 = 0.116 hashes per word; 18/181 vs 19/183 ellipses.
    ('en', 'gopher_quality', 'hash_ratio', EN + ' #tag' * 14, EN + ' #tag' * 19, {}),
    ('en', 'gopher_quality', 'ellipsis_ratio', EN + ' wait... then' * 18, EN + ' wait... then' * 19, {}),
    ('en', 'gopher_quality', 'bullet_lines', '\n'.join(['• ' + l for l in _lines(9).split('\n')[:9]]
                                                         + ['a plain line of text with the words']),
     '\n'.join('• ' + l for l in _lines(10).split('\n')[:10]), {}),
    ('en', 'gopher_quality', 'ellipsis_lines', EN + _lines(3, end=' the end…'),
     EN + _lines(4, end=' the end…'), {}),  # 3 of 11 lines vs 4 of 12; > 0.3 drops
    ('en', 'gopher_quality', 'alpha_words', EN + ' 1234' * 36, EN + ' 1234' * 37, {}),  # 0.801, 0.797
    ('en', 'gopher_quality', 'stop_words', ' '.join(FILLER * 3) + ' the and',
     ' '.join(FILLER * 3) + ' the', {}),
    # Chinese: characters are words, function characters are the stop words.
    ('zh', 'gopher_quality', 'word_count', ZH, ZH[:40], {}),
    ('zh', 'gopher_quality', 'stop_words', '春风吹过山谷溪水流向远方' * 9 + '的了',
     '春风吹过山谷溪水流向远方' * 9 + '的', {}),
    # Gopher repetition (table A1).
    ('en', 'gopher_repetition', 'dup_lines', _lines(7) + 'Again here.\n' * 4,
     _lines(5) + 'Again here.\n' * 4, {}),  # 3 copies of 11 lines (0.27) vs 3 of 9 (0.33)
    ('en', 'gopher_repetition', 'dup_paragraphs', _paragraphs(copies=2), _paragraphs(copies=4), {}),
    ('en', 'gopher_repetition', 'dup_line_chars', _lines(20) + (_unique(20, 0) + '\n') * 2,
     _lines(4) + (_unique(40, 0) + '\n') * 2, {}),
    ('en', 'gopher_repetition', 'dup_paragraph_chars', EN + '\nThe end of it.\n\nThe end of it.\n',
     EN + '\n' + EN.split('\n\n')[2],  # its longest paragraph again: 1 of 4, 0.25 of the characters
     dict(gopher_repetition__max_dup_lines=None, gopher_repetition__max_dup_line_chars=None)),
    ('en', 'gopher_repetition', 'top_2gram', _spread('pepperoni mozzarella', 8, 100),
     _spread('pepperoni mozzarella', 12, 100), {}),  # 0.16 vs 0.24 of the characters
    ('en', 'gopher_repetition', 'top_3gram', _spread('cat dog eel', 12, 100),
     _spread('cat dog eel', 14, 100), {}),  # 0.15 vs 0.185 (and its 2-grams 0.12 < 0.2)
    ('en', 'gopher_repetition', 'dup_5gram', _unique(300) + ' ' + _unique(10),
     _unique(200) + ' ' + _unique(45), {}),  # a repeated passage: 0.03 vs 0.17 of the characters
    # Chinese repetition counts characters: a repeated 10-character phrase is a duplicated 5..10-gram.
    ('zh', 'gopher_repetition', 'dup_5gram', ZH, ZH + ZH.split('\n\n')[0][:40], {}),
    # C4 (Raffel et al. 2020, 2.2).
    ('en', 'c4', 'lorem_ipsum', EN, EN + 'Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n', {}),
    ('en', 'c4', 'curly_bracket', EN, EN + 'Write the value as {x} in the template now.\n', {}),
    ('en', 'c4', 'too_few_sentences', '\n'.join(EN.split('\n')[:4]), '\n'.join(EN.split('\n')[:2]), {}),
    ('zh', 'c4', 'too_few_sentences', '\n'.join(ZH.split('\n\n')[:2]), ZH.split('\n\n')[0],
     {}),  # 。 ends a Chinese sentence: 4 vs 2
    # FineWeb (Penedo et al. 2024, 3.5).
    ('en', 'fineweb', 'punct_lines', _lines(2) + _lines(12, end=''), _lines(2) + _lines(15, end=''), {}),
    ('en', 'fineweb', 'dup_line_chars', _lines(30) + _REPEAT_LINE + '\n' + _REPEAT_LINE + '\n',
     _lines(4) + _REPEAT_LINE + '\n' + _REPEAT_LINE + '\n', {}),
    ('en', 'fineweb', 'short_lines', _lines(4) + 'Short line.\n' * 1 + ''.join(f'Tiny {i}.\n' for i in range(7)),
     _lines(3) + ''.join(f'Tiny {i}.\n' for i in range(7)), {}),  # 8/12 = 0.667 vs 7/10
    ('zh', 'fineweb', 'short_lines', ZH, '\n'.join(f'短句第{i}行。' for i in range(10)) + '\n', {}),
    # Code (Codex 3.1, The Stack, StarCoder).
    ('code', 'code', 'max_line_length', CODE + 'x = "' + 'a' * 994 + '"\n',
     CODE + 'x = "' + 'a' * 995 + '"\n', {}),
    ('code', 'code', 'mean_line_length', 'data = [' + '1, ' * 30 + ']\n',
     'data = [' + '1, ' * 31 + ']\n', {}),  # 99 vs 102 characters in the one line
    ('code', 'code', 'alnum_fraction', CODE, CODE + ('#' * 60 + '\n') * 60, {}),
    ('code', 'code', 'autogenerated', '\n' * 5 + '# Generated by protoc. DO NOT EDIT.\n' + CODE,
     '# -*- coding: utf-8 -*-\n# Generated by protoc. DO NOT EDIT.\n' + CODE, {}),
]


@pytest.mark.parametrize('variant,name,rule,kept,dropped,overrides', CASES,
                         ids=[f'{c[0]}-{c[1]}.{c[2]}' for c in CASES])
def test_rule_keeps_one_document_and_drops_the_other(variant, name, rule, kept, dropped, overrides):
  cfg = _cfg(variant, **overrides)
  keep = quality.FILTERS[name](kept, cfg)
  drop = quality.FILTERS[name](dropped, cfg)
  assert keep.keep and keep.reason is None, keep
  assert (drop.keep, drop.reason) == (False, f'{name}.{rule}'), drop


def test_a_threshold_of_none_turns_its_rule_off():
  cfg = _cfg('en', gopher_quality__min_stop_words=None)
  assert quality.gopher_quality(' '.join(FILLER * 3), cfg).keep
  assert quality.defaults().zh.gopher_quality.mean_word_length is None
  assert quality.gopher_quality(ZH, quality.defaults().zh).stats['gopher_quality.mean_word_length'] < 2


def test_measured_values_match_hand_computation():
  # Words a b a b a (5 characters): the top 2-gram 'a b' occurs twice (4 chars) -> 0.8; the copies
  # after the first occurrence start at words 2 and 3, covering words 2..4 -> 3/5.
  assert quality.ngram_char_fractions(list('ababa'), (2,), (2,)) == {'top_2gram': 0.8, 'dup_2gram': 0.6}
  assert quality.ngram_char_fractions(list('abcde'), (2,), (5, 6)) == {
      'top_2gram': 0.0, 'dup_5gram': 0.0, 'dup_6gram': 0.0}
  stats = quality.gopher_repetition('one\ntwo\none\n\none\n', quality.defaults().en).stats
  assert stats['gopher_repetition.dup_lines'] == 0.5  # lines one two one one: 2 copies of 4
  assert stats['gopher_repetition.dup_paragraphs'] == 0.0  # 'one\ntwo\none' and 'one'
  stats = quality.gopher_quality('# a ... b\n- c d\n', quality.defaults().en).stats
  assert stats['gopher_quality.words'] == 7  # '#', 'a', '...', 'b', '-', 'c', 'd'
  assert stats['gopher_quality.hash_ratio'] == pytest.approx(1 / 7)
  assert stats['gopher_quality.bullet_lines'] == 0.5 and stats['gopher_quality.alpha_words'] == 4 / 7
  stats = quality.code('ab\n' + '#' * 8 + '\n', quality.defaults().code).stats
  assert stats == {'code.max_line_length': 8.0, 'code.mean_line_length': 5.0,
                   'code.alnum_fraction': 2 / 12, 'code.autogenerated': 0.0}


def test_c4_removes_lines_and_keeps_paragraphs():
  text = (EN.split('\n\n')[0] + '\nPlease enable JavaScript to view this page.\nToo short.\n\n'
          + EN.split('\n\n')[1] + '\nRead our privacy policy before you continue reading here.\n'
          'A line without a final mark but long enough to keep\n')
  verdict = quality.c4(text, quality.defaults().en)
  assert verdict.keep
  assert verdict.text == (EN.split('\n\n')[0] + '\n\n' + EN.split('\n\n')[1]
                          + '\nA line without a final mark but long enough to keep\n')
  assert verdict.stats['c4.removed_lines'] == 3 / 9
  strict = _cfg('en', c4__drop_lines_without_terminal_punct=True)
  assert quality.c4(text, strict).text == EN.split('\n\n')[0] + '\n\n' + EN.split('\n\n')[1] + '\n'
  zh = '短句。\n' + ZH  # a line under 5 characters goes
  assert quality.c4(zh, quality.defaults().zh).text == ZH


def test_batch_records_the_rule_that_dropped_each_document():
  docs = [Doc('web', '1', EN), Doc('web', '2', ' '.join(EN_WORDS[:10])),
          Doc('web', '3', EN + 'Lorem ipsum dolor sit amet, consectetur.\n')]
  kept, drops = quality.quality_batch(docs, quality.defaults().en)
  assert kept == [docs[0]]
  assert [(d.doc_id, d.stage, d.reason, d.chars) for d in drops] == [
      ('2', 'quality', 'gopher_quality.word_count', len(docs[1].text)),
      ('3', 'quality', 'c4.lorem_ipsum', len(docs[2].text))]
  with pytest.raises(ValueError, match="unknown filter 'nope'"):
    quality.check(EN, _cfg('en', filters=('nope',)))


def _ngram_reference(words, n):
  """Plain Python: (top n-gram fraction, duplicated n-gram fraction) of the words' characters."""
  total = sum(map(len, words))
  grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
  counts = {g: grams.count(g) for g in grams}
  best = max(counts.values(), default=0)
  top = max((best * sum(map(len, g)) for g, c in counts.items() if c == best), default=0)
  covered, seen = set(), set()
  for i, g in enumerate(grams):
    if g in seen:
      covered.update(range(i, i + n))
    seen.add(g)
  return (top / total if best > 1 else 0.0), sum(len(words[i]) for i in covered) / total


def test_ngram_fractions_match_a_plain_python_reference():
  import random  # pylint: disable=import-outside-toplevel
  rng = random.Random(0)
  for trial in range(200):
    vocab = ['a', 'bb', 'ccc', 'dddd', 'eeeee'][:rng.randint(1, 5)]
    words = rng.choices(vocab, k=rng.randint(1, 40))
    got = quality.ngram_char_fractions(words, (2, 3, 4), (5, 6, 7, 8, 9, 10))
    for n in range(2, 11):
      top, dup = _ngram_reference(words, n)
      if n <= 4:
        assert got[f'top_{n}gram'] == pytest.approx(top), (trial, words, n)
      else:
        assert got[f'dup_{n}gram'] == pytest.approx(dup), (trial, words, n)
