"""The shared base of the stochastic and first-order bilevel solvers.

    min_x h(x) = F(y*(x), x),   y*(x) = argmin_y f(y, x),   f = 1/n sum_i f_i,  F = 1/m sum_j F_j,

    grad h(x) = grad_x F - grad2_xy f v*,   v* = [grad2_yy f]^-1 grad_y F   (at y = y*(x)).

A solver holds the state of one run: the lower variable y, the upper variable x and, for the methods that
carry it, the linear-system variable v, each one flat vector (``params``/``hparams`` give them back in the
caller's shapes); one [`StochasticSolver.step`][methods.stochastic.StochasticSolver.step] is one outer iteration of the
paper's algorithm, and y and v stay where the last step left them (the warm starts). ``inner`` (f) and ``outer`` (F) are
[`FiniteSum`][methods.stochastic.FiniteSum] oracles; every derivative goes through the few primitives
here (a minibatch gradient, a gradient with its Hessian- and cross-vector products at the same batch), which
count the per-sample evaluations: ``oracle_calls`` is that count in minibatch units.

Sign convention of v: SOBA, SABA and SRBA (the framework of Dagreou et al.) drive v to -v*, i.e. solve
grad2_yy f v = -grad_y F, and step x along grad_x F + grad2_xy f v; each module states its own.

Safety (the core's rules): after every step one host read checks that the state is finite and has not
grown beyond ``max_norm`` (default 1e8 x (1 + its starting size)); either raises naming the step sizes.
Every result is a stochastic estimate and says so (``approximate=True``).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from hypergrad.errors import DivergenceError, NonFiniteError
from .oracle import Batch, FiniteSum

Tensors = Union[Tensor, Sequence[Tensor]]


def _as_list(xs: Tensors, name: str) -> List[Tensor]:
    xs = [xs] if isinstance(xs, Tensor) else list(xs) if isinstance(xs, (list, tuple)) else None
    if not xs or not all(isinstance(x, Tensor) for x in xs):
        raise TypeError(f"{name} must be a tensor or a non-empty list of tensors")
    for i, x in enumerate(xs):
        if not x.is_floating_point():
            raise TypeError(f"{name}[{i}] has dtype {x.dtype}; expected a floating dtype")
    return xs


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    """``value`` as a float, required finite and > 0 (>= 0 with ``allow_zero``); any real number type
    (numpy's included), not bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class StochasticResult:
    """The result of [`run`][methods.stochastic.StochasticSolver.run]: the final iterate, the costs and the history.

    The final ``params`` (y) and ``hparams`` (x) in the caller's shapes, ``steps`` taken, ``oracle_calls`` (per-sample
    derivative evaluations / batch size, over both oracles), ``time`` (seconds in steps, callbacks excluded) and the
    ``history`` of callback records. ``approximate`` is always True: x is a stochastic iterate, not a certified
    solution."""
    params: List[Tensor]
    hparams: List[Tensor]
    steps: int
    oracle_calls: float
    time: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    approximate: bool = True


class StochasticSolver:
    """Base of the minibatch bilevel solvers: the state (y, v, x), the derivative primitives and the run loop.

    Subclasses implement ``_step`` (one outer iteration) with the primitives below and set ``name``. The
    state is flat: ``y``, ``x`` and ``v`` are one vector each (``params`` and ``hparams`` give y and x back in
    the caller's shapes).

    Args:
        inner: the oracle of f (lower).
        outer: the oracle of F (upper).
        params: the starting y (a tensor or a list of tensors; copied, never written).
        hparams: the starting x (a tensor or a list of tensors; copied, never written).
        step_size: the inner step size rho (the benchmark's ``step_size``).
        outer_ratio: the outer step size is ``step_size / outer_ratio``.
        max_norm: a state norm above this raises [`hypergrad.DivergenceError`][hypergrad.DivergenceError] (default
            1e8 x (1 + the starting norm)).
    """

    name = "stochastic"
    """The method's name (in messages, ``repr`` and progress bars)."""
    uses_v = True
    """Whether the safety check watches ``v`` (False for the methods that carry no linear-system variable)."""

    def __init__(self, inner: FiniteSum, outer: FiniteSum, params: Tensors, hparams: Tensors, *,
                 step_size: float = 0.1, outer_ratio: float = 1.0, max_norm: Optional[float] = None):
        for o, n in ((inner, "inner"), (outer, "outer")):
            if not isinstance(o, FiniteSum):
                raise TypeError(f"{n} must be a methods.stochastic.FiniteSum oracle, got {type(o).__name__}")
        self.inner, self.outer = inner, outer
        params, hparams = _as_list(params, "params"), _as_list(hparams, "hparams")
        kinds = {(t.dtype, t.device) for t in params + hparams}
        if len(kinds) != 1:
            raise TypeError(f"params and hparams must share one dtype and device, got {sorted(map(str, kinds))}")
        self._y_shapes = [p.shape for p in params]
        self._x_shapes = [h.shape for h in hparams]
        self.y = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        self.x = torch.cat([h.detach().reshape(-1) for h in hparams]).clone()
        self.v = torch.zeros_like(self.y)
        self.step_size = check_positive(step_size, "step_size")
        self.outer_ratio = check_positive(outer_ratio, "outer_ratio")
        start = float(torch.cat([self.y, self.x]).norm())
        if not math.isfinite(start):
            raise NonFiniteError("params/hparams contain NaN or Inf")
        self.max_norm = 1e8 * (1.0 + start) if max_norm is None else check_positive(max_norm, "max_norm")
        self.t = 0
        self.samples = {"inner": 0, "outer": 0}
        self.time_spent = 0.0  # seconds in steps taken by run(), over all runs

    # -- the caller's view ---------------------------------------------------------------------------
    @property
    def params(self) -> List[Tensor]:
        """The current y in the caller's shapes (views of the solver's state; clone to keep)."""
        return self._unpack(self.y, self._y_shapes)

    @property
    def hparams(self) -> List[Tensor]:
        """The current x in the caller's shapes (views of the solver's state; clone to keep)."""
        return self._unpack(self.x, self._x_shapes)

    @property
    def oracle_calls(self) -> float:
        """Per-sample derivative evaluations of both oracles, in minibatch units.

        A full-batch gradient of f counts n / batch_size; a gradient with its Hessian-vector product at the
        same batch counts 2.
        """
        return self.inner.calls(self.samples["inner"]) + self.outer.calls(self.samples["outer"])

    @staticmethod
    def _unpack(vec: Tensor, shapes) -> List[Tensor]:
        parts = vec.split([math.prod(s) for s in shapes])
        return [p.view(s) for p, s in zip(parts, shapes)]

    def lr(self, constant: float, exponent: float = 0.0) -> float:
        """The step size of iteration t (0-based): ``constant / (t + 1) ** exponent``."""
        return constant / (self.t + 1) ** exponent if exponent else constant

    @property
    def outer_step_size(self) -> float:
        """The outer step size gamma = step_size / outer_ratio (before any schedule)."""
        return self.step_size / self.outer_ratio

    # -- derivative primitives (flat vectors in, flat vectors out) -------------------------------------
    def _loss(self, oracle: FiniteSum, y: Tensor, x: Tensor, batch: Batch) -> Tensor:
        return oracle.value(self._unpack(y, self._y_shapes), self._unpack(x, self._x_shapes), batch)

    def _count(self, oracle: FiniteSum, batch: Batch, products: int = 1) -> None:
        self.samples["inner" if oracle is self.inner else "outer"] += products * batch.size

    def grad(self, oracle: FiniteSum, y: Tensor, x: Tensor, batch: Batch, wrt: str = "y") -> Tuple[Tensor, ...]:
        """The batch gradients of ``oracle`` at (y, x) with respect to ``wrt`` ("y", "x" or "yx")."""
        yl, xl = y.detach().requires_grad_("y" in wrt), x.detach().requires_grad_("x" in wrt)
        with torch.enable_grad():
            loss = self._loss(oracle, yl, xl, batch)
            leaves = [t for t, k in ((yl, "y"), (xl, "x")) if k in wrt]
            gs = (torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad
                  else [None] * len(leaves))      # a loss that does not depend on the variables asked for
        self._count(oracle, batch)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves))

    def grad_and_products(self, y: Tensor, x: Tensor, v: Tensor, batch: Batch,
                          grad: bool = True) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """(grad_y f_B, grad2_yy f_B v, grad2_xy f_B v) at (y, x) on one batch B of the inner oracle.

        One forward and two backward passes (``grad=False``: the gradient is not returned, None in its place).
        """
        yl, xl = y.detach().requires_grad_(), x.detach().requires_grad_()
        with torch.enable_grad():
            loss = self._loss(self.inner, yl, xl, batch)
            g = (torch.autograd.grad(loss, yl, create_graph=True, allow_unused=True)[0] if loss.requires_grad
                 else None)
            g = torch.zeros_like(y) if g is None else g
            hv, jv = (torch.autograd.grad(g, (yl, xl), v, allow_unused=True) if g.requires_grad
                      else (None, None))           # f linear in y, or independent of it: zero products
        self._count(self.inner, batch, 2)
        hv = torch.zeros_like(y) if hv is None else hv
        jv = torch.zeros_like(x) if jv is None else jv
        return (g.detach() if grad else None), hv, jv

    def hvp(self, y: Tensor, x: Tensor, v: Tensor, batch: Batch) -> Tensor:
        """grad2_yy f_B v at (y, x)."""
        return self.grad_and_products(y, x, v, batch, grad=False)[1]

    def cross(self, y: Tensor, x: Tensor, v: Tensor, batch: Batch) -> Tensor:
        """grad2_xy f_B v at (y, x) (the upper-variable part of the same double backward)."""
        return self.grad_and_products(y, x, v, batch, grad=False)[2]

    # -- stepping ------------------------------------------------------------------------------------
    def _step(self) -> None:
        raise NotImplementedError

    def _state(self) -> List[Tensor]:
        """The tensors the safety check watches (y, x and v; subclasses add their own)."""
        return [self.y, self.x, self.v] if self.uses_v else [self.y, self.x]

    def step(self) -> "StochasticSolver":
        """One outer iteration (the paper's update); raises on a non-finite or diverging state."""
        self._step()
        self.t += 1
        norms = torch.stack(torch._foreach_norm(self._state()))
        worst = float(norms.max()) if torch.isfinite(norms).all() else math.nan
        if not math.isfinite(worst):
            raise NonFiniteError(
                f"{self.name} iteration {self.t}: the state became NaN or Inf (step_size={self.step_size}, "
                f"outer_ratio={self.outer_ratio}); reduce step_size (or raise outer_ratio), or check that the "
                "losses are finite")
        if worst > self.max_norm:
            raise DivergenceError(
                f"{self.name} iteration {self.t}: the state's norm {worst:.3g} exceeds max_norm="
                f"{self.max_norm:.3g}: the iteration diverges; reduce step_size={self.step_size} (or raise "
                f"outer_ratio={self.outer_ratio})")
        return self

    def run(self, n_steps: int, *, callback: Optional[Callable[["StochasticSolver"], Any]] = None,
            eval_every: int = 1, max_time: Optional[float] = None, progress: bool = False) -> StochasticResult:
        """Run ``n_steps`` outer iterations; returns a [`StochasticResult`][methods.stochastic.StochasticResult].

        Every ``eval_every`` steps (and at the start and the end) ``callback(self)`` is called and its value
        recorded in the result's ``history`` with the step, the oracle calls and the time spent in steps
        (callbacks excluded; ``self.time_spent`` is the running total, so a callback can evaluate on a time
        grid).

        Args:
            n_steps: the number of steps (fewer once ``max_time`` seconds were spent in steps).
            callback: ``callback(solver)``; a return value of ``False`` stops the run, ``None`` is not recorded.
            eval_every: the steps between two callbacks.
            max_time: the most seconds spent in steps (None: no limit).
            progress: show a ``tqdm`` progress bar.
        """
        check_count(n_steps, "n_steps", 0)
        check_count(eval_every, "eval_every")
        if max_time is not None:
            check_positive(max_time, "max_time")
        history: List[Dict[str, Any]] = []
        spent, stop = 0.0, False

        def record():
            if callback is None:
                return False
            out = callback(self)
            if out is not None:
                history.append({"step": self.t, "oracle_calls": self.oracle_calls, "time": spent, "value": out})
            return out is False

        stop = record()
        steps = range(n_steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=self.name, leave=False)
        for k in steps:
            if stop:
                break
            t0 = time.perf_counter()
            self.step()
            dt = time.perf_counter() - t0
            spent += dt
            self.time_spent += dt
            out_of_time = max_time is not None and spent >= max_time
            if (k + 1) % eval_every == 0 or k + 1 == n_steps or out_of_time:
                stop = record()
            if out_of_time:
                break
        return StochasticResult([p.clone() for p in self.params], [h.clone() for h in self.hparams],
                                self.t, self.oracle_calls, spent, history)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(step_size={self.step_size}, outer_ratio={self.outer_ratio}, "
                f"t={self.t})")
