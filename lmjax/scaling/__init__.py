"""Scaling laws: parametric forms (laws), their fitting (fit), sweeps that produce the points (sweep),
plots (report)."""
