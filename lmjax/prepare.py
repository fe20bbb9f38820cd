"""Prepare: tokenizer and ArrayRecord shards of every source of a config, ahead of training.

    python -m lmjax.prepare --config=configs/tiny_mix.py --workdir=/tmp/run

Data goes to <workdir>/data unless config.data.cache_dir is set; `python -m lmjax.train` with the same
config and cache then loads it instead of preparing it. The work is lmjax.data.prepare's.
"""
from __future__ import annotations

import json
import os

import ml_collections
from absl import flags

from lmjax import cli
from lmjax.data import prepare


def main(config: ml_collections.ConfigDict) -> None:
  tok, dirs, missing = prepare.prepare(config.data, flags.FLAGS.workdir)
  print(f'tokenizer {tok.path}  vocab {tok.vocab_size}')
  print(f'{"source":10s} {"docs":>8s} {"tokens":>11s} {"chars/tok":>9s} {"eval docs":>9s} '
        f'{"eval tokens":>11s}  dir')
  for name, d in dirs.items():
    with open(os.path.join(d, 'stats.json')) as f:
      s = json.load(f)
    tr, ev = s['train'], s['eval']
    print(f'{name:10s} {tr["documents"]:8d} {tr["tokens"]:11d} {tr["chars"] / max(tr["tokens"], 1):9.2f} '
          f'{ev["documents"]:9d} {ev["tokens"]:11d}  {d}')
    for c, line in s['missing_corpora'].items():
      print(f'  (corpus {c} of {name} not installed: {line})')
  for name, line in missing.items():
    print(f'{name:10s} MISSING: install with {line}')


if __name__ == '__main__':
  cli.define_flags('run directory; data goes to <workdir>/data unless config.data.cache_dir is set')
  cli.run(main)
