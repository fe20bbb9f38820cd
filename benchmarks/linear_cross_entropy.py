"""The LM head + loss, forward and backward, at the 1b model's head (N tokens x d -> V vocabulary, bf16
inputs): milliseconds and extra memory of every implementation, JAX and PyTorch peers, in one call.

  python benchmarks/linear_cross_entropy.py [--only=naive_ce,fused_ce] [--shape=1b_8k]

Each configuration runs in its own process (its memory is its own): `--steps` timed runs after a
warm-up, the median reported. Extra memory is what the computation holds beyond its inputs and its
outputs (loss, dx, dw): for JAX the compiler's temporaries (compiled.memory_analysis()), for PyTorch
the allocator's peak minus the inputs and gradients. `err` is the relative L2 error of (dx, dw) against
the same implementation family's f32 computation on the same inputs (JAX: the reference in f32; PyTorch:
F.cross_entropy on f32 logits). Shapes: pallas_kernels/linear_cross_entropy/shapes.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pallas_kernels.linear_cross_entropy import shapes  # noqa: E402 (no jax import)

# name -> (framework, labels, what)
CONFIGS = {
    'naive_ce': ('jax', 'hard', 'reference'),
    'chunked_ce': ('jax', 'hard', 'lmjax.losses chunked@1024'),
    'fused_ce@512': ('jax', 'hard', 'xla'),
    'fused_ce@1024': ('jax', 'hard', 'xla'),
    'fused_ce@2048': ('jax', 'hard', 'xla'),
    'tokamax_ce': ('jax', 'hard', 'tokamax'),
    'naive_kd': ('jax', 'soft', 'reference'),
    'fused_kd@1024': ('jax', 'soft', 'xla'),
    'fused_kd_bucket@1024': ('jax', 'soft', 'xla'),
    'torch_naive_ce': ('torch', 'hard', 'naive'),
    'torch_liger_ce': ('torch', 'hard', 'liger'),
    'torch_cce_ce': ('torch', 'hard', 'cce'),
}


def _median_ms(fn, steps, sync):
  fn(); sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn(); sync()
    times.append(time.perf_counter() - start)
  return 1e3 * sorted(times)[len(times) // 2]


def run_jax(name, shape, steps):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels.linear_cross_entropy import api
  _, labels, what = CONFIGS[name]
  n, d, v, k = shape
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (n, d), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (d, v), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
  t = jax.random.randint(ks[2], (n,), 0, v)
  wt = jnp.ones((n,), jnp.float32)
  kw = {}
  if labels == 'soft':  # k distinct ids a row; teacher top-k holding 90% of the mass
    ids = (jax.random.randint(ks[3], (n, 1), 0, v) + 2003 * jnp.arange(k)) % v
    lp = jax.nn.log_softmax(jax.random.normal(ks[3], (n, k))) + jnp.log(0.9)
    kw = dict(teacher_ids_nk=ids, teacher_logprobs_nk=lp, alpha=0.5,
              tail='bucket' if 'bucket' in name else 'renormalize')
  block = int(name.split('@')[1]) if '@' in name and what == 'xla' else None

  def loss_fn(impl):
    if impl == 'tokamax':
      import tokamax
      return lambda x, w: tokamax.linear_softmax_cross_entropy_loss(x, t, w, reduction='sum')
    if impl.startswith('lmjax.losses'):
      from lmjax import losses
      args = losses.Args('ce', 'chunked', 0.0, 1024, v)
      return lambda x, w: jnp.sum(losses.ce_chunked(x.reshape(4, n // 4, d), w, {'targets': t.reshape(4, -1)},
                                                    args))
    return lambda x, w: jnp.sum(wt * api.linear_cross_entropy(x, w, t, weights_n=wt, implementation=impl,
                                                               block_tokens=block, **kw))

  f = jax.jit(jax.value_and_grad(loss_fn(what), argnums=(0, 1)))
  compiled = f.lower(x, w).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  ms = _median_ms(lambda: jax.block_until_ready(compiled(x, w)), steps, lambda: None)
  _, (dx, dw) = compiled(x, w)
  f32 = jax.jit(jax.grad(loss_fn('reference' if what in ('xla', 'reference') else what), argnums=(0, 1)))
  dx32, dw32 = f32(x.astype(jnp.float32), w.astype(jnp.float32))
  rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) / jnp.linalg.norm(b.ravel()))
  return dict(ms=round(ms, 2), extra_gb=round(temp / 1e9, 2), err_dx=rel(dx, dx32), err_dw=rel(dw, dw32))


def run_torch(name, shape, steps):
  import torch
  import torch.nn.functional as F
  _, _, what = CONFIGS[name]
  n, d, v, _ = shape
  g = torch.Generator(device='cuda').manual_seed(0)
  x = torch.randn(n, d, device='cuda', dtype=torch.bfloat16, generator=g).requires_grad_()
  w = (torch.randn(v, d, device='cuda', generator=g) * d ** -0.5).to(torch.bfloat16).requires_grad_()
  t = torch.randint(0, v, (n,), device='cuda', generator=g)
  if what == 'liger':
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    liger = LigerFusedLinearCrossEntropyLoss(reduction='sum')
    loss_fn = lambda x, w: liger(w, x, t)
  elif what == 'cce':
    from cut_cross_entropy import linear_cross_entropy
    loss_fn = lambda x, w: linear_cross_entropy(x, w, t, reduction='sum')
  else:
    loss_fn = lambda x, w: F.cross_entropy((x @ w.T).float(), t, reduction='sum')

  def step():
    x.grad = w.grad = None
    loss_fn(x, w).backward()

  step(); torch.cuda.synchronize()
  x.grad = w.grad = None
  torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
  base = torch.cuda.memory_allocated()
  step(); torch.cuda.synchronize()
  extra = torch.cuda.max_memory_allocated() - base - (x.numel() + w.numel()) * 2
  ms = _median_ms(step, steps, torch.cuda.synchronize)
  dx, dw = x.grad.float(), w.grad.float()
  x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
  F.cross_entropy(x32 @ w32.T, t, reduction='sum').backward()
  rel = lambda a, b: float((a - b).norm() / b.norm())
  return dict(ms=round(ms, 2), extra_gb=round(extra / 1e9, 2), err_dx=rel(dx, x32.grad), err_dw=rel(dw, w32.grad))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--shape', default='1b_8k', choices=sorted(shapes.SHAPES))
  parser.add_argument('--only', default='', help='comma-separated names of CONFIGS (default: all)')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--out', default=os.environ.get('OUT', '.'))
  parser.add_argument('--one', default='', help=argparse.SUPPRESS)
  a = parser.parse_args()
  shape = shapes.SHAPES[a.shape]
  if a.one:
    run = run_jax if CONFIGS[a.one][0] == 'jax' else run_torch
    print(json.dumps(dict(name=a.one, **run(a.one, shape, a.steps))), flush=True)
    return
  results = []
  for name in (a.only.split(',') if a.only else CONFIGS):
    proc = subprocess.run([sys.executable, __file__, f'--shape={a.shape}', f'--steps={a.steps}', f'--one={name}'],
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    r = json.loads(lines[-1]) if proc.returncode == 0 and lines else dict(
        name=name, error=(proc.stderr.strip().splitlines() or ['failed'])[-1][:300])
    r.update(framework=CONFIGS[name][0], labels=CONFIGS[name][1])
    results.append(r)
    print(json.dumps(r), flush=True)
  with open(os.path.join(a.out, 'linear_cross_entropy.json'), 'w') as f:
    json.dump(dict(shape=dict(zip('ndvk', shape)), results=results), f, indent=1)
  print(f'\nN, d, V, k = {shape}; fwd+bwd, bf16 inputs')
  print(f"{'name':22} {'labels':6} {'ms':>7} {'extra GB':>9} {'err dx':>8} {'err dw':>8}")
  for r in results:
    if 'error' in r:
      print(f"{r['name']:22} {r['labels']:6} error: {r['error'][:90]}")
    else:
      print(f"{r['name']:22} {r['labels']:6} {r['ms']:7.2f} {r['extra_gb']:9.2f} {r['err_dx']:8.1e} {r['err_dw']:8.1e}")
  if a.shape == '1b_8k':
    print('anchors (issue 21, 2026-12-01, ms / extra GB): ' +
          ', '.join(f'{name} {ms} / {gb}' for name, (ms, gb) in shapes.ANCHORS.items()))


if __name__ == '__main__':
  main()
