"""Text generation from a run's params on the command line (the decoding: lmjax/decode.py, a KV cache;
greedy, temperature and top-p sampling). A run's latest params (or `--checkpoint=STEP`) and its
tokenizer; the prompt follows BOS, as every training document does, and the text is printed up to EOS:

  python -m lmjax.sample --workdir=RUN --prompt="Permission is" \
      [--max_new_tokens=64 --temperature=0.8 --top_p=0.95 --seed=0]

The run's config is its config.json; `--config=configs/<name>.py` uses that file instead.
"""
from __future__ import annotations

import sys

from lmjax import decode


def main(config) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from lmjax.eval import runs  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  ev = runs.build(config, f.workdir, data=False)
  _, params = runs.load_params(ev, f.workdir, f.checkpoint)
  tok = ev.tokenizer
  new = decode.generate(ev.steps.graphdef, params, [[tok.bos_id] + tok.encode(f.prompt)], f.max_new_tokens,
                        temperature=f.temperature, top_p=f.top_p, seed=f.seed, eos_id=tok.eos_id)[0].tolist()
  text_ids = decode.text_tokens(new, tok.eos_id, tok.vocab_size)
  if len(text_ids) < len(new) and new[len(text_ids)] >= tok.vocab_size:
    print(f'(stopped at token {new[len(text_ids)]}, past the tokenizer\'s {tok.vocab_size})',
          file=sys.stderr)
  new = text_ids
  print(f.prompt + tok.decode(new))


if __name__ == '__main__':
  from absl import flags
  from lmjax import cli
  cli.define_flags('run directory (its checkpoints and provenance.json, which names the tokenizer)',
                   config_from_run=True)
  flags.DEFINE_string('prompt', None, 'text to continue', required=True)
  flags.DEFINE_integer('max_new_tokens', 64, 'tokens to generate')
  flags.DEFINE_float('temperature', 0.0, '0 = greedy; otherwise sample softmax(logits / temperature)')
  flags.DEFINE_float('top_p', 1.0, 'sample from the smallest set of tokens whose probability reaches it')
  flags.DEFINE_integer('seed', 0, 'sampling seed')
  flags.DEFINE_integer('checkpoint', None, 'step to load (default: the latest)', lower_bound=0)
  cli.run(main)
