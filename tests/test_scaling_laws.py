"""lmjax.scaling.laws: each law against a float64 numpy transcription of its formula, the log-sum-exp
fitting coordinates against the natural form, and every usage against scipy.optimize on that numpy law."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from lmjax import errors
from lmjax.scaling import laws

# Published Chinchilla fit (Hoffmann et al. 2022, arXiv 2203.15556, eq. 10).
HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
DCPT = dict(E=1.6, A=250.0, alpha=0.32, B=60.0, beta=0.28, eta=0.6, C=0.25, gamma=0.3)
GENERAL = dict(E=1.7, A=300.0, alpha=0.33, B=40.0, beta=0.3, eta=0.5, C=0.08, gamma=0.25)
EPS = laws.DCPT_EPS


def np_dcpt(p, n, d, r, eps=EPS):
  return p['E'] + p['A'] * n ** -p['alpha'] + p['B'] * r ** p['eta'] * d ** -p['beta'] + p['C'] * (
      r + eps) ** -p['gamma']


def _points(seed=0, size=64):
  rng = np.random.default_rng(seed)
  return dict(n=10 ** rng.uniform(6, 11, size), d=10 ** rng.uniform(7, 12, size),
              r=np.concatenate([[0.0, 1.0], rng.uniform(0, 1, size - 2)]),
              k=rng.uniform(0.5, 3.0, size))


def test_natural_forms_match_numpy_formulas():
  x = _points()
  with jax.enable_x64(True):
    np.testing.assert_allclose(
        laws.chinchilla_loss(HOFFMANN, x['n'], x['d']),
        1.69 + 406.4 * x['n'] ** -0.34 + 410.7 * x['d'] ** -0.28, rtol=1e-13)
    np.testing.assert_allclose(laws.dcpt_loss(DCPT, x['n'], x['d'], x['r']),
                               np_dcpt(DCPT, x['n'], x['d'], x['r']), rtol=1e-13)
    cross = dict(DCPT, F=0.3, mu=0.7)
    np.testing.assert_allclose(laws.cross_domain_loss(cross, x['n'], x['d'], x['r'], x['k']),
                               np_dcpt(DCPT, x['n'], x['d'], x['r']) + 0.3 * x['k'] ** -0.7,
                               rtol=1e-13)
  assert laws.domain_coefficient(2.0, 0.5, w1=1.5, w2=4.0) == pytest.approx(1.5 / 2.0 + 4.0 * 0.5)


@pytest.mark.parametrize('name, params', [
    ('chinchilla', HOFFMANN), ('dcpt', DCPT), ('cross_domain', dict(DCPT, F=0.3, mu=0.7))])
def test_fitting_coordinates_round_trip_and_match_natural_form(name, params):
  form = laws.form(name)
  x = _points(1)
  cols = {k: x[k] for k in form.inputs}
  with jax.enable_x64(True):
    theta = form.to_theta(params)
    back = form.to_params(theta)
    for k in form.params:
      assert float(back[k]) == pytest.approx(params[k], rel=1e-13), k
    np.testing.assert_allclose(np.exp(form.log_loss(theta, cols)), form.loss(params, **cols),
                               rtol=1e-12)


def test_dcpt_log_form_is_finite_with_finite_gradient_at_zero_share():
  # r = 0 (no data of this kind): r^eta is exactly 0; the fit must see a finite loss and gradient.
  form = laws.dcpt_form()
  cols = dict(n=np.array([1e8, 1e9]), d=np.array([1e9, 1e10]), r=np.array([0.0, 0.0]))
  with jax.enable_x64(True):
    theta = form.to_theta(DCPT)
    np.testing.assert_allclose(np.exp(form.log_loss(theta, cols)),
                               np_dcpt(dict(DCPT, B=0.0), cols['n'], cols['d'], 0.0), rtol=1e-12)
    grad = jax.grad(lambda t: jnp.sum(form.log_loss(t, cols)))(theta)
    assert np.all(np.isfinite(grad))
    assert float(grad[2]) == 0.0 and float(grad[7]) == 0.0  # b and log eta do not act at r = 0


def test_dcpt_dloss_dr_matches_finite_difference():
  n, d, r = 1e9, 3e9, np.array([0.05, 0.3, 0.9])
  h = 1e-6
  fd = (np_dcpt(DCPT, n, d, r + h) - np_dcpt(DCPT, n, d, r - h)) / (2 * h)
  with jax.enable_x64(True):
    np.testing.assert_allclose(laws.dcpt_dloss_dr(DCPT, n, d, r), fd, rtol=1e-6)
  assert np.all(fd < 0)  # this law falls in r where it is used


def test_form_rejects_unknown_name():
  with pytest.raises(errors.ConfigError, match="scaling law 'kaplan'.*chinchilla, dcpt, cross_domain"):
    laws.form('kaplan')


def test_hoffmann_grid_is_appendix_d2():
  grid = laws.HOFFMANN_GRID
  assert grid.shape == (4500, 5)
  for col, values in enumerate([range(0, 30, 5), range(0, 30, 5), [-1, -.5, 0, .5, 1],
                                [0, .5, 1, 1.5, 2], [0, .5, 1, 1.5, 2]]):
    assert sorted(set(grid[:, col])) == list(values)


@pytest.mark.parametrize('params', [HOFFMANN, dict(E=1.82, A=482.01, B=2085.43, alpha=0.3478,
                                                   beta=0.3658)])
def test_chinchilla_optimal_matches_numeric_minimum_on_isoflop(params):
  for flops in [1e18, 5.76e23, 1e26]:
    def loss_at(log_n):
      n = np.exp(log_n)
      return params['E'] + params['A'] * n ** -params['alpha'] + params['B'] * (
          flops / (6 * n)) ** -params['beta']
    res = optimize.minimize_scalar(loss_at, bounds=(np.log(1e3), np.log(1e16)), method='bounded',
                                   options=dict(xatol=1e-10))
    with jax.enable_x64(True):
      n_opt, d_opt = (float(v) for v in laws.chinchilla_optimal(params, flops))
    assert float(n_opt) == pytest.approx(np.exp(res.x), rel=1e-5)
    assert float(6 * n_opt * d_opt) == pytest.approx(flops, rel=1e-12)


def test_chinchilla_optimal_exponents_are_hoffmann_table_2():
  # Hoffmann et al. 2022, Table 2, approach 3: N_opt ~ C^0.46, D_opt ~ C^0.54 (rounded to 2 digits;
  # from the unrounded fit, so the rounded eq. 10 parameters give them to within 0.01).
  with jax.enable_x64(True):
    n1, d1 = (float(v) for v in laws.chinchilla_optimal(HOFFMANN, 1e20))
    n2, d2 = (float(v) for v in laws.chinchilla_optimal(HOFFMANN, 1e24))
  a, b = np.log10(n2 / n1) / 4, np.log10(d2 / d1) / 4
  assert a == pytest.approx(0.46, abs=0.01) and b == pytest.approx(0.54, abs=0.01)
  assert a + b == pytest.approx(1.0, abs=1e-12)


def test_dcpt_optimal_matches_numeric_minimum_at_fixed_share():
  for r in [0.1, 0.5, 1.0]:
    flops = 1e21
    loss_at = lambda log_n: np_dcpt(DCPT, np.exp(log_n), flops / (6 * np.exp(log_n)), r)
    res = optimize.minimize_scalar(loss_at, bounds=(np.log(1e3), np.log(1e16)), method='bounded',
                                   options=dict(xatol=1e-10))
    with jax.enable_x64(True):
      n_opt, d_opt = (float(v) for v in laws.dcpt_optimal(DCPT, flops, r))
    assert float(n_opt) == pytest.approx(np.exp(res.x), rel=1e-5)
    assert float(d_opt) == pytest.approx(flops / (6 * np.exp(res.x)), rel=1e-5)


def test_tradeoff_share_is_largest_share_within_general_budget():
  # Domain loss falls in r_d here and general loss rises in r_d, so the answer is the r_d where the
  # general loss reaches its cap: the root that scipy's brentq finds on the numpy laws.
  n, d = 1.8e9, 5e9
  start = np_dcpt(GENERAL, n, d, 1.0) * 0.99  # starting model a little better than r_g = 1
  cap = 1.03 * start
  root = optimize.brentq(lambda r_d: np_dcpt(GENERAL, n, d, 1 - r_d) - cap, 0.0, 1.0, xtol=1e-12)
  grid_r = np.linspace(0, 1, 100_001)
  assert np.all(np.diff(np_dcpt(DCPT, n, d, grid_r)) < 0)
  with jax.enable_x64(True):
    r_d = float(laws.tradeoff_share(DCPT, GENERAL, n, d, start, 0.03, grid_size=100_001))
  assert r_d <= root and r_d == pytest.approx(root, abs=1e-5)
  with jax.enable_x64(True):  # an unreachable cap: no share qualifies
    assert np.isnan(laws.tradeoff_share(DCPT, GENERAL, n, d, 0.5 * start, 0.0))


def test_limited_domain_share_matches_bounded_scalar_minimum():
  n, domain_tokens = 1.8e9, 2e8
  loss_at = lambda r: np_dcpt(DCPT, n, domain_tokens / r, r)
  for max_tokens, lowest in [(np.inf, 1.0 / 100_001), (4e8, 0.5)]:
    res = optimize.minimize_scalar(loss_at, bounds=(lowest, 1.0), method='bounded',
                                   options=dict(xatol=1e-10))
    with jax.enable_x64(True):
      r_d, tokens = laws.limited_domain_share(DCPT, n, domain_tokens, max_tokens, grid_size=100_001)
    assert float(r_d) == pytest.approx(res.x, abs=2e-5)
    assert float(tokens) == pytest.approx(domain_tokens / float(r_d), rel=1e-12)
    assert float(tokens) <= max_tokens * (1 + 1e-12)
