"""Moved to :mod:`fastjac.estimators.hutchinson`; kept so that ``fastjac.hutchinson`` imports still work."""
from .estimators.hutchinson import (PROBES, CGResult, ConvergenceWarning, conjugate_gradients, draw_probes,
                                    gram_matvec, hutchinson_cg, lanczos_quadrature, lanczos_tridiagonal)

__all__ = ["PROBES", "CGResult", "ConvergenceWarning", "conjugate_gradients", "draw_probes", "gram_matvec",
           "hutchinson_cg", "lanczos_quadrature", "lanczos_tridiagonal"]
