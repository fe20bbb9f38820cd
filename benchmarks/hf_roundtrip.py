"""A Hugging Face checkpoint in and out of lmjax at a real size: import it onto the mesh, train, export.

  python scripts/make_hf_golden.py --skip_export_check --hf_1b /tmp/hf_1b   # a random Llama-3.2-1B
  python benchmarks/hf_roundtrip.py --hf_dir=/tmp/hf_1b --out=/tmp/hf_1b_trained --steps=20

The import is `init_from='hf:DIR'` through lmjax/init_from.py (tensor by tensor onto each device's
shards), the steps are the trainer's (lmjax/steps.py, `configs/pretrain.py` at the checkpoint's size,
random tokens), the export is lmjax/convert.py's `save` (bf16 safetensors + config.json). Prints the
wall time of each part, the step rate, and checks that the export holds the trained weights.
"""
import argparse
import json
import os
import time

import jax
import numpy as np

from lmjax import batch as batch_lib, config as config_lib, convert, init_from, sharding, steps as steps_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hf_dir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--variant', default='1b', help="configs/pretrain.py's size (the model itself is "
                      "the checkpoint's)")
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq', type=int, default=4096)
  parser.add_argument('--attention', default='cudnn')
  a = parser.parse_args()
  config = config_lib.load('configs/pretrain.py', f'size={a.variant},batch_size={a.batch},'
                           f'seq_len={a.seq},steps={a.steps},attention={a.attention}')
  config.unlock()
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.init_from = f'hf:{a.hf_dir}'
  hf_config = convert.read_config(a.hf_dir)
  config.model.update({k: v for k, v in convert.model_fields(hf_config).items() if v is not None})
  mesh = sharding.make_mesh(config.mesh)
  built = steps_lib.build(config, mesh, hf_config['vocab_size'])
  state = built.init(0)
  jax.block_until_ready(state)
  times = {}
  start = time.perf_counter()
  state['params'] = init_from.load(config.init_from, config.init_skip, built.args, state['params'], built.abstract_state['params'], mesh)
  jax.block_until_ready(state['params'])
  times['import_s'] = time.perf_counter() - start
  embed_in = np.asarray(state['params']['embed_vd'][:4, :8])
  device_batch = sharding.global_batch(batch_lib.synthetic(a.batch, a.seq, built.args.vocab_size), mesh)
  losses, step_times = [], []
  with jax.set_mesh(mesh):
    for _ in range(a.steps):
      t = time.perf_counter()
      state, metrics = built.train_step(state, device_batch)
      losses.append(float(metrics['loss']))
      step_times.append(time.perf_counter() - t)
  times['train_s'] = sum(step_times)
  start = time.perf_counter()
  convert.save(a.out, built.args, state['params'], hf_config=hf_config, dtype='bfloat16')
  times['export_s'] = time.perf_counter() - start
  _, exported = convert.load(a.out)
  trained = np.asarray(state['params']['embed_vd'][:4, :8]).astype(np.float32)
  again = np.asarray(exported['embed_vd'][:4, :8]).astype(np.float32)
  result = dict(variant=a.variant, device=jax.devices()[0].device_kind, steps=a.steps,
                **{k: round(v, 2) for k, v in times.items()},
                median_step_ms=round(1e3 * float(np.median(step_times[2:])), 1),
                tokens_per_s=round(a.batch * a.seq / float(np.median(step_times[2:]))),
                first_loss=round(losses[0], 3), last_loss=round(losses[-1], 3),
                weights_moved=bool(not np.array_equal(trained, embed_in.astype(np.float32))),
                export_matches_trained_bf16=bool(np.allclose(again, trained, rtol=1e-2, atol=1e-3)),
                export_gb=round(sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out)) / 1e9, 2))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
