"""The shared base of the bilevel solvers and the ``state`` adapter for ``objective(state)`` callables.

Every algorithm is a function over the core convention (``params`` = lower variables y, ``hparams`` = upper
variables x, losses of ``(params, hparams)``); [`BilevelSolver`][methods.BilevelSolver] turns the reference
documentation's module-and-objective style into that convention and back:

    state = {"data", "target", "upper_model", "lower_model"}   (aliases "ul_model", "ll_model")

where ``lower_model`` is a [`ModuleView`][methods.ModuleView] of the lower model at the current iterate.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from ._lower import Loss, SGDRule, check_int, check_scalar

Objective = Callable[[Dict[str, Any]], Tensor]


def parameter_slots(module: nn.Module, names: Sequence[str]) -> List[List[Tuple[Dict[str, Any], str]]]:
    """For each parameter name of ``module``, every ``(submodule._parameters, attribute)`` that holds that
    tensor (a tied weight is held in several places and is swapped in all of them)."""
    holders: Dict[int, List[Tuple[Dict[str, Any], str]]] = {}
    for full, p in module.named_parameters(remove_duplicate=False):
        path, _, attr = full.rpartition(".")
        sub = module.get_submodule(path) if path else module
        holders.setdefault(id(p), []).append((sub._parameters, attr))
    named = dict(module.named_parameters())
    return [holders[id(named[n])] for n in names]


class ModuleView:
    """``module`` evaluated with ``tensors`` in place of its trainable parameters (as ``functional_call``).

    Call it like the module; ``parameters()``/``named_parameters()`` give the iterate, and an attribute
    named like a top-level parameter (``view.y``) returns the iterate's tensor. Buffers and frozen
    parameters are the module's own. A call puts the tensors into the parameter slots
    (``parameter_slots``, computed once per solver) for its duration and restores them after, even on
    an error: the cost of a few dictionary writes per tensor, against ~100 us of ``functional_call``.

    Args:
        module: the ``nn.Module``.
        names: the names of its trainable parameters, in the order of ``tensors``.
        tensors: the iterate, one tensor per name.
        slots: the parameter slots of ``names`` (default: computed from ``module``).
    """

    def __init__(self, module: nn.Module, names: Sequence[str], tensors: Sequence[Tensor], slots=None):
        self.__dict__["_module"] = module
        self.__dict__["_params"] = dict(zip(names, tensors))
        self.__dict__["_slots"] = parameter_slots(module, names) if slots is None else slots

    def __call__(self, *args, **kwargs):
        saved = []
        try:
            for holders, t in zip(self._slots, self._params.values()):
                for params, attr in holders:
                    saved.append((params, attr, params[attr]))
                    params[attr] = t
            return self._module(*args, **kwargs)
        finally:
            for params, attr, old in reversed(saved):
                params[attr] = old

    def parameters(self):
        """An iterator over the iterate's tensors (in place of the module's trainable parameters)."""
        return iter(self._params.values())

    def named_parameters(self):
        """An iterator over ``(name, tensor)`` pairs of the iterate."""
        return iter(self._params.items())

    def __getattr__(self, name: str):
        params = self.__dict__["_params"]
        if name in params:
            return params[name]
        return getattr(self.__dict__["_module"], name)

    def __setattr__(self, name, value):
        raise AttributeError("ModuleView is read-only")

    def __repr__(self) -> str:
        return f"ModuleView({type(self._module).__name__})"


@dataclass
class Result:
    """What every solver function returns: the upper gradients, the final lower iterate and diagnostics.

    One gradient per hparam (``grads``), the final lower iterate ``params``
    (detached), the ``upper_loss`` that was differentiated, ``lower_grad_norm``, the norm of the last
    lower gradient evaluated, and the inner fixed-point residual ``fp_residual`` = ||Phi(y) - y|| with
    ``fp_residual_rel`` the core's relative residual (per tensor, see
    [`hypergrad.HypergradResult`][hypergrad.HypergradResult]), Phi the lower step (how far y is from a lower
    solution: ``||y - y*|| <= ||Phi(y) - y|| / (1 - rho)`` for a contraction with factor rho). Subclasses add
    their own diagnostics."""
    grads: List[Tensor]
    params: List[Tensor]
    upper_loss: Tensor
    lower_grad_norm: float
    fp_residual: float
    fp_residual_rel: float

    def diagnostics(self) -> Dict[str, Any]:
        """The scalar fields (iterations, residuals, k*, slack, ...) as a plain dict."""
        skip = {"grads", "params", "upper_loss"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out = {k: v for k, v in out.items() if isinstance(v, (int, float, str))}
        out["upper_loss"] = float(self.upper_loss)
        return out


def _trainable(module: nn.Module, what: str) -> Tuple[List[str], List[Tensor]]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(module).__name__}")
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{what} ({type(module).__name__}) has no parameters with requires_grad=True")
    for n, p in named:
        if not p.is_floating_point():
            raise TypeError(f"{what} parameter {n!r} has dtype {p.dtype}; expected floating point")
    return [n for n, _ in named], [p for _, p in named]


class BilevelSolver:
    """Base of [`Implicit`][methods.Implicit], [`Dynamic`][methods.Dynamic] and [`BVFIM`][methods.BVFIM].

    One call of [`compute_gradients`][methods.BilevelSolver.compute_gradients] per outer step adds the upper gradient to
    the upper model's ``.grad`` (like ``.backward()``) and returns the upper loss; the caller zeroes and steps its own
    optimizer. With ``warm_start`` the final lower iterate is copied into the lower model's parameters,
    so the next call starts there; otherwise the lower model is never written. Models are never
    re-initialized. Diagnostics of the last call are in [`diagnostics`][methods.BilevelSolver.diagnostics] (and
    ``last``).

    Args:
        ul_objective: the upper objective, ``objective(state) -> scalar tensor``.
        ul_model: the upper ``nn.Module``; its trainable parameters are x.
        ll_objective: the lower objective, ``objective(state) -> scalar tensor``.
        ll_model: the lower ``nn.Module``; its trainable parameters are y.
        ll_opt: a ``torch.optim.SGD`` over ``ll_model.parameters()``: the lower steps follow its rule
            (lr, momentum, dampening, weight decay, nesterov); it is never stepped itself.
        lower_loop: number of lower steps per call.
        lr: lower step size when ``ll_opt`` is None (else an override of its lr).
        warm_start: copy the final lower iterate into the lower model's parameters after each call.
    """

    def __init__(self, ul_objective: Objective, ul_model: nn.Module, ll_objective: Objective,
                 ll_model: nn.Module, *, ll_opt: Optional[torch.optim.Optimizer] = None,
                 lower_loop: int = 10, lr: Optional[float] = None, warm_start: bool = True):
        for obj, name in ((ul_objective, "ul_objective"), (ll_objective, "ll_objective")):
            if not callable(obj):
                raise TypeError(f"{name} must be a callable of state, got {type(obj).__name__}")
        self.ul_objective, self.ll_objective = ul_objective, ll_objective
        self.ul_model, self.ll_model, self.ll_opt = ul_model, ll_model, ll_opt
        self._ul_names, self._hparams = _trainable(ul_model, "ul_model")
        self._ll_names, self._params = _trainable(ll_model, "ll_model")
        self._ul_slots = parameter_slots(ul_model, self._ul_names)
        self._ll_slots = parameter_slots(ll_model, self._ll_names)
        shared = {id(p) for p in self._hparams} & {id(p) for p in self._params}
        if shared:
            raise ValueError("ul_model and ll_model share parameters; the upper and lower variables must be "
                             "distinct tensors")
        self.lower_loop = check_int(lower_loop, "lower_loop", 1)
        self.rule = self._make_rule(lr)
        self.warm_start = bool(warm_start)
        self.iteration = 0
        self.last: Optional[Result] = None
        self._wrap = None

    def data_parallel(self, group=None, reduce: str = "mean") -> "BilevelSolver":
        """Make the solver data-parallel over ``group`` (``torch.distributed``); returns ``self``.

        Every rank passes its own shard as the batches of
        [`compute_gradients`][methods.BilevelSolver.compute_gradients], and both objectives become the global
        ones through [`hypergrad.distributed.data_parallel`][hypergrad.distributed.data_parallel]
        (``reduce="mean"``: equal shards, objectives that are means over the shard; ``"sum"``: objectives
        already weighted by n_local / N). Every rank then computes the upper gradient of one process holding
        all the data.
        """
        from hypergrad.distributed import data_parallel
        data_parallel(lambda p, h: p, group, reduce)  # early errors: no process group, a bad reduce
        self._wrap = lambda fn: data_parallel(fn, group, reduce)
        return self

    def _make_rule(self, lr: Optional[float], default: float = 0.1) -> SGDRule:
        if self.ll_opt is None:
            return SGDRule.plain(default if lr is None else lr, len(self._params))
        return SGDRule.from_optimizer(self.ll_opt, self._params, lr)

    # -- the adapter: objective(state) -> loss(params, hparams) --------------------------------------
    def _upper_view(self, hparams: Sequence[Tensor]):
        if len(hparams) == len(self._hparams) and all(a is b for a, b in zip(hparams, self._hparams)):
            return self.ul_model  # the module itself: attribute access works as the user wrote it
        return ModuleView(self.ul_model, self._ul_names, hparams, self._ul_slots)

    def state(self, data, target, params: Sequence[Tensor], hparams: Sequence[Tensor]) -> Dict[str, Any]:
        """The ``state`` dict an objective sees for lower iterate ``params`` and upper ``hparams``."""
        upper, lower = self._upper_view(hparams), ModuleView(self.ll_model, self._ll_names, params, self._ll_slots)
        return {"data": data, "target": target, "upper_model": upper, "lower_model": lower,
                "ul_model": upper, "ll_model": lower}

    def as_loss(self, objective: Objective, data, target, name: str) -> Loss:
        """``objective(state)`` as a loss of ``(params, hparams)`` (the core convention)."""

        def loss(params, hparams):
            return check_scalar(objective(self.state(data, target, params, hparams)), name)

        return loss if self._wrap is None else self._wrap(loss)

    def losses(self, ul_data, ul_target, ll_data, ll_target) -> Tuple[Loss, Loss]:
        """(inner_loss f, outer_loss F) over the core convention for this batch."""
        return (self.as_loss(self.ll_objective, ll_data, ll_target, "ll_objective(state)"),
                self.as_loss(self.ul_objective, ul_data, ul_target, "ul_objective(state)"))

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def hparams(self) -> List[Tensor]:
        """The upper variables x: the upper model's trainable parameters (the tensors themselves)."""
        return list(self._hparams)

    @property
    def params(self) -> List[Tensor]:
        """The lower model's trainable parameters (the tensors themselves)."""
        return list(self._params)

    @property
    def diagnostics(self) -> Optional[Dict[str, Any]]:
        """Scalars of the last call: lower gradient norm, k*, solver iterations and residual, slack..."""
        return None if self.last is None else self.last.diagnostics()

    def _finish(self, result: Result, write_lower: bool) -> Tensor:
        """Store the result, copy the final lower iterate into the lower model if asked, count the step."""
        if write_lower:
            with torch.no_grad():
                for p, y in zip(self._params, result.params):
                    p.copy_(y)
        self.last = result
        self.iteration += 1
        return result.upper_loss

    def compute_gradients(self, ul_data, ul_target, ll_data, ll_target, **options) -> Tensor:
        """Add the upper gradient to the upper model's ``.grad`` and return the upper loss.

        Args:
            ul_data: the upper objective's batch (its ``state["data"]``).
            ul_target: the upper objective's targets (its ``state["target"]``).
            ll_data: the lower objective's batch.
            ll_target: the lower objective's targets.
            **options: per-call overrides of the solver's settings (see each solver).
        """
        raise NotImplementedError


__all__ = ["BilevelSolver", "ModuleView", "Result", "parameter_slots"]
