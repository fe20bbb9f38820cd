"""Fused LM-head cross-entropy: `linear_cross_entropy(x_nd, w_dv, targets_n, ..., implementation)`."""
from pallas_kernels.linear_cross_entropy.api import IMPLEMENTATIONS, linear_cross_entropy

__all__ = ["IMPLEMENTATIONS", "linear_cross_entropy"]
