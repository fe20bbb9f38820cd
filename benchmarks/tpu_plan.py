"""The planning table: what fits where, compiled by the TPU compiler on this CPU host (lmjax.aot).

  python benchmarks/tpu_plan.py [--only=8b] > plan.md

Each row is `python -m lmjax.aot --config=configs/pretrain.py:size=S,batch_size=B,seq_len=4096,remat=R
--topology=SLICE` (fsdp over the whole slice, configs/pretrain.py's mesh); the estimate is aot's
roofline from the model's FLOPs (an upper bound of throughput, not a measurement).
"""
import argparse
import time

from lmjax import aot, config as config_lib

# (size, slice, global batch, remat): the slices a user would rent for each size.
PLAN = [
    ('1b', 'v5e-8', 32, 'full'), ('1b', 'v5e-8', 32, 'dots_no_batch'), ('1b', 'v5e-8', 8, 'full'),
    ('1b', 'v5p-32', 128, 'dots_no_batch'), ('1b', 'v5e-256', 512, 'full'), ('1b', 'v6e-8', 32, 'dots_no_batch'),
    ('1b', 'v6e-8', 16, 'full'),
    ('8b', 'v5e-8', 16, 'none'), ('8b', 'v5e-256', 256, 'full'), ('8b', 'v5p-32', 128, 'full'),
    ('8b', 'v5p-64', 128, 'dots_no_batch'), ('8b', 'v6e-64', 128, 'full'),
    ('70b', 'v5p-256', 256, 'full'), ('70b', 'v5e-256', 256, 'full'),
]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--only', default='', help='sizes to plan, comma-separated')
  parser.add_argument('--rows', default='', help='row numbers of PLAN to compile (0-based, comma-separated)')
  a = parser.parse_args()
  print('| size | slice | batch x 4096 | remat | mesh, verdict per device | estimate | compile s |')
  print('|---|---|---|---|---|---|---|')
  for i, (size, name, batch, remat) in enumerate(PLAN):
    if (a.only and size not in a.only.split(',')) or (a.rows and str(i) not in a.rows.split(',')):
      continue
    config = config_lib.load('configs/pretrain.py', f'size={size},batch_size={batch},remat={remat}')
    start = time.perf_counter()
    lines = aot.report(config, topology_name=name)
    seconds = time.perf_counter() - start
    mesh = lines[0].split('mesh ')[-1]
    verdict = lines[1].removeprefix('memory per device: ')
    est = lines[2].split(': ', 1)[1] if len(lines) > 2 else '-'
    print(f'| {size} | {name} | {batch} | {remat} | {mesh}; {verdict} | {est} | {seconds:.0f} |', flush=True)


if __name__ == '__main__':
  main()
