"""VRBO, the Variance Reduction Bilevel Optimizer (Yang, Ji and Liang, "Provably Faster Algorithms for Bilevel
Optimization", NeurIPS 2021).

A double-loop method with SARAH/SPIDER-type recursive estimators d_y of grad_y f and d_x of the hypergradient:
every ``period`` outer iterations they are recomputed at full batch, and in between each inner step corrects them
by the difference of the same-batch quantities at the current y and at the previous one. The inverse
Hessian-vector product is the truncated Neumann series of ``methods.stochastic.mrbo.joint_neumann`` (at full batch for a
refresh; jointly at the two points with the same batches for a correction).

One outer iteration t (0-based; the order of benchopt's benchmark_bilevel ``solvers/vrbo.py`` and its
``inner_loop_vrbo``), with p(y, x; B, j, w) = grad_x F_j(y, x) - grad2_xy f_B(y, x) w::

    if t % period == 0:                                         (full batches of f and F; t = 0 is one)
        w   = eta sum_{k<=K} (I - eta grad2_yy f)^k grad_y F(y, x)
        d_y = grad_y f(y, x),   d_x = p(y, x; full, full, w)
    x <- x - gamma d_x
    repeat n_inner_steps times:                                 (x fixed: the new x)
        draw an inner batch B and an outer batch j
        d_y <- d_y + grad_y f_B(y, x) - grad_y f_B(y_old, x)
        w, w_old = joint Neumann approximations of [grad2_yy f]^-1 grad_y F_j at (y, x) and at (y_old, x)
        d_x <- d_x + p(y, x; B, j, w) - p(y_old, x; B, j, w_old)
        y_old <- y,   y <- y - rho d_y

with constant steps (rho, Neumann step eta, gamma) = (``step_size``, ``step_size``, ``step_size / outer_ratio``)
(the benchmark's schedule, zero exponents) and its period: period = int((n_inner + n_outer) * ``period_frac``
/ inner batch size), at least 1. y_old starts at the starting y.

Two properties of this order, both the benchmark's and kept here (the paper's own pseudo-code could not be
checked for this port, so the benchmark's order is followed):

* the old point of every correction is (y_old, x) with the **current** x, so the corrections track the moves of
  y only; the moves of x are taken into account at the next full-batch refresh alone (for a quadratic f the
  corrections do not depend on x at all). Between refreshes the directions are thus stale in x, which is why a
  short period (the benchmark's tuned quadratic setting uses ``period_frac=0.01``) is needed for convergence.
* y_old is not reset at a refresh: after a refresh at t > 0 the first correction still adds the difference
  between the current y and the y before the last inner step of the previous iteration.

Sampling order per inner step: one inner batch B, one outer batch j, then the n_shia_steps Neumann batches (each
used at both points); a refresh draws none. Cost in ``oracle_calls``: a refresh counts
(2 + 2 n_shia_steps) n_inner / b_inner + n_outer / b_outer (a gradient of f with its cross product, the Neumann
Hessian-vector products, a gradient of F, all at full batch), each inner step 4 + 4 n_shia_steps inner and 2
outer minibatch calls (as one MRBO iteration).

With ``batch_size="full"`` the corrections are exact in y; with period 1 (a small ``period_frac``) every outer
iteration starts from the exact directions and VRBO approaches the stationary point of the truncated-Neumann
hypergradient (x* = argmin h for enough Neumann terms).

``v`` keeps the last Neumann result at (y, x) (same sign as AmIGO's v, +[grad2_yy f]^-1 grad_y F) for
inspection; it is never read.
"""
from __future__ import annotations

from typing import List

from torch import Tensor

from .base import StochasticSolver, check_count, check_positive
from .mrbo import joint_neumann, paired_estimates


class VRBO(StochasticSolver):
    """VRBO (Yang, Ji and Liang, NeurIPS 2021): a double loop along SARAH/SPIDER recursive estimators.

    Every ``period`` outer iterations the estimators d_y of grad_y f and d_x of the hypergradient (truncated
    Neumann series) are recomputed at full batch; each iteration then steps x <- x - gamma d_x and takes
    ``n_inner_steps`` inner steps, each correcting (d_y, d_x) by the difference of same-batch estimates at the
    current and the previous y and stepping y <- y - rho d_y; constant steps rho = step_size,
    gamma = step_size / outer_ratio (the full description: the docstring of the module
    [`methods.stochastic.vrbo`][methods.stochastic.vrbo]).

    Defaults: step_size 0.1, outer_ratio 1, n_inner_steps 10, n_shia_steps 10
    (Neumann terms beyond the first) as in the benchmark's ``parameters``, and period_frac 0.01, its tuned
    quadratic setting: its solver file's 128 refreshes the directions once per 128 epochs, and since x moves
    along a direction that ignores the moves of x until the next refresh, it made no progress on our tests.

    Args:
        n_inner_steps: the inner steps (corrections and steps on y) per outer iteration.
        n_shia_steps: the Neumann terms beyond the first.
        period_frac: period = int((n_inner + n_outer) * period_frac / inner batch size), at least 1.
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.


    Attributes:
        period: the outer iterations between two full-batch recomputations of the directions.
        d_y: the recursive estimator of grad_y f.
        d_x: the recursive estimator of the hypergradient.
        y_old: the y before the last inner step (the old point of the next correction).
        v: the last Neumann approximation of [grad2_yy f]^-1 grad_y F at (y, x) (diagnostic; never read).
    """

    name = "VRBO"
    uses_v = False

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 n_inner_steps: int = 10, n_shia_steps: int = 10, period_frac: float = 0.01, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.n_inner_steps = check_count(n_inner_steps, "n_inner_steps")
        self.n_shia_steps = check_count(n_shia_steps, "n_shia_steps", 0)
        self.period_frac = check_positive(period_frac, "period_frac")
        self.period = max(1, int((self.inner.n + self.outer.n) * self.period_frac / self.inner.batch_size))
        self.y_old = self.y.clone()
        self.d_y, self.d_x = self.y.new_zeros(self.y.shape), self.x.new_zeros(self.x.shape)

    def _refresh(self, eta: float) -> None:
        """The full-batch directions at (y, x)."""
        y, x, full = self.y, self.x, self.inner.full()
        gy, gx = self.grad(self.outer, y, x, self.outer.full(), "yx")
        (w,) = joint_neumann(self, ((y, x),), (gy,), self.n_shia_steps, eta, full=True)
        g, _, jw = self.grad_and_products(y, x, w, full)
        self.d_y, self.d_x, self.v = g, gx - jw, w

    def _inner_step(self, rho: float, eta: float) -> None:
        """One recursive correction of (d_y, d_x) between y_old and y at the current x, then a step on y."""
        y, x = self.y, self.x
        g, p, w, g0, p0 = paired_estimates(self, (y, x), (self.y_old, x), self.n_shia_steps, eta)
        self.d_y = self.d_y + (g - g0)
        self.d_x = self.d_x + (p - p0)
        self.v = w
        self.y_old = y
        self.y = y - rho * self.d_y

    def _step(self) -> None:
        rho, eta, gamma = self.lr(self.step_size), self.lr(self.step_size), self.lr(self.outer_step_size)
        if self.t % self.period == 0:
            self._refresh(eta)
        self.x = self.x - gamma * self.d_x
        for _ in range(self.n_inner_steps):
            self._inner_step(rho, eta)

    def _state(self) -> List[Tensor]:
        return super()._state() + [self.d_y, self.d_x, self.y_old]

    def __repr__(self) -> str:
        return (f"VRBO(step_size={self.step_size}, outer_ratio={self.outer_ratio}, "
                f"n_inner_steps={self.n_inner_steps}, n_shia_steps={self.n_shia_steps}, period={self.period}, "
                f"t={self.t})")
