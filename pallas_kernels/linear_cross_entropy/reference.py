"""The loss with the logits materialised ([N, V] f32) and gradients by autodiff: the oracle the fused
backends are tested against, and the 'reference' implementation. The math is stated in api.py."""
import jax
import jax.numpy as jnp

TAILS = ("renormalize", "bucket")
# Floor of the student's tail mass 1 - sum_i q_i in the bucket loss (it is exactly 0 only when rounding
# puts all the mass on the k ids); the same floor in terms.py.
TAIL_FLOOR = 1e-30


def check_inputs(x_nd, w_dv, targets_n, weights_n, teacher_ids_nk, teacher_logprobs_nk, tail, temperature,
                 alpha, vocab_size):
  n, d = x_nd.shape
  if w_dv.ndim != 2 or w_dv.shape[0] != d:
    raise ValueError(f"w_dv must be [d={d}, V], got {w_dv.shape}")
  if targets_n.shape != (n,) or not jnp.issubdtype(targets_n.dtype, jnp.integer):
    raise ValueError(f"targets_n must be integer [{n}], got {targets_n.dtype}{list(targets_n.shape)}")
  if weights_n is not None and weights_n.shape != (n,):
    raise ValueError(f"weights_n must be [{n}], got {weights_n.shape}")
  if (teacher_ids_nk is None) != (teacher_logprobs_nk is None):
    raise ValueError("teacher_ids_nk and teacher_logprobs_nk come together (soft labels) or not at all")
  if teacher_ids_nk is not None and (teacher_ids_nk.ndim != 2 or teacher_ids_nk.shape[0] != n
                                     or teacher_logprobs_nk.shape != teacher_ids_nk.shape):
    raise ValueError(f"teacher_ids_nk and teacher_logprobs_nk must both be [{n}, k], got "
                     f"{teacher_ids_nk.shape} and {teacher_logprobs_nk.shape}")
  if tail not in TAILS:
    raise ValueError(f"tail={tail!r}: expected one of {TAILS}")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r}: expected > 0")
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha={alpha!r}: expected 0 <= alpha <= 1")
  if not 0 < vocab_size <= w_dv.shape[1]:
    raise ValueError(f"vocab_size={vocab_size!r}: expected 1..{w_dv.shape[1]} (the rows of w_dv)")


def teacher_probs(teacher_logprobs_nk, tail, temperature):
  """The teacher's target distribution: [N, k] for 'renormalize', [N, k + 1] (the tail bucket last)
  for 'bucket', each re-tempered as softmax(log p / T)."""
  lp = teacher_logprobs_nk.astype(jnp.float32)
  if tail == "bucket":
    tail_mass = jnp.maximum(1.0 - jnp.exp(lp).sum(-1, keepdims=True), 0.0)
    lp = jnp.concatenate([lp, jnp.log(tail_mass)], axis=-1)
  return jax.nn.softmax(lp / temperature, axis=-1)


def loss_from_logits(z_nv, targets_n, weights_n, z_loss, teacher_ids_nk, teacher_logprobs_nk, tail,
                     temperature, alpha):
  """Per-token loss [N] from f32 logits z_nv (padded vocabulary already at -inf); 0 where weights_n == 0."""
  lse = jax.nn.logsumexp(z_nv, axis=-1)
  hard = lse - jnp.take_along_axis(z_nv, targets_n[:, None], axis=-1)[:, 0]
  loss = hard
  if teacher_ids_nk is not None:
    t = temperature
    u_nk = jnp.take_along_axis(z_nv, teacher_ids_nk, axis=-1) / t
    p = teacher_probs(teacher_logprobs_nk, tail, t)
    if tail == "renormalize":
      soft = -(p * jax.nn.log_softmax(u_nk, axis=-1)).sum(-1)
    else:
      logq_nk = u_nk - jax.nn.logsumexp(z_nv / t, axis=-1)[:, None]
      log_tail = jnp.log(jnp.maximum(1.0 - jnp.exp(logq_nk).sum(-1), TAIL_FLOOR))
      soft = -(p[:, :-1] * logq_nk).sum(-1) - p[:, -1] * log_tail
    loss = alpha * t * t * soft + (1 - alpha) * hard
  loss = loss + z_loss * jnp.square(lse)
  return jnp.where(weights_n != 0, loss, 0.0)


def logits(x_nd, w_dv, vocab_size):
  """x_nd @ w_dv in x's dtype, f32 out; columns at or past vocab_size at -inf."""
  z = jnp.dot(x_nd, w_dv.astype(x_nd.dtype), preferred_element_type=jnp.float32)
  if vocab_size < z.shape[-1]:
    z = jnp.where(jnp.arange(z.shape[-1]) < vocab_size, z, -jnp.inf)
  return z


def linear_cross_entropy(x_nd, w_dv, targets_n, weights_n, z_loss, vocab_size, teacher_ids_nk,
                         teacher_logprobs_nk, tail, temperature, alpha):
  """Same contract as api.linear_cross_entropy (all arguments given): logits [N, V] in f32, then the loss."""
  return loss_from_logits(logits(x_nd, w_dv, vocab_size), targets_n, weights_n, z_loss, teacher_ids_nk,
                          teacher_logprobs_nk, tail, temperature, alpha)
