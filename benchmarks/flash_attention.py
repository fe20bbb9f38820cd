"""Flash attention speed on one GPU: our Mosaic GPU kernel vs cuDNN, XLA and tokamax, in TFLOP/s.

  python benchmarks/flash_attention.py [--shapes anchors|sweep|all] [--causal true|false|both]
                                       [--impls ours,cudnn,xla,tokamax] [--out results.json]

FLOPs as issue 4 counts them (shapes.attention_flops): 4*B*T*S*Hq*D forward, halved when causal,
fwd+bwd = 3.5x forward. Time: median over 20 samples, each sample the mean of 5 back-to-back
dispatches (so host dispatch overlaps device work) after one warm-up call. bf16 random inputs.
The table is printed last; the ratio columns are ours over the best of cuDNN and tokamax measured
in this same run (and over the issue's recorded numbers for the anchor shapes).
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu_mosaic, shapes


def _attention_fns():
  fns = {
      "ours": lambda q, k, v, causal: gpu_mosaic.flash_attention(q, k, v, causal=causal),
      "cudnn": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                    implementation="cudnn"),
      "xla": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                  implementation="xla"),
  }
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
    fns["tokamax"] = lambda q, k, v, causal: tokamax.dot_product_attention(q, k, v, is_causal=causal,
                                                                           implementation="mosaic")
  except ImportError as e:
    print(f"tokamax not importable ({e}); skipping it")
  return fns


def _median_seconds(fn, args, samples=20, inner=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times)


def measure(name, attn, shape, causal):
  """Returns {'fwd': TFLOP/s, 'fwdbwd': TFLOP/s} or {'error': message}."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (shape.b, shape.t, shape.hq, shape.d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (shape.b, shape.t, shape.hkv, shape.d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (shape.b, shape.t, shape.hkv, shape.d), jnp.bfloat16)
  do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
  fwd = jax.jit(lambda q, k, v: attn(q, k, v, causal))
  fwdbwd = jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: attn(q, k, v, causal), q, k, v)[1](do))
  result = {}
  for mode, fn, args in (("fwd", fwd, (q, k, v)), ("fwdbwd", fwdbwd, (q, k, v, do))):
    try:
      seconds = _median_seconds(fn, args)
      result[mode] = shapes.attention_flops(shape, causal, mode == "fwdbwd") / seconds / 1e12
    except Exception as e:  # pylint: disable=broad-except
      result[mode] = None
      result[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print(f"  {name} {mode} failed: {result[f'{mode}_error']}", flush=True)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="anchors", choices=["anchors", "sweep", "all"])
  parser.add_argument("--causal", default="true", choices=["true", "false", "both"])
  parser.add_argument("--impls", default="ours,cudnn,xla,tokamax")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
  fns = _attention_fns()
  impls = [i for i in args.impls.split(",") if i in fns]
  todo = []
  if args.shapes in ("anchors", "all"):
    todo += [(n, s) for n, (s, _) in shapes.ANCHORS.items()]
  if args.shapes in ("sweep", "all"):
    todo += list(shapes.SWEEP.items())
  causals = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
  rows = []
  for name, shape in todo:
    for causal in causals:
      row = {"shape": name, "dims": tuple(shape), "causal": causal}
      for impl in impls:
        row[impl] = measure(impl, fns[impl], shape, causal)
        print(f"{name} causal={causal} {impl}: {row[impl]}", flush=True)
      rows.append(row)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)

  fmt = lambda x: "  -  " if x is None else f"{x:5.0f}"
  print("\nTFLOP/s fwd / fwd+bwd (bf16; causal FLOPs halved; bwd = 2.5x fwd)")
  print(f"{'shape (B,T,Hq,Hkv,D)':34s} {'causal':6s} " + " ".join(f"{i:>13s}" for i in impls)
        + "   ours/best(cudnn,tokamax) fwd  fwd+bwd")
  for row in rows:
    cells = " ".join(f"{fmt(row[i].get('fwd'))} / {fmt(row[i].get('fwdbwd'))}" for i in impls)
    ratios = []
    for mode in ("fwd", "fwdbwd"):
      peers = [row[i].get(mode) for i in ("cudnn", "tokamax") if i in row and row[i].get(mode)]
      ours = row.get("ours", {}).get(mode)
      ratios.append(f"{ours / max(peers):5.2f}" if ours and peers else "  -  ")
    print(f"{row['shape'] + ' ' + str(row['dims']):34s} {str(row['causal']):6s} {cells}   "
          f"{ratios[0]:>27s} {ratios[1]:>8s}")


if __name__ == "__main__":
  main()
