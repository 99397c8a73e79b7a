"""StocBiO, the Stochastic Bilevel Optimizer (Ji, Yang and Liang, "Bilevel Optimization: Convergence Analysis
and Enhanced Design", ICML 2021).

A two-loop method: SGD on y (warm-started from the last iteration's y), then the hypergradient with the inverse
Hessian-vector product [grad2_yy f]^-1 grad_y F replaced by a truncated Neumann series whose factors are
Hessians of independent minibatches,

    eta sum_{k=0}^{K} prod_{j=1}^{k} (I - eta grad2_yy f_{B_j}) b     ->  [grad2_yy f]^-1 b  as K -> infinity

(with full batches the series converges for 0 < eta < 2 / L, L the largest eigenvalue of f's Hessian). One outer
iteration (the variant of benchopt's benchmark_bilevel), with fresh minibatches B of f and one minibatch j of
F::

    repeat n_inner_steps times:   y <- y - rho grad_y f_B(y, x)                        (a fresh B each step)
    g_y, g_x = grad_y F_j(y, x), grad_x F_j(y, x)
    r = s = g_y;  repeat n_shia_steps (K) times:   r <- r - eta grad2_yy f_B(y, x) r,  s <- s + r   (fresh B)
    w = eta s                                                          (approximates [grad2_yy f]^-1 g_y)
    x <- x - gamma (g_x - grad2_xy f_B(y, x) w)                                        (a fresh B)

with constant steps (rho, eta, gamma) = (step_size, step_size, step_size / outer_ratio) (the benchmark's
schedule with zero exponents; the Neumann step eta is the same ``step_size``). No linear-system variable is
carried between iterations: ``v`` only keeps the last Neumann result w (same sign as AmIGO's v, +H^-1 g_y) for
inspection, it is never read.

Sampling order per iteration (the benchmark's): n_inner_steps inner batches (y), one outer batch (g_y, g_x),
n_shia_steps inner batches (Neumann), one inner batch (the cross product). Cost in ``oracle_calls``:
n_inner_steps + 2 n_shia_steps + 2 inner and 1 outer minibatch calls (33 by default).

With ``batch_size="full"`` every Hessian factor is the same and w is the deterministic truncated Neumann series
eta sum_{k<=K} (I - eta H)^k g_y; StocBiO then converges (small enough steps) to the fixed point of that
K-truncated hypergradient, which differs from x* by the truncation bias (of order (1 - eta mu)^(K+1), mu the
smallest eigenvalue of f's Hessian), not to x* itself.

The y loop and the outer update are ``methods.stochastic.amigo``'s (``TwoLoopImplicit``, shared with AmIGO).
"""
from __future__ import annotations

from torch import Tensor

from .amigo import TwoLoopImplicit
from .base import StochasticSolver, check_count


def stochastic_neumann(solver: StochasticSolver, b: Tensor, n_steps: int, eta: float) -> Tensor:
    """eta sum_{k=0}^{n_steps} prod_{j<=k} (I - eta grad2_yy f_{B_j}) b at the solver's (y, x), one fresh inner
    batch B_j per factor: an approximation of [grad2_yy f]^-1 b."""
    r = s = b
    for _ in range(n_steps):
        r = r - eta * solver.hvp(solver.y, solver.x, r, solver.inner.sample())
        s = s + r
    return eta * s


class StocBiO(TwoLoopImplicit):
    """StocBiO (Ji, Yang and Liang, ICML 2021): SGD on y, then a step on x with a stochastic Neumann series.

    Per iteration: ``n_inner_steps`` SGD steps on y; w = eta sum_{k<=K} prod_{j<=k} (I - eta grad2_yy f_{B_j}) g_y
    (K = ``n_shia_steps``, a fresh batch per factor) approximates [grad2_yy f]^-1 g_y, g_y = grad_y F_j; then
    x <- x - gamma (grad_x F_j - grad2_xy f_B w), with rho = eta = step_size and gamma = step_size / outer_ratio
    (the full description: the docstring of the module [`methods.stochastic.stocbio`][methods.stochastic.stocbio]).
    Defaults (the
    benchmark's): step_size 0.1, outer_ratio 1, n_inner_steps 10 (SGD steps on y), n_shia_steps 10.

    Args:
        n_shia_steps: K, the Neumann terms beyond the first (0 gives w = eta g_y).
        **kwargs: ``step_size``, ``outer_ratio``, ``n_inner_steps`` (SGD steps on y) and ``max_norm``, as in
            [`AmIGO`][methods.stochastic.AmIGO] and [`StochasticSolver`][methods.stochastic.StochasticSolver].

    Attributes:
        v: the last Neumann approximation of [grad2_yy f]^-1 grad_y F (diagnostic; not carried, never read).
    """

    name = "StocBiO"
    uses_v = False
    _counts = ("n_inner_steps", "n_shia_steps")

    def __init__(self, inner, outer, params, hparams, *, n_shia_steps: int = 10, **kwargs):
        super().__init__(inner, outer, params, hparams, **kwargs)
        self.n_shia_steps = check_count(n_shia_steps, "n_shia_steps", 0)

    def _solve(self, g_y: Tensor) -> Tensor:
        self.v = stochastic_neumann(self, g_y, self.n_shia_steps, self.lr(self.step_size))
        return self.v
