"""Training throughput of a named model size: tokens/s, MFU and peak memory of lmjax's train step, and
the ratio to a PyTorch peer's tokens/s when its result file is given.

  python benchmarks/train_throughput.py --variant=1b --batch=4 --seq=4096 --steps=20 \
      --attention=cudnn,pallas --remat=none --loss=materialize,chunked,pallas \
      [--xla_flags='|--xla_gpu_enable_latency_hiding_scheduler=true'] [--peer=$OUT/torch_peer.json] \
      [--profile=$OUT] [--set='|model.matmul_precision=fp8|optim.moments_dtype=bfloat16']

Each configuration runs `--steps` real optimizer steps of the `configs/pretrain.py` setup (AdamW,
f32 params, bf16 compute, the full 128k vocabulary) on random tokens (lmjax.batch.synthetic), built by
the same step builder training uses (lmjax/steps.py); the median step time of the steps after the
first two (compilation, warm-up) is reported. MFU counts `model.flops_per_token` (6N + causal
attention) over the chip's dense bf16 peak. Peak memory is the device allocator's high-water mark
since the configuration started (each configuration runs in its own process, so it is its own).

Several devices of one host (the multi-GPU issue), one process driving all of them:
  python benchmarks/train_throughput.py --variant=8b --batch=2 --seq=4096 --attention=cudnn \
      --loss=pallas --remat=full --devices=1,2,4,8 --mesh=fsdp,fsdp_tensor
`--batch` is per device; each count N uses the first N devices with the `--mesh` layout (data: data
parallel; fsdp: parameters and optimizer state sharded over all N; fsdp_tensor: fsdp x 2-way tensor),
and reports tokens/s per device and the scaling efficiency against the smallest count in the call.
`--xla_flags` alternatives ('|'-separated, '' = none) are one more axis of configurations, appended to
XLA_FLAGS of that configuration's process. `--profile=DIR` traces 3 steps of each configuration
(jax.profiler, perfetto trace) and prints the GPU time by kernel class (profile_breakdown).

`--set` alternatives ('|'-separated, '' = none) are one more axis: each is `;`-separated `section.field=value`
config overrides (e.g. `model.matmul_precision=fp8;optim.moments_dtype=bfloat16`), typed by the field.

`--loss=pallas` is pallas_kernels.linear_cross_entropy's fused loss on the head/loss seam
(`config.loss.implementation='pallas'`).
"""
import argparse
import collections
import glob
import gzip
import itertools
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np

from lmjax import batch as batch_lib, config as config_lib, model, sharding, steps as steps_lib, trainer


# GPU kernel names -> class, first match wins (cuBLAS/cuDNN/XLA-Triton kernels as the profiler names them).
KERNEL_CLASSES = (
    ('attention', r'flash|fmha|cudnn|attention|mosaic|sdpa'),
    ('matmul', r'gemm|nvjet|cutlass|xmma|wgmma|cublas|matmul|dot'),
    ('copy/transpose', r'copy|transpose|memcpy|memset'),
    ('reduce/norm fusions', r'reduce|norm'),
    ('elementwise/other fusions', r'.'),
)


def profile_breakdown(trace_dir: str, steps: int) -> dict:
  """GPU kernel time a step by class, from the perfetto trace jax.profiler wrote under trace_dir."""
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))[-1]
  events = json.load(gzip.open(path)).get('traceEvents', [])
  gpu_pids = {e['pid'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'
              and re.search(r'/device:GPU|GPU', str(e.get('args', {}).get('name', '')))}
  ms = collections.Counter()
  top = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('pid') in gpu_pids and 'dur' in e:
      name = e.get('name', '')
      cls = next(c for c, pattern in KERNEL_CLASSES if re.search(pattern, name, re.I))
      ms[cls] += e['dur'] / 1e3 / steps
      top[name[:60]] += e['dur'] / 1e3 / steps
  return dict(by_class_ms={k: round(v, 1) for k, v in ms.most_common()},
              gpu_busy_ms=round(sum(ms.values()), 1),
              top_kernels_ms={k: round(v, 2) for k, v in top.most_common(25)})


# --mesh names -> config.mesh over the run's devices (-1: every device left)
MESHES = {'data': dict(data=-1, fsdp=1, tensor=1), 'fsdp': dict(data=1, fsdp=-1, tensor=1),
          'fsdp_tensor': dict(data=1, fsdp=-1, tensor=2)}


def apply_overrides(config, overrides: str) -> None:
  """`section.field=value;...` onto the config, each value parsed as the field's type."""
  for item in filter(None, overrides.split(';')):
    path, value = item.split('=', 1)
    section, field = path.rsplit('.', 1)
    node = config
    for key in section.split('.'):
      node = node[key]
    current = node[field]
    node[field] = (value.lower() == 'true') if isinstance(current, bool) else type(current)(value)


def measure(variant, batch, seq, steps, attention, remat, loss, profile_dir='', devices=1, mesh_name='data',
            overrides=''):
  """One configuration on the first `devices` devices; `batch` is per device (global = batch x devices)."""
  global_batch = batch * devices
  config = config_lib.load('configs/pretrain.py', f'size={variant},batch_size={global_batch},seq_len={seq},'
                           f'steps={steps},attention={attention},remat={remat}')
  config.unlock()
  config.mesh.update(MESHES[mesh_name])
  apply_overrides(config, overrides)
  config.loss.implementation, _, chunk = loss.partition('@')  # 'chunked@4096': 4096-token blocks
  if chunk:
    config.loss.chunk_tokens = int(chunk)
  used = jax.devices()[:devices]
  mesh = sharding.make_mesh(config.mesh, used)
  built = steps_lib.build(config, mesh, model.resolve(config.model).vocab_size)
  state = built.init(0)
  host_batch = batch_lib.synthetic(global_batch, seq, built.args.vocab_size)
  times, losses = [], []
  with jax.set_mesh(mesh):
    device_batch = sharding.global_batch(host_batch, mesh)
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = built.train_step(state, device_batch)
      losses.append(float(metrics['loss']))  # blocks until the step is done
      times.append(time.perf_counter() - start)
    if profile_dir:
      tag = re.sub(r'[^A-Za-z0-9_.=-]', '_', overrides)
      trace_dir = os.path.join(profile_dir, f'trace_{attention}_{remat}_{loss}_B{batch}T{seq}_{mesh_name}{devices}{tag}')
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(3):
          state, metrics = built.train_step(state, device_batch)
        float(metrics['loss'])
  step_time = float(np.median(times[2:]))
  tokens_per_s = global_batch * seq / step_time
  peak = trainer.PEAK_FLOPS.get(used[0].device_kind)
  mfu = model.flops_per_token(built.args, seq) * tokens_per_s / (peak * devices) if peak else None
  peak_bytes = max((d.memory_stats() or {}).get('peak_bytes_in_use', 0) for d in used)
  return dict(variant=variant, batch=batch, seq=seq, attention=attention, remat=remat, loss=loss,
              overrides=overrides, devices=devices, mesh=mesh_name, step_ms=round(step_time * 1e3, 1),
              tokens_per_s=round(tokens_per_s), tokens_per_s_per_device=round(tokens_per_s / devices),
              mfu=None if mfu is None else round(mfu, 4), first_loss=losses[0], last_loss=losses[-1],
              peak_mem_gb=round(peak_bytes / 1e9, 1),
              profile=profile_breakdown(trace_dir, 3) if profile_dir else None)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--variant', default='1b')
  parser.add_argument('--batch', type=int, default=4, help='sequences per device')
  parser.add_argument('--seq', type=int, default=4096)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--attention', default='cudnn,xla')
  parser.add_argument('--remat', default='none')
  parser.add_argument('--loss', default='materialize', help='config.loss.implementation(s), comma-separated; '
                      'chunked@N sets chunk_tokens=N')
  parser.add_argument('--peer', default='', help="benchmarks/torch_peer.py's JSON (or the same runs at top level)")
  parser.add_argument('--xla_flags', default='', help="'|'-separated alternatives appended to XLA_FLAGS")
  parser.add_argument('--profile', default='', help='a directory: trace 3 steps of each configuration')
  parser.add_argument('--set', default='', help="'|'-separated alternatives of ';'-separated config overrides")
  parser.add_argument('--devices', default='1', help='device counts, comma-separated (e.g. 1,2,4,8): the '
                      'first N devices of one process; scaling efficiency is against the smallest count')
  parser.add_argument('--mesh', default='data', help=f'mesh layouts, comma-separated, of {sorted(MESHES)}')
  parser.add_argument('--out', default=os.environ.get('OUT', '.'))
  parser.add_argument('--one', default='', help=argparse.SUPPRESS)  # internal: attention,remat,loss,devices,mesh
  a = parser.parse_args()
  if a.one:  # one configuration in this process (its overrides in --set); prints its JSON line
    attention, remat, loss, devices, mesh_name = a.one.split(',')
    print(json.dumps(measure(a.variant, a.batch, a.seq, a.steps, attention, remat, loss, a.profile,
                             int(devices), mesh_name, a.set)), flush=True)
    return
  unknown = sorted(set(a.mesh.split(',')) - set(MESHES))
  if unknown:
    parser.error(f'--mesh: unknown layouts {unknown}; expected some of {sorted(MESHES)}')
  peer_tok_s = peer_liger_tok_s = None
  if a.peer and os.path.exists(a.peer):
    peer = json.load(open(a.peer))
    runs = {k: v for k, v in peer.get('runs', peer).items()
            if isinstance(v, dict) and f'B{a.batch} T{a.seq}' in k}
    peer_tok_s = max((r['tokens_per_s'] for k, r in runs.items() if 'liger=True' not in k), default=None)
    peer_liger_tok_s = max((r['tokens_per_s'] for k, r in runs.items() if 'liger=True' in k), default=None)
  fastest_peer_tok_s = max(filter(None, (peer_tok_s, peer_liger_tok_s)), default=None)
  results = []
  counts = sorted(int(n) for n in a.devices.split(','))
  for attention, remat, loss, flags, overrides, mesh_name, devices in itertools.product(
      a.attention.split(','), a.remat.split(','), a.loss.split(','), a.xla_flags.split('|'), a.set.split('|'),
      a.mesh.split(','), counts):
    # A process per configuration: its peak memory is its own, and one that fails leaves the others.
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.run([sys.executable, __file__, f'--variant={a.variant}', f'--batch={a.batch}',
                           f'--seq={a.seq}', f'--steps={a.steps}',
                           f'--one={attention},{remat},{loss},{devices},{mesh_name}',
                           f'--profile={a.profile}', f'--set={overrides}'], capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode == 0 and lines:
      r = json.loads(lines[-1])
    else:  # report a configuration that does not fit or compile, keep the others
      r = dict(variant=a.variant, attention=attention, remat=remat, loss=loss, overrides=overrides, devices=devices,
               mesh=mesh_name, error=proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else 'failed')
    r['xla_flags'] = flags
    base = next((b for b in results if 'tokens_per_s' in b and b['devices'] == counts[0] and
                 (b['attention'], b['remat'], b['loss'], b['xla_flags'], b['overrides'], b['mesh']) ==
                 (attention, remat, loss, flags, overrides, mesh_name)), None)
    if base and 'tokens_per_s' in r and devices != counts[0]:  # per-device throughput kept, 1.0 = linear
      r['scaling_efficiency'] = round(r['tokens_per_s_per_device'] / base['tokens_per_s_per_device'], 3)
    if peer_tok_s and 'tokens_per_s' in r and devices == 1:  # the peer file is one GPU's
      r['vs_torch_peer'] = round(r['tokens_per_s'] / peer_tok_s, 3)
    if peer_liger_tok_s and 'tokens_per_s' in r and devices == 1:
      r['vs_torch_peer_liger'] = round(r['tokens_per_s'] / peer_liger_tok_s, 3)
    if fastest_peer_tok_s and 'tokens_per_s' in r and devices == 1:  # the fastest that ran
      r['vs_fastest_peer'] = round(r['tokens_per_s'] / fastest_peer_tok_s, 3)
    results.append(r)
    print(json.dumps(r), flush=True)
  with open(os.path.join(a.out, f'train_throughput_B{a.batch}T{a.seq}.json'), 'w') as f:
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, peer_tokens_per_s=peer_tok_s,
                   peer_liger_tokens_per_s=peer_liger_tok_s, results=results), f, indent=1)
  print(f'\n{jax.devices()[0].device_kind}, jax {jax.__version__}; B{a.batch} x T{a.seq}; peer (PyTorch, best '
        f'of eager/compiled) {peer_tok_s} tokens/s, with Liger {peer_liger_tok_s}')
  print(f"{'attention':10} {'remat':14} {'loss':12} {'mesh':12} {'N':>2} {'step ms':>8} {'tokens/s':>9} "
        f"{'/device':>8} {'eff':>5} {'MFU':>6} {'peak GB':>8} {'vs best':>8} loss")
  for r in results:
    if 'error' in r:
      print(f"{r['attention']:10} {r['remat']:14} {r['loss']:12} {r['mesh']:12} {r['devices']:2d} "
            f"error: {r['error'][:80]}")
    else:
      print(f"{r['attention']:10} {r['remat']:14} {r['loss']:12} {r['mesh']:12} {r['devices']:2d} "
            f"{r['step_ms']:8.1f} {r['tokens_per_s']:9d} {r['tokens_per_s_per_device']:8d} "
            f"{r.get('scaling_efficiency', float('nan')):5.2f} {r['mfu'] or 0:6.3f} {r['peak_mem_gb']:8.1f} "
            f"{r.get('vs_fastest_peer', float('nan')):8.3f} {r['first_loss']:.3f}->{r['last_loss']:.3f} "
            f"{r['xla_flags']} {r['overrides']}")
      if r.get('profile'):
        print('   ', json.dumps(r['profile']))


if __name__ == '__main__':
  main()
