"""Flash attention speed on one GPU: our Mosaic GPU kernel vs cuDNN, XLA and tokamax, in TFLOP/s.

  python benchmarks/flash_attention.py [--shapes anchors|sweep|all] [--only NAME,...] [--causal true|false|both]
                                       [--impls ours,cudnn,xla,tokamax] [--samples 20] [--out results.json]

An impl is 'ours' (the kernel config gpu_mosaic.default_config picks for the shape), 'ours:<variant>'
(that config with the fields of VARIANTS[variant] replaced), 'cudnn', 'xla' or 'tokamax'; '@fwd' or
'@fwdbwd' after it measures that mode only.

FLOPs as issue 4 counts them (shapes.attention_flops): 4*B*T*S*Hq*D forward, halved when causal,
fwd+bwd = 3.5x forward. Time: median over --samples samples, each sample the mean of 5 back-to-back
dispatches (so host dispatch overlaps device work) after one warm-up call. bf16 random inputs.
The tables are printed last: TFLOP/s, then each of our variants over the best of cuDNN and tokamax
measured in this same run.
"""
import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu_mosaic, shapes


# Kernel variants compared with 'ours:<name>': fields replaced in the shape's default config.
VARIANTS = {
    "split": {"backward": "split", "q_descending": False},
    "split_desc": {"backward": "split", "q_descending": True},
    "fused": {"backward": "fused", "q_descending": False},
    "fused_desc": {"backward": "fused", "q_descending": True},
    "mbarrier": {"named_barriers": False},
    "nb": {"named_barriers": True},
    "kv128": {"block_kv": 128},
    "persistent": {"persistent": True},
    "grid": {"persistent": False},
}


def _ours(q, k, v, causal, overrides=None):
  config = gpu_mosaic.default_config(q.shape[-1], k.shape[1], causal, q.shape[2] // k.shape[2])
  return gpu_mosaic.flash_attention(q, k, v, causal=causal, config=config._replace(**(overrides or {})))


def attention_fns():
  fns = {
      "ours": _ours,
      **{f"ours:{name}": functools.partial(_ours, overrides=o) for name, o in VARIANTS.items()},
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


def calls(attn, shape, causal):
  """{'fwd': (jitted fn, args), 'fwdbwd': (jitted fn, args)} for attn on bf16 random inputs of shape."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (shape.b, shape.t, shape.hq, shape.d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (shape.b, shape.t, shape.hkv, shape.d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (shape.b, shape.t, shape.hkv, shape.d), jnp.bfloat16)
  do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
  fwd = jax.jit(lambda q, k, v: attn(q, k, v, causal))
  fwdbwd = jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: attn(q, k, v, causal), q, k, v)[1](do))
  return {"fwd": (fwd, (q, k, v)), "fwdbwd": (fwdbwd, (q, k, v, do))}


def measure(name, attn, shape, causal, modes=("fwd", "fwdbwd"), samples=20):
  """Returns {mode: TFLOP/s or None, f'{mode}_error': message} for mode in modes."""
  result = {}
  for mode, (fn, args) in calls(attn, shape, causal).items():
    if mode not in modes:
      continue
    try:
      seconds = _median_seconds(fn, args, samples=samples)
      result[mode] = shapes.attention_flops(shape, causal, mode == "fwdbwd") / seconds / 1e12
    except Exception as e:  # pylint: disable=broad-except
      result[mode] = None
      result[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print(f"  {name} {mode} failed: {result[f'{mode}_error']}", flush=True)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="anchors", choices=["anchors", "sweep", "all"])
  parser.add_argument("--only", default=None, help="comma-separated shape names (shapes.py) to keep")
  parser.add_argument("--causal", default="true", choices=["true", "false", "both"])
  parser.add_argument("--impls", default="ours,cudnn,xla,tokamax")
  parser.add_argument("--samples", type=int, default=20)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
  fns = attention_fns()
  impls = []  # (column name, modes)
  for spec in args.impls.split(","):
    name, _, mode = spec.partition("@")
    if name not in fns:
      raise SystemExit(f"unknown impl {name!r}; known: {sorted(fns)}")
    impls.append((name, (mode,) if mode else ("fwd", "fwdbwd")))
  names = {"anchors": list(shapes.ANCHORS), "sweep": list(shapes.SWEEP), "all": list(shapes.BY_NAME)}[args.shapes]
  todo = [(n, shapes.BY_NAME[n]) for n in names]
  if args.only:
    keep = args.only.split(",")
    if unknown := set(keep) - {n for n, _ in todo}:
      raise SystemExit(f"--only: unknown shape names {sorted(unknown)} for --shapes {args.shapes}")
    todo = [(n, s) for n, s in todo if n in keep]
  causals = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
  rows = []
  for name, shape in todo:
    for causal in causals:
      row = {"shape": name, "dims": tuple(shape), "causal": causal}
      for impl, modes in impls:
        row[impl] = measure(impl, fns[impl], shape, causal, modes, args.samples)
        print(f"{name} causal={causal} {impl}: {row[impl]}", flush=True)
      rows.append(row)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)

  fmt = lambda x: "  -  " if x is None else f"{x:5.0f}"
  print("\nTFLOP/s fwd / fwd+bwd (bf16; causal FLOPs halved; bwd = 2.5x fwd)")
  names = [i for i, _ in impls]
  ours = [i for i in names if i.startswith("ours")]
  print(f"{'shape (B,T,Hq,Hkv,D)':34s} {'causal':6s} " + " ".join(f"{i:>13s}" for i in names))
  for row in rows:
    cells = " ".join(f"{fmt(row[i].get('fwd'))} / {fmt(row[i].get('fwdbwd'))}" for i in names)
    print(f"{row['shape'] + ' ' + str(row['dims']):34s} {str(row['causal']):6s} {cells}")
  print("\nours / best of (cudnn, tokamax) measured in this run, fwd  fwd+bwd")
  for row in rows:
    ratios = []
    for i in ours:
      for mode in ("fwd", "fwdbwd"):
        peers = [row[p].get(mode) for p in ("cudnn", "tokamax") if p in row and row[p].get(mode)]
        value = row[i].get(mode)
        ratios.append(f"{value / max(peers):5.2f}" if value and peers else "  -  ")
    cells = "   ".join(f"{i}: {ratios[2 * n]} {ratios[2 * n + 1]}" for n, i in enumerate(ours))
    print(f"{row['shape'] + ' ' + str(row['dims']):34s} {str(row['causal']):6s} {cells}")


if __name__ == "__main__":
  main()
