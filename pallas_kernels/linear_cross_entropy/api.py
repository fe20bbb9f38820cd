"""`linear_cross_entropy`: the LM head x_nd @ w_dv fused with the next-token loss, per token, without the
[N, V] logits in HBM (except implementation='reference').

The loss of token n, with logits z = x_n @ w (f32; columns at or past `vocab_size` are padding, -inf),
s = softmax(z), lse = logsumexp(z), weight w_n (0 = ignored: loss 0, no gradient):

  hard    CE_n = lse - z[target_n]
  z-loss  + z_loss * lse^2                             (PaLM, section 5; never scaled by alpha)
  soft (teacher top-k ids id_ni and log-probs l_ni, i < k; temperature T; alpha):
    loss_n = alpha * T^2 * soft_n + (1 - alpha) * CE_n (+ z-loss)
    A slot whose log-prob is -inf is no outcome (a teacher with fewer than k tokens of mass; padding).
    'renormalize' (MaxText's top-k distillation): p = softmax_i(l_ni / T) over the valid slots; the
        student restricted to the same ids, r = softmax_i(z[id_ni] / T); soft_n = sum_i p_i log(p_i / r_i)
        (0 for a row without a valid slot).
    'bucket': the valid ids plus one tail bucket. Teacher: their log-probs and the log of the tail's mass
        (teacher_tail_n, else 1 - sum_i exp l_ni; floored at 1e-9) re-tempered, p = softmax(. / T);
        student: q_i = softmax(z / T)[id_ni] over the full vocabulary, q_tail = 1 - sum_i q_i (floored at
        1e-30); soft_n = sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail).
    soft_n is the forward KL from the teacher's distribution over the outcomes (its gradient that of the
    soft cross-entropy, the teacher's entropy being constant), as lmjax/losses.py's kd_from_logits
    computes it; T^2 keeps the gradient's scale independent of T (Hinton et al. 2015).

Gradients. The backends make the gradients of sum_n weights_n loss_n in the forward pass (fwd rule of
the custom_vjp; the loss is the last op of a train step, so no logits are recomputed). The backward
scales the input gradient row by row by the cotangent, exactly; the weight gradient is exact when the
cotangent is proportional to weights_n (a weighted sum or mean of the returned losses: every train
step's case) and is NaN otherwise, never silently wrong. Ask implementation='reference' for arbitrary
cotangents.

Implementations: 'mosaic_tpu' (Pallas TPU kernels, tpu_mosaic.py), 'xla' (a scan over token blocks,
xla.py; also the GPU backend: no Mosaic GPU kernel beat it, see benchmarks/linear_cross_entropy_NOTES.md),
'reference' (materialised logits, autodiff). None picks mosaic_tpu when compiling for TPU, else xla.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.linear_cross_entropy import reference, tpu_mosaic, xla

IMPLEMENTATIONS = ("mosaic_tpu", "xla", "reference")


class Config(NamedTuple):
  """Static settings of one call (hashable)."""
  z_loss: float
  vocab_size: int
  tail: str
  temperature: float
  alpha: float
  block_tokens: int
  interpret: bool


def _target_platform(x) -> str:
  for mesh in (jax.sharding.get_abstract_mesh(), jax.typeof(x).sharding.mesh):
    if not mesh.empty and mesh.abstract_device is not None:
      return mesh.abstract_device.platform
  return jax.default_backend()


def _vary_alike(xs):
  """Inside shard_map: every input varies over the union of the inputs' varying mesh axes, so the
  gradients have the inputs' types; autodiff turns the cast into the psum a replicated w needs."""
  leaves = [x for x in jax.tree.leaves(xs)]
  union = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in leaves))
  missing = lambda x: tuple(sorted(union - jax.typeof(x).manual_axis_type.varying))
  return jax.tree.map(lambda x: jax.lax.pcast(x, missing(x), to="varying") if missing(x) else x, xs)


_BACKENDS = {"xla": xla, "mosaic_tpu": tpu_mosaic}


def _fused(implementation):
  backend = _BACKENDS[implementation]

  @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
  def f(x, w, targets, weights, ids, lps, cfg):
    return backend.loss(x, w, targets, weights, ids, lps, cfg)

  def fwd(x, w, targets, weights, ids, lps, cfg):
    loss, dx, dw = backend.loss_and_grads(x, w, targets, weights, ids, lps, cfg)
    return loss, (dx, dw, weights)

  def bwd(cfg, res, ct):
    dx, dw, weights = res
    ct = ct.astype(jnp.float32)
    row_scale = jnp.where(weights != 0, ct / jnp.where(weights != 0, weights, 1.0), 0.0)
    # dw holds sum_n weights_n dloss_n/dw: exact for a cotangent c * weights_n, NaN for any other.
    ww = jnp.sum(weights * weights)
    c = jnp.where(ww > 0, jnp.sum(ct * weights) / jnp.where(ww > 0, ww, 1.0), 0.0)
    off = jnp.max(jnp.abs(ct - c * weights)) > 1e-5 * jnp.max(jnp.abs(ct)) + 1e-30
    c = jnp.where(off, jnp.nan, c)
    return ((row_scale[:, None] * dx.astype(jnp.float32)).astype(dx.dtype), (c * dw).astype(dw.dtype),
            None, None, None, None)

  f.defvjp(fwd, bwd)
  return f


_FUSED = {name: _fused(name) for name in _BACKENDS}


def linear_cross_entropy(x_nd, w_dv, targets_n, *, weights_n=None, z_loss=0.0, vocab_size=None,
                         teacher_ids_nk=None, teacher_logprobs_nk=None, teacher_tail_n=None, tail="renormalize",
                         temperature=1.0, alpha=1.0, implementation=None, block_tokens=None, interpret=False):
  """Per-token loss [N] f32 of the head x_nd @ w_dv (module docstring for the math), differentiable in
  x_nd and w_dv.

  Args:
    x_nd: [N, d] final hidden states (bf16 or f32; the matmuls run in this dtype, f32 accumulate).
    w_dv: [d, V] head weight (cast to x's dtype inside; its gradient comes back in its own dtype). A
      tied head passes the embedding transposed: the gradient reaches the embedding through autodiff.
    targets_n: int [N] next tokens (any valid index where weights_n is 0).
    weights_n: f32 [N], 0 at ignored positions; None = all 1.
    z_loss: coefficient of lse^2.
    vocab_size: columns of w_dv that can be predicted (the rest are padding); None = all.
    teacher_ids_nk, teacher_logprobs_nk: int [N, k] and f32 [N, k], the teacher's top-k (soft labels;
      -inf: a slot without mass).
    teacher_tail_n: f32 [N], the teacher's mass outside its top-k ('bucket'; None: 1 - the top-k's).
    tail: 'renormalize' | 'bucket'; temperature: T > 0; alpha: weight of the soft loss in [0, 1].
    implementation: None, 'mosaic_tpu', 'xla' or 'reference'.
    block_tokens: tokens per block of the fused backends (None: the backend's default).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
  """
  vocab_size = w_dv.shape[1] if vocab_size is None else int(vocab_size)
  reference.check_inputs(x_nd, w_dv, targets_n, weights_n, teacher_ids_nk, teacher_logprobs_nk, tail,
                         temperature, alpha, vocab_size)
  if teacher_tail_n is not None and (tail != "bucket" or teacher_tail_n.shape != targets_n.shape):
    raise ValueError(f"teacher_tail_n: a [{targets_n.shape[0]}] array with tail='bucket', got "
                     f"{teacher_tail_n.shape} with tail={tail!r}")
  if implementation is None:
    implementation = "mosaic_tpu" if _target_platform(x_nd) == "tpu" or interpret else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "mosaic_tpu" and not interpret and _target_platform(x_nd) != "tpu":
    raise ValueError(f"mosaic_tpu needs a TPU, the target platform is {_target_platform(x_nd)!r}; "
                     "use implementation='xla'")
  weights_n = jnp.ones(targets_n.shape, jnp.float32) if weights_n is None else weights_n.astype(jnp.float32)
  targets_n = targets_n.astype(jnp.int32)
  if teacher_ids_nk is not None:
    teacher_ids_nk = teacher_ids_nk.astype(jnp.int32)
    teacher_logprobs_nk = reference.with_tail(teacher_logprobs_nk, tail, teacher_tail_n)
  if implementation == "reference":
    return reference.linear_cross_entropy(x_nd, w_dv, targets_n, weights_n, float(z_loss), vocab_size,
                                          teacher_ids_nk, teacher_logprobs_nk, tail, float(temperature),
                                          float(alpha))
  backend = _BACKENDS[implementation]
  cfg = Config(float(z_loss), vocab_size, tail, float(temperature), float(alpha),
               int(block_tokens or backend.DEFAULT_BLOCK_TOKENS), bool(interpret))
  x_nd, w_dv, weights_n, teacher_logprobs_nk = _vary_alike((x_nd, w_dv, weights_n, teacher_logprobs_nk))
  return _FUSED[implementation](x_nd, w_dv, targets_n, weights_n, teacher_ids_nk, teacher_logprobs_nk, cfg)
