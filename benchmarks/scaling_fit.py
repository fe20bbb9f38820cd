"""Chinchilla fit from Hoffmann et al.'s 4,500-start grid: vectorised JAX L-BFGS vs scipy start by start.

  python benchmarks/scaling_fit.py [--data=PATH] [--repeats=3]

Data: Epoch AI's extraction of Hoffmann et al. fig. 4 (data/svg_extracted_data.csv of
epoch-research/analyzing-chinchilla; 240 points after dropping the 5 highest losses, as Besiroglu et
al. 2024 do), read from --data, $LMJAX_CHINCHILLA_CSV or shared/data/chinchilla/. Without it, 240
synthetic points from Besiroglu et al.'s published law with 2% noise (the run says which it used).

Both sides minimise the same objective (sum of Huber, delta 1e-3, on log-loss residuals) from the
same 4,500 starts (Hoffmann et al. appendix D.2):
- baseline: scipy.optimize.minimize(method='L-BFGS-B') once per start, default tolerances (as
  Hoffmann et al. and Epoch AI ran it), given the exact gradient by a numpy function (a stronger
  baseline than the finite differences Epoch's notebook used).
- ours: lmjax.scaling.fit.fit: every start in one compiled JAX computation, then the best 8
  polished. Timed after one warm-up call (compilation reported separately); median of --repeats.
Goal: ours >= 20x faster. The ratio printed is measured in this run.
"""
import argparse
import csv
import os
import pathlib
import platform
import time

import numpy as np
from scipy import optimize

from lmjax.scaling import fit, laws

BESIROGLU = dict(A=482.01, B=2085.43, E=1.82, alpha=0.3478, beta=0.3658)  # arXiv 2404.10102 Table 1


def _data(path):
  root = pathlib.Path(__file__).resolve().parents[1]
  candidates = [path, os.environ.get('LMJAX_CHINCHILLA_CSV', '')] + [
      str(base / 'shared/data/chinchilla/svg_extracted_data.csv') for base in (root, root.parent)]
  found = next((c for c in candidates if c and os.path.isfile(c)), None)
  if found is None:
    rng = np.random.default_rng(0)
    n = 10 ** rng.uniform(7.8, 10.2, 240)
    d = 10 ** rng.uniform(9.0, 11.5, 240)
    loss = laws.chinchilla_loss(BESIROGLU, n, d) * np.exp(0.02 * rng.standard_normal(240))
    return n, d, loss, 'synthetic (Besiroglu et al. law, 2% noise, 240 points)'
  with open(found) as f:
    rows = list(csv.DictReader(f))
  n = np.array([float(r['Model Size']) for r in rows])
  d = np.array([float(r['Training FLOP']) for r in rows]) / (6 * n)
  loss = np.array([float(r['loss']) for r in rows])
  keep = loss < np.sort(loss)[-5]
  return n[keep], d[keep], loss[keep], f'Epoch AI extraction of Hoffmann et al. fig. 4 ({found})'


def _scipy_value_and_grad(log_n, log_d, log_y, delta=1e-3):
  def fun(t):
    a, b, e, alpha, beta = t
    z = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    m = z.max(0)
    w = np.exp(z - m)
    total = w.sum(0)
    r = m + np.log(total) - log_y
    w /= total
    h = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    dh = np.clip(r, -delta, delta)
    grad = np.array([np.sum(dh * w[0]), np.sum(dh * w[1]), np.sum(dh * w[2]),
                     -np.sum(dh * w[0] * log_n), -np.sum(dh * w[1] * log_d)])
    return np.sum(h), grad
  return fun


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--data', default='')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  n, d, loss, source = _data(args.data)
  starts = laws.HOFFMANN_GRID
  print(f'data: {source}; {loss.size} points; {len(starts)} starts; {os.cpu_count()} CPUs '
        f'({platform.processor() or platform.machine()})')

  t0 = time.perf_counter()
  first = fit.fit(laws.CHINCHILLA, dict(n=n, d=d), loss)
  compile_and_run = time.perf_counter() - t0
  times, results = [], []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    results.append(fit.fit(laws.CHINCHILLA, dict(n=n, d=d), loss))
    times.append(time.perf_counter() - t0)
  ours = float(np.median(times))
  deterministic = all(np.array_equal(r.theta, first.theta) for r in results)

  fun = _scipy_value_and_grad(np.log(n), np.log(d), np.log(loss))
  t0 = time.perf_counter()
  best = None
  for x0 in starts:
    res = optimize.minimize(fun, x0, jac=True, method='L-BFGS-B')
    if best is None or res.fun < best.fun:
      best = res
  baseline = time.perf_counter() - t0

  p = first.params
  a, b, e, alpha, beta = best.x
  q = dict(A=np.exp(a), B=np.exp(b), E=np.exp(e), alpha=alpha, beta=beta)
  print('| method | seconds | best objective | A | B | E | alpha | beta |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  print(f'| scipy L-BFGS-B, start by start | {baseline:.1f} | {best.fun:.13g} | {float(q["A"]):.2f} | '
        f'{float(q["B"]):.2f} | {float(q["E"]):.4f} | {float(q["alpha"]):.4f} | '
        f'{float(q["beta"]):.4f} |')
  print(f'| lmjax vectorised (median of {args.repeats}) | {ours:.2f} | {first.objective:.13g} | '
        f'{p["A"]:.2f} | {p["B"]:.2f} | {p["E"]:.4f} | {p["alpha"]:.4f} | {p["beta"]:.4f} |')
  print(f'first call incl. compilation: {compile_and_run:.1f} s; repeated calls bit-identical: '
        f'{deterministic}')
  print(f'speed-up (scipy / lmjax): {baseline / ours:.1f}x (goal >= 20x)')


if __name__ == '__main__':
  main()
