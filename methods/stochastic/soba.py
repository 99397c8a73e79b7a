"""SOBA, the StOchastic Bilevel Algorithm (Dagreou, Ablin, Vaiter and Moreau, NeurIPS 2022).

y, v and x move together along one minibatch estimate each of the three directions (Section 2, the
directions D_y, D_v, D_x, and the SOBA update of Algorithm 1), with i a sample of f and j of F::

    D_y = grad_y f_i(y, x)
    D_v = grad2_yy f_i(y, x) v + grad_y F_j(y, x)
    D_x = grad2_xy f_i(y, x) v + grad_x F_j(y, x)
    y <- y - rho_t D_y,   v <- v - rho_t D_v,   x <- x - gamma_t D_x

with decreasing steps rho_t = step_size / (t + 1)^decay, gamma_t = rho_t / outer_ratio; ``decay`` = 1/2 is the
schedule of the paper's O(log T / sqrt T) theorem and benchopt's benchmark_bilevel; with full batches and
``decay=0`` SOBA is the deterministic dynamics of the framework (linear convergence on a strongly convex
value function).
"""
from __future__ import annotations

from .base import StochasticSolver, check_positive


class SOBA(StochasticSolver):
    """SOBA (Dagreou et al., NeurIPS 2022): y, v and x step together along one minibatch estimate per direction.

    With i a sample of f and j of F: y <- y - rho_t grad_y f_i, v <- v - rho_t (grad2_yy f_i v + grad_y F_j),
    x <- x - gamma_t (grad2_xy f_i v + grad_x F_j), where rho_t = step_size / (t + 1)^decay and
    gamma_t = rho_t / outer_ratio (the full description: the docstring of the module
    [`methods.stochastic.soba`][methods.stochastic.soba]).
    Defaults: step_size 0.1, outer_ratio 1, decay 1/2 (the benchmark's).

    Args:
        decay: the exponent of the step-size schedule (0: constant steps).
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.
    """

    name = "SOBA"

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 decay: float = 0.5, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.decay = check_positive(decay, "decay", allow_zero=True)

    def _step(self) -> None:
        rho = self.lr(self.step_size, self.decay)
        gamma = self.lr(self.outer_step_size, self.decay)
        bi, bo = self.inner.sample(), self.outer.sample()
        d_y, hv, jv = self.grad_and_products(self.y, self.x, self.v, bi)
        gy, gx = self.grad(self.outer, self.y, self.x, bo, "yx")
        self.y = self.y - rho * d_y
        self.v = self.v - rho * (hv + gy)
        self.x = self.x - gamma * (jv + gx)
