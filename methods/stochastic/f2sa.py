"""F2SA, the Fully First-order Stochastic Approximation method (Kwon, Kwon, Wright and Nowak, "A Fully
First-Order Method for Stochastic Bilevel Optimization", ICML 2023).

No Hessian- or Jacobian-vector products: the bilevel problem is replaced by its penalty (Lagrangian) form
with a multiplier lambda that grows along the run,

    L_lambda(y, z, x) = F(y, x) + lambda (f(y, x) - f(z, x)),

whose minimizer over y is y_lambda(x) = argmin_y F + lambda f (-> y*(x) as lambda -> infinity), whose minimizer
over z is y*(x), and whose x-gradient at those points, grad_x F(y_lambda) + lambda (grad_x f(y_lambda) -
grad_x f(y*)), differs from grad h(x) by O(1/lambda). Iteration t (0-based) of this implementation, with
lambda_t the current multiplier (``lmbda0`` at t = 0) and fresh minibatches for every gradient::

    repeat n_inner_steps times:                           (y and z start where the last iteration left them)
        y <- y - alpha_t (lambda_t grad_y f_{B1}(y, x) + grad_y F_{B3}(y, x))
        z <- z - gamma_t grad_y f_{B2}(z, x)
    x <- x - xi_t (grad_x F_{B4}(y, x) + lambda_t (grad_x f_{B5}(y, x) - grad_x f_{B6}(z, x)))
    lambda_{t+1} = lambda_t + delta_t

with the schedules of benchopt's benchmark_bilevel (``lr`` of the base: c / (t + 1)^e)::

    alpha_t = step_size / (t+1)^(5/7),    gamma_t = step_size / (t+1)^(4/7),
    xi_t = (step_size / outer_ratio) / (t+1)^(4/7),    delta_t = delta_lmbda / (t+1)^(1/7)

(``decay`` holds these four exponents; ``decay=(0, 0, 0, 0)`` with ``delta_lmbda=0`` gives constant steps
and a fixed multiplier, whose full-batch fixed point is the minimizer of the penalty function
x -> min_y L_lambda(y, y*(x), x), O(1/lambda) away from x*). So lambda_t grows like t^(6/7).

Sampling order per iteration (the benchmark's): in each inner step an inner batch B1 (y's f term), an inner
batch B2 (z), an outer batch B3 (y's F term); then for x an outer batch B4, an inner batch B5 (at y) and an
inner batch B6 (at z). All x-gradients are taken at the y, z after the inner loop and the x before its step.
With ``batch_size="full"`` every batch is the full one and F2SA is its deterministic counterpart.

Note (measured on the tests' quadratic, not a claim of the paper): under these schedules z's step shrinks like
t^(-4/7) while the lambda-weighted part of the x-step grows like lambda_t xi_t ~ t^(2/7), so z eventually
lags x and the iteration loses stability as lambda grows: with full batches, step_size 0.3-0.4 and
delta_lmbda 0.1-0.3, the error to x* started growing once lambda_t passed ~15-20 and the runs diverged
by t = 400-1600. A small ``delta_lmbda`` (the benchmark's tuned 0.01 for quadratics) keeps lambda moderate
over practical run lengths.

Cost of one iteration: n_inner_steps x (2 inner + 1 outer) + 1 outer + 2 inner gradients (33 minibatch
calls with the default 10 inner steps). Carried state: y, z (the approximation of y*(x), warm started) and
the multiplier ``lmbda`` (a float, deterministic in t).
"""
from __future__ import annotations

from typing import List, Sequence

from torch import Tensor

from .base import StochasticSolver, check_count, check_positive

#: the benchmark's exponents of the (y, z, x, delta lambda) step-size schedules
DECAY = (5 / 7, 4 / 7, 4 / 7, 1 / 7)


class F2SA(StochasticSolver):
    """F2SA (Kwon et al., ICML 2023): first-order steps on a penalty form with a growing multiplier lambda.

    On L_lambda(y, z, x) = F(y, x) + lambda (f(y, x) - f(z, x)), per iteration: ``n_inner_steps`` steps
    y <- y - alpha_t (lambda_t grad_y f + grad_y F) and z <- z - gamma_t grad_y f(z, x), then
    x <- x - xi_t (grad_x F(y, x) + lambda_t (grad_x f(y, x) - grad_x f(z, x))) and
    lambda_{t+1} = lambda_t + delta_t, every gradient on a fresh minibatch; the schedules are c / (t + 1)^e
    with c = step_size, step_size, step_size / outer_ratio, delta_lmbda (the full description: the docstring
    of the module ``methods.stochastic.f2sa``). Defaults (the benchmark's): step_size 0.01, outer_ratio 1,
    lmbda0 1, delta_lmbda 0.1, n_inner_steps 10, decay (5/7, 4/7, 4/7, 1/7).

    Args:
        lmbda0: the starting multiplier lambda_0 (> 0).
        delta_lmbda: the constant of the multiplier's increment delta_t (0: a fixed multiplier).
        n_inner_steps: the steps on y and z per iteration.
        decay: the four exponents e of the (y, z, x, delta lambda) schedules.
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.


    Attributes:
        z: the approximation of y*(x) (flat, like ``y``), carried between iterations.
        lmbda: the current multiplier lambda_t.
    """

    name = "F2SA"
    uses_v = False

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.01, outer_ratio: float = 1.0,
                 lmbda0: float = 1.0, delta_lmbda: float = 0.1, n_inner_steps: int = 10,
                 decay: Sequence[float] = DECAY, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.lmbda = check_positive(lmbda0, "lmbda0")
        self.lmbda0 = self.lmbda
        self.delta_lmbda = check_positive(delta_lmbda, "delta_lmbda", allow_zero=True)
        self.n_inner_steps = check_count(n_inner_steps, "n_inner_steps")
        if isinstance(decay, (str, bytes)) or not hasattr(decay, "__len__") or len(decay) != 4:
            raise ValueError(f"decay must be 4 exponents (y, z, x, delta lambda), got {decay!r}")
        self.decay = tuple(check_positive(e, f"decay[{i}]", allow_zero=True) for i, e in enumerate(decay))
        self.z = self.y.clone()

    def _step(self) -> None:
        e_y, e_z, e_x, e_l = self.decay
        alpha, gamma = self.lr(self.step_size, e_y), self.lr(self.step_size, e_z)
        xi, delta = self.lr(self.outer_step_size, e_x), self.lr(self.delta_lmbda, e_l)
        lam, x, y, z = self.lmbda, self.x, self.y, self.z
        inner, outer = self.inner, self.outer
        for _ in range(self.n_inner_steps):
            b_y, b_z, b_F = inner.sample(), inner.sample(), outer.sample()
            d_y = lam * self.grad(inner, y, x, b_y)[0] + self.grad(outer, y, x, b_F)[0]
            d_z = self.grad(inner, z, x, b_z)[0]
            y = y - alpha * d_y
            z = z - gamma * d_z
        b_F, b_y, b_z = outer.sample(), inner.sample(), inner.sample()
        d_x = self.grad(outer, y, x, b_F, "x")[0] + lam * (
            self.grad(inner, y, x, b_y, "x")[0] - self.grad(inner, z, x, b_z, "x")[0])
        self.y, self.z = y, z
        self.x = x - xi * d_x
        self.lmbda = lam + delta

    def _state(self) -> List[Tensor]:
        return super()._state() + [self.z]

    def __repr__(self) -> str:
        return (f"F2SA(step_size={self.step_size}, outer_ratio={self.outer_ratio}, lmbda={self.lmbda:.4g}, "
                f"t={self.t})")
