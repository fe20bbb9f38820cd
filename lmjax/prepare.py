"""Prepare: clean, deduplicate, train the tokenizer and write the shards of every source of a
config, ahead of training (lmjax/data/prepare.py; docs/data.md).

    python -m lmjax.prepare --config=configs/tiny_mix.py --workdir=/tmp/run [--runner=beam]

Data goes to <workdir>/data unless config.data.cache_dir is set (local or gs://); `python -m
lmjax.train` with the same config and cache then loads it instead of preparing it. Prints the
report (documents and tokens each stage kept and dropped, per source; also <workdir>/data_report.json
and .png) and the prepared shards.
"""
from __future__ import annotations

import json
import os

import ml_collections
from absl import flags

from lmjax import cli
from lmjax import fs
from lmjax.data import prepare
from lmjax.data import report as report_lib


def main(config: ml_collections.ConfigDict) -> None:
  if flags.FLAGS.runner:
    config.data.clean.runner = flags.FLAGS.runner
  tok, dirs, missing, report, report_path = prepare.prepare(config.data, flags.FLAGS.workdir,
                                                            verbose=True)
  if report is None:  # prepared before: the report was printed then; show it again
    print(report_lib.table(report_lib.load(report_path)))
  print(f'report {report_path} (and .png)')
  print(f'tokenizer {tok.path}  vocab {tok.vocab_size}')
  print(f'{"source":10s} {"docs":>8s} {"tokens":>11s} {"chars/tok":>9s} {"eval docs":>9s} '
        f'{"eval tokens":>11s}  dir')
  for name, d in dirs.items():
    s = json.loads(fs.read_text(os.path.join(d, 'stats.json')))
    tr, ev = s['train'], s['eval']
    print(f'{name:10s} {tr["documents"]:8d} {tr["tokens"]:11d} {tr["chars"] / max(tr["tokens"], 1):9.2f} '
          f'{ev["documents"]:9d} {ev["tokens"]:11d}  {d}')
    for c, line in s['missing_corpora'].items():
      print(f'  (corpus {c} of {name} not installed: {line})')
  for name, line in missing.items():
    print(f'{name:10s} MISSING: install with {line}')


if __name__ == '__main__':
  cli.define_flags('run directory; data goes to <workdir>/data unless config.data.cache_dir is set')
  flags.DEFINE_enum('runner', None, list(prepare.RUNNERS),
                    'the cleaning runner (default: config.data.clean.runner)')
  cli.run(main)
