"""Differentiable inner optimizers, usable as fixed-point maps ``opt(params, hparams) -> params``.

Same classes and signatures as hypertorch: ``loss_f(params, hparams[, data])``; ``step_size`` (and
``momentum``) may be a float or a callable of hparams. HeavyBall and Momentum carry an auxiliary state,
so their params list is ``[*params, *aux]`` (use :meth:`get_opt_params` to build it).
"""
from __future__ import annotations

from itertools import repeat
from typing import List

import torch
from torch import Tensor


class DifferentiableOptimizer:
    """Base class: ``__call__(params, hparams, create_graph=True)`` performs one differentiable step."""

    def __init__(self, loss_f, dim_mult: int, data_or_iter=None):
        self.loss_f = loss_f
        self.dim_mult = dim_mult
        self.curr_loss = None
        self.data_iterator = None
        if data_or_iter is not None:
            self.data_iterator = data_or_iter if hasattr(data_or_iter, "__next__") else repeat(data_or_iter)

    def get_opt_params(self, params: List[Tensor]) -> List[Tensor]:
        """params followed by zero auxiliary states (for the momentum methods)."""
        return list(params) + [torch.zeros_like(p) for _ in range(self.dim_mult - 1) for p in params]

    def step(self, params, hparams, create_graph):
        raise NotImplementedError

    def __call__(self, params, hparams, create_graph: bool = True) -> List[Tensor]:
        if len(params) % self.dim_mult != 0:
            raise ValueError(f"{type(self).__name__} expects {self.dim_mult} tensors per parameter "
                             f"(params + auxiliary state, see get_opt_params); got {len(params)}")
        with torch.enable_grad():
            return self.step(list(params), hparams, create_graph)

    def get_loss(self, params, hparams) -> Tensor:
        if self.data_iterator is not None:
            self.curr_loss = self.loss_f(params, hparams, next(self.data_iterator))
        else:
            self.curr_loss = self.loss_f(params, hparams)
        return self.curr_loss

    def _grads(self, params, hparams, create_graph):
        return torch.autograd.grad(self.get_loss(params, hparams), params, create_graph=create_graph,
                                   allow_unused=True)


def _as_fn(value):
    return value if callable(value) else (lambda hparams: value)


class GradientDescent(DifferentiableOptimizer):
    """w <- w - s(lambda) * grad_w L(w, lambda)."""

    def __init__(self, loss_f, step_size, data_or_iter=None):
        super().__init__(loss_f, dim_mult=1, data_or_iter=data_or_iter)
        self.step_size_f = _as_fn(step_size)

    def step(self, params, hparams, create_graph):
        sz = self.step_size_f(hparams)
        grads = self._grads(params, hparams, create_graph)
        if isinstance(sz, (int, float)):  # one graph node per step instead of two (cheaper VJPs)
            return [w if g is None else torch.add(w, g, alpha=-sz) for w, g in zip(params, grads)]
        return [w if g is None else w - sz * g for w, g in zip(params, grads)]


class HeavyBall(DifferentiableOptimizer):
    """Polyak: (w, w_prev) <- (w - s grad + m (w - w_prev), w)."""

    def __init__(self, loss_f, step_size, momentum, data_or_iter=None):
        super().__init__(loss_f, dim_mult=2, data_or_iter=data_or_iter)
        self.step_size_f, self.momentum_f = _as_fn(step_size), _as_fn(momentum)

    def step(self, params, hparams, create_graph):
        n = len(params) // 2
        p, prev = params[:n], params[n:]
        sz, mu = self.step_size_f(hparams), self.momentum_f(hparams)
        grads = self._grads(p, hparams, create_graph)
        new = [w - (0 if g is None else sz * g) + mu * (w - v) for w, v, g in zip(p, prev, grads)]
        return new + p


class Momentum(DifferentiableOptimizer):
    """torch.optim.SGD momentum: (w, b) <- (w - s (m b + grad), m b + grad)."""

    def __init__(self, loss_f, step_size, momentum, data_or_iter=None):
        super().__init__(loss_f, dim_mult=2, data_or_iter=data_or_iter)
        self.step_size_f, self.momentum_f = _as_fn(step_size), _as_fn(momentum)

    def step(self, params, hparams, create_graph):
        n = len(params) // 2
        p, buf = params[:n], params[n:]
        sz, mu = self.step_size_f(hparams), self.momentum_f(hparams)
        grads = self._grads(p, hparams, create_graph)
        new_buf = [mu * b + (0 if g is None else g) for b, g in zip(buf, grads)]
        return [w - sz * b for w, b in zip(p, new_buf)] + new_buf
