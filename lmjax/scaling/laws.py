"""Parametric scaling laws as pure JAX functions, and the decisions they are fitted for.

Two views of each law:
  * natural parameters, a dict such as {'E': 1.8, 'A': 482., ...}: `chinchilla_loss`, `dcpt_loss`,
    `cross_domain_loss` and the usages below take these;
  * fitting coordinates `theta_p` (a flat vector), used by `lmjax.scaling.fit`: a `Form` maps between
    the two and gives log L in fitting coordinates as a log-sum-exp of the law's terms, which keeps
    the fit stable over many orders of magnitude of N and D (Hoffmann et al. 2022, appendix D.2).

Laws
  Chinchilla (Hoffmann et al. 2022, eq. 2):   L(N, D) = E + A / N^alpha + B / D^beta
  D-CPT Law (Que et al. 2024, arXiv 2406.01375, the parameterisation the paper keeps):
      L(N, D, r) = E + A / N^alpha + B r^eta / D^beta + C / (r + eps)^gamma
    fitted separately for the domain loss (r = domain share of the training mixture) and the general
    loss (r = general share = 1 - domain share). eps is a fixed constant that keeps L finite at r = 0.
  Cross-domain D-CPT Law (same paper):  L(N, D, r, K) = D-CPT(N, D, r) + F / K^mu,
    K = w1 / k1 + w2 * k2 (k1: the domain's initial validation loss, k2: its early rate of decrease).

Constraints. Every amplitude (E, A, B, C, F) is exp of a fitted coordinate and every D-CPT exponent
(alpha, beta, gamma, eta, mu) too, so all are positive: L falls in N, in D and, through C, in r. The
B r^eta / D^beta term rises in r (eta > 0 is what makes more domain data worth more per token); it is
outweighed by the C term whenever C gamma / (r + eps)^(gamma + 1) > B eta r^(eta - 1) / D^beta, which
holds at the token counts a law is fitted on (`dcpt_dloss_dr` checks it). Chinchilla keeps Hoffmann's
unconstrained exponents so that published fits are reproduced exactly.

Precision: the functions compute in the dtype of their inputs; call them inside
`jax.enable_x64(True)` for float64 (the fitter does).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import errors

Params = Mapping[str, float]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a jit static argument
class Form:
  """A law in fitting coordinates.

  inputs: names of the data columns the law reads, each a [P] array of positive values
    (r may be 0); `log_loss(theta_p, cols) -> [P]` log of the predicted loss.
  params: natural parameter names; `to_params(theta_p) -> dict` and `to_theta(dict) -> theta_p`.
  grid: default starting points, [S, len(theta)], in fitting coordinates.
  """
  name: str
  inputs: tuple[str, ...]
  params: tuple[str, ...]
  log_loss: Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]
  to_params: Callable[[jax.Array], dict]
  to_theta: Callable[[Params], jax.Array]
  grid: np.ndarray
  loss: Callable[..., jax.Array]  # natural form: loss(params, **cols) -> [P]


def _grid(*axes) -> np.ndarray:
  return np.array(list(itertools.product(*axes)), dtype=np.float64)


# ---------------------------------------------------------------------------------------------------
# Chinchilla

def chinchilla_loss(params: Params, n, d):
  """L = E + A / N^alpha + B / D^beta for arrays n (parameters) and d (tokens) of one shape."""
  return params['E'] + params['A'] / n ** params['alpha'] + params['B'] / d ** params['beta']


def _chinchilla_log_loss(theta_p, cols):
  # theta = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e): Hoffmann et al. D.2.
  a, b, e, alpha, beta = theta_p
  log_n, log_d = jnp.log(cols['n']), jnp.log(cols['d'])
  terms_3p = jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)])
  return jax.nn.logsumexp(terms_3p, axis=0)


# Hoffmann et al. 2022, appendix D.2: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}: 5 * 5 * 5 * 6 * 6 = 4,500 starts.
HOFFMANN_GRID = _grid(np.arange(0, 30, 5.), np.arange(0, 30, 5.), np.arange(-1, 1.5, .5),
                      np.arange(0, 2.5, .5), np.arange(0, 2.5, .5))

CHINCHILLA = Form(
    name='chinchilla',
    inputs=('n', 'd'),
    params=('E', 'A', 'B', 'alpha', 'beta'),
    log_loss=_chinchilla_log_loss,
    to_params=lambda t: dict(A=jnp.exp(t[0]), B=jnp.exp(t[1]), E=jnp.exp(t[2]), alpha=t[3], beta=t[4]),
    to_theta=lambda p: jnp.array([jnp.log(p['A']), jnp.log(p['B']), jnp.log(p['E']), p['alpha'],
                                  p['beta']]),
    grid=HOFFMANN_GRID,
    loss=chinchilla_loss,
)


def chinchilla_optimal(params: Params, flops):
  """Compute-optimal (N*, D*) for a budget C = 6 N D (Hoffmann et al. 2022, eq. 4).

  N* = G (C/6)^(beta/(alpha+beta)), D* = (C/6)^(alpha/(alpha+beta)) / G,
  G = (alpha A / (beta B))^(1/(alpha+beta)). Works on arrays of budgets.
  """
  alpha, beta = params['alpha'], params['beta']
  g = (alpha * params['A'] / (beta * params['B'])) ** (1.0 / (alpha + beta))
  half = jnp.asarray(flops) / 6.0
  return g * half ** (beta / (alpha + beta)), half ** (alpha / (alpha + beta)) / g


# ---------------------------------------------------------------------------------------------------
# D-CPT Law and its cross-domain variant

DCPT_EPS = 1e-2  # fixed eps of C / (r + eps)^gamma; the law is finite at r = 0 (no data of that kind)


def dcpt_loss(params: Params, n, d, r, eps: float = DCPT_EPS):
  """L = E + A / N^alpha + B r^eta / D^beta + C / (r + eps)^gamma (Que et al. 2024)."""
  return (params['E'] + params['A'] / n ** params['alpha']
          + params['B'] * r ** params['eta'] / d ** params['beta']
          + params['C'] / (r + eps) ** params['gamma'])


def dcpt_dloss_dr(params: Params, n, d, r, eps: float = DCPT_EPS):
  """dL/dr of the D-CPT Law (negative where more of the data kind lowers its loss); r > 0."""
  del n
  return (params['B'] * params['eta'] * r ** (params['eta'] - 1) / d ** params['beta']
          - params['C'] * params['gamma'] / (r + eps) ** (params['gamma'] + 1))


def domain_coefficient(k1, k2, w1: float, w2: float):
  """K = w1 / k1 + w2 * k2 of the cross-domain law (k1: initial loss, k2: its early decrease rate)."""
  return w1 / k1 + w2 * k2


def cross_domain_loss(params: Params, n, d, r, k, eps: float = DCPT_EPS):
  """L = D-CPT(N, D, r) + F / K^mu."""
  return dcpt_loss(params, n, d, r, eps) + params['F'] / k ** params['mu']


def _dcpt_terms(theta_p, cols, eps):
  # theta = (e, a, b, c, log alpha, log beta, log gamma, log eta[, f, log mu]).
  e, a, b, c = theta_p[0], theta_p[1], theta_p[2], theta_p[3]
  alpha, beta, gamma, eta = jnp.exp(theta_p[4]), jnp.exp(theta_p[5]), jnp.exp(theta_p[6]), jnp.exp(
      theta_p[7])
  log_n, log_d, r = jnp.log(cols['n']), jnp.log(cols['d']), cols['r']
  positive = r > 0
  # r^eta is exactly 0 at r = 0; the inner where keeps log(0) (and its gradient) out of the graph.
  data_term = jnp.where(positive, b + eta * jnp.log(jnp.where(positive, r, 1.0)) - beta * log_d,
                        -jnp.inf)
  return [jnp.broadcast_to(e, log_n.shape), a - alpha * log_n, data_term,
          c - gamma * jnp.log(r + eps)]


def _dcpt_to_params(t):
  return dict(E=jnp.exp(t[0]), A=jnp.exp(t[1]), B=jnp.exp(t[2]), C=jnp.exp(t[3]),
              alpha=jnp.exp(t[4]), beta=jnp.exp(t[5]), gamma=jnp.exp(t[6]), eta=jnp.exp(t[7]))


_DCPT_NAMES = ('E', 'A', 'B', 'C', 'alpha', 'beta', 'gamma', 'eta')

# Starts for D-CPT fits (8 coordinates): amplitudes and exponents over the ranges seen in the paper's
# and our sweeps; 3^6 * 2^2 = 2,916 starts.
DCPT_GRID = _grid([-1.0, 0.0, 0.7], [0.0, 5.0, 10.0], [0.0, 5.0, 10.0], [-4.0, -2.0, 0.0],
                  np.log([0.1, 0.3, 0.6]), np.log([0.1, 0.3, 0.6]), np.log([0.05, 0.3]),
                  np.log([0.2, 1.0]))


@functools.cache  # one Form (and so one compiled fit) per eps
def dcpt_form(eps: float = DCPT_EPS) -> Form:
  """The D-CPT Law as a `Form` over columns n, d, r (r: share of the data kind whose loss it is)."""
  return Form(
      name='dcpt',
      inputs=('n', 'd', 'r'),
      params=_DCPT_NAMES,
      log_loss=lambda t, cols: jax.nn.logsumexp(jnp.stack(_dcpt_terms(t, cols, eps)), axis=0),
      to_params=_dcpt_to_params,
      to_theta=lambda p: jnp.log(jnp.array([p[k] for k in _DCPT_NAMES])),
      grid=DCPT_GRID,
      loss=lambda params, n, d, r: dcpt_loss(params, n, d, r, eps),
  )


@functools.cache
def cross_domain_form(eps: float = DCPT_EPS) -> Form:
  """The cross-domain D-CPT Law as a `Form` over columns n, d, r, k (k: the domain coefficient K)."""
  names = _DCPT_NAMES + ('F', 'mu')

  def log_loss(t, cols):
    terms = _dcpt_terms(t, cols, eps) + [t[8] - jnp.exp(t[9]) * jnp.log(cols['k'])]
    return jax.nn.logsumexp(jnp.stack(terms), axis=0)

  return Form(
      name='cross_domain',
      inputs=('n', 'd', 'r', 'k'),
      params=names,
      log_loss=log_loss,
      to_params=lambda t: dict(_dcpt_to_params(t), F=jnp.exp(t[8]), mu=jnp.exp(t[9])),
      to_theta=lambda p: jnp.log(jnp.array([p[k] for k in names])),
      # Each D-CPT start with F, mu in {e^-2, 1} x {0.3, 1}: 11,664 starts.
      grid=np.array([np.concatenate([g, h]) for g in DCPT_GRID
                     for h in _grid([-2.0, 0.0], np.log([0.3, 1.0]))]),
      loss=lambda params, n, d, r, k: cross_domain_loss(params, n, d, r, k, eps),
  )


def form(name: str, eps: float = DCPT_EPS) -> Form:
  """The `Form` called `name` ('chinchilla' | 'dcpt' | 'cross_domain'); eps is for the D-CPT ones."""
  if name == 'chinchilla':
    return CHINCHILLA
  makers = {'dcpt': dcpt_form, 'cross_domain': cross_domain_form}
  if name not in makers:
    raise errors.ConfigError(f'scaling law {name!r}: expected one of chinchilla, dcpt, cross_domain')
  return makers[name](eps)


# ---------------------------------------------------------------------------------------------------
# Usages of the D-CPT Law (Que et al. 2024, section "Usages")

def _float64(x):
  """x in float64 numpy: a degenerate fit's power (alpha = 6e45 happened in a quick sweep; fit.warnings
  flags it) is then inf, its term 0, where Python's float power raises OverflowError."""
  return np.asarray(x, np.float64)


def _share_grid(size: int, lowest: float = 0.0):
  return jnp.linspace(lowest, 1.0, size)


def tradeoff_share(domain: Params, general: Params, n, d, general_start_loss, max_increase,
                   eps: float = DCPT_EPS, grid_size: int = 10_001):
  """Usage 1: the domain share r_d with the lowest domain loss whose general loss is at most
  (1 + max_increase) * general_start_loss (the starting model's general loss; e.g. 0.03 for 3%).

  domain, general: D-CPT params fitted on the domain loss (r = r_d) and the general loss
  (r = 1 - r_d). Searched on a grid of `grid_size` shares in [0, 1]; nan if no share qualifies.
  """
  r_d = _share_grid(grid_size)
  n, d = _float64(n), _float64(d)
  domain_loss = dcpt_loss(domain, n, d, r_d, eps)
  general_loss = dcpt_loss(general, n, d, 1.0 - r_d, eps)
  ok = general_loss <= (1.0 + max_increase) * general_start_loss
  best = jnp.argmin(jnp.where(ok, domain_loss, jnp.inf))
  return jnp.where(jnp.any(ok), r_d[best], jnp.nan)


def limited_domain_share(domain: Params, n, domain_tokens, max_tokens=jnp.inf,
                         eps: float = DCPT_EPS, grid_size: int = 10_001):
  """Usage 2: with only `domain_tokens` of domain data (each seen once), the domain share r_d that
  minimises the domain loss when training on D = domain_tokens / r_d tokens (the rest general data),
  with D at most `max_tokens`. Returns (r_d, D). Searched on a grid of shares in
  [domain_tokens / max_tokens, 1].
  """
  lowest = jnp.clip(domain_tokens / max_tokens, 1.0 / grid_size, 1.0)
  r_d = lowest + (1.0 - lowest) * jnp.linspace(0.0, 1.0, grid_size)
  tokens = domain_tokens / r_d
  best = jnp.argmin(dcpt_loss(domain, _float64(n), tokens, r_d, eps))
  return r_d[best], tokens[best]


def dcpt_optimal(params: Params, flops, r, eps: float = DCPT_EPS):
  """Usage 3: compute-optimal (N*, D*) for a budget C = 6 N D at a fixed share r > 0.

  At fixed r the D-CPT Law is a Chinchilla law with B' = B r^eta and a constant added to E, so
  N*, D* follow `chinchilla_optimal` with B'.
  """
  del eps  # the C term does not depend on N or D
  return chinchilla_optimal(dict(params, B=params['B'] * r ** params['eta']), flops)
