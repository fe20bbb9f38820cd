"""Fitting scaling laws: Huber loss on log-loss residuals, L-BFGS from a grid of starts, all in JAX.

Method of Hoffmann et al. 2022 (appendix D.2), as replicated by Besiroglu et al. 2024: minimise
  sum_i w_i Huber_delta(log L_hat(x_i; theta) - log L_i),   delta = 1e-3,
with L-BFGS from every point of a grid of initialisations and keep the best. Here every start runs
in one compiled computation: a small L-BFGS written with jax.lax (one objective evaluation per
iteration, so that vmap over starts wastes no work on line-search loops of unequal length), mapped
over the starts in vectorised batches. That screen runs every start for a few dozen iterations in
float32 (it only ranks the starts); the best few are then polished in float64 to a tight tolerance.
The result is deterministic for given inputs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import errors
from lmjax.scaling import laws


@dataclasses.dataclass(frozen=True)
class Options:
  """L-BFGS settings. screen_*: the pass over every start; polish_*: the best `polish` starts."""
  delta: float = 1e-3          # Huber threshold on log-loss residuals (Hoffmann et al. D.2)
  screen_iters: int = 50
  screen_ftol: float = 1e-7    # stop a start when an accepted step lowers f by < ftol * |f|
  polish: int = 8
  polish_iters: int = 3000
  polish_ftol: float = 1e-14
  gtol: float = 1e-14          # stop when max |gradient| <= gtol
  memory: int = 10             # L-BFGS history length
  batch_size: int = 512        # starts vectorised together (lax.map batch)


@dataclasses.dataclass(frozen=True)
class FitResult:
  """params: natural parameters; theta: fitting coordinates; objective: the summed Huber loss;
  start_objectives: [S] objective reached by each start in the screen; converged: whether the
  polished optimum met its stopping rule before the iteration cap."""
  form: laws.Form
  params: dict
  theta: np.ndarray
  objective: float
  start_objectives: np.ndarray
  converged: bool


def huber(x, delta: float):
  """Huber loss: x^2 / 2 for |x| <= delta, delta (|x| - delta / 2) beyond."""
  ax = jnp.abs(x)
  return jnp.where(ax <= delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def objective(theta_p, log_loss: Callable, cols, log_y_n, weights_n, delta: float):
  """sum_n w_n Huber(log_loss(theta, cols)_n - log_y_n)."""
  return jnp.sum(weights_n * huber(log_loss(theta_p, cols) - log_y_n, delta))


def lbfgs(fun: Callable, x0_p, max_iter: int, ftol: float, gtol: float, memory: int):
  """Minimises fun(x) from x0 with L-BFGS; pure JAX, one evaluation of fun per iteration.

  Each iteration tries x + tau d (d: the two-loop L-BFGS direction, Nocedal & Wright alg. 7.4). The
  step is kept if it satisfies the Armijo condition; then tau grows back towards 1. Otherwise x
  stays and tau shrinks by safeguarded quadratic interpolation (N&W section 3.5), and the next
  iteration retries. Stops when max |grad| <= gtol, when a kept step lowers f by at most ftol |f|,
  when tau underflows (no decrease possible at this precision), or after max_iter iterations.
  Returns (x_p, f, iterations, converged) with converged False only when stopped by max_iter.
  """
  value_and_grad = jax.value_and_grad(fun)
  p = x0_p.shape[0]
  dtype = x0_p.dtype
  f0, g0 = value_and_grad(x0_p)

  def direction(g, s_mp, y_mp, rho_m, head):
    q, alphas = g, []
    for j in range(memory):  # newest to oldest; unused slots have rho = 0 and contribute nothing
      i = (head - 1 - j) % memory
      a = rho_m[i] * jnp.dot(s_mp[i], q)
      alphas.append(a)
      q = q - a * y_mp[i]
    newest = (head - 1) % memory
    yy = jnp.dot(y_mp[newest], y_mp[newest])
    gamma = jnp.where(rho_m[newest] > 0, 1.0 / (rho_m[newest] * jnp.where(yy > 0, yy, 1.0)),
                      1.0 / jnp.maximum(jnp.linalg.norm(g), 1e-30))
    r = gamma * q
    for j in reversed(range(memory)):
      i = (head - 1 - j) % memory
      r = r + s_mp[i] * (alphas[j] - rho_m[i] * jnp.dot(y_mp[i], r))
    return -r

  def body(c):
    d = direction(c['g'], c['s'], c['y'], c['rho'], c['head'])
    slope = jnp.dot(c['g'], d)
    restart = ~(slope < 0)  # not a descent direction (or nan): forget the history, go downhill
    d = jnp.where(restart, -c['g'] / jnp.maximum(jnp.linalg.norm(c['g']), 1e-30), d)
    slope = jnp.dot(c['g'], d)
    rho = jnp.where(restart, 0.0, c['rho'])
    tau = c['tau']
    x_new = c['x'] + tau * d
    f_new, g_new = value_and_grad(x_new)
    accept = jnp.isfinite(f_new) & (f_new <= c['f'] + 1e-4 * tau * slope)
    s, y = x_new - c['x'], g_new - c['g']
    sy = jnp.dot(s, y)
    store = accept & (sy > 1e-10 * jnp.dot(y, y))  # keep only pairs with positive curvature
    h = c['head']
    s_mp = jnp.where(store, c['s'].at[h].set(s), c['s'])
    y_mp = jnp.where(store, c['y'].at[h].set(y), c['y'])
    rho = jnp.where(store, rho.at[h].set(1.0 / jnp.where(store, sy, 1.0)), rho)
    quad = tau * tau * (-slope) / (2.0 * (f_new - c['f'] - tau * slope))
    shrunk = jnp.where(jnp.isfinite(quad), jnp.clip(quad, 0.1 * tau, 0.5 * tau), 0.1 * tau)
    tau_next = jnp.where(accept, jnp.minimum(1.0, 2.0 * tau), shrunk)
    x = jnp.where(accept, x_new, c['x'])
    f = jnp.where(accept, f_new, c['f'])
    g = jnp.where(accept, g_new, c['g'])
    stalled = accept & (c['f'] - f_new <= ftol * jnp.abs(c['f']))
    done = stalled | (jnp.max(jnp.abs(g)) <= gtol) | (tau_next < 1e-14)
    return dict(x=x, f=f, g=g, s=s_mp, y=y_mp, rho=rho, head=jnp.where(store, (h + 1) % memory, h),
                tau=tau_next, it=c['it'] + 1, done=done)

  init = dict(x=x0_p, f=f0, g=g0, s=jnp.zeros((memory, p), dtype), y=jnp.zeros((memory, p), dtype),
              rho=jnp.zeros((memory,), dtype), head=jnp.asarray(0), tau=jnp.asarray(1.0, dtype),
              it=jnp.asarray(0), done=jnp.max(jnp.abs(g0)) <= gtol)
  out = jax.lax.while_loop(lambda c: (c['it'] < max_iter) & ~c['done'], body, init)
  return out['x'], out['f'], out['it'], out['done']


def _batched_map(fn, xs_b, batch_size: int):
  """lax.map of fn over the leading axis in vectorised batches. The input is padded with copies of
  its last row to a whole number of batches so that fn is compiled once (lax.map would compile the
  remainder batch separately)."""
  size = xs_b.shape[0]
  batch = min(batch_size, size)
  pad = -size % batch
  xs_b = jnp.concatenate([xs_b, jnp.repeat(xs_b[-1:], pad, axis=0)])
  out = jax.lax.map(fn, xs_b, batch_size=batch)
  return jax.tree.map(lambda a: a[:size], out)


@functools.partial(jax.jit, static_argnames=('log_loss', 'options'))
def _multistart(starts_sp, cols, log_y_n, weights_n, log_loss, options: Options):
  """Screens every start, polishes the best `options.polish`; returns (theta_p, f, converged, f_s)."""
  fun = functools.partial(objective, log_loss=log_loss, cols=cols, log_y_n=log_y_n,
                          weights_n=weights_n, delta=options.delta)
  # The screen only ranks starts, so it runs in float32 (about 3x faster on CPU); the polish that
  # decides the result runs in float64.
  f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
  fun32 = functools.partial(objective, log_loss=log_loss, cols=f32(cols), log_y_n=f32(log_y_n),
                            weights_n=f32(weights_n), delta=options.delta)
  screen = functools.partial(lbfgs, fun32, max_iter=options.screen_iters, ftol=options.screen_ftol,
                             gtol=options.gtol, memory=options.memory)
  x_sp, f_s, _, _ = _batched_map(screen, f32(starts_sp), options.batch_size)
  x_sp = x_sp.astype(starts_sp.dtype)
  f_s = jnp.where(jnp.isfinite(f_s), f_s, jnp.inf).astype(starts_sp.dtype)
  best = jnp.argsort(f_s)[:min(options.polish, starts_sp.shape[0])]  # stable: ties keep grid order
  polish = functools.partial(lbfgs, fun, max_iter=options.polish_iters, ftol=options.polish_ftol,
                             gtol=options.gtol, memory=options.memory)
  x_kp, f_k, _, conv_k = jax.vmap(polish)(x_sp[best])
  f_k = jnp.where(jnp.isfinite(f_k), f_k, jnp.inf)
  k = jnp.argmin(f_k)
  return x_kp[k], f_k[k], conv_k[k], f_s


def _check(form: laws.Form, data: Mapping[str, np.ndarray], loss) -> tuple[dict, np.ndarray]:
  """float64 columns for `form.inputs` and the loss; errors name the column and the first bad row."""
  loss = np.asarray(loss, np.float64)
  if loss.ndim != 1 or loss.size == 0:
    raise errors.DataError(f'loss: expected a non-empty 1-D array, got shape {loss.shape}')
  cols = {}
  for name in form.inputs:
    if name not in data:
      raise ValueError(f'{form.name} law needs column {name!r}; got columns {sorted(data)}')
    cols[name] = np.asarray(data[name], np.float64)
    if cols[name].shape != loss.shape:
      raise ValueError(f'column {name!r} has shape {cols[name].shape}, loss has {loss.shape}')
  checks = [('loss', loss, loss > 0, 'a positive finite value')]
  for name, col in cols.items():
    if name == 'r':
      checks.append((name, col, (col >= 0) & (col <= 1), 'a share in [0, 1]'))
    else:
      checks.append((name, col, col > 0, 'a positive finite value'))
  for name, col, ok, what in checks:
    bad = np.flatnonzero(~(ok & np.isfinite(col)))
    if bad.size:
      raise errors.DataError(f'row {bad[0]}: column {name!r} is {float(col[bad[0]])!r}; expected {what}')
  return cols, loss


def fit(form: laws.Form, data: Mapping[str, np.ndarray], loss, *, starts=None,
        weights=None, options: Options = Options()) -> FitResult:
  """Fits `form` to points (data[c][i] for c in form.inputs, loss[i]).

  starts: [S, len(theta)] initialisations in fitting coordinates (default: form.grid).
  weights: [P] per-point weights of the Huber sum (default 1; bootstrap passes resample counts).
  """
  cols, loss = _check(form, data, loss)
  starts = form.grid if starts is None else np.asarray(starts, np.float64)
  weights = np.ones_like(loss) if weights is None else np.asarray(weights, np.float64)
  with jax.enable_x64(True):
    theta, f, converged, f_s = _multistart(jnp.asarray(starts), cols, jnp.log(loss),
                                           jnp.asarray(weights), form.log_loss, options)
    theta = np.asarray(theta)
    params = {k: float(v) for k, v in form.to_params(jnp.asarray(theta)).items()}
  return FitResult(form=form, params=params, theta=theta, objective=float(f),
                   start_objectives=np.asarray(f_s), converged=bool(converged))


COLLAPSE = 1e-3  # an irreducible term E below this share of the smallest fitted loss has collapsed
EXPONENT_MAX = 10.0  # a fitted power-law exponent above this has made its term vanish (published: < 1)


def warnings(result: FitResult, loss) -> list[str]:
  """What makes a fit untrustworthy, as sentences (empty: none found):
  - the irreducible term collapsed: E < COLLAPSE x the smallest observed loss (e.g. E = 1e-12). The
    optimiser put all the loss into the power-law terms because the points do not pin E down (too
    few sizes or too short a token range); the exponents then absorb the plateau, and predictions
    beyond the fitted range, and the optima derived from them, are unreliable;
  - an exponent above EXPONENT_MAX (e.g. alpha = 6e45): its term is 0 everywhere the points are,
    because the losses barely vary along that input; the law then says nothing about it;
  - the polished optimum did not converge within the iteration cap."""
  out = []
  floor = float(np.min(np.asarray(loss, np.float64)))
  e = result.params.get('E')
  if e is not None and e < COLLAPSE * floor:
    out.append(f'irreducible term collapsed: E={e:.3g} < {COLLAPSE:g} x the smallest loss '
               f'{floor:.4g}; the points do not determine E (widen the range of N and D), so '
               'extrapolations and optima from this fit are unreliable')
  for name in ('alpha', 'beta', 'gamma', 'eta'):
    value = result.params.get(name)
    if value is not None and value > EXPONENT_MAX:
      out.append(f'exponent {name}={value:.3g} > {EXPONENT_MAX:g}: its term vanished, the points barely '
                 'vary along its input, so the law says nothing about that input')
  if not result.converged:
    out.append('the fit did not converge within Options.polish_iters iterations')
  return out


def predict(form: laws.Form, params: Mapping[str, float], data: Mapping[str, np.ndarray]):
  """The law's loss at the points in `data`, in float64 numpy."""
  with jax.enable_x64(True):
    cols = {k: jnp.asarray(np.asarray(data[k], np.float64)) for k in form.inputs}
    return np.asarray(form.loss(params, **cols))


def evaluate(form: laws.Form, params: Mapping[str, float], data: Mapping[str, np.ndarray], loss):
  """R^2 and RMSE of the law's loss against observed `loss` (e.g. on held-out points)."""
  cols, loss = _check(form, data, loss)
  pred = predict(form, params, cols)
  ss_res = float(np.sum((loss - pred) ** 2))
  ss_tot = float(np.sum((loss - loss.mean()) ** 2))
  return dict(r2=1.0 - ss_res / ss_tot if ss_tot > 0 else float('nan'),
              rmse=float(np.sqrt(ss_res / loss.size)))


@functools.partial(jax.jit, static_argnames=('log_loss', 'options'))
def _refit(theta_p, cols, log_y_n, weights_bn, log_loss, options: Options):
  def one(w_n):
    fun = functools.partial(objective, log_loss=log_loss, cols=cols, log_y_n=log_y_n, weights_n=w_n,
                            delta=options.delta)
    return lbfgs(fun, theta_p, max_iter=options.polish_iters, ftol=options.polish_ftol,
                 gtol=options.gtol, memory=options.memory)[0]
  return _batched_map(one, weights_bn, options.batch_size)


def resample_counts(points: int, resamples: int, seed: int = 0) -> np.ndarray:
  """[resamples, points] counts of each point in a draw of `points` with replacement."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(points, np.full(points, 1.0 / points), size=resamples)


def bootstrap_samples(result: FitResult, data: Mapping[str, np.ndarray], loss, counts_bn,
                      options: Options = Options()) -> dict:
  """Refits `result` once per row of counts_bn (used as Huber weights), each from the full-data
  optimum, as Besiroglu et al. 2024 do; the refits run vectorised. Returns {param: [B] values}."""
  cols, loss = _check(result.form, data, loss)
  with jax.enable_x64(True):
    theta_bp = _refit(jnp.asarray(result.theta), cols, jnp.log(loss),
                      jnp.asarray(counts_bn, jnp.float64), result.form.log_loss, options)
    return {k: np.asarray(v) for k, v in jax.vmap(result.form.to_params)(theta_bp).items()}


def bootstrap(result: FitResult, data: Mapping[str, np.ndarray], loss, *, resamples: int = 200,
              level: float = 0.95, seed: int = 0, options: Options = Options()) -> dict:
  """Percentile bootstrap intervals {param: (low, high)} at confidence `level` for a fit."""
  counts_bn = resample_counts(np.asarray(loss).size, resamples, seed)
  samples = bootstrap_samples(result, data, loss, counts_bn, options)
  tail = 50.0 * (1.0 - level)
  return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail)))
          for k, v in samples.items()}
