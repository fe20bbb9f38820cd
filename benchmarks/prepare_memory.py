"""Peak memory of prepare's local runner at 1x and 4x the input: it must not grow with the input.

  python benchmarks/prepare_memory.py [--docs=20000]

Input: jsonl files of English-like documents (sentences drawn from the pydoc topics, so the quality
filters keep most of them), a third of them near-duplicates of others and some exact copies; 4x is
four times as many distinct documents. Each size is prepared (clean with every stage, dedup,
tokenizer, shards) in a fresh subprocess with the tokenizer's sample capped, and its peak resident
memory (ru_maxrss) is reported beside the input size.

What the runner holds per document is 24 bytes of dedup key (dedup.key_rows) plus 44 bytes of
index while the shards are written (clean_store.SourceIndex); texts and signatures stay in spill files.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = '''
import resource, sys, time
sys.path.insert(0, {root!r})
from lmjax.data import pipeline, prepare
cfg = pipeline.defaults()
cfg.sources = {{'web': dict(corpora='jsonl:{src}/*.jsonl', max_chars=0, kind='en', languages='en')}}
cfg.tokenizer.update(vocab_size=1000, sample_chars=300_000)
t0 = time.perf_counter()
p = prepare.prepare(cfg, {workdir!r})
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      p.report['dedup']['near_dropped'], p.report['dedup']['exact_dropped'])
'''


def write_input(directory: str, n_docs: int, seed: int) -> int:
  """n_docs documents in 4 jsonl files; returns the bytes written."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  sentences = [s.strip() + '.' for t in topics.topics.values() for s in t.replace('\n', ' ').split('. ')
               if 40 < len(s) < 300]
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  files = [open(os.path.join(directory, f'part{i}.jsonl'), 'w') for i in range(4)]
  size = 0
  previous = []
  for i in range(n_docs):
    if previous and rng.random() < 0.3:  # a near-duplicate: one sentence changed
      doc = list(rng.choice(previous))
      doc[rng.randrange(len(doc))] = rng.choice(sentences)
    elif previous and rng.random() < 0.05:  # an exact copy
      doc = rng.choice(previous)
    else:
      doc = [rng.choice(sentences) for _ in range(rng.randint(6, 20))]
      previous = (previous + [doc])[-1000:]
    line = json.dumps({'text': '\n'.join(doc) + '\n'}) + '\n'
    files[i % 4].write(line)
    size += len(line)
  for f in files:
    f.close()
  return size


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--docs', type=int, default=20_000, help='documents at 1x')
  args = parser.parse_args()
  print(f'{"input":6s} {"docs":>8s} {"MB in":>7s} {"seconds":>8s} {"peak RSS MB":>12s} '
        f'{"near dropped":>12s} {"exact dropped":>13s}')
  for scale in (1, 4):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      size = write_input(src, args.docs * scale, seed=scale)
      code = CHILD.format(root=ROOT, src=src, workdir=os.path.join(tmp, 'run'))
      out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, JAX_PLATFORMS='cpu'))
      seconds, rss_kb, near, exact = out.stdout.split()[-4:]
      print(f'{scale}x{"":4s} {args.docs * scale:8d} {size / 1e6:7.1f} {float(seconds):8.1f} '
            f'{int(rss_kb) / 1024:12.0f} {int(near):12d} {int(exact):13d}')


if __name__ == '__main__':
  main()
