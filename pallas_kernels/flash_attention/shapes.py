"""Named benchmark shapes (B, T, Hq, Hkv, D): the issue's four anchors first, then the sweep.

ANCHORS carry the issue's H200 numbers (bf16, causal, TFLOP/s, median of 20) for cuDNN and tokamax
0.0.17 as (fwd, fwd+bwd), read on this workplace's H200 with jax 0.11.2.
"""
from typing import NamedTuple


class Shape(NamedTuple):
  b: int
  t: int
  hq: int
  hkv: int
  d: int


ANCHORS = {
    "mha_4k_d128": (Shape(4, 4096, 16, 16, 128), {"cudnn": (360, 373), "tokamax": (454, 373)}),
    "gqa_4k_d128": (Shape(2, 4096, 32, 8, 128), {"cudnn": (381, 392), "tokamax": (433, 387)}),
    "mha_16k_d128": (Shape(1, 16384, 16, 16, 128), {"cudnn": (488, 540), "tokamax": (480, 495)}),
    "mha_4k_d64": (Shape(4, 4096, 32, 32, 64), {"cudnn": (299, 306), "tokamax": (300, 309)}),
}

# Sequence sweep at a fixed token count (B*T = 16k), MHA and GQA, head_dim 64 and 128.
SWEEP = {
    f"{kind}_{t // 1024}k_d{d}": Shape(16384 // t, t, 16 if d == 128 else 32, hkv, d)
    for t in (1024, 2048, 8192)
    for d in (64, 128)
    for kind, hkv in (("mha", 16 if d == 128 else 32), ("gqa", 4))
}

# A length off every block multiple (padded to 1024 and masked inside the kernels; issue 21 read
# 26 TFLOP/s fwd+bwd here when it fell back to the XLA reference, cuDNN 51).
UNALIGNED = {"mha_t1000_d128": Shape(16, 1000, 16, 16, 128)}

# Every shape by name: the anchors, the sweep, the unaligned length.
BY_NAME = {**{name: shape for name, (shape, _) in ANCHORS.items()}, **SWEEP, **UNALIGNED}


def attention_flops(shape: Shape, causal: bool, backward: bool) -> float:
  """Matmul FLOPs as the issue counts them: 4*B*T*S*Hq*D forward, halved when causal, x3.5 fwd+bwd.

  The backward is counted as 2.5x the forward (its five matmuls against the forward's two).
  """
  flops = 4.0 * shape.b * shape.t * shape.t * shape.hq * shape.d
  if causal:
    flops /= 2
  return flops * 3.5 if backward else flops
