"""The deterministic solvers over the same interface: full-batch gradient descent on x with the hypergradient
of ``methods.implicit`` (implicit differentiation by the core's solvers) or ``methods.dynamic`` (RAD).

Per outer iteration, with the full means f and F (the oracles called as losses, ``oracle(params, hparams)``):

    FullBatchImplicit:  y <- n_inner_steps gradient steps on f from the last y (step ``step_size``);
                        grad = grad_x F - grad2_xy f [grad2_yy f]^-1 grad_y F at y, by ``solver`` ("cg")
                        with at most ``k`` iterations, warm-started from the last adjoint;
    FullBatchRAD:       grad = reverse mode through n_inner_steps gradient steps from the last y;
    both:               x <- x - (step_size / outer_ratio) grad.

So a user switches between a stochastic method and a deterministic one by changing the class. The oracle
calls count full passes: a gradient or Hessian-vector product of f costs n / batch_size calls.
"""
from __future__ import annotations

import math

import torch

from ..dynamic import dynamic_hypergradient
from ..implicit import implicit_hypergradient
from .base import StochasticSolver, check_count, check_positive


class _FullBatch(StochasticSolver):
    uses_v = False
    min_inner_steps = 0

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 n_inner_steps: int = 10, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio, **kwargs)
        self.n_inner_steps = check_count(n_inner_steps, "n_inner_steps", self.min_inner_steps)

    def _leaves(self):
        return ([p.clone() for p in self.params],
                [h.detach().clone().requires_grad_() for h in self.hparams])

    def _finish(self, result, inner_passes: int) -> None:
        self.samples["inner"] += inner_passes * self.inner.n
        self.samples["outer"] += self.outer.n
        self.y = torch.cat([p.detach().reshape(-1) for p in result.params])
        grad = torch.cat([g.reshape(-1) for g in result.grads])
        self.x = self.x - self.outer_step_size * grad
        self.last = result


class FullBatchImplicit(_FullBatch):
    """Full-batch gradient descent on x with the implicit hypergradient (``methods.implicit``).

    Per iteration: ``n_inner_steps`` gradient steps on f from the last y (step ``step_size``), the
    hypergradient grad_x F - grad2_xy f [grad2_yy f]^-1 grad_y F at that y by ``solver`` (warm-started from
    the last adjoint), then x <- x - (step_size / outer_ratio) grad.

    Args:
        n_inner_steps: the gradient steps on y per iteration (0: y is taken as it is).
        solver: any of the core's ([`hypergrad.SOLVERS`][hypergrad.SOLVERS]).
        k: the solver's iteration limit.
        tol: its residual tolerance (as in [`implicit_hypergradient`][methods.implicit_hypergradient]).
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.
    """

    name = "Implicit"

    def __init__(self, inner, outer, params, hparams, *, step_size: float = 0.1, outer_ratio: float = 1.0,
                 n_inner_steps: int = 10, solver: str = "cg", k: int = 10, tol: float = 1e-10, **kwargs):
        super().__init__(inner, outer, params, hparams, step_size=step_size, outer_ratio=outer_ratio,
                         n_inner_steps=n_inner_steps, **kwargs)
        self.solver, self.k = solver, check_count(k, "k", 0)
        self.tol = check_positive(tol, "tol", allow_zero=True)
        self._v0 = None

    def _step(self) -> None:
        params, hparams = self._leaves()
        res = implicit_hypergradient(params, hparams, self.inner, self.outer, self.n_inner_steps, self.step_size,
                                     solver=self.solver, K=self.k, tol=self.tol, v0=self._v0, set_grad=False,
                                     fixed_point_tol=math.inf)
        self._v0 = res.v
        # lower steps + one Hessian-vector product per solver iteration + the cross product
        self._finish(res, self.n_inner_steps + res.iterations + 1)


class FullBatchRAD(_FullBatch):
    """Full-batch gradient descent on x with the reverse-mode hypergradient (RAD, ``methods.dynamic``).

    Per iteration: reverse mode through ``n_inner_steps`` gradient steps on f (step ``step_size``) from the
    last y, then x <- x - (step_size / outer_ratio) grad.

    Args:
        n_inner_steps: the differentiated gradient steps on y per iteration (>= 1).
        **kwargs: [`StochasticSolver`][methods.stochastic.StochasticSolver]'s ``max_norm``.
    """

    name = "RAD"
    min_inner_steps = 1

    def _step(self) -> None:
        params, hparams = self._leaves()
        res = dynamic_hypergradient(params, hparams, self.inner, self.outer, self.n_inner_steps,
                                    self.step_size, set_grad=False)
        self._finish(res, 2 * self.n_inner_steps)  # forward gradients + their reverse products
