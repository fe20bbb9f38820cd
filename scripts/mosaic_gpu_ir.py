"""Dumps the Mosaic GPU modules of the flash attention kernels, without source locations, for a grid
of cases (head_dim, causal, packed, GQA/MQA, q walk, split/fused backward; the rest of each config as
`default_config` picks it), on any machine (CPU too).

A kernel refactor that should change no instruction is proven so by dumping before and after and
comparing the two folders; the lowered modules otherwise embed source locations, so they always differ.

  python scripts/mosaic_gpu_ir.py /tmp/ir_before   # on the old code
  python scripts/mosaic_gpu_ir.py /tmp/ir_after    # on the new code
  diff -rq /tmp/ir_before /tmp/ir_after

It captures each module where Mosaic GPU serialises it (`_run_serde_pass`, a private function of
jax.experimental.mosaic.gpu.core: checked with jax 0.10.2).
"""
import hashlib
import itertools
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import core

from pallas_kernels.flash_attention import gpu_mosaic

_captured = []
_serde = core._run_serde_pass


def _capture(module, *args, **kwargs):
  _captured.append(module.operation.get_asm(enable_debug_info=False))
  return _serde(module, *args, **kwargs)


def main(out_dir):
  core._run_serde_pass = _capture
  os.makedirs(out_dir, exist_ok=True)
  cases = itertools.product((64, 128), (True, False), (True, False), (4, 1), (False, True), ("split", "fused"))
  for d, causal, packed, hkv, descending, backward in cases:
    q = jax.ShapeDtypeStruct((1, 512, 4, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, hkv, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    config = gpu_mosaic.default_config(d, 512, causal, 4 // hkv)._replace(backward=backward,
                                                                         q_descending=descending)

    def grads(q, k, v, do, seg):
      attn = lambda q, k, v: gpu_mosaic.flash_attention(
          q, k, v, causal=causal, segment_ids=seg if packed else None, config=config)
      return jax.vjp(attn, q, k, v)[1](do)

    _captured.clear()
    jax.jit(grads).trace(q, kv, kv, q, seg).lower(lowering_platforms=("cuda",))
    name = f"d{d}_causal{int(causal)}_packed{int(packed)}_hkv{hkv}_desc{int(descending)}_{backward}"
    text = "\n// ---- next kernel ----\n".join(_captured)
    with open(os.path.join(out_dir, name + ".mlir"), "w") as f:
      f.write(text)
    print(name, len(_captured), "kernels", hashlib.sha1(text.encode()).hexdigest()[:12])


if __name__ == "__main__":
  main(sys.argv[1])
