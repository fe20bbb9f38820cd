"""Flash attention kernels: `flash_attention(q, k, v, *, causal, segment_ids, softmax_scale, implementation)`."""
from pallas_kernels.flash_attention.api import IMPLEMENTATIONS, flash_attention

__all__ = ["IMPLEMENTATIONS", "flash_attention"]
