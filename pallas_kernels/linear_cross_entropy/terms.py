"""Per-row loss and the coefficients of its gradient with respect to the logits, from per-row statistics
of one pass over the vocabulary: the fused backends (xla.py, tpu_mosaic.py) share it.

With q = softmax(z / T) and s = softmax(z) (valid vocabulary), the gradient of w_n * loss_n is

  dz_nv = a_n s_nv + b_n q_nv + ct_n [v == target_n] + sum_i c_ni [v == id_ni]

(b_n = 0 without a bucket tail; with T == 1 the caller folds b into a, q == s). Derivation, per row,
u = z / T, p the teacher's re-tempered probabilities over the valid slots (reference.masked_log_softmax);
the soft term is KL(p || student), whose gradient is that of the soft cross-entropy (p is constant):
  hard CE:        d(lse - z_t)/dz = s - onehot(t);  z-loss: d(zl lse^2)/dz = 2 zl lse s
  renormalize:    r = softmax over the valid ids of u_ids, soft = sum p (log p - log r): d soft/du_ids =
                  r - p (p sums to 1; both 0 off the valid ids)
  bucket:         log q_i = u_i - lseT over the valid ids, S = sum_i q_i,
                  soft = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log(1 - S)):
                  d soft/du_v = q_v (P - S) / (1 - S) off the ids and q_v - p_v on them (P = sum_i p_i
                  = 1 - p_tail), i.e. c q_v everywhere plus ((1 - c) q_v - p_v) on the ids,
                  c = 1 - p_tail / (1 - S)
and the soft term's T^2 scale times dz = du / T gives the factor alpha * T.
"""
import jax.numpy as jnp

from pallas_kernels.linear_cross_entropy import reference


def row_terms(lse_n, lse_t_n, z_target_n, z_ids_nk, weights_n, teacher_lps_nk, *, z_loss, tail,
              temperature, alpha):
  """(loss_n, a_n, b_n or None, ct_n, c_nk or None); all f32, the gradient of sum_n weights_n loss_n.
  `teacher_lps_nk`: reference.with_tail's (a slot whose log-prob is -inf is no outcome: c_nk = 0 there,
  and in 'bucket' its id belongs to the tail like any other)."""
  hard_weight = 1.0 - alpha if z_ids_nk is not None else 1.0
  hard = lse_n - z_target_n
  loss = hard
  a = weights_n * (hard_weight + 2.0 * z_loss * lse_n)
  ct = -weights_n * hard_weight
  b = c_nk = None
  if z_ids_nk is not None:
    t = temperature
    k = z_ids_nk.shape[-1]
    valid = teacher_lps_nk[:, :k] > -jnp.inf
    log_p = reference.masked_log_softmax(teacher_lps_nk / t)
    p = jnp.exp(log_p)
    soft = reference.soft_term(z_ids_nk, lse_t_n, teacher_lps_nk, tail, t)
    scale = (weights_n * alpha * t)[:, None]
    if tail == "renormalize":
      r = jnp.exp(reference.masked_log_softmax(jnp.where(valid, z_ids_nk / t, -jnp.inf)))
      c_nk = scale * (r - p)
    else:
      q = jnp.where(valid, jnp.exp(z_ids_nk / t - lse_t_n[:, None]), 0.0)
      q_tail = jnp.maximum(1.0 - q.sum(-1), reference.TAIL_FLOOR)
      c = 1.0 - p[:, k] / q_tail
      b = scale[:, 0] * c
      c_nk = jnp.where(valid, scale * ((1.0 - c)[:, None] * q - p[:, :k]), 0.0)
    loss = alpha * t * t * soft + (1.0 - alpha) * hard
  loss = jnp.where(weights_n != 0, loss + z_loss * jnp.square(lse_n), 0.0)
  if b is not None and temperature == 1.0:
    a, b = a + b, None
  return loss, a, b, ct, c_nk
