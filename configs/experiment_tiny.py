"""The tiny model of the built-in experiments (lmjax/experiments/, docs/experiments.md) on the real
zh/en/code/math/legal corpora of configs/tiny_mix.py, one constant-LR phase on its pretraining mixture.

  python -m lmjax.train --config=configs/experiment_tiny.py:quick=True --workdir=/tmp/lmjax_xt

Each experiment builds its runs from this config with overrides (the LR shape, the mixture, the
model size, the steps, the seed), so every run is an ordinary `lmjax.train` run.
  quick=False: 0.33M parameters (d_model 64, 2 layers), 16 rows of 64 tokens per step; ~0.08 s a step
      on 2 CPU cores.
  quick=True:  0.14M parameters (d_model 32, 1 layer), 8 rows of 64 tokens, 200k characters of each
      source and a smaller tokenizer sample: the setting CI and the notebooks run.
Knobs: `configs/experiment_tiny.py:quick=False,steps=400,max_chars=1000000`.
"""
import os

from lmjax import config as config_lib, phases

PARENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny_mix.py')


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, quick=False, steps=400, max_chars=1_000_000)
  c = config_lib.load(PARENT)  # tiny_mix's sources and tokenizer
  c.train.steps = knobs.steps
  max_chars = min(knobs.max_chars, 200_000) if knobs.quick else knobs.max_chars
  for source in c.data.sources.values():
    source.max_chars = max_chars
  width = 32 if knobs.quick else 64
  c.model.update(dict(d_model=width, n_layers=1 if knobs.quick else 2, n_heads=2, n_kv_heads=1,
                      d_ff=3 * width))
  c.train.batch_size = 8 if knobs.quick else 16
  c.train.seq_len = 64
  c.train.eval_every = max(1, knobs.steps // 5)
  c.train.checkpoint_every = knobs.steps
  c.train.trackers = ()
  c.optim.lr = 3e-3
  c.phases = phases.timeline(main=phases.phase(fraction=1.0, weights=dict(c.phases.pretrain.weights),
                                               shape='constant', warmup_steps=max(1, knobs.steps // 10)))
  c.data.eval.holdout_chars = 30_000
  c.data.eval.num_batches = 4
  if knobs.quick:
    c.data.tokenizer.sample_chars = 600_000
  return c
