"""Domain continued pretraining: legal text plus general replay, from an existing model.

The model and the data sources are configs/tiny_mix.py's, so the held-out sets are the pretraining
run's own and every evaluation compares with it. Pretrain that model, continue it with 20% and with
0% replay, score each run's starting params (step 0) and last checkpoint, then report:

  python -m lmjax.train --config=configs/tiny_mix.py --workdir=/tmp/lmjax_pre
  for r in 0.2 0; do
    CPT="--config=configs/cpt_domain.py:init_from=lmjax:/tmp/lmjax_pre,replay=$r --workdir=/tmp/lmjax_cpt_$r"
    python -m lmjax.train $CPT
    python -m lmjax.evaluate $CPT --checkpoint=0 --tasks=lmjax/eval/tasks/legal_cloze.jsonl
    python -m lmjax.evaluate $CPT --tasks=lmjax/eval/tasks/legal_cloze.jsonl
  done
  python -m lmjax.evaluate --config=configs/cpt_domain.py --workdir=/tmp/lmjax_cpt_0.2 \
      --forgetting=/tmp/lmjax_cpt_0,/tmp/lmjax_cpt_0.2 --domain=legal

The last prints the forgetting table and writes /tmp/lmjax_cpt_0.2/forgetting.png. Each run inherits
the parent's tokenizer (lmjax/init_from.py). scripts/cpt_demo.py does all of this in one process,
shorter, on 2 CPU cores.

One phase (by default): the LR re-warms from 0 (where tiny_mix's anneal left it) to `peak` x
config.optim.lr over the first 10% of the steps, then decays (cosine) to 0. The mixture: the domain
(legal) takes 1 - r of the rows and the general sources share r (`replay`) in their pretraining
proportions; the legal train text is capped at `domain_chars` rather than tiny_mix's 1M. Every
source is evaluated every `steps // 5` steps, so the log shows the domain loss falling and the
general losses rising.

`embed_steps` > 0 puts a phase of that many steps first in which only the embeddings and the final
norm train (the layers frozen, lmjax.phases' `freeze`), warming up to `peak` and holding it; the
decay phase then unfreezes everything. It suits a parent whose vocabulary grew (`init_from` starts
new rows at the mean of the old): the new rows settle before the layers move.

Knobs: `configs/cpt_domain.py:init_from=lmjax:DIR,replay=0.2,steps=200,peak=0.3,
domain_chars=4000000,embed_steps=0`.
"""
import os

from lmjax import config as config_lib, phases

PARENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny_mix.py')
DOMAIN = 'legal'


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, init_from='', replay=0.2, steps=200, peak=0.3,
                               domain_chars=4_000_000, embed_steps=0)
  if not 0 <= knobs.replay < 1:
    raise ValueError(f'config knob replay={knobs.replay}: expected the general share in [0, 1)')
  c = config_lib.load(PARENT)  # tiny_mix's model, sources, held-out split and optimizer
  general = {s: w for s, w in c.phases.pretrain.weights.items() if s != DOMAIN}
  total = sum(general.values())
  weights = {DOMAIN: 1.0 - knobs.replay, **{s: knobs.replay * w / total for s, w in general.items()}}
  decay = dict(weights=weights, shape='cosine', peak=knobs.peak, end=0.0)
  if knobs.embed_steps:
    c.phases = phases.timeline(
        embed=phases.phase(steps=knobs.embed_steps, weights=weights, freeze=('layers/.*',),
                           shape='constant', warmup_fraction=0.5, init=0.0, peak=knobs.peak),
        cpt=phases.phase(warmup_steps=0, init=knobs.peak, **decay))
  else:
    c.phases = phases.timeline(cpt=phases.phase(fraction=1.0, warmup_fraction=0.1, init=0.0, **decay))
  c.init_from = knobs.init_from
  c.train.steps = knobs.steps
  c.train.eval_every = max(1, knobs.steps // 5)
  c.data.sources[DOMAIN].max_chars = knobs.domain_chars
  return c
