"""The implicit layer's public face: the solution of an inner problem as tensors in the caller's graph.

    w = hg.FixedPointLayer(fp_map)(params0, hparams)     # w = Phi(w, lambda), found by Anderson
    loss = outer(w, hparams); loss.backward()            # implicit gradient, exact to any order

``fp_map(params, hparams) -> list`` is hypertorch's map; ``optimality_fn(params, hparams) -> list`` is jaxopt's
optimality function (zero at the solution). The decorators wrap a solver of one's own:
``custom_root(optimality_fn)(solver)`` and ``custom_fixed_point(fp_map)(solver)``, ``solver(params0, hparams)``
returning the solution, as in jaxopt.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import tensor_list as tl
from .errors import FixedPointWarning, NonFiniteError, NotAFixedPointError
from .forward_solvers import FORWARD_SOLVERS, ForwardInfo
from .hypergradients import check_fixed_point, check_solver_call, fixed_point_residuals, fixed_point_warn_rtol
from .implicit import _Problem, _Solve, retrieve_all_functorch_interpreters
from .linear_solvers import SOLVERS, SolveInfo

FpMap = Callable[[List[Tensor], List[Tensor]], List[Tensor]]
Solver = Callable[[List[Tensor], List[Tensor]], List[Tensor]]


def _evaluate(fn, ws, hs, name: str) -> List[Tensor]:
    """fn(ws, hs) checked against the shapes of ``ws``; plain (graph-free) tensors are given requires_grad so
    hypertorch maps that differentiate an inner loss with torch.autograd.grad work in the forward solve."""
    if not torch._C._functorch.is_functorch_wrapped_tensor(ws[0]) and not ws[0].requires_grad:
        with torch.enable_grad():
            ws = [w.detach().requires_grad_() for w in ws]
            return [t.detach() for t in tl.check_like(fn(ws, list(hs)), ws, name)]
    return tl.check_like(fn(list(ws), list(hs)), ws, name)


class ImplicitLayer:
    """The solution ``w*(lambda)`` of ``F(w*, lambda) = 0`` as tensors differentiable in hparams.

    ``layer(params0, hparams)`` runs the forward solver from ``params0`` and returns the solution in the caller's
    graph; its derivatives (``backward``, ``torch.func`` transforms, any order) are implicit.

    Args:
        optimality: F(params, hparams) -> list shaped like params, zero at the solution.
        solver: the forward solver, ``solver(params0, hparams) -> (params, ForwardInfo)`` on graph-free
            tensors (the decorators [`custom_root`][hypergrad.custom_root] and
            [`custom_fixed_point`][hypergrad.custom_fixed_point] take a plain ``solver(params0, hparams) -> params``).
        backward_solver: a core solver for the adjoint (dF/dw)^T u = g: "gmres" (any operator, the default),
            "cg" (symmetric positive definite dF/dw: gradient maps, optimality = gradient of a convex loss),
            "minres", "fixed_point", "neumann", "cg_normaleq" or "dense".
        backward_maxiter: the backward solver's iteration limit.
        backward_tol: its absolute tolerance (the core's default relative tolerance, 1e-10 in float64,
            when neither tolerance is given).
        backward_rtol: its relative tolerance (see ``backward_tol``).
        warm_start: start each first-order adjoint solve from the previous one (same shapes).
        strict: a backward solve that does not converge raises [`ConvergenceError`][hypergrad.ConvergenceError] (else
            warns).
        backward_options: more options of the backward solver (``restart``, ``check_every``, ...).
        name: the name of ``optimality`` in error messages.

    After a call, ``forward_info`` is the forward solve's [`ForwardInfo`][hypergrad.ForwardInfo] (under vmap: a list,
    one per task); after a first-order backward pass outside vmap,
    ``backward_info`` is the last adjoint solve's [`SolveInfo`][hypergrad.SolveInfo] and ``adjoint`` its solution.
    """

    def __init__(self, optimality, solver, *, backward_solver: str = "gmres", backward_maxiter: int = 200,
                 backward_tol: Optional[float] = None, backward_rtol: Optional[float] = None, warm_start: bool = False,
                 strict: bool = True, backward_options: Optional[dict] = None, name: str = "optimality_fn"):
        self.optimality, self.solver, self.name = optimality, solver, name
        extra = dict(backward_options or {})
        if "maxiter" in extra:
            raise TypeError("pass backward_maxiter=... instead of backward_options={'maxiter': ...}")
        maxiter = check_solver_call(backward_solver, SOLVERS, backward_maxiter, extra)
        self.options = dict(solver=backward_solver, strict=tl.check_flag(strict, "strict"),
                            warm_start=tl.check_flag(warm_start, "warm_start"), tol=backward_tol, rtol=backward_rtol,
                            **({"maxiter": maxiter} if backward_solver != "dense" else {}), **extra)
        self.forward_info: Optional[ForwardInfo] = None
        self.backward_info: Optional[SolveInfo] = None
        self.adjoint: Optional[List[Tensor]] = None

    def __call__(self, params0: Sequence[Tensor], hparams: Sequence[Tensor]) -> List[Tensor]:
        params0 = tl.as_tensor_list(params0, "params0")
        hparams = tl.as_tensor_list(hparams, "hparams")
        for i, t in enumerate(params0):  # integer hparams (labels, indices) are data: no derivative
            if not t.is_floating_point():
                raise TypeError(f"params0[{i}] has dtype {t.dtype}; the solution must be floating-point")
        for i, t in enumerate(hparams):
            if t.is_complex():
                raise TypeError(f"hparams[{i}] has dtype {t.dtype}; complex hparams are not supported (pass the real "
                                "and imaginary parts as two real tensors)")
        F = functools.partial(_checked, self.optimality, self.name)
        self._grad_on = torch.is_grad_enabled()  # under no_grad no gradient can be lost to a closure
        prob = _Problem(F, self._forward, len(params0), self.options, self)
        # params0 is only a start: it gets no gradient, and its graph (a previous step's solution) is not kept
        out = list(_Solve.apply(prob, *[t.detach() for t in params0], *hparams))
        if _transformed():  # here, outside the node, the transforms are visible
            _check_transformed_closure(F, out, hparams, self.name)
        return out

    def _forward(self, w0: List[Tensor], hs: List[Tensor]) -> List[Tensor]:
        w, info = self.solver(w0, hs)
        w = [t.detach() for t in tl.check_like(w, w0, "the forward solver's solution")]
        if getattr(self, "_grad_on", True):
            _check_closure(self.optimality, w, hs, self.name)
        self.forward_info = info
        return w

    # called by the backward nodes
    def warm_adjoint(self, b: Sequence[Tensor]) -> Optional[List[Tensor]]:
        """The start of the next adjoint solve for right-hand side ``b``: the last ``adjoint``, if usable.

        None when unset or not of ``b``'s shapes and dtype. Called by the backward pass under ``warm_start``.
        """
        prev = self.adjoint
        if prev is None or [t.shape for t in prev] != [t.shape for t in b] or prev[0].dtype != b[0].dtype:
            return None
        return prev

    def record_backward(self, info: SolveInfo, x: Sequence[Tensor]) -> None:
        """Keep an adjoint solve's ``info`` and (detached) solution ``x`` as ``backward_info`` and ``adjoint``.

        Called by the first-order backward pass.
        """
        self.backward_info, self.adjoint = info, [t.detach() for t in x]


def _check_closure(fn, ws, hs, name: str) -> None:
    """F must reach tensors that require grad only through its arguments: a closed-over tensor with a graph
    (model weights not passed as hparams) would get no gradient, silently. One evaluation, one graph walk."""
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_() for w in ws]
        out = fn(leaves, [h.detach() for h in hs])
    ours = {id(t) for t in leaves}
    stray = [t for t in tl.graph_leaves([o for o in out if o.requires_grad]) if id(t) not in ours]
    if stray:
        raise ValueError(f"{name}(params, hparams) uses tensors that require grad but are not among its arguments "
                         f"(shapes {[tuple(t.shape) for t in stray][:5]}), or reads an hparam by closure instead of "
                         "from its hparams argument: they would get no gradient. Pass them in hparams and read them "
                         "from there inside the map")


def _transformed() -> bool:
    """A torch.func transform or a forward-mode AD level is active."""
    return bool(retrieve_all_functorch_interpreters()) or torch.autograd.forward_ad._current_level >= 0


def _check_transformed_closure(F, params0, hparams, name: str) -> None:
    """Under torch.func (or forward AD) a closed-over tensor that the transform tracks would silently get a zero
    derivative: F on plain copies of the solution and hparams (a batch's first task) must give untracked
    tensors. Seen: reverse-mode levels (grad, jacrev, hessian), vmap, and torch.autograd.forward_ad; not a
    closure under a forward-only torch.func.jvp/jacfwd."""
    plain = lambda ts: [torch.zeros(tuple(t.shape), dtype=t.dtype, device=t.device) + _value(t) for t in ts]
    try:
        out = F(plain(params0), plain(hparams))
    except Exception:  # a map that needs params with grad (hypertorch's): the autograd.grad guard refuses it
        return
    if any(_tracked(o) for o in out):
        raise ValueError(f"{name}(params, hparams) uses a tensor that a torch.func transform (or forward-mode AD) is "
                         "differentiating or batching, but not through its arguments: its derivative would be 0. "
                         "Pass it in hparams and read it from there inside the map")


def _tracked(t: Tensor) -> bool:
    """``t`` is batched, differentiated by a reverse-mode transform level, or has a forward-AD tangent."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        if F.is_batchedtensor(t) or t.requires_grad:
            return True
        t = F.get_unwrapped(t)
    return torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _value(t: Tensor) -> Tensor:
    """The plain values of a tensor a transform wraps (of the first task where a vmap batches it)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        batched = F.is_batchedtensor(t)
        bdim = F.maybe_get_bdim(t) if batched else None
        t = F.get_unwrapped(t)
        if batched:
            t = t.select(bdim, 0)
    return torch.autograd.forward_ad.unpack_dual(t).primal.detach()


def _checked(fn, name: str, ws, hs) -> List[Tensor]:
    return tl.check_like(fn(list(ws), list(hs)), ws, f"{name}(params, hparams)")


class FixedPointLayer(ImplicitLayer):
    """The fixed point ``w* = fp_map(w*, hparams)`` as tensors differentiable in hparams.

    ``layer(params0, hparams)`` finds it from ``params0`` with a forward solver of
    [`FORWARD_SOLVERS`][hypergrad.FORWARD_SOLVERS], whose stopping rule (per-tensor relative) decides when the
    solution is a fixed point.

    Args:
        fp_map: Phi(params, hparams) -> list shaped like params.
        solver: "anderson" ([`anderson`][hypergrad.anderson]) or "fixed_point"
            ([`fixed_point_iteration`][hypergrad.fixed_point_iteration]).
        maxiter: the forward solver's iteration limit.
        tol: its absolute tolerance.
        rtol: its per-tensor relative tolerance (neither given: ``default_rtol(dtype)``).
        solver_options: its other options (``memory``, ``beta``, ``regularization``, ...).
        **backward: [`ImplicitLayer`][hypergrad.ImplicitLayer]'s keywords (``backward_solver``, ``strict``, ...).
    """

    def __init__(self, fp_map: FpMap, solver: str = "anderson", *, maxiter: int = 1000, tol: Optional[float] = None,
                 rtol: Optional[float] = None, solver_options: Optional[dict] = None, **backward):
        if solver not in FORWARD_SOLVERS:
            raise ValueError(f"unknown forward solver {solver!r}; choose one of {sorted(FORWARD_SOLVERS)}, or wrap "
                             "your own with hypergrad.custom_fixed_point(fp_map)(solver)")
        self.fp_map = fp_map
        extra = dict(solver_options or {})
        valid = sorted(set(inspect.signature(FORWARD_SOLVERS[solver]).parameters) - {"fp", "w0", "maxiter", "tol", "rtol"})
        for key in extra:
            if key in ("maxiter", "tol", "rtol"):
                raise TypeError(f"pass {key}=... to FixedPointLayer, not in solver_options")
            if key not in valid:
                raise TypeError(f"unknown option {key!r} for solver {solver!r}; its options are {valid}")
        opts = dict(maxiter=maxiter, tol=tol, rtol=rtol, **extra)

        def forward(w0, hs):
            return FORWARD_SOLVERS[solver](lambda w: _evaluate(fp_map, w, hs, "fp_map(params, hparams)"), w0, **opts)
        super().__init__(functools.partial(_fixed_point_residual, fp_map), forward, name="fp_map", **backward)


def _fixed_point_residual(fp_map, ws, hs) -> List[Tensor]:
    """F(w, lambda) = w - Phi(w, lambda)."""
    return tl.sub(ws, tl.check_like(fp_map(list(ws), list(hs)), ws, "fp_map(params, hparams)"))


def custom_fixed_point(fp_map: FpMap, *, fixed_point_tol: Optional[float] = None, **backward):
    """Decorator: ``custom_fixed_point(fp_map)(solver)`` is ``solver`` with implicit derivatives.

    For a solver ``solver(params0, hparams) -> params`` that returns a fixed point of ``fp_map``. The solution
    is checked as the core checks params: a [`FixedPointWarning`][hypergrad.FixedPointWarning] above 1e-3
    relative residual (float32: 1.2e-2), [`NotAFixedPointError`][hypergrad.NotAFixedPointError] above
    ``fixed_point_tol`` if given. The decorated solver's ``.layer`` is its
    [`ImplicitLayer`][hypergrad.ImplicitLayer] (with the diagnostics).

    Args:
        fp_map: Phi(params, hparams) -> list shaped like params.
        fixed_point_tol: the largest accepted relative fixed-point residual (None: warn only).
        **backward: [`ImplicitLayer`][hypergrad.ImplicitLayer]'s keywords (``backward_solver``, ``strict``, ...).
    """
    def wrap(solver: Solver) -> ImplicitLayer:
        def forward(w0, hs):
            w = _run_user_solver(solver, w0, hs)
            mapped = _evaluate(fp_map, w, hs, "fp_map(params, hparams)")
            d, rel = fixed_point_residuals(w, mapped, tl.dots)
            check_fixed_point(float(d), float(rel), fixed_point_tol, w[0].dtype)
            return w, ForwardInfo("custom", 0, float(d), True, [float(d)], float(rel))
        layer = ImplicitLayer(functools.partial(_fixed_point_residual, fp_map), forward, name="fp_map", **backward)
        return functools.wraps(solver)(_Bound(layer))
    return wrap


def custom_root(optimality_fn: FpMap, *, root_tol: Optional[float] = None, **backward):
    """Decorator: ``custom_root(optimality_fn)(solver)`` is ``solver`` with implicit derivatives (jaxopt's).

    For a solver ``solver(params0, hparams) -> params`` with optimality_fn(params, hparams) = 0 at its output.
    The decorated solver's ``.layer`` is its [`ImplicitLayer`][hypergrad.ImplicitLayer] (with the diagnostics).

    Args:
        optimality_fn: F(params, hparams) -> list shaped like params, zero at the solution.
        root_tol: the largest accepted ||F(w)|| / ||F(params0)||
            ([`NotAFixedPointError`][hypergrad.NotAFixedPointError] above it); None: a
            [`FixedPointWarning`][hypergrad.FixedPointWarning] above 1e-3 (float32: 1.2e-2).
        **backward: [`ImplicitLayer`][hypergrad.ImplicitLayer]'s keywords (``backward_solver``, ``strict``, ...).
    """
    def wrap(solver: Solver) -> ImplicitLayer:
        def forward(w0, hs):
            r0 = float(tl.norm(_evaluate(optimality_fn, w0, hs, "optimality_fn(params, hparams)")))
            w = _run_user_solver(solver, w0, hs)
            r = float(tl.norm(_evaluate(optimality_fn, w, hs, "optimality_fn(params, hparams)")))
            if r == 0:
                rel = 0.0
            else:  # no relative scale when F(params0) is 0, NaN or Inf: any nonzero residual is unaccounted for
                rel = r / r0 if math.isfinite(r0) and r0 > 0 else math.inf
            _check_root(r, rel, root_tol, w[0].dtype)
            return w, ForwardInfo("custom", 0, r, True, [r0, r])
        layer = ImplicitLayer(optimality_fn, forward, name="optimality_fn", **backward)
        return functools.wraps(solver)(_Bound(layer))
    return wrap


class _Bound:
    """A decorated solver: call it like the solver; ``.layer`` has the diagnostics."""

    def __init__(self, layer: ImplicitLayer):
        self.layer = layer

    def __call__(self, params0, hparams) -> List[Tensor]:
        return self.layer(params0, hparams)


def _run_user_solver(solver, w0, hs) -> List[Tensor]:
    with torch.enable_grad():  # the user's solver may differentiate its loss; its graph is not ours
        out = solver([t.detach().clone() for t in w0], [h.detach() for h in hs])
    out = tl.check_like(list(out) if isinstance(out, (list, tuple)) else [out], w0, "solver(params0, hparams)")
    return [t.detach() for t in out]


def _check_root(r: float, rel: float, root_tol: Optional[float], dtype) -> None:
    """NaN/Inf raise; ||F(w)|| / ||F(params0)|| above ``root_tol`` raises, above 1e-3 warns when not given."""
    if not math.isfinite(r):
        raise NonFiniteError("optimality_fn(params, hparams) contains NaN or Inf at the solver's output")
    if root_tol is not None:
        if rel > root_tol:
            raise NotAFixedPointError(f"the solver's output is not a root of optimality_fn: ||F(w)|| = {r:.3e}, "
                                      f"{rel:.3e} relative to ||F(params0)|| (root_tol={root_tol:g}); the implicit "
                                      "gradient is exact only at a root: run the solver longer")
    elif rel > fixed_point_warn_rtol(dtype):
        warnings.warn("the solver's output is not a root of optimality_fn: ||F(w)|| / ||F(params0)|| > 1e-3; the "
                      "implicit gradient is exact only at a root: run the solver longer, or pass root_tol=math.inf to "
                      "accept it", FixedPointWarning, stacklevel=4)


def fixed_point_solve(fp_map: FpMap, params0: Sequence[Tensor], hparams: Sequence[Tensor], **options) -> List[Tensor]:
    """The fixed point of ``fp_map`` from ``params0``, differentiable in hparams.

    ``FixedPointLayer(fp_map, **options)(params0, hparams)``, with a new layer at each call.

    Args:
        fp_map: Phi(params, hparams) -> list shaped like params.
        params0: the start of the forward solver (gets no gradient).
        hparams: lambda, the tensors the fixed point is differentiable in.
        **options: [`FixedPointLayer`][hypergrad.FixedPointLayer]'s keywords (``solver``, ``maxiter``, ``tol``,
            ``rtol``, ``solver_options``, and those of [`ImplicitLayer`][hypergrad.ImplicitLayer]).

    Returns:
        The fixed point w*, one tensor per tensor of ``params0``, differentiable in ``hparams``.
    """
    return FixedPointLayer(fp_map, **options)(params0, hparams)
