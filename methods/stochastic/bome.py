"""BOME, Bilevel Optimization Made Easy (Liu, Ye, Wright, Stone and Liu, "BOME! Bilevel Optimization Made Easy:
A Simple First-Order Approach", NeurIPS 2022).

A value-function method that needs no Hessian- or Jacobian-vector products. The bilevel problem is read as
min_{y, x} F(y, x) subject to q(y, x) = f(y, x) - min_y' f(y', x) <= 0, the inner minimum is approximated
by n_inner_steps = T gradient steps from the current y, and (y, x) take one step of the dynamic barrier
method on that constraint. Iteration t, with rho = ``step_size`` and xi = ``step_size / outer_ratio``
(constant, as in benchopt's benchmark_bilevel)::

    y_0 = y,   y_{k+1} = y_k - rho grad_y f(y_k, x)   (k < T)          y_T is then held fixed:
    grad q = (grad_y f(y, x),  grad_x f(y, x) - grad_x f(y_T, x))      q(y, x) = f(y, x) - f(y_T, x)
    phi    = eta ||grad q||^2                 (choice_phi="grad_norm", the default)
           = eta (f(y, x) - f(y_T, x))        (choice_phi="value")
    lambda = max(phi - <grad F(y, x), grad q>, 0) / ||grad q||^2      (lambda = 0 where grad q = 0)
    (y, x) <- (y - rho (grad_y F + lambda grad_y q),  x - xi (grad_x F + lambda grad_x q))

so the step is along grad F while it decreases q fast enough (<grad F, grad q> >= phi) and is otherwise
projected just enough to make <d, grad q> = phi. Where grad q = 0 exactly (y is a stationary point of f(., x):
then y_T = y and both parts of grad q vanish) the constraint gives no direction: lambda is set to 0 and the
step is plain gradient descent on F (the 0/0 is never formed; a NaN grad q still propagates to the state and
is reported by the base's check).

``batches="full"`` (the default, the benchmark's deterministic BOME): every gradient and value is the full
one (``oracle.full()``; each counts n / batch_size oracle calls). ``batches="stochastic"``: the oracles'
minibatches, sampled in this order: one inner batch per inner step (T of them), then one outer batch (grad F
at (y, x)), then one inner batch shared by both terms of q (grad f at (y, x) and at (y_T, x), and f's two
values with choice_phi="value"), so that q's estimate is one batch's f_B(y, x) - f_B(y_T, x), which vanishes
with y_T = y like q itself. Step sizes stay constant (the result then hovers at a noise level).

With full batches and constant steps the iteration does not converge to x* exactly: measured on the tests'
quadratic it drives ||grad h||^2 far down, then settles into a period-2 cycle whose mean is biased, mostly by
the inexact inner solution y_T (the bias shrank from 0.155 to 0.066 as T grew from 10 to 40 at step 0.4, and
to 0.038 at step 0.1 with T = 160; ||x*|| = 1.75).

Cost of one iteration: T + 2 inner gradients (T inner steps, grad f at (y, x), grad_x f at (y_T, x)) and 1
outer gradient; with ``choice_phi="value"`` also 2 inner loss values, each counted like a gradient (one pass
over its batch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import StochasticSolver, check_count, check_positive


class BOME(StochasticSolver):
    """BOME (Liu et al., NeurIPS 2022): one dynamic-barrier step on (y, x) for the value-function constraint.

    With y_T = ``n_inner_steps`` gradient steps on f from y and q(y, x) = f(y, x) - f(y_T, x):
    ``lambda = max(phi - <grad F, grad q>, 0) / ||grad q||^2`` (0 where grad q = 0), then
    (y, x) <- (y - rho (grad_y F + lambda grad_y q), x - xi (grad_x F + lambda grad_x q)), with constant
    rho = step_size and xi = step_size / outer_ratio (the full description: the docstring of the module
    [`methods.stochastic.bome`][methods.stochastic.bome]). Defaults (the benchmark's): step_size 0.1, outer_ratio 1,
    eta 0.5,
    n_inner_steps 10, choice_phi "grad_norm", and full batches (``batches="full"``).

    Args:
        eta: the constant of phi.
        n_inner_steps: T, the gradient steps on f that give y_T.
        choice_phi: "grad_norm" (phi = eta ||grad q||^2) or "value" (phi = eta q(y, x)).
        batches: "full" (every gradient and value at full batch) or "stochastic" (the oracles' minibatches).
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.


    Attributes:
        lmbda: the multiplier lambda of the last iteration (a 0-dim tensor; None before the first).
    """

    name = "BOME"
    uses_v = False

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 eta: float = 0.5, n_inner_steps: int = 10, choice_phi: str = "grad_norm",
                 batches: str = "full", **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.eta = check_positive(eta, "eta")
        self.n_inner_steps = check_count(n_inner_steps, "n_inner_steps")
        if choice_phi not in ("grad_norm", "value"):
            raise ValueError(f"choice_phi must be 'grad_norm' or 'value', got {choice_phi!r}")
        if batches not in ("full", "stochastic"):
            raise ValueError(f"batches must be 'full' or 'stochastic', got {batches!r}")
        self.choice_phi, self.batches = choice_phi, batches
        self.lmbda = None

    def _value(self, y: Tensor, x: Tensor, batch) -> Tensor:
        """f_B(y, x) (a loss value, counted as one pass over the batch)."""
        with torch.no_grad():
            out = self._loss(self.inner, y, x, batch)
        self._count(self.inner, batch)
        return out

    def _step(self) -> None:
        rho, xi = self.lr(self.step_size), self.lr(self.outer_step_size)
        inner, outer, y, x = self.inner, self.outer, self.y, self.x
        full = self.batches == "full"
        y_T = y
        for _ in range(self.n_inner_steps):
            y_T = y_T - rho * self.grad(inner, y_T, x, inner.full() if full else inner.sample())[0]
        b_F = outer.full() if full else outer.sample()
        b_q = inner.full() if full else inner.sample()
        gF_y, gF_x = self.grad(outer, y, x, b_F, "yx")
        gq_y, gq_x = self.grad(inner, y, x, b_q, "yx")
        gq_x = gq_x - self.grad(inner, y_T, x, b_q, "x")[0]
        sq = gq_y.square().sum() + gq_x.square().sum()
        if self.choice_phi == "grad_norm":
            phi = self.eta * sq
        else:
            phi = self.eta * (self._value(y, x, b_q) - self._value(y_T, x, b_q))
        dot = gF_y @ gq_y + gF_x @ gq_x
        zero = sq == 0
        lam = torch.where(zero, torch.zeros_like(sq),
                          torch.clamp(phi - dot, min=0) / torch.where(zero, torch.ones_like(sq), sq))
        self.lmbda = lam
        self.y = y - rho * (gF_y + lam * gq_y)
        self.x = x - xi * (gF_x + lam * gq_x)
