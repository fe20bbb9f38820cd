"""Tiny end-to-end run on 2 CPU cores: a 4-layer Llama on the Python standard library's source.

  python -m lmjax.train --config=configs/tiny.py --workdir=/tmp/lmjax_tiny

The loss falls from ln(vocab) ~ 7.6 to well under 4 within a couple of minutes; re-running the same
command resumes from the last checkpoint. Knobs: `configs/tiny.py:steps=300`.
"""
from lmjax import config as config_lib, phases


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, steps=300)
  c = config_lib.base()
  c.model.variant = 'tiny'
  c.model.compute_dtype = 'float32'  # bf16 matmuls are emulated (slow) on CPU
  c.train.steps = knobs.steps
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.optim.lr = 3e-3
  c.phases = phases.timeline(main=phases.phase(fraction=1.0, shape='cosine', warmup_fraction=0.1, end=0.1))
  return c
