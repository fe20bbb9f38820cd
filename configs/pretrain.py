"""Pretraining at a named size on real hardware; `runlocal=True` shrinks it to a CPU smoke run.

  python -m lmjax.train --config=configs/pretrain.py:size=1b --workdir=gs://bucket/runs/1b
  python -m lmjax.train --config=configs/pretrain.py:size=1b,runlocal=True --workdir=/tmp/pt

Sizes are `lmjax.model.VARIANTS` (tiny, 150m, 1b, 8b). Batch and sequence follow Llama-3.2-1B-style
runs: 4096-token sequences, bf16 compute, f32 parameters and AdamW state.

Tokenizer: a sentencepiece BPE trained on the sources with as many tokens as the size has vocabulary
rows (1b and 8b: Llama 3's 128,256), or your own with `--config.data.tokenizer.path=MODEL` (at most
that many tokens; rows past the tokenizer's are masked in the loss). The source is the Python
standard library until you set `config.data.sources` to your corpora.
"""
from lmjax import config as config_lib, model, phases


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, size='1b', runlocal=False, steps=10_000, batch_size=256,
                               seq_len=4096, attention='xla', remat='dots_no_batch')
  c = config_lib.base()
  c.model.variant = knobs.size
  c.model.attention = knobs.attention
  c.model.remat = knobs.remat
  c.train.steps = knobs.steps
  c.train.batch_size = knobs.batch_size
  c.train.seq_len = knobs.seq_len
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.optim.lr = 3e-4
  c.phases = phases.timeline(main=phases.phase(fraction=1.0, shape='wsd', warmup_steps=min(2000, knobs.steps // 10),
                                    decay='1-sqrt', decay_fraction=0.2, end=0.0))
  c.mesh.fsdp = -1
  c.mesh.data = 1
  c.data.tokenizer.vocab_size = model.VARIANTS[knobs.size]['vocab_size']
  if knobs.runlocal:
    c.model.variant = 'tiny'
    c.data.tokenizer.vocab_size = model.VARIANTS['tiny']['vocab_size']
    c.model.compute_dtype = 'float32'
    c.model.remat = 'none'
    c.train.steps = 20
    c.train.batch_size = 8
    c.train.seq_len = 128
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    c.phases = phases.timeline(main=phases.phase(fraction=1.0, shape='wsd', warmup_steps=5, decay='1-sqrt',
                                      decay_fraction=0.2, end=0.0))
  return c
