"""D-CPT Law sweep: continued pretraining of 3 tiny sizes on legal text mixed with English.

  python -m lmjax.scaling.sweep --config=configs/dcpt_sweep.py:runlocal=True --workdir=/tmp/dcpt_sweep

Per size, a general-only run (English) makes the starting model; then continued-pretraining runs
mix the domain (legal) at shares r_d in `ratios` with English, each from that starting model. Every
evaluation of a run gives a (N, D, r) point (D: CPT tokens so far); the LR is constant after a short
warmup so that a point mid-run approximates a run of that length. The runs at the held-out share
are left out of the fit and scored. The sweep ends with results.csv, fit.json (D-CPT Law fits of the
domain and the general loss, R^2 on fitted and held-out runs, bootstrap intervals, usages) and
fit.png / tradeoff.png. Re-running the command skips finished runs and resumes unfinished ones.

  runlocal=True: 3 sizes (0.23M, 0.52M, 1.05M params) x 4 shares, 0.49M CPT tokens per run after
  0.66M of pretraining: 14 min on 2 CPU cores (benchmarks/RESULTS.md). runlocal=False: the same grid
  with 4x the tokens and twice as wide models (hours on CPU; meant for a GPU).
  A launcher runs one run per command: --mode=commands prints them (knobs run=, sweep_dir=; with
  --config.* overrides, `python -m lmjax.scaling.sweep --mode=run --run=NAME` commands carrying them).
  lmjax.experiments.dcpt runs this sweep, then its recommendation and the cross-domain law.
Corpora: `en` (fortunes, pydoc topics), `legal` (licensedcode, Debian licences); see CORPORA.md.
"""
from lmjax import config as config_lib, phases
from lmjax.scaling import sweep


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, runlocal=True, run='', sweep_dir='')
  c = config_lib.base()
  c.model.variant = 'tiny'
  c.model.compute_dtype = 'float32'  # bf16 matmuls are emulated (slow) on CPU
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 25
  c.train.eval_every = 20 if knobs.runlocal else 50
  c.train.checkpoint_every = 100
  c.optim.lr = 3e-3
  # One phase; the sweep sets its mixture per run (general only for pretraining, r_d legal for CPT).
  c.phases = phases.timeline(main=phases.phase(fraction=1.0, shape='constant', warmup_steps=10,
                                    weights={'en': 1.0}))
  c.data.sources = {'en': dict(corpora='fortunes,pydoc_topics', max_chars=0),
                    'legal': dict(corpora='licensedcode,common_licenses', max_chars=4_000_000)}
  c.data.eval.num_batches = 4
  c.data.tokenizer.sample_weights = {'en': 1.0, 'legal': 1.0}

  c.sweep = sweep.defaults()
  c.sweep.domain = 'legal'
  c.sweep.general = {'en': 1.0}
  c.sweep.ratios = (0.1, 0.3, 0.5, 0.8)
  c.sweep.holdout_ratios = (0.3,)
  scale = 1 if knobs.runlocal else 2
  c.sweep.sizes = {
      's': dict(d_model=64 * scale, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=192 * scale),
      'm': dict(d_model=96 * scale, n_layers=3, n_heads=3, n_kv_heads=1, d_ff=288 * scale),
      'l': dict(d_model=128 * scale, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384 * scale),
  }
  tokens_per_step = c.train.batch_size * c.train.seq_len
  cpt_steps, pretrain_steps = (240, 320) if knobs.runlocal else (960, 1280)
  c.sweep.tokens = (cpt_steps * tokens_per_step,)
  c.sweep.pretrain_tokens = pretrain_steps * tokens_per_step
  c.sweep.min_tokens = 3 * c.train.eval_every * tokens_per_step  # past the warmup transient
  if knobs.run:
    if not knobs.sweep_dir:
      raise ValueError('config knob run= needs sweep_dir= (the sweep workdir the run belongs to)')
    return sweep.run_config(c, knobs.run, knobs.sweep_dir)
  return c
