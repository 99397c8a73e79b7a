"""MRBO, the Momentum-based Recursive Bilevel Optimizer (Yang, Ji and Liang, "Provably Faster Algorithms for
Bilevel Optimization", NeurIPS 2021).

A single-loop method: y and x move together along STORM-type momentum-recursive estimators of the inner
gradient and of the hypergradient. Each estimator is corrected by the difference of the same-batch quantities
at the current point (y, x) and at the previous one (y_old, x_old), and shrunk towards the fresh estimate by
the momentum weight eta_t. The inverse Hessian-vector product [grad2_yy f]^-1 grad_y F is replaced by the
truncated stochastic Neumann series of ``joint_neumann``, evaluated *jointly* at both points with the same
inner batches (so the two hypergradient estimates of the difference share their noise).

One iteration t (0-based; the order of benchopt's benchmark_bilevel ``solvers/mrbo.py``), with B an inner
batch, j an outer batch and B_1..B_K the Neumann batches::

    g     = grad_y f_B(y, x),                       g_old = grad_y f_B(y_old, x_old)
    d_y  <- g + (1 - eta_t) (d_y - g_old)
    w, w_old = joint Neumann approximations of [grad2_yy f]^-1 grad_y F_j at (y, x) and at (y_old, x_old)
    p     = grad_x F_j(y, x) - grad2_xy f_B(y, x) w,   p_old = the same at (y_old, x_old) with w_old
    d_x  <- eta_t p + (1 - eta_t) (d_x + p - p_old)      (= p + (1 - eta_t) (d_x - p_old))
    (y_old, x_old) <- (y, x)
    y <- y - rho_t d_y,     x <- x - gamma_t d_x

The cross products grad2_xy f_B use the iteration's first inner batch B (the one of g), as in the benchmark.
Schedules lr_t = c / (t + 1)^e (the benchmark's ``init_lr_scheduler``): (rho_t, Neumann step, eta_t, gamma_t)
with constants (``step_size``, ``step_size``, ``eta``, ``step_size / outer_ratio``) and exponents
(1/3, 0, 2/3, 1/3). ``eta`` is the momentum weight's constant, in (0, 1] (a weight eta_t = 1 would make the
estimates plain minibatch ones); the Neumann step is ``step_size`` itself (it needs step_size < 2 / L, L the largest
eigenvalue of grad2_yy f).

First iteration (the benchmark's, kept): the memories start at **zero**, d_y = d_x = 0 and
(y_old, x_old) = (0, 0) — the origin, not the starting point. At t = 0 the "old" quantities are therefore the
derivatives at the origin on the iteration's batches: d_y = g - (1 - eta) grad_y f_B(0, 0) and
d_x = p - (1 - eta) p(0, 0), a bias that is carried by the recursion with the factor prod_s (1 - eta_s)
(-> 0 like exp(-3 eta t^{1/3}); only eta = 1 removes it at once — starting at the origin does not, the
first directions are then eta times the fresh ones).

Sampling order per iteration: one inner batch B, one outer batch j, then the n_shia_steps Neumann batches (each
used at both points). Cost in ``oracle_calls``: at each of the two points a gradient of f with its cross product
at B (2 units), n_shia_steps Hessian-vector products (2 units each) and one gradient of F:
4 + 4 n_shia_steps inner and 2 outer minibatch calls (46 by default).

With ``batch_size="full"`` every estimate is exact, the recursion only carries the first iteration's bias
(decaying as above), and MRBO is gradient descent on (y, x) with decreasing steps and the hypergradient of the
truncated Neumann series eta sum_{k<=K} (I - eta H)^k; with enough Neumann terms it approaches
x* = argmin h.

``v`` keeps the last Neumann result w (same sign as AmIGO's v, +[grad2_yy f]^-1 grad_y F) for inspection; it is
never read. ``joint_neumann`` is shared with VRBO (``methods.stochastic.vrbo``).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import Tensor

from .base import StochasticSolver, check_count, check_positive


def joint_neumann(solver: StochasticSolver, points: Sequence[Tuple[Tensor, Tensor]], rhs: Sequence[Tensor],
                  n_steps: int, eta: float, full: bool = False) -> Tuple[Tensor, ...]:
    """Truncated Neumann approximations of [grad2_yy f(y_i, x_i)]^-1 b_i at each point (y_i, x_i) of
    ``points``, b_i the matching entry of ``rhs``, all with the **same** inner batches::

        r_i = s_i = b_i;  repeat n_steps times:  draw B;  for each i:  r_i <- r_i - eta grad2_yy f_B(y_i, x_i) r_i,
                                                                        s_i <- s_i + r_i
        return eta s_i      (= eta sum_{k=0}^{n_steps} prod_{j<=k} (I - eta grad2_yy f_{B_j}(y_i, x_i)) b_i)

    One fresh inner batch per factor (``solver.inner.sample()``, n_steps draws in all), shared by the points
    (benchmark_bilevel's ``joint_shia_jax``); one point is the single-point series (its ``shia_jax``), and
    ``full=True`` uses the full batch for every factor (its ``shia_fb_jax``): the deterministic series
    eta sum_{k<=K} (I - eta H_i)^k b_i, which tends to H_i^-1 b_i for 0 < eta < 2 / L."""
    if len(points) != len(rhs) or not points:
        raise ValueError(f"joint_neumann needs one right-hand side per point, got {len(points)} points and "
                         f"{len(rhs)} right-hand sides")
    r, s = list(rhs), list(rhs)
    for _ in range(n_steps):
        batch = solver.inner.full() if full else solver.inner.sample()
        for i, (y, x) in enumerate(points):
            r[i] = r[i] - eta * solver.hvp(y, x, r[i], batch)
            s[i] = s[i] + r[i]
    return tuple(eta * si for si in s)


def check_momentum(value, name: str) -> float:
    """A momentum weight in (0, 1]."""
    value = check_positive(value, name)
    if value > 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value



def paired_estimates(solver: StochasticSolver, new, old, n_steps: int, eta: float):
    """At the points ``new`` = (y, x) and ``old`` = (y0, x0), on the same batches (one inner batch B, then one
    outer batch j, then the K Neumann batches): the inner gradient g = grad_y f_B and the hypergradient
    estimate p = grad_x F_j - grad2_xy f_B w, w the joint Neumann approximation of H^-1 grad_y F_j at each
    point. Returns (g, p, w) at ``new`` and (g0, p0) at ``old``."""
    (y, x), (y0, x0) = new, old
    bi, bo = solver.inner.sample(), solver.outer.sample()
    gy, gx = solver.grad(solver.outer, y, x, bo, "yx")
    gy0, gx0 = solver.grad(solver.outer, y0, x0, bo, "yx")
    w, w0 = joint_neumann(solver, (new, old), (gy, gy0), n_steps, eta)
    g, _, jw = solver.grad_and_products(y, x, w, bi)          # the gradient and cross product at batch B
    g0, _, jw0 = solver.grad_and_products(y0, x0, w0, bi)
    return g, gx - jw, w, g0, gx0 - jw0

class MRBO(StochasticSolver):
    """MRBO (Yang, Ji and Liang, NeurIPS 2021): single-loop steps along momentum-recursive (STORM) estimators.

    d_y <- g + (1 - eta_t) (d_y - g_old) and d_x <- p + (1 - eta_t) (d_x - p_old), with g = grad_y f_B and p the
    Neumann estimate of the hypergradient, at (y, x) and (on the same batches) at the previous iterate; then
    y <- y - rho_t d_y, x <- x - gamma_t d_x, with rho_t = step_size / (t + 1)^(1/3),
    gamma_t = rho_t / outer_ratio and eta_t = eta / (t + 1)^(2/3) (the full description: the docstring of the
    module ``methods.stochastic.mrbo``). Defaults (the benchmark's): step_size 0.1, outer_ratio 1,
    n_shia_steps 10, eta 0.5.

    Args:
        n_shia_steps: the Neumann terms beyond the first.
        eta: the constant of the momentum weight, in (0, 1].
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.


    Attributes:
        d_y: the momentum-recursive estimator of grad_y f (zero at the start).
        d_x: the momentum-recursive estimator of the hypergradient (zero at the start).
        y_old: the previous y (zero at the start, see the docstring of the module
            [`methods.stochastic.mrbo`][methods.stochastic.mrbo]).
        x_old: the previous x (zero at the start, likewise).
        v: the last Neumann approximation of [grad2_yy f]^-1 grad_y F at (y, x) (diagnostic; never read).
    """

    name = "MRBO"
    uses_v = False

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 n_shia_steps: int = 10, eta: float = 0.5, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.n_shia_steps = check_count(n_shia_steps, "n_shia_steps", 0)
        self.eta = check_momentum(eta, "eta")
        self.y_old, self.x_old = self.y.new_zeros(self.y.shape), self.x.new_zeros(self.x.shape)
        self.d_y, self.d_x = self.y.new_zeros(self.y.shape), self.x.new_zeros(self.x.shape)

    def _step(self) -> None:
        rho, gamma = self.lr(self.step_size, 1 / 3), self.lr(self.outer_step_size, 1 / 3)
        eta_n, eta = self.lr(self.step_size), self.lr(self.eta, 2 / 3)
        y, x = self.y, self.x
        g, p, w, g0, p0 = paired_estimates(self, (y, x), (self.y_old, self.x_old), self.n_shia_steps, eta_n)
        self.d_y = g + (1 - eta) * (self.d_y - g0)
        self.d_x = p + (1 - eta) * (self.d_x - p0)
        self.v = w
        self.y_old, self.x_old = y, x
        self.y = y - rho * self.d_y
        self.x = x - gamma * self.d_x

    def _state(self) -> List[Tensor]:
        return super()._state() + [self.d_y, self.d_x, self.y_old, self.x_old]

    def __repr__(self) -> str:
        return (f"MRBO(step_size={self.step_size}, outer_ratio={self.outer_ratio}, "
                f"n_shia_steps={self.n_shia_steps}, eta={self.eta}, t={self.t})")
