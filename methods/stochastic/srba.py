"""SRBA, the Stochastic Recursive Bilevel Algorithm (Dagreou, Moreau, Vaiter and Ablin, "A Lower Bound and a
Near-Optimal Algorithm for Bilevel Empirical Risk Minimization", AISTATS 2024).

SOBA's three directions (see ``methods.stochastic.soba``) estimated SARAH-style: every ``period`` iterations they are
recomputed at full batch, and in between each is corrected by the difference of the same-batch quantities at
the current and the previous iterate. With z = (y, v, x), z_old the previous iterate and, for a batch i of f
and j of F, the per-batch directions

    D_y^{ij}(z) = grad_y f_i(y, x)
    D_v^{ij}(z) = grad2_yy f_i(y, x) v + grad_y F_j(y, x)
    D_x^{ij}(z) = grad2_xy f_i(y, x) v + grad_x F_j(y, x)

iteration t (0-based) is::

    t % period == 0:  d = D(z)                                      (full batches of f and F)
    otherwise:        d = d + D^{ij}(z) - D^{ij}(z_old)             (one block i of f, one block j of F)
    z_old <- z
    y <- y - rho d_y,   v <- v - rho d_v,   x <- x - gamma d_x

with constant steps rho = ``step_size`` and gamma = rho / ``outer_ratio``, and the period of benchopt's
benchmark_bilevel: period = int((n_inner + n_outer) * ``period_frac`` / inner batch size), at least 1 (so
the full-batch passes cost about ``period_frac`` of the minibatch work between them). The first iteration
(t = 0) is a full-batch one. Sampling order of a recursive iteration: one block of the inner oracle, then one
of the outer oracle (a full-batch iteration draws none); both are used at z and at z_old. With period 1
(e.g. ``batch_size="full"``) SRBA is deterministic gradient descent on the three directions.

Cost: a full-batch iteration counts 2 n_inner / b_inner + n_outer / b_outer oracle calls, a recursive one
6 (a gradient with its two products and an outer gradient, at two points).
"""
from __future__ import annotations

from typing import List

from .base import StochasticSolver, check_positive


class SRBA(StochasticSolver):
    """SRBA (Dagreou et al., AISTATS 2024): SOBA's directions as SARAH-style recursive estimates.

    Every ``period`` iterations (t = 0 included) the directions d are recomputed at full batch; in between,
    d <- d + D^{ij}(z) - D^{ij}(z_old) on one block i of f and j of F, z = (y, v, x) and z_old the previous
    iterate; then y <- y - rho d_y, v <- v - rho d_v, x <- x - gamma d_x with constant steps rho = step_size,
    gamma = rho / outer_ratio (the full description: the docstring of the module
    [`methods.stochastic.srba`][methods.stochastic.srba]).
    Defaults: step_size 0.1, outer_ratio 1, period_frac 0.5 (the benchmark's).

    Args:
        period_frac: period = int((n_inner + n_outer) * period_frac / inner batch size), at least 1.
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.


    Attributes:
        period: the iterations between two full-batch recomputations of the directions.
        d_y: the current recursive direction of y.
        d_v: the current recursive direction of v.
        d_x: the current recursive direction of x.
        y_old: the previous y (where the last directions were evaluated).
        v_old: the previous v.
        x_old: the previous x.
    """

    name = "SRBA"

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 period_frac: float = 0.5, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.period_frac = check_positive(period_frac, "period_frac")
        self.period = max(1, int((self.inner.n + self.outer.n) * self.period_frac / self.inner.batch_size))
        self.y_old, self.v_old, self.x_old = self.y.clone(), self.v.clone(), self.x.clone()
        self.d_y, self.d_v, self.d_x = self.y.new_zeros(self.y.shape), self.y.new_zeros(self.y.shape), \
            self.x.new_zeros(self.x.shape)

    def _directions(self, y, v, x, bi, bo):
        """(D_y, D_v, D_x) at (y, v, x) on the inner batch ``bi`` and the outer batch ``bo``."""
        g, hv, jv = self.grad_and_products(y, x, v, bi)
        gy, gx = self.grad(self.outer, y, x, bo, "yx")
        return g, hv, jv, gy, gx

    def _step(self) -> None:
        rho, gamma = self.lr(self.step_size), self.lr(self.outer_step_size)
        if self.t % self.period == 0:
            g, hv, jv, gy, gx = self._directions(self.y, self.v, self.x, self.inner.full(), self.outer.full())
            self.d_y, self.d_v, self.d_x = g, hv + gy, jv + gx
        else:
            bi, bo = self.inner.sample(), self.outer.sample()
            g, hv, jv, gy, gx = self._directions(self.y, self.v, self.x, bi, bo)
            g0, hv0, jv0, gy0, gx0 = self._directions(self.y_old, self.v_old, self.x_old, bi, bo)
            self.d_y = self.d_y + (g - g0)
            self.d_v = self.d_v + ((hv - hv0) + (gy - gy0))
            self.d_x = self.d_x + ((jv - jv0) + (gx - gx0))
        self.y_old, self.v_old, self.x_old = self.y, self.v, self.x
        self.y = self.y - rho * self.d_y
        self.v = self.v - rho * self.d_v
        self.x = self.x - gamma * self.d_x

    def _state(self) -> List:
        return super()._state() + [self.d_y, self.d_v, self.d_x, self.y_old, self.v_old, self.x_old]
