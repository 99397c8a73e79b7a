"""Differentiable inner optimizers, usable as fixed-point maps ``opt(params, hparams) -> params``.

Same classes, step functions and signatures as hypertorch's ``hypergrad.diff_optimizers``:
``loss_f(params, hparams[, data])``; ``step_size`` (and ``momentum``) may be a float or a callable of
hparams. HeavyBall and Momentum carry an auxiliary state, so their params list is ``[*params, *aux]``
(use [`get_opt_params`][hypergrad.DifferentiableOptimizer.get_opt_params] to build it).

Each step computes exactly hypertorch's floating-point operations in hypertorch's order
(``w - step_size * g``, ...), so unrolled trajectories and their hypergradients are bitwise hypertorch's.
The one extension: a parameter the loss does not use keeps its value (zero gradient) instead of raising.
"""
from __future__ import annotations

from itertools import repeat
from typing import List

import torch
from torch import Tensor

from .errors import AUTOGRAD_UNDER_TORCH_FUNC


def _has_data(data_or_iter) -> bool:
    """hypertorch's ``if data_or_iter:`` (so ``None``, ``()``, ``[]`` mean no data), except that a tensor
    or array, whose truth value hypertorch cannot take, is data."""
    if data_or_iter is None or isinstance(data_or_iter, Tensor):
        return data_or_iter is not None
    try:
        return bool(data_or_iter)
    except (ValueError, RuntimeError):  # numpy arrays and the like: ambiguous truth value
        return True


class DifferentiableOptimizer:
    """Base class: ``__call__(params, hparams, create_graph=True)`` performs one differentiable step.

    Args:
        loss_f: the inner loss ``loss_f(params, hparams)``, or ``loss_f(params, hparams, data)`` with data.
        dim_mult: tensors per parameter in the params list (1 + the auxiliary states).
        data_or_iter: None or an empty container (no data), an iterator (``next`` is drawn at every step),
            or a fixed data object (passed at every step).
    """

    def __init__(self, loss_f, dim_mult, data_or_iter=None):
        self.data_iterator = None
        if _has_data(data_or_iter):
            self.data_iterator = data_or_iter if hasattr(data_or_iter, "__next__") else repeat(data_or_iter)
        self.loss_f = loss_f
        self.dim_mult = dim_mult
        self.curr_loss = None

    def get_opt_params(self, params):
        """params followed by zero auxiliary states, ``dim_mult - 1`` per parameter (hypertorch's order)."""
        return list(params) + [torch.zeros_like(p) for p in params for _ in range(self.dim_mult - 1)]

    def step(self, params, hparams, create_graph):
        """One update of the params list (params followed by any auxiliary states); subclasses implement it."""
        raise NotImplementedError

    def __call__(self, params, hparams, create_graph=True) -> List[Tensor]:
        if len(params) % self.dim_mult != 0:
            raise ValueError(f"{type(self).__name__} expects {self.dim_mult} tensors per parameter "
                             f"(params + auxiliary state, see get_opt_params); got {len(params)}")
        with torch.enable_grad():
            return self.step(params, hparams, create_graph)

    def get_loss(self, params, hparams) -> Tensor:
        """The inner loss ``loss_f(params, hparams)`` (with data: ``loss_f(params, hparams, next batch)``).

        The value is also kept in ``curr_loss``.
        """
        if self.data_iterator is not None:
            self.curr_loss = self.loss_f(params, hparams, next(self.data_iterator))
        else:
            self.curr_loss = self.loss_f(params, hparams)
        return self.curr_loss


def _as_fn(value):
    return value if callable(value) else (lambda hparams: value)


class GradientDescent(DifferentiableOptimizer):
    """Gradient descent: w <- w - s(lambda) grad_w L(w, lambda).

    Args:
        loss_f: the inner loss L, as in [`DifferentiableOptimizer`][hypergrad.DifferentiableOptimizer].
        step_size: s, a float or a callable of hparams.
        data_or_iter: as in [`DifferentiableOptimizer`][hypergrad.DifferentiableOptimizer].
    """

    def __init__(self, loss_f, step_size, data_or_iter=None):
        super().__init__(loss_f, dim_mult=1, data_or_iter=data_or_iter)
        self.step_size_f = _as_fn(step_size)

    def step(self, params, hparams, create_graph):
        """w <- w - s(lambda) grad_w L(w, lambda) (``create_graph``: keep the step differentiable)."""
        loss = self.get_loss(params, hparams)
        sz = self.step_size_f(hparams)
        return gd_step(params, loss, sz, create_graph=create_graph)


class HeavyBall(DifferentiableOptimizer):
    """Polyak's heavy ball: (w, w_prev) <- (w - s grad_w L + m (w - w_prev), w).

    The params list is ``[*params, *previous iterates]`` (see
    [`get_opt_params`][hypergrad.DifferentiableOptimizer.get_opt_params]).

    Args:
        loss_f: the inner loss L, as in [`DifferentiableOptimizer`][hypergrad.DifferentiableOptimizer].
        step_size: s, a float or a callable of hparams.
        momentum: m, a float or a callable of hparams.
        data_or_iter: as in [`DifferentiableOptimizer`][hypergrad.DifferentiableOptimizer].
    """

    def __init__(self, loss_f, step_size, momentum, data_or_iter=None):
        super().__init__(loss_f, dim_mult=2, data_or_iter=data_or_iter)
        self.step_size_f, self.momentum_f = _as_fn(step_size), _as_fn(momentum)

    def step(self, params, hparams, create_graph):
        """(w, w_prev) <- (w - s grad_w L + m (w - w_prev), w) on ``[*params, *previous iterates]``."""
        n = len(params) // 2
        p, p_aux = params[:n], params[n:]
        loss = self.get_loss(p, hparams)
        sz, mu = self.step_size_f(hparams), self.momentum_f(hparams)
        p_new, p_new_aux = heavy_ball_step(p, p_aux, loss, sz, mu, create_graph=create_graph)
        return [*p_new, *p_new_aux]


class Momentum(DifferentiableOptimizer):
    """``torch.optim.SGD``'s momentum: (w, b) <- (w - s (m b + grad_w L), m b + grad_w L).

    The params list is ``[*params, *momentum buffers]`` (see
    [`get_opt_params`][hypergrad.DifferentiableOptimizer.get_opt_params]).

    Args:
        loss_f: the inner loss L, as in [`DifferentiableOptimizer`][hypergrad.DifferentiableOptimizer].
        step_size: s, a float or a callable of hparams.
        momentum: m, a float or a callable of hparams.
        data_or_iter: as in [`DifferentiableOptimizer`][hypergrad.DifferentiableOptimizer].
    """

    def __init__(self, loss_f, step_size, momentum, data_or_iter=None):
        super().__init__(loss_f, dim_mult=2, data_or_iter=data_or_iter)
        self.step_size_f, self.momentum_f = _as_fn(step_size), _as_fn(momentum)

    def step(self, params, hparams, create_graph):
        """(w, b) <- (w - s (m b + grad_w L), m b + grad_w L) on ``[*params, *momentum buffers]``."""
        n = len(params) // 2
        p, p_aux = params[:n], params[n:]
        loss = self.get_loss(p, hparams)
        sz, mu = self.step_size_f(hparams), self.momentum_f(hparams)
        p_new, p_new_aux = torch_momentum_step(p, p_aux, loss, sz, mu, create_graph=create_graph)
        return [*p_new, *p_new_aux]


def _grads(loss, params, create_graph):
    if any(torch._C._functorch.is_functorch_wrapped_tensor(w) for w in params):
        raise RuntimeError(AUTOGRAD_UNDER_TORCH_FUNC)
    for i, w in enumerate(params):
        if not w.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(w.shape)}) does not require grad, so the inner optimizer "
                             "cannot differentiate the loss w.r.t. it: pass params made with .requires_grad_() (e.g. "
                             "[t.detach().requires_grad_() for t in params]) or the outputs of a previous step")
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise ValueError("the inner loss has no graph to params (detached, .data, or computed under torch.no_grad())")
    return torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)


def gd_step(params, loss, step_size, create_graph=True):
    """One gradient step on ``loss``: [w - step_size * g] (hypertorch's function).

    Args:
        params: the iterate w, a list of tensors with ``requires_grad=True``.
        loss: the inner loss, a scalar tensor with a graph to ``params``.
        step_size: the step (a number or a tensor, e.g. computed from hparams).
        create_graph: build the gradient with a graph, so that the new iterate is differentiable through
            the step (needed to backpropagate through it).

    Returns:
        The new iterate, one tensor per param (a param the loss does not use is returned as it is).
    """
    return [w if g is None else w - step_size * g for w, g in zip(params, _grads(loss, params, create_graph))]


def heavy_ball_step(params, aux_params, loss, step_size, momentum, create_graph=True):
    """Heavy-ball step: ([w - step_size * g + momentum * (w - v)], params), v the previous iterate (hypertorch's).

    Args:
        params: the iterate w, a list of tensors with ``requires_grad=True``.
        aux_params: the previous iterate v, one tensor per param.
        loss: the inner loss, a scalar tensor with a graph to ``params``.
        step_size: the step (a number or a tensor).
        momentum: the momentum coefficient (a number or a tensor).
        create_graph: build the gradient with a graph, so that the new iterate is differentiable through
            the step.

    Returns:
        ``(new_params, params)``: the new iterate and ``params`` itself (the next step's ``aux_params``).
    """
    grads = _grads(loss, params, create_graph)
    return [(w if g is None else w - step_size * g) + momentum * (w - v)
            for g, w, v in zip(grads, params, aux_params)], params


def torch_momentum_step(params, aux_params, loss, step_size, momentum, create_graph=True):
    """torch.optim.SGD's momentum step: v <- momentum * v + g, w <- w - step_size * v (hypertorch's).

    Args:
        params: the iterate w, a list of tensors with ``requires_grad=True``.
        aux_params: the momentum buffers v, one tensor per param.
        loss: the inner loss, a scalar tensor with a graph to ``params``.
        step_size: the step (a number or a tensor).
        momentum: the momentum coefficient (a number or a tensor).
        create_graph: build the gradient with a graph, so that the new iterate is differentiable through
            the step.

    Returns:
        ``(new_params, new_aux_params)``: the new iterate and the new momentum buffers.
    """
    grads = _grads(loss, params, create_graph)
    new_aux = [momentum * v if g is None else momentum * v + g for v, g in zip(aux_params, grads)]
    return [w - step_size * nv for w, nv in zip(params, new_aux)], new_aux
