"""Runs one attention call of a benchmark shape inside a CUDA profiler range, for Nsight Compute:

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --profile-from-start off \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats ... \
      python scripts/profile_attention.py --shape mha_16k_d128 --causal true --impl ours --mode fwdbwd

(Without XLA_PYTHON_CLIENT_PREALLOCATE=false, JAX holds most of the GPU's memory and ncu saves and
restores all of it for every replay pass: minutes per kernel.)

The call is compiled and run once before the range (so autotuning and compilation kernels are not
profiled), then run once between cudaProfilerStart and cudaProfilerStop. Impl names as in
benchmarks/flash_attention.py ('ours', 'ours:<variant>', 'cudnn', 'xla', 'tokamax').
"""
import argparse
import ctypes
import glob
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks import flash_attention as bench  # pylint: disable=wrong-import-position
from pallas_kernels.flash_attention import shapes  # pylint: disable=wrong-import-position


def _cudart():
  """The CUDA runtime library of JAX's CUDA pip packages, else the system one."""
  try:
    import nvidia  # pylint: disable=import-outside-toplevel
    paths = [p for root in nvidia.__path__
             for p in sorted(glob.glob(os.path.join(root, "**", "libcudart.so*"), recursive=True))]
  except ImportError:
    paths = []
  try:
    return ctypes.CDLL(paths[0] if paths else "libcudart.so")
  except OSError as e:
    raise SystemExit(f"no CUDA runtime library found ({e}); run this on a machine with a CUDA GPU") from e


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shape", required=True, help="a name in shapes.ANCHORS or shapes.SWEEP")
  parser.add_argument("--causal", default="true", choices=["true", "false"])
  parser.add_argument("--impl", default="ours")
  parser.add_argument("--mode", default="fwdbwd", choices=["fwd", "fwdbwd"])
  args = parser.parse_args()
  if args.shape not in shapes.BY_NAME:
    raise SystemExit(f"--shape: unknown {args.shape!r}; known: {sorted(shapes.BY_NAME)}")
  shape, causal = shapes.BY_NAME[args.shape], args.causal == "true"
  fns = bench.attention_fns()
  if args.impl not in fns:
    raise SystemExit(f"--impl: unknown {args.impl!r}; known: {sorted(fns)}")
  attn = fns[args.impl]
  fn, inputs = bench.calls(attn, shape, causal)[args.mode]
  jax.block_until_ready(fn(*inputs))
  cudart = _cudart()
  cudart.cudaProfilerStart()
  jax.block_until_ready(fn(*inputs))
  cudart.cudaProfilerStop()
  print(f"profiled {args.impl} {args.mode} {args.shape} causal={causal}")


if __name__ == "__main__":
  main()
