"""Writes the continued-pretraining demo's domain task: a cloze over licence texts.

  python scripts/make_legal_cloze.py [--out lmjax/eval/tasks/legal_cloze.jsonl] [--n 64]

Passages come from the legal documents that training never reads. configs/cpt_domain.py (like
configs/tiny_mix.py) cleans the legal corpora, orders the kept documents by content hash, holds out
the first ones for the held-out loss and trains on the next ones up to its character cap (4M;
tiny_mix's is 1M); the examples are cut from the cleaned documents after those
(`lmjax.data.prepare.cleaned_documents`'s 'unseen'). Licences share boilerplate, so an example whose
last `--overlap` characters of context and true continuation appear verbatim in the training text is
dropped (decontamination, as language-model evaluations do with n-gram overlap). `cloze` (below)
makes the examples: a context of ~240 characters, 4 choices of ~48, the true continuation and three
from other licences. The output depends only on the installed corpora (licensedcode-data 32.1.0 and
Debian's common licences when it was made) and the arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmjax import config as config_lib, errors  # noqa: E402
from lmjax.data import prepare  # noqa: E402


def cloze(docs: Sequence[str], n: int, *, context_chars: int = 240, choice_chars: int = 48,
          num_choices: int = 4, seed: int = 0) -> list[dict]:
  """A cloze task from documents, deterministic in its arguments: each example's context is a
  passage of one document (about context_chars, ending before a space), its choices the passage's
  true continuation and continuations from other documents, each starting at a space and cut at
  the first whitespace past choice_chars; the true one at a seeded position."""
  min_chars = 2 * (context_chars + choice_chars)
  long_enough = [d for d in docs if len(d) >= min_chars]
  if len(long_enough) < num_choices:
    raise errors.DataError(f'cloze: {len(long_enough)} documents of at least {min_chars} characters; '
                           f'expected at least num_choices={num_choices}')
  rng = np.random.default_rng(seed)

  def continuation(doc: str, at: int) -> str:
    end = at + choice_chars
    while end < len(doc) and not doc[end].isspace():
      end += 1
    return doc[at:end]

  def space_after(doc: str, at: int) -> int:
    while at < len(doc) and doc[at] != ' ':
      at += 1
    return at

  examples = []
  for _ in range(100 * n):
    if len(examples) == n:
      return examples
    i = int(rng.integers(len(long_enough)))
    doc = long_enough[i]
    cut = space_after(doc, int(rng.integers(context_chars, len(doc) - 2 * choice_chars)))
    true = continuation(doc, cut)
    others = rng.choice([j for j in range(len(long_enough)) if j != i], num_choices - 1, replace=False)
    wrong = []
    for j in others:
      other = long_enough[j]
      start = space_after(other, int(rng.integers(len(other) - 2 * choice_chars)))
      wrong.append(continuation(other, start))
    context = doc[space_after(doc, max(0, cut - context_chars)) + 1:cut]
    if len(true.strip()) < choice_chars // 2 or any(len(w.strip()) < choice_chars // 2 or w == true
                                                    for w in wrong):
      continue  # a continuation ran into the end of its document
    answer = int(rng.integers(num_choices))
    examples.append(dict(context=context, choices=wrong[:answer] + [true] + wrong[answer:],
                         answer=answer))
  raise errors.DataError(f'cloze: {len(examples)} of {n} examples after {100 * n} draws: the documents '
                         f'have too few spaces to cut continuations of about choice_chars={choice_chars}')


def seen_in(example: dict, train_text: str, overlap: int) -> bool:
  """Whether the last `overlap` characters of the example's context + true continuation (one
  stretch of its document) occur in `train_text`."""
  span = example['context'] + example['choices'][example['answer']]
  return span[-overlap:] in train_text


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'lmjax', 'eval', 'tasks',
                                                    'legal_cloze.jsonl'))
  parser.add_argument('--n', type=int, default=64, help='examples')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--overlap', type=int, default=100, help='characters of verbatim overlap that '
                      'make an example seen in training')
  parser.add_argument('--workdir', default='', help="where the data is prepared (default: a temporary "
                      "directory; the corpora's clean store is reused through LMJAX_CLEAN_CACHE)")
  args = parser.parse_args()
  config = config_lib.load(os.path.join(ROOT, 'configs', 'cpt_domain.py'))
  docs = prepare.cleaned_documents(config.data, args.workdir or tempfile.mkdtemp(), 'legal')
  train_text = '\x00'.join(docs['train'] + docs['eval'])
  candidates = cloze(docs['unseen'], 4 * args.n, seed=args.seed)
  unseen = [e for e in candidates if not seen_in(e, train_text, args.overlap)]
  if len(unseen) < args.n:
    raise SystemExit(f'only {len(unseen)} of {len(candidates)} candidate examples are unseen; '
                     f'expected --n={args.n}')
  examples = unseen[:args.n]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.tmp', 'w', encoding='utf-8') as f:
    for ex in examples:
      f.write(json.dumps(ex, ensure_ascii=False) + '\n')
  os.replace(args.out + '.tmp', args.out)
  print(f'wrote {len(examples)} examples from {len(docs["unseen"])} unseen legal documents to '
        f'{args.out}; {len(candidates) - len(unseen)} of {len(candidates)} candidates overlapped the '
        'training text and were dropped')


if __name__ == '__main__':
  main()
