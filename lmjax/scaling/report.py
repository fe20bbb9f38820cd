"""Plots of a fitted sweep (PNG files drawn on matplotlib `Figure`s: no display, no pyplot state, so
the backend a notebook chose is left alone).

plot_sweep:    observed loss against CPT tokens, one panel per (loss, model size), one colour per
               domain share; lines are the fitted D-CPT Law, hollow markers the held-out runs,
               faint markers the early points left out of the fit (min_tokens).
plot_tradeoff: at each size and the largest token count, the fitted domain loss L_d(r_d) and
               general loss L_g(1 - r_d) over the domain share, with the general-loss cap and the
               share that usage (a) picks.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from lmjax import fs


def figure(rows: int, cols: int, size: tuple[float, float]):
  """(fig, axes[rows, cols]) on a bare `Figure`: `lmjax.fs.write_figure(fig, path)` writes it, nothing is shown and
  pyplot's backend and figure list are untouched (the plots of lmjax/experiments/ use it too)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=size)
  return fig, fig.subplots(rows, cols, squeeze=False)


def colours(count: int):
  """`count` colours of the viridis map."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  return matplotlib.colormaps['viridis'](np.linspace(0, 0.9, count))


def _dcpt(params, n, d, r, eps):
  """The D-CPT Law in numpy (plots need no JAX)."""
  p = {k: float(v) for k, v in params.items()}
  return (p['E'] + p['A'] * n ** -p['alpha'] + p['B'] * r ** p['eta'] * d ** -p['beta']
          + p['C'] * (r + eps) ** -p['gamma'])


def plot_sweep(table: Mapping[str, np.ndarray], fitted: Mapping, start: Sequence[Mapping],
               path: str) -> None:
  """Points and fitted curves, loss against tokens (see module docstring); writes `path`."""
  eps = fitted['eps']
  sizes = sorted(set(zip(table['n'], table['size'])))
  ratios = sorted(set(table['ratio']))
  fig, axes = figure(2, len(sizes), (4.2 * len(sizes), 7))
  start_by_n = {float(s['n']): s for s in start}
  for row, target in enumerate(('domain', 'general')):
    params = fitted[target]['params']
    for col, (n, size) in enumerate(sizes):
      ax = axes[row, col]
      for ratio, colour in zip(ratios, colours(len(ratios))):
        mask = (table['n'] == n) & (table['ratio'] == ratio)
        d, loss, held = table['tokens'][mask], table[f'{target}_loss'][mask], table['holdout'][mask]
        share = ratio if target == 'domain' else 1.0 - ratio
        early = d < fitted['min_tokens']  # not fitted: drawn faint
        for pick, alpha in ((~early, 1.0), (early, 0.3)):
          ax.scatter(d[pick & (held == 0)], loss[pick & (held == 0)], color=colour, s=14, alpha=alpha)
          ax.scatter(d[pick & (held == 1)], loss[pick & (held == 1)], facecolors='none',
                     edgecolors=colour, s=22, alpha=alpha)
        grid = np.geomspace(d.min(), d.max(), 100)
        ax.plot(grid, _dcpt(params, n, grid, share, eps), color=colour, lw=1,
                label=f'r_d={ratio:g}' + (' (held out)' if held.any() else ''))
      if float(n) in start_by_n:
        ax.axhline(start_by_n[float(n)][f'{target}_loss'], color='grey', ls=':', lw=1,
                   label='starting model')
      ax.set_xscale('log')
      ax.set_title(f'{target} loss, {size} (N={n:.3g})', fontsize=9)
      ax.set_xlabel('CPT tokens D')
      if col == 0:
        ax.set_ylabel(f'{target} validation loss')
  for row, target in enumerate(('domain', 'general')):
    f = fitted[target]
    text = f'fit R^2 {f["fitted"]["r2"]:.3f}'
    if 'held_out' in f:
      text += f', held-out R^2 {f["held_out"]["r2"]:.3f}'
    if f.get('warnings'):  # their first clause only: the whole sentences are in fit.json
      text += ''.join(f'\nWARNING: {w.split(":")[0].split(" within")[0]}' for w in f['warnings'])
    axes[row, 0].text(0.02, 0.02, text, transform=axes[row, 0].transAxes, fontsize=8)
  axes[0, -1].legend(fontsize=7)
  fig.suptitle('D-CPT Law fit: L = E + A/N^a + B r^eta/D^b + C/(r+eps)^g', fontsize=10)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=110)


def plot_tradeoff(fitted: Mapping, start: Sequence[Mapping], path: str) -> None:
  """Domain/general trade-off over the domain share at each size (see module docstring)."""
  eps = fitted['eps']
  uses = fitted['usages']
  fig, axes = figure(1, len(uses), (4.2 * len(uses), 3.6))
  r_d = np.linspace(0, 1, 501)
  for ax, use in zip(axes[0], uses):
    n, d = use['n'], use['tokens']
    ax.plot(r_d, _dcpt(fitted['domain']['params'], n, d, r_d, eps), label='domain loss L_d')
    ax.plot(r_d, _dcpt(fitted['general']['params'], n, d, 1 - r_d, eps), label='general loss L_g')
    if 'start_general_loss' in use:
      cap = use['start_general_loss'] * (1 + use['max_increase'])
      ax.axhline(cap, color='grey', ls=':', lw=1,
                 label=f'L_g cap (+{100 * use["max_increase"]:g}% over start)')
      if math.isfinite(use['tradeoff_share']):
        ax.axvline(use['tradeoff_share'], color='k', ls='--', lw=1,
                   label=f'chosen r_d={use["tradeoff_share"]:.3f}')
    ax.set_title(f'N={n:.3g}, D={d:.3g}', fontsize=9)
    ax.set_xlabel('domain share r_d')
    ax.set_ylabel('predicted loss')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fs.write_figure(fig, path, dpi=110)
