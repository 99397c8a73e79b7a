"""Explicit hypergradients through the lower dynamics: RAD, T-RAD, BDA, IAPTT-GM.

    y_{t+1} = y_t - s d_t,   d_t = grad_y[(1 - a_t) f(x, y_t) + a_t F(x, y_t)]    (a_t = 0: RAD)

and the upper gradient is reverse-mode d/dx F(x, y_T(x)) through the steps, with

- T-RAD (``truncate=K``): the first K steps are real steps without a graph, each at its own iterate;
  only the last T - K are differentiated. Nothing of the warm-up reaches x.
- BDA (``alpha > 0``): aggregation weights a_t = alpha_schedule(t) in [0, 1), by default alpha / (t + 1)
  (decaying, Liu et al. ICML 2020); alpha = 0 is RAD exactly (F is not even evaluated, and a schedule
  with alpha = 0 is an error rather than silently ignored).
- PTT (``pessimistic``): k* = argmax_{1<=k<=T} F(x, y_k) and the gradient is d/dx F(x, y_{k*}).
- IA (``init_aux``): y_0 = ``params`` is itself an upper variable; the gradient w.r.t. it is returned
  (and added to ``params[i].grad``).
The step ``y - s d`` is the lower rule (plain gradient descent or torch.optim.SGD's rule). A lower loop
that diverges (step too large) raises [`hypergrad.DivergenceError`][hypergrad.DivergenceError] instead of returning its
gradient; the residual of the last step, ||y_T - y_{T-1}||, is reported as ``fp_residual``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from hypergrad import update_tensor_grads
from hypergrad.tensor_list import assert_finite

from ._lower import Loss, SGDRule, check_int, check_lower, descend, fp_residual, grads_of, raise_if_nonfinite, \
    step_name
from .base import BilevelSolver, Objective, Result


@dataclass
class DynamicResult(Result):
    """The result of [`dynamic_hypergradient`][methods.dynamic_hypergradient]: a [`Result`][methods.Result] and more.

    Plus ``k_star`` (the iterate differentiated: T unless pessimistic), the gradient w.r.t. y_0
    ``init_grads`` (IA only, else None) and the differentiated ``steps`` (T - K)."""
    k_star: int
    steps: int
    init_grads: Optional[List[Tensor]] = None


def check_options(steps: int, alpha: float, truncate: int, pessimistic: bool, init_aux: bool,
                  alpha_schedule: Optional[Callable[[int], float]] = None) -> None:
    """Raise on invalid combinations (RAD|BDA via alpha, T-RAD|PTT exclusive) and on a schedule that is
    ignored (alpha = 0) or leaves [0, 1) at some step t < steps."""
    check_int(steps, "the number of lower steps (lower_loop)", 1)
    check_int(truncate, "truncate_iters", 0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha (BDA aggregation weight) must be in [0, 1), got {alpha!r}; alpha = 0 is RAD")
    if alpha_schedule is not None:
        if alpha == 0:
            raise ValueError("alpha_schedule is given but alpha=0 selects RAD, which would ignore it; pass "
                             "alpha > 0 to run BDA with the schedule, or drop alpha_schedule")
        if not callable(alpha_schedule):
            raise TypeError(f"alpha_schedule must be a callable of the step t, got {type(alpha_schedule).__name__}")
        for t in range(steps):
            schedule_value(alpha_schedule, t)
    if truncate >= steps:
        raise ValueError(f"truncate_iters={truncate} must be < lower_loop={steps}: at least one step must be "
                         "differentiated")
    if truncate and pessimistic:
        raise ValueError("truncate_iters (T-RAD) and acquire_max_loss (PTT) are exclusive truncations; "
                         "choose one")
    if truncate and init_aux:
        raise ValueError("init_aux with truncate_iters > 0: the warm-up steps carry no graph, so y_0 would get "
                         "no gradient at all; use PTT (acquire_max_loss) or truncate_iters=0 with init_aux")


def schedule_value(schedule: Callable[[int], float], t: int) -> float:
    """a_t = schedule(t), checked to lie in [0, 1) (a_t = 1 would descend F alone)."""
    a = schedule(t)
    a = float(a) if isinstance(a, (int, float, Tensor)) and not isinstance(a, bool) else a
    if not isinstance(a, float) or not 0.0 <= a < 1.0:
        raise ValueError(f"alpha_schedule({t}) = {a!r}: the BDA aggregation weight a_t must be in [0, 1) at every "
                         "lower step")
    return a


def dynamic_hypergradient(params: Sequence[Tensor], hparams: Sequence[Tensor], inner_loss: Loss,
                          outer_loss: Loss, steps: int, lr: float = 0.1, *, rule: Optional[SGDRule] = None,
                          alpha: float = 0.0, alpha_schedule: Optional[Callable[[int], float]] = None,
                          truncate: int = 0, pessimistic: bool = False, init_aux: bool = False,
                          set_grad: bool = True) -> DynamicResult:
    """Upper gradient by reverse mode through ``steps`` lower steps (RAD, T-RAD, BDA, PTT, IA).

    y_{t+1} = y_t - s d_t with d_t = grad_y[(1 - a_t) f(x, y_t) + a_t F(x, y_t)] (a_t = 0: RAD), and the
    gradient is d/dx F(x, y_T(x)) through the steps. A diverging lower loop raises
    [`hypergrad.DivergenceError`][hypergrad.DivergenceError]; ``fp_residual`` is ||y_T - y_{T-1}||.

    Args:
        params: y_0 (never modified).
        hparams: the upper variables x.
        inner_loss: f(params, hparams).
        outer_loss: F(params, hparams).
        steps: the number T of lower steps (>= 1).
        lr: the step s of plain gradient descent.
        rule: the lower update rule, instead of plain gradient descent with step ``lr``.
        alpha: BDA's aggregation weight, in [0, 1) (0: RAD; F is then not evaluated in the steps).
        alpha_schedule: BDA's a_t = alpha_schedule(t), in [0, 1) (default: alpha / (t + 1)); needs alpha > 0.
        truncate: T-RAD's K: the first K steps are taken without a graph, only the last T - K are
            differentiated (nothing of the warm-up reaches x).
        pessimistic: PTT: differentiate ``F(x, y_{k*})``, ``k* = argmax_{1<=k<=T} F(x, y_k)`` (not with
            ``truncate``).
        init_aux: IA: y_0 = ``params`` is itself an upper variable; its gradient is returned as
            ``init_grads`` (not with ``truncate``).
        set_grad: add the gradients to ``hparam.grad`` (and, with ``init_aux``, to ``params[i].grad``).
    """
    check_options(steps, alpha, truncate, pessimistic, init_aux, alpha_schedule)
    hparams, params = list(hparams), list(params)
    if init_aux and not all(p.requires_grad for p in params):
        raise ValueError("init_aux: y_0 (params) is an upper variable and needs requires_grad=True")
    rule = SGDRule.plain(lr, len(params)) if rule is None else rule
    schedule = alpha_schedule or (lambda t: alpha / (t + 1))
    lower_losses: List[Tensor] = []

    def grad_fn(y, t, create_graph):
        f = inner_loss(y, hparams)
        a = schedule_value(schedule, t) if alpha > 0 else 0.0
        if a != 0.0:
            f = (1.0 - a) * f + a * outer_loss(y, hparams)
        lower_losses.append(f.detach())  # the loss the step descends
        return grads_of(f, y, create_graph=create_graph)

    y0 = params if init_aux else [p.detach() for p in params]
    y, state, norms, _ = descend(y0, grad_fn, rule, range(truncate), track=False)
    iterates: List[List[Tensor]] = []
    y, state, norms2, prev = descend(y, grad_fn, rule, range(truncate, steps), state, track=True,
                                     on_iterate=(lambda yk, t: iterates.append(yk)) if pessimistic else None)
    norms += norms2
    check_lower(lower_losses, norms, step_name("lr", rule))

    k_star = steps
    if pessimistic:
        with torch.no_grad():
            values = [outer_loss([w.detach() for w in yk], hparams).reshape(()) for yk in iterates]
        raise_if_nonfinite(values, "the upper loss along the trajectory", "iterate")
        k_star = int(torch.argmax(torch.stack(values))) + 1
        y_diff = iterates[k_star - 1]
    else:
        y_diff = y
    with torch.enable_grad():
        loss = outer_loss(y_diff, hparams)
        wrt = hparams + (params if init_aux else [])
        grads = grads_of(loss, wrt)
    assert_finite([loss.detach()] + grads, "the upper loss or its gradient")
    grads, init_grads = grads[:len(hparams)], (grads[len(hparams):] if init_aux else None)
    if set_grad:
        update_tensor_grads(hparams, grads)
        if init_aux:
            update_tensor_grads(params, init_grads)
    res, rel = fp_residual(prev, y)
    return DynamicResult(grads, [w.detach() for w in y], loss.detach(), float(norms[-1]), res, rel, k_star,
                         steps - truncate, init_grads)


class Dynamic(BilevelSolver):
    """RAD / T-RAD / BDA / IAPTT-GM as one solver (reference: ``Dynamic``).

    RAD|BDA (``alpha``) are exclusive, T-RAD|PTT (``truncate_iters`` | ``acquire_max_loss``) are exclusive,
    IA (``init_aux``) combines with RAD, BDA and PTT; each call is one
    [`dynamic_hypergradient`][methods.dynamic_hypergradient].

    With ``init_aux`` the lower model's parameters are y_0, an upper variable: their ``.grad`` receives
    dF/dy_0 and the caller's upper optimizer should include them; the lower model is then never
    written (``warm_start`` defaults to True otherwise: the final iterate y_T is copied into it).

    Args:
        ll_objective: the lower objective, ``objective(state) -> scalar tensor``.
        lower_loop: the lower steps per call (T).
        ul_model: the upper ``nn.Module`` (x).
        ul_objective: the upper objective, ``objective(state) -> scalar tensor``.
        ll_model: the lower ``nn.Module`` (y).
        acquire_max_loss: PTT: differentiate the iterate of largest upper loss.
        alpha: BDA's aggregation weight, in [0, 1) (0: RAD).
        truncate_iters: T-RAD: the warm-up steps taken without a graph.
        ll_opt: a ``torch.optim.SGD`` over the lower parameters whose rule the lower steps follow.
        init_aux: IA: the lower model's parameters are y_0, an upper variable.
        lr: the lower step size without ``ll_opt`` (default 0.1), else an override of its lr.
        alpha_schedule: BDA's a_t as a callable of the step t (default alpha / (t + 1)).
        warm_start: copy y_T into the lower model after each call (default: True unless ``init_aux``).
    """

    def __init__(self, ll_objective: Objective, lower_loop: int, ul_model, ul_objective: Objective, ll_model,
                 acquire_max_loss: bool = False, alpha: float = 0.0, truncate_iters: int = 0,
                 ll_opt: Optional[torch.optim.Optimizer] = None, *, init_aux: bool = False,
                 lr: Optional[float] = None, alpha_schedule: Optional[Callable[[int], float]] = None,
                 warm_start: Optional[bool] = None):
        if warm_start and init_aux:
            raise ValueError("warm_start and init_aux are exclusive: with IA the lower model holds y_0, an upper "
                             "variable, and must not be overwritten by y_T")
        super().__init__(ul_objective, ul_model, ll_objective, ll_model, ll_opt=ll_opt, lower_loop=lower_loop,
                         lr=lr, warm_start=not init_aux if warm_start is None else warm_start)
        check_options(lower_loop, alpha, truncate_iters, acquire_max_loss, init_aux, alpha_schedule)
        self.alpha, self.truncate_iters = float(alpha), truncate_iters
        self.acquire_max_loss, self.init_aux = bool(acquire_max_loss), bool(init_aux)
        self.alpha_schedule = alpha_schedule

    def compute_gradients(self, ul_data, ul_target, ll_data, ll_target, **options) -> Tensor:
        """One outer step: lower dynamics from the lower model's parameters, then the upper gradient.

        ``options`` override ``steps``/``alpha``/``truncate``/... of
        [`dynamic_hypergradient`][methods.dynamic_hypergradient] for this call; returns the upper loss.
        """
        inner, outer = self.losses(ul_data, ul_target, ll_data, ll_target)
        kw = dict(rule=self.rule, alpha=self.alpha, alpha_schedule=self.alpha_schedule,
                  truncate=self.truncate_iters, pessimistic=self.acquire_max_loss, init_aux=self.init_aux)
        kw.update(options)
        steps = kw.pop("steps", self.lower_loop)
        params = self._params if self.init_aux else [p.detach() for p in self._params]
        result = dynamic_hypergradient(params, self._hparams, inner, outer, steps, **kw)
        return self._finish(result, write_lower=self.warm_start)
