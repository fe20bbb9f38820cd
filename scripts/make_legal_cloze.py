"""Writes the continued-pretraining demo's domain task: a cloze over licence texts.

  python scripts/make_legal_cloze.py [--out tests/assets/eval/legal_cloze.jsonl] [--n 64]

Passages come from the legal documents past the ones training can take. configs/cpt_domain.py
(like configs/tiny_mix.py) orders the legal documents by content hash, holds out the first ones for
the held-out loss and trains on the next ones up to its character cap (4M; tiny_mix's is 1M); the
examples are cut from the documents after those, in the order of their raw text (cleaning may
drop or edit a few, shifting the cap a little). `lmjax.evaluate.cloze` makes the examples: a context
of ~240 characters, 4 choices of ~48, the true continuation and three from other licences. The
output depends only on the installed corpora (licensedcode-data 32.1.0 and Debian's common licences
when it was made) and the arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmjax import config as config_lib, evaluate  # noqa: E402
from lmjax.data import corpora, prepare  # noqa: E402


def unseen_documents(config) -> list[str]:
  """The legal documents past the held-out ones and the train cap, in content-hash order."""
  source = config.data.sources['legal']
  docs = corpora.source_documents(source.corpora)
  n_eval, n_train = prepare.split(np.array([len(d) for d in docs]), config.data.eval,
                                  int(source.max_chars))
  return docs[n_eval + n_train:]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'tests', 'assets', 'eval',
                                                    'legal_cloze.jsonl'))
  parser.add_argument('--n', type=int, default=64, help='examples')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  config = config_lib.load(os.path.join(ROOT, 'configs', 'cpt_domain.py'))
  docs = unseen_documents(config)
  examples = evaluate.cloze(docs, args.n, seed=args.seed)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    for ex in examples:
      f.write(json.dumps(ex, ensure_ascii=False) + '\n')
  print(f'wrote {len(examples)} examples from {len(docs)} unseen legal documents to {args.out}')


if __name__ == '__main__':
  main()
