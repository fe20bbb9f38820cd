"""Online distillation throughput: tokens/s of one student's train step with a frozen teacher inside
(config.loss.name='kd', mode='online') for each loss implementation (`--loss`: chunked against the fused
kernel's top-k path, pallas) against the same student without KD, in one process; plus
one line of top-k store write/read throughput (benchmarks/distill_store.py).

  python benchmarks/distill_throughput.py --student=1b --teacher=8b --teacher_layers=8 \
      --batch=4 --seq=4096 --steps=10 --k=128 --attention=cudnn --remat=none --loss=chunked,pallas
  python benchmarks/distill_throughput.py --tiny   # CPU: tiny shapes, to check it runs

Both steps are built by lmjax/steps.py (configs/pretrain.py's setup: AdamW, f32 params, bf16
compute) on random tokens (lmjax.batch.synthetic); the teacher has `teacher`'s shapes with
`teacher_layers` layers and random weights (throughput does not depend on them). The median step time
after the first two steps is reported.
"""
import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

import distill_store  # benchmarks/distill_store.py (this script's directory is on sys.path)
from lmjax import batch as batch_lib, config as config_lib, model, sharding, steps as steps_lib


def measure(config, mesh, vocab, batch, seq, steps, teacher_args=None):
  built = steps_lib.build(config, mesh, vocab)
  state = built.init(0)
  extra = ()
  if teacher_args is not None:  # random weights of the teacher's shapes, sharded as the step takes them
    _, t_params = model.create(teacher_args, 1)
    extra = (jax.device_put(t_params, jax.tree.map(lambda a: a.sharding, built.needs.step_arg)),)
  host = batch_lib.synthetic(batch, seq, vocab)
  times = []
  with jax.set_mesh(mesh):
    device_batch = sharding.global_batch(host, mesh)
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = built.train_step(state, device_batch, *extra)
      float(metrics['loss'])
      times.append(time.perf_counter() - start)
  return batch * seq / float(np.median(times[2:]))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--student', default='1b')
  p.add_argument('--teacher', default='8b')
  p.add_argument('--teacher_layers', type=int, default=8)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--seq', type=int, default=4096)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--k', type=int, default=128)
  p.add_argument('--loss', default='chunked,pallas',
                 help="comma-separated: materialize | chunked | pallas (the fused kernel's top-k path)")
  p.add_argument('--attention', default='cudnn', help='xla | cudnn | pallas (the student and teacher)')
  p.add_argument('--remat', default='none', help="configs/pretrain.py's remat policy")
  p.add_argument('--tiny', action='store_true', help='CPU check: tiny student and teacher, short')
  a = p.parse_args()
  if a.tiny:
    a.student, a.teacher, a.teacher_layers, a.batch, a.seq, a.steps, a.k = 'tiny', 'tiny', 4, 4, 64, 4, 16
    a.attention = 'xla'
  config = config_lib.load('configs/pretrain.py', f'size={a.student},batch_size={a.batch},'
                           f'seq_len={a.seq},steps={a.steps},attention={a.attention},remat={a.remat}')
  config.unlock()
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  implementations = a.loss.split(',')
  config.loss.implementation = implementations[0]
  if a.tiny:
    config.model.compute_dtype = 'float32'
  mesh = sharding.make_mesh(config.mesh)
  vocab = model.resolve(config.model).vocab_size
  student = model.resolve(config.model)
  teacher_cfg = config_lib.base().model
  teacher_cfg.update(variant=a.teacher, n_layers=a.teacher_layers, vocab_size=student.vocab_size,
                     compute_dtype=student.compute_dtype, attention=a.attention, remat=a.remat)
  teacher_args = model.resolve(teacher_cfg)
  plain = measure(config, mesh, vocab, a.batch, a.seq, a.steps)
  config.loss.name = 'kd'
  teacher_dir = tempfile.mkdtemp(prefix='lmjax_teacher_')  # a run directory with the teacher's model only
  with open(os.path.join(teacher_dir, 'config.json'), 'w') as f:
    json.dump({'model': teacher_cfg.to_dict()}, f)
  config.loss.kd.update(mode='online', teacher=f'lmjax:{teacher_dir}', k=a.k)
  kd = {}
  for implementation in implementations:
    config.loss.implementation = implementation
    kd[implementation] = measure(config, mesh, vocab, a.batch, a.seq, a.steps, teacher_args)
  print(f'student {a.student} ({model.param_count(student) / 1e9:.2f}B), teacher {a.teacher} x '
        f'{a.teacher_layers} layers ({model.param_count(teacher_args) / 1e9:.2f}B), B{a.batch} x T{a.seq}, '
        f'k={a.k}, attention {a.attention}, remat {a.remat}, {jax.devices()[0].device_kind}')
  print(f'tokens/s: no KD ({implementations[0]} CE) {plain:,.0f}; KD online: ' + '; '.join(
      f'{name} {v:,.0f} ({v / plain:.2f}x of no KD, {v / kd[implementations[0]]:.2f}x of {implementations[0]})'
      for name, v in kd.items()))
  r = distill_store.measure(a.k, 'compact', vocab, 16, a.seq)
  print(f"store (compact, k={a.k}): {r['bytes_per_token']:.0f} bytes/token, write "
        f"{r['write_tokens_per_s']:,} tokens/s, read {r['read_tokens_per_s']:,} tokens/s")


if __name__ == '__main__':
  main()
