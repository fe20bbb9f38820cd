"""The optimizer update alone: clip + AdamW + apply over a model's parameters, optax's AdamW against
lmjax's fused one with f32 and with bf16 moments (lmjax/optim.py), median of 20 jitted updates after 3.

  python benchmarks/optimizer_update.py --variant=1b

Prints each update's time, its ratio to optax's, and the bytes a parameter moves (32 with f32 moments:
read g twice, read and write m, v, p; 24 with bf16 moments) per second. Random params and gradients.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from lmjax import config as config_lib, model, optim, phases as phases_lib

BYTES_PER_PARAM = {'float32': 32, 'bfloat16': 24}


def median_ms(tx: optax.GradientTransformation, shapes: dict) -> float:
  params = jax.tree.map(lambda s: 0.02 * jax.random.normal(jax.random.key(0), s.shape), shapes)
  grads = jax.tree.map(lambda s: 1e-3 * jax.random.normal(jax.random.key(1), s.shape), shapes)
  state = tx.init(params)

  def update(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  update = jax.jit(update, donate_argnums=(0, 2))
  for _ in range(3):
    params, state = update(params, grads, state)
  jax.block_until_ready(params)
  times = []
  for _ in range(20):
    start = time.perf_counter()
    params, state = update(params, grads, state)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--variant', default='1b')
  a = p.parse_args()
  config = config_lib.base()
  config.model.variant = a.variant
  _, shapes, _ = model.abstract(model.resolve(config.model))
  n = sum(s.size for s in jax.tree.leaves(shapes))
  schedule = optim.make_schedule(phases_lib.resolve(config.phases, 1000, []), config.optim.lr)
  print(f'{a.variant}: {n / 1e9:.3f}B f32 params, {jax.devices()[0].device_kind}')
  runs = [('optax.adamw', 'float32', False), ('fused, f32 moments', 'float32', True),
          ('fused, bf16 moments', 'bfloat16', True)]
  base = None
  for name, dtype, fused in runs:
    config.optim.moments_dtype = dtype
    ms = median_ms(optim.make_optimizer(config.optim, schedule, shapes, fused=fused), shapes)
    base = base or ms
    print(f'{name:20s} {ms:8.2f} ms  {base / ms:.2f}x of optax.adamw  '
          f'{BYTES_PER_PARAM[dtype] * n / ms / 1e9:.2f} TB/s at {BYTES_PER_PARAM[dtype]} B/param')


if __name__ == '__main__':
  main()
