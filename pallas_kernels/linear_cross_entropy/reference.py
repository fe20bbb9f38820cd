"""The loss with the logits materialised ([N, V] f32) and gradients by autodiff: the oracle the fused
backends are tested against, and the 'reference' implementation. The math is stated in api.py."""
import jax
import jax.numpy as jnp

TAILS = ("renormalize", "bucket")
# Floor of the student's tail mass 1 - sum_i q_i in the bucket loss (it is exactly 0 only when rounding
# puts all the mass on the k ids); the same floor in terms.py.
TAIL_FLOOR = 1e-30
# The teacher's tail mass is at least this in the bucket loss (lmjax/losses.py's TAIL_FLOOR: the same
# value, so the fused loss equals lmjax's chunked one).
TEACHER_TAIL_FLOOR = 1e-9


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


def with_tail(teacher_logprobs_nk, tail, teacher_tail_n=None):
  """The teacher's log-probs as the backends read them: [N, k] for 'renormalize'; for 'bucket' [N, k + 1],
  the log of the tail's mass last: `teacher_tail_n` when given, else 1 - the valid slots' mass, floored
  at TEACHER_TAIL_FLOOR."""
  lp = teacher_logprobs_nk.astype(jnp.float32)
  if tail != "bucket":
    return lp
  if teacher_tail_n is None:
    teacher_tail_n = jnp.clip(1.0 - jnp.where(lp > -jnp.inf, jnp.exp(lp), 0.0).sum(-1), 0.0, 1.0)
  log_tail = jnp.log(jnp.maximum(teacher_tail_n.astype(jnp.float32), TEACHER_TAIL_FLOOR))
  return jnp.concatenate([lp, log_tail[:, None]], axis=-1)


def masked_log_softmax(a_nk):
  """log-softmax over a row's entries above -inf (the others stay -inf; a row with none stays all
  -inf): the teacher's distribution over its valid outcomes (`with_tail`'s log-probs / T), and the
  student's over the valid ids ('renormalize')."""
  valid = a_nk > -jnp.inf
  lse = jax.nn.logsumexp(a_nk, axis=-1, keepdims=True)
  return jnp.where(valid, a_nk - jnp.where(jnp.isfinite(lse), lse, 0.0), -jnp.inf)


def soft_term(z_ids_nk, lse_t_n, lps_nk, tail, temperature):
  """The soft term per row [N]: KL(teacher || student) over the outcomes (api.py's docstring), from the
  student's logits at the teacher's ids, its logsumexp of z / T over the vocabulary, and `with_tail`'s
  log-probs. Autodiff of this is the oracle of terms.py's gradient."""
  t = temperature
  log_p = masked_log_softmax(lps_nk / t)
  k = z_ids_nk.shape[-1]
  valid = lps_nk[:, :k] > -jnp.inf
  u = z_ids_nk / t
  if tail == "renormalize":
    log_q = masked_log_softmax(jnp.where(valid, u, -jnp.inf))
    terms = jnp.exp(log_p) * (log_p - log_q)
    return jnp.where(valid, terms, 0.0).sum(-1)
  log_q = u - lse_t_n[:, None]
  mass = jnp.where(valid, jnp.exp(log_q), 0.0).sum(-1)
  log_q_tail = jnp.log(jnp.maximum(1.0 - mass, TAIL_FLOOR))
  top = jnp.where(valid, jnp.exp(log_p[:, :k]) * (log_p[:, :k] - log_q), 0.0).sum(-1)
  return top + jnp.exp(log_p[:, k]) * (log_p[:, k] - log_q_tail)


def loss_from_logits(z_nv, targets_n, weights_n, z_loss, teacher_ids_nk, teacher_lps_nk, tail,
                     temperature, alpha):
  """Per-token loss [N] from f32 logits z_nv (padded vocabulary already at -inf) and `with_tail`'s
  teacher log-probs; 0 where weights_n == 0."""
  lse = jax.nn.logsumexp(z_nv, axis=-1)
  hard = lse - jnp.take_along_axis(z_nv, targets_n[:, None], axis=-1)[:, 0]
  loss = hard
  if teacher_ids_nk is not None:
    t = temperature
    z_ids = jnp.take_along_axis(z_nv, teacher_ids_nk, axis=-1)
    soft = soft_term(z_ids, jax.nn.logsumexp(z_nv / t, axis=-1), teacher_lps_nk, tail, t)
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
                         teacher_lps_nk, tail, temperature, alpha):
  """Same contract as api.linear_cross_entropy (all arguments given; the teacher's log-probs as
  `with_tail` makes them): logits [N, V] in f32, then the loss."""
  return loss_from_logits(logits(x_nd, w_dv, vocab_size), targets_n, weights_n, z_loss, teacher_ids_nk,
                          teacher_lps_nk, tail, temperature, alpha)
