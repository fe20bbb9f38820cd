"""Named benchmark shapes (N tokens, d hidden, V vocabulary, k teacher top-k) and the issue's anchors.

ANCHORS: fwd+bwd (ms, extra GB) at 1b_8k, bf16 inputs, read on this workplace's H200 on 2026-12-01
(issue 21): JAX with jax 0.11.2, PyTorch 2.11.
"""
SHAPES = {
    "1b_8k": (8192, 2048, 128256, 64),     # Llama-3.2-1B head, B4 x T2048 (or B2 x T4096) tokens
    "1b_16k": (16384, 2048, 128256, 64),   # the 1b step's B4 x T4096
    "8b_8k": (8192, 4096, 128256, 64),     # Llama-3.1-8B head
}

ANCHORS = {
    "jax_naive_ce": (39.7, 8.4),
    "jax_naive_topk_kd": (42.3, 12.6),
    "tokamax_chunked_xla_ce": (53.0, 1.7),
    "torch_naive_ce": (30.6, 12.6),
    "liger_fused_linear_ce": (29.3, 0.6),
    "cut_cross_entropy": (25.8, 0.0),
}
