"""AmIGO, Amortized Implicit Gradient Optimization (Arbel and Mairal, "Amortized Implicit Differentiation for
Stochastic Bilevel Optimization", ICLR 2022).

A two-loop method whose inner loops are amortized by warm starts: y and the linear-system variable v start each
outer iteration where the last one left them, so a constant, small number of SGD steps per iteration keeps them
close to y*(x) and to v*(x) = [grad2_yy f]^-1 grad_y F. One outer iteration (the variant of benchopt's
benchmark_bilevel, SGD for both inner problems), with fresh minibatches B of f and one minibatch j of F::

    repeat n_inner_steps times:   y <- y - rho grad_y f_B(y, x)                       (a fresh B each step)
    g_y, g_x = grad_y F_j(y, x), grad_x F_j(y, x)
    repeat n_inner_steps times:   v <- v - eta (grad2_yy f_B(y, x) v - g_y)            (a fresh B each step)
    x <- x - gamma (g_x - grad2_xy f_B(y, x) v)                                        (a fresh B)

The v loop is SGD on the quadratic 1/2 v^T grad2_yy f v - g_y . v, so v tends to **+** [grad2_yy f]^-1 grad_y F
and the hypergradient estimate is g_x - grad2_xy f v. This is the opposite sign of SOBA/SABA/SRBA's v (which
tend to -v*, see ``methods.stochastic.base``); AmIGO keeps the benchmark's convention.

Steps are constant, (rho, eta, gamma) = (step_size, step_size, step_size / outer_ratio): the benchmark's
schedule with zero exponents. Everything after the y loop is taken at the new y and the current x.

Sampling order per iteration (the benchmark's): n_inner_steps inner batches (y), one outer batch (g_y, g_x),
n_inner_steps inner batches (v), one inner batch (the cross product). Cost in ``oracle_calls``: n_inner_steps
gradients of f, n_inner_steps Hessian-vector products and one cross product of f (2 units each: a gradient and
its double backward), one gradient of F: 3 n_inner_steps + 3 minibatch calls (33 by default).

With ``batch_size="full"`` every batch is the full one: AmIGO is then gradient descent on x with a
hypergradient from warm-started gradient descent on y and on v. Its fixed points have y = y*(x),
v = [grad2_yy f]^-1 grad_y F exactly, hence x = x* (no truncation bias, unlike StocBiO), and with small enough
steps it converges there linearly; with many inner steps one iteration is a step of exact hypergradient
descent, x <- x - gamma grad h(x).

``sgd_on_y`` and the outer iteration (``TwoLoopImplicit``) are shared with StocBiO (``methods.stochastic.stocbio``),
which differs only in how it approximates [grad2_yy f]^-1 g_y.
"""
from __future__ import annotations

from torch import Tensor

from .base import StochasticSolver, check_count


def sgd_on_y(solver: StochasticSolver, n_steps: int, lr: float) -> None:
    """``n_steps`` SGD steps on the solver's y at its current x, a fresh inner batch each step (warm start:
    from the current y, which is rebound)."""
    y, x = solver.y, solver.x
    for _ in range(n_steps):
        y = y - lr * solver.grad(solver.inner, y, x, solver.inner.sample())[0]
    solver.y = y


class TwoLoopImplicit(StochasticSolver):
    """The outer iteration shared by AmIGO and StocBiO (``methods.stochastic.stocbio``); subclasses give ``_solve``.

    One step: ``sgd_on_y`` (``n_inner_steps`` steps of size ``step_size``); an outer batch for
    (grad_y F, grad_x F) at the new y; ``w = self._solve(grad_y F)``, an approximation of
    **+** [grad2_yy f]^-1 grad_y F drawing its own inner batches; a fresh inner batch for the cross product;
    ``x <- x - (step_size / outer_ratio) (grad_x F - grad2_xy f w)``.
    """

    #: the integer arguments shown by ``repr``
    _counts = ("n_inner_steps",)

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 n_inner_steps: int = 10, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.n_inner_steps = check_count(n_inner_steps, "n_inner_steps")

    def _solve(self, g_y: Tensor) -> Tensor:
        raise NotImplementedError

    def _step(self) -> None:
        sgd_on_y(self, self.n_inner_steps, self.lr(self.step_size))
        g_y, g_x = self.grad(self.outer, self.y, self.x, self.outer.sample(), "yx")
        w = self._solve(g_y)
        jw = self.cross(self.y, self.x, w, self.inner.sample())
        self.x = self.x - self.lr(self.outer_step_size) * (g_x - jw)

    def __repr__(self) -> str:
        counts = "".join(f"{k}={getattr(self, k)}, " for k in self._counts)
        return f"{type(self).__name__}(step_size={self.step_size}, outer_ratio={self.outer_ratio}, {counts}t={self.t})"


class AmIGO(TwoLoopImplicit):
    """AmIGO (Arbel and Mairal, ICLR 2022): warm-started SGD on y and on v, then one step on x.

    Per iteration, each step on a fresh inner batch B: ``n_inner_steps`` steps y <- y - rho grad_y f_B, then
    ``n_inner_steps`` steps v <- v - eta (grad2_yy f_B v - grad_y F_j), then
    x <- x - gamma (grad_x F_j - grad2_xy f_B v), with rho = eta = step_size and gamma = step_size / outer_ratio
    (the full description: the docstring of the module [`methods.stochastic.amigo`][methods.stochastic.amigo]).
    Defaults (the
    benchmark's): step_size 0.1, outer_ratio 1, n_inner_steps 10 (SGD steps on y and on v per outer iteration).

    Args:
        n_inner_steps: the SGD steps on y and on v per outer iteration.
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.


    Attributes:
        v: the warm-started approximation of **+** [grad2_yy f]^-1 grad_y F (flat, like ``y``).
    """

    name = "AmIGO"

    def _solve(self, g_y: Tensor) -> Tensor:
        """``n_inner_steps`` SGD steps on 1/2 v^T H v - g_y . v from the current v (fresh batch each step)."""
        eta, v = self.lr(self.step_size), self.v
        for _ in range(self.n_inner_steps):
            v = v - eta * (self.hvp(self.y, self.x, v, self.inner.sample()) - g_y)
        self.v = v
        return v
