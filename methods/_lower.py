"""Lower-level machinery shared by the solvers: functional update rules and the descent loop.

Everything works on lists of tensors (the ``params`` convention of ``hypergrad``). An update rule is a
pure function of (params, grads, state); applied to tensors that carry a graph it is differentiable, which
is what the unrolled methods (RAD, T-RAD, BDA, IAPTT-GM) backpropagate through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hypergrad import tensor_list as tl
from hypergrad.errors import DivergenceError, NonFiniteError
from hypergrad.hypergradients import fixed_point_residuals

TensorList = List[Tensor]
Loss = Callable[[TensorList, TensorList], Tensor]


@dataclass
class SGDRule:
    """``torch.optim.SGD``'s update written functionally, one hyperparameter tuple per tensor.

        d = g + wd p;  b = d (first step) or m b + (1 - dampening) d;  d = d + m b (nesterov) or b;
        p <- p - lr d        (g -> -g when ``maximize``)
    """
    lr: List[float]
    momentum: List[float]
    dampening: List[float]
    weight_decay: List[float]
    nesterov: List[bool]
    maximize: List[bool]

    @classmethod
    def plain(cls, lr: float, n: int) -> "SGDRule":
        """Gradient descent ``p <- p - lr g`` on ``n`` tensors."""
        _check_lr(lr, "lr")
        return cls([float(lr)] * n, [0.0] * n, [0.0] * n, [0.0] * n, [False] * n, [False] * n)

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer, params: Sequence[Tensor],
                       lr: Optional[float] = None) -> "SGDRule":
        """The rule of ``opt`` for the tensors ``params`` (the lower model's parameters, by identity).

        ``lr`` overrides the optimizer's learning rate. Only ``torch.optim.SGD`` is supported: other
        optimizers' rules (Adam's sqrt of a squared gradient) are not safely differentiable.
        """
        if not isinstance(opt, torch.optim.SGD):
            raise TypeError(f"ll_opt must be a torch.optim.SGD (its update rule is followed, differentiably "
                            f"where the method unrolls); got {type(opt).__name__}")
        where = {}
        for group in opt.param_groups:
            for p in group["params"]:
                where[id(p)] = group
        rows = []
        for i, p in enumerate(params):
            if id(p) not in where:
                raise ValueError(f"ll_opt does not hold lower parameter {i} (shape {tuple(p.shape)}); build it "
                                 "over ll_model.parameters()")
            g = where[id(p)]
            glr = float(g["lr"]) if lr is None else float(lr)
            _check_lr(glr, "ll_opt's lr" if lr is None else "lr")
            rows.append((glr, float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0)),
                         float(g.get("weight_decay", 0.0)), bool(g.get("nesterov", False)),
                         bool(g.get("maximize", False))))
        if len(where) != len(params):
            raise ValueError(f"ll_opt holds {len(where)} tensors but the lower model has {len(params)} "
                             "trainable parameters; build it over ll_model.parameters()")
        return cls(*[list(c) for c in zip(*rows)])

    def with_lr(self, lr: float) -> "SGDRule":
        """The same rule with the step size ``lr`` on every tensor (a positive finite number)."""
        _check_lr(lr, "lr")
        return SGDRule([float(lr)] * len(self.lr), self.momentum, self.dampening, self.weight_decay,
                       self.nesterov, self.maximize)

    def init(self, params: Sequence[Tensor]) -> List[Optional[Tensor]]:
        """Fresh state: no momentum buffers (every call starts the lower optimizer afresh)."""
        return [None] * len(params)

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor],
             state: List[Optional[Tensor]]) -> Tuple[TensorList, List[Optional[Tensor]]]:
        """One step p <- p - lr d per tensor (d from g as in the class docstring); returns (params, state).

        ``state`` holds the momentum buffers (None before the first step, see ``init``); differentiable when
        ``params`` and ``grads`` carry a graph.
        """
        if self.is_plain():  # p - lr g on every tensor by one multi-tensor kernel (differentiable)
            return list(torch._foreach_add(list(params), list(grads), alpha=-self.lr[0])), state
        new, new_state = [], []
        for i, (p, g, buf) in enumerate(zip(params, grads, state)):
            d = -g if self.maximize[i] else g
            if self.weight_decay[i] != 0:
                d = d + self.weight_decay[i] * p
            m = self.momentum[i]
            if m != 0:
                buf = d if buf is None else m * buf + (1 - self.dampening[i]) * d
                d = d + m * buf if self.nesterov[i] else buf
            new.append(torch.add(p, d, alpha=-self.lr[i]))
            new_state.append(buf)
        return new, new_state

    def is_plain(self) -> bool:
        """Plain gradient descent with one step size on every tensor."""
        if getattr(self, "_plain", None) is None:
            self._plain = (len(set(self.lr)) == 1 and not any(self.momentum) and not any(self.weight_decay)
                           and not any(self.maximize))
        return self._plain


def _check_lr(lr, name: str) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {lr!r}")


def check_int(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_scalar(loss, name: str) -> Tensor:
    """A loss must be a one-element tensor (finiteness is checked in batches, see ``raise_if_nonfinite``)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name} must return a scalar, got a tensor of shape {tuple(loss.shape)}")
    return loss.reshape(())


def grads_of(loss: Tensor, wrt: Sequence[Tensor], create_graph: bool = False,
             retain_graph: Optional[bool] = None) -> TensorList:
    """d loss / d wrt with zeros where ``loss`` does not depend on a tensor."""
    return tl.grad_or_zeros(loss, list(wrt), retain_graph=create_graph if retain_graph is None else retain_graph,
                            create_graph=create_graph)


def sq_norm(xs: Sequence[Tensor]) -> Tensor:
    return sum((x * x).sum() for x in xs)


def raise_if_nonfinite(values: Sequence[Tensor], what: str, index_name: str = "step") -> None:
    """One host sync for a whole loop: raise [`NonFiniteError`][hypergrad.NonFiniteError] naming the first bad entry."""
    if not values:
        return
    ok = torch.isfinite(torch.stack([v.detach().reshape(()) for v in values]))
    if not bool(ok.all()):
        first = int((~ok).nonzero()[0, 0])
        raise NonFiniteError(f"{what} became NaN or Inf at {index_name} {first} of {len(values)}")


def descend(params: Sequence[Tensor], grad_fn: Callable[[TensorList, int, bool], TensorList], rule: SGDRule,
            steps: range, state: Optional[list] = None, *, track: bool,
            on_iterate: Optional[Callable[[TensorList, int], None]] = None):
    """Apply ``rule`` with ``grad_fn(y, t, create_graph)`` for t in ``steps``; return (y, state, grad norms,
    the iterate before the last step, detached: ``fp_residual(prev, y)`` is then ||Phi(y_prev) - y_prev||).

    ``track=False``: no graph at all (each step at its own iterate, detached). ``track=True``: every
    step stays on the graph, so the result can be differentiated w.r.t. whatever ``grad_fn`` and the
    start depend on. ``grad_fn`` is called with ``y`` requiring grad.
    """
    y = list(params)
    state = rule.init(y) if state is None else state
    norms: List[Tensor] = []
    last = y
    with torch.enable_grad():
        for t in steps:
            last = y
            if track:
                y = [w if w.requires_grad else w.detach().requires_grad_(True) for w in y]
                g = grad_fn(y, t, True)
                y, state = rule.step(y, g, state)
            else:
                leaves = [w.detach().requires_grad_(True) for w in y]
                g = [gi.detach() for gi in grad_fn(leaves, t, False)]
                with torch.no_grad():
                    y, state = rule.step([w.detach() for w in y], g, state)
            norms.append(tl.global_norm(g))
            if on_iterate is not None:
                on_iterate(y, t)
    return y, state, norms, [w.detach() for w in last]


def fp_residual(prev: Sequence[Tensor], y: Sequence[Tensor]) -> Tuple[float, float]:
    """(||Phi(w) - w||, the core's relative residual: the largest per tensor, see
    [`hypergrad.HypergradResult`][hypergrad.HypergradResult]) for one step w = ``prev`` -> Phi(w) = ``y``. One host
    read, after the loop."""
    with torch.no_grad():
        d, rel = fixed_point_residuals([w.detach() for w in prev], [w.detach() for w in y], tl.dots)
        both = torch.stack([d, rel]).tolist()
    return float(both[0]), float(both[1])


GROWTH, STREAK, STREAK_GROWTH, MIN_GROWTH = 1e6, 10, 1e3, 1e2


def check_lower(losses: Sequence[Tensor], norms: Sequence[Tensor], step_option: str,
                what: str = "the lower") -> None:
    """NaN/Inf and divergence of a lower loop, from its per-step losses f_t and gradient norms g_t (tensors:
    one host read for the whole loop). Diverging: at some t, f_t > f_0 and either g_t > GROWTH g_0 or the
    last STREAK steps all raised both f and g with g_t > STREAK_GROWTH g_0; or, whatever f_0, the last
    STREAK steps raised both with g_t > MIN_GROWTH min_s g_s (an unstable mode that started small). A
    descent step with a small enough step size lowers f, so a rising loss with a growing gradient means the
    step is too large; a saddle escape grows g but lowers f.
    Raise [`DivergenceError`][hypergrad.DivergenceError] naming ``step_option``, else
    [`NonFiniteError`][hypergrad.NonFiniteError] at the first NaN."""
    if not norms:
        return
    n = min(len(losses), len(norms))
    rows = torch.stack([torch.stack(list(losses[:n])).detach().reshape(n),
                        torch.stack(list(norms[:n])).detach().reshape(n)]).double().cpu().tolist()
    f, g = rows
    finite = [a == a and b == b and abs(a) != float("inf") and abs(b) != float("inf") for a, b in zip(f, g)]
    end = finite.index(False) if False in finite else n
    up, g_min = 0, g[0] if end else 0.0
    for t in range(1, end):
        up = up + 1 if (f[t] > f[t - 1] and g[t] > g[t - 1]) else 0
        g_min = min(g_min, g[t])
        rising = up >= STREAK and g[t] > MIN_GROWTH * g_min  # an unstable mode dominating: f need not pass f_0
        if rising or (f[t] > f[0] and (g[t] > GROWTH * g[0] or (up >= STREAK and g[t] > STREAK_GROWTH * g[0]))):
            raise DivergenceError(
                f"{what} iteration diverges: its gradient norm grew from {g[0]:.3e} (smallest {g_min:.3e}) to "
                f"{g[t]:.3e} and its loss from {f[0]:.6g} to {f[t]:.6g} in {t} steps (of {len(norms)}), rising over "
                f"the last {up}; the step size {step_option} is "
                f"too large for this problem (gradient descent needs step < 2/L, L the curvature of the lower "
                f"loss): pass a smaller one, e.g. a tenth")
    if end < n or len(losses) != len(norms):
        raise_if_nonfinite(list(losses), f"{what} loss", "lower step")
        raise_if_nonfinite(list(norms), f"{what} gradient", "lower step")


def step_name(option: str, rule: SGDRule, alias: str = "or ll_opt's lr") -> str:
    """``option`` with the rule's current value, e.g. ``lr=0.5 (or ll_opt's lr)``."""
    lrs = sorted(set(rule.lr))
    value = f"={lrs[0]:g}" if len(lrs) == 1 else f" (values {', '.join(f'{v:g}' for v in lrs)})"
    return f"{option}{value} ({alias})"
