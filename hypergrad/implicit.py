"""Implicit differentiation as an autograd node: w*(lambda) with F(w*, lambda) = 0, differentiable to any order.

    dw*/dlambda = -(dF/dw)^-1 dF/dlambda            (implicit function theorem)

Fixed-point form: F(w, lambda) = w - Phi(w, lambda). Root form: F = an optimality function (the gradient of
an inner loss, a KKT residual). Reverse mode: u = (dF/dw)^-T g, then grad_lambda = -(dF/dlambda)^T u.
Forward mode: w_dot = -(dF/dw)^-1 (dF/dlambda) lambda_dot. Each linear solve is an autograd node of its own
(``_LinearSolve``) whose derivative is again a solve with the same operator or its transpose, so every
order of derivative, in reverse or forward mode, is the implicit one (jaxopt PR #143), not the derivative of
a truncated solver. Both nodes have vmap rules, so ``torch.func`` transforms (grad, vjp, jacrev, jacfwd,
hessian, vmap) compose with them.

The backward solves use the core's linear solvers ([`hypergrad.SOLVERS`][hypergrad.SOLVERS]) and their
checks; a solve that fails raises from inside ``.backward()`` with the solver's own message.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import sys
import threading
import warnings
from typing import Callable, List, Tuple

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.overrides import TorchFunctionMode

from . import tensor_list as tl
from .errors import AUTOGRAD_UNDER_TORCH_FUNC, ConvergenceError, HypergradError, NonFiniteError
from .linear_solvers import SOLVERS, SolveInfo

Optimality = Callable[[List[Tensor], List[Tensor]], List[Tensor]]


class _NoAutogradGrad(TorchFunctionMode):
    """Under torch.func transforms, torch.autograd.grad inside the user's map computes wrong derivatives
    silently (it does not see the transform's wrapped tensors): refuse it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.autograd.grad and not _called_by_torch_func():
            raise RuntimeError(AUTOGRAD_UNDER_TORCH_FUNC)
        return func(*args, **(kwargs or {}))


def _guard():
    """The ``_NoAutogradGrad`` mode, entered once (nested entries would see each other's calls)."""
    active = any(isinstance(m, _NoAutogradGrad) for m in torch.overrides._get_current_function_mode_stack())
    return contextlib.nullcontext() if active else _NoAutogradGrad()


def _called_by_torch_func() -> bool:
    """True when torch.autograd.grad was called by torch.func itself (torch.func.grad/vjp in the map is fine)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("torch.overrides", "torch.autograd")):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("torch._functorch")


def _wrapped(tensors) -> bool:
    """True under a torch.func transform (the tensors are functorch-wrapped)."""
    return any(isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _graph(f, primals, create: bool):
    """(leaves, f(leaves)) with a graph. With ``create``, a primal that carries a graph enters as an alias
    (``view_as``): gradients w.r.t. the alias are the partial derivatives (they do not flow back through
    other inputs that depend on the primal) and stay differentiable in the primal (a double backward)."""
    leaves = [p.view_as(p) if create and p.requires_grad else p.detach().requires_grad_() for p in primals]
    return leaves, tuple(f(*leaves))


def _pull(out, leaves, cotangents, create: bool) -> Tuple[Tensor, ...]:
    """(d out / d leaves)^T cotangents (outputs without a graph contribute zero)."""
    pairs = [(o, c) for o, c in zip(out, cotangents) if o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(t) for t in leaves)
    return tuple(tl.grad_or_zeros([o for o, _ in pairs], leaves, grad_outputs=[c for _, c in pairs],
                                  retain_graph=True, create_graph=create))


def _data_fixed(f, primals):
    """(f of the floating-point primals only, their indices): integer and bool primals (labels, masks) are data,
    not variables (complex ones are refused by the layer)."""
    idx = [i for i, p in enumerate(primals) if p.is_floating_point() or p.is_complex()]
    if len(idx) == len(primals):
        return None, idx

    def g(*sub):
        args = list(primals)
        for i, t in zip(idx, sub):
            args[i] = t
        return f(*args)
    return g, idx


def _vjp(f, primals, cotangents) -> Tuple[Tensor, ...]:
    """(df/dprimals)^T cotangents, differentiable: torch.func under a transform, else autograd (with
    create_graph when grad mode is on, as in a double backward). None for integer primals."""
    primals, cotangents = tuple(primals), tuple(cotangents)
    g, idx = _data_fixed(f, primals)
    if g is not None:
        out = [None] * len(primals)
        for i, r in zip(idx, _vjp(g, [primals[i] for i in idx], cotangents)):
            out[i] = r
        return tuple(out)
    if _wrapped(primals + cotangents):
        with _guard():
            return torch.func.vjp(f, *primals)[1](cotangents)
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves, out = _graph(f, primals, create)
        return _pull(out, leaves, cotangents, create)


def _jvp(f, primals, tangents) -> Tuple[Tensor, ...]:
    """(df/dprimals) tangents: forward mode under a transform, else the transpose of a VJP (reverse mode
    only, so maps built on torch.autograd.grad work). Integer primals have no tangent."""
    primals, tangents = tuple(primals), tuple(tangents)
    g, idx = _data_fixed(f, primals)
    if g is not None:
        return _jvp(g, [primals[i] for i in idx], [tangents[i] for i in idx])
    if _wrapped(primals + tangents):
        _OWN_JVP_LEVELS.n = getattr(_OWN_JVP_LEVELS, "n", 0) + 1  # our own level, not the user's (thread-local)
        try:
            with _guard():
                return torch.func.jvp(f, primals, tangents)[1]
        finally:
            _OWN_JVP_LEVELS.n -= 1
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves, out = _graph(f, primals, create)
        dummy = [torch.zeros_like(o, requires_grad=True) for o in out]
        return _pull(_pull(out, leaves, dummy, True), dummy, tangents, create)


def _tasks(levels) -> List[tuple]:
    """Every index (i_1, ..., i_L) of the batch levels, outermost first."""
    out = [()]
    for size, _ in levels:
        out = [i + (j,) for i in out for j in range(size)]
    return out


def _task(tensors, levels, offset: int, idx: tuple) -> List[Tensor]:
    """Task ``idx`` of tensors laid out with their batched levels leading, in level order."""
    out = []
    for j, t in enumerate(tensors):
        sel = tuple(i for i, (_, mask) in zip(idx, levels) if mask[offset + j])
        out.append(t[sel] if sel else t)
    return out


def _vmapped(fn, levels, n_w: int, x_batched: bool):
    """fn(x, ws, hs) vmapped over ``levels`` (outermost first); x is batched at every level."""
    for _, mask in reversed(levels):
        dims = (0 if x_batched else None, tuple(0 if m else None for m in mask[:n_w]),
                tuple(0 if m else None for m in mask[n_w:]))
        fn = torch.vmap(fn, in_dims=dims)
    return fn


class _Problem:
    """One task's optimality F(w, lambda) = 0, its forward solver and backward options, and the vmap levels
    (size, batched-mask over the w and lambda tensors), outermost first, its tensors are batched over."""

    def __init__(self, F: Optimality, forward, n_w: int, options: dict, owner, levels: tuple = ()):
        self.F, self.forward, self.n_w, self.options, self.owner, self.levels = F, forward, n_w, options, owner, levels

    def batched(self, size: int, mask: tuple) -> "_Problem":
        return _Problem(self.F, self.forward, self.n_w, self.options, self.owner, ((size, mask),) + self.levels)

    def sizes(self) -> Tuple[int, ...]:
        return tuple(s for s, _ in self.levels)

    def Fb(self, ws, hs) -> Tuple[Tensor, ...]:
        """F over the whole batch."""
        fn = _vmapped(lambda _, w, h: tuple(self.F(list(w), list(h))), self.levels, self.n_w, False)
        return tuple(fn(None, tuple(ws), tuple(hs)))

    def mv(self, transpose: bool, x, ws, hs) -> Tuple[Tensor, ...]:
        """(dF/dw)^T x (``transpose``) or (dF/dw) x, per task, over the whole batch."""
        def one(x, w, h):
            f = lambda *w_: tuple(self.F(list(w_), list(h)))
            return _vjp(f, w, x) if transpose else _jvp(f, w, x)
        return tuple(_vmapped(one, self.levels, self.n_w, True)(tuple(x), tuple(ws), tuple(hs)))

    # ---------------------------------------------------------------- forward
    def solve(self, w0, hs) -> List[Tensor]:
        """The forward solve of every task (one at a time; a task's solver need not be vmappable)."""
        if not self.levels:
            return self.forward([t.detach() for t in w0], [h.detach() for h in hs])
        tasks, infos = [], []
        for i in _tasks(self.levels):
            tasks.append(self.unbatched().solve(_task(w0, self.levels, 0, i), _task(hs, self.levels, self.n_w, i)))
            infos.append(self.owner.forward_info)
        self.owner.forward_info = infos  # one ForwardInfo per task, in the batch's (flattened) order
        return [torch.stack([t[j] for t in tasks]).reshape(*self.sizes(), *tasks[0][j].shape) for j in range(self.n_w)]

    def unbatched(self) -> "_Problem":
        """The same problem for one task."""
        return _Problem(self.F, self.forward, self.n_w, self.options, self.owner)

    # ---------------------------------------------------------------- backward
    def operator(self, transpose: bool, ws, hs):
        """u -> (dF/dw)^T u or (dF/dw) u on tensors laid out like ``ws`` with every level batched; the
        linearization is built once when ``ws`` are batched at every level (products are then per task)."""
        if _wrapped(list(ws) + list(hs)) or not all(all(m[:self.n_w]) for _, m in self.levels):
            return lambda u: list(self.mv(transpose, u, ws, hs))
        with torch.enable_grad():
            leaves, out = _graph(lambda *w_: self.Fb(w_, hs), ws, False)
            if transpose:
                return lambda u: list(_pull(out, leaves, u, False))
            dummy = [torch.zeros_like(o, requires_grad=True) for o in out]
            pulled = _pull(out, leaves, dummy, True)
        return lambda u: list(_pull(pulled, dummy, u, False))

    def linear_solve(self, transpose: bool, b, ws, hs) -> List[Tensor]:
        """x with (dF/dw)^T x = b (``transpose``) or (dF/dw) x = b, per task, by the chosen core solver."""
        opts = dict(self.options)
        name, strict, warm = opts.pop("solver"), opts.pop("strict"), opts.pop("warm_start")
        fn = SOLVERS[name]
        ws, hs = [w.detach() for w in ws], [h.detach() for h in hs]
        b = [t.detach() for t in b]
        if not self.levels:
            x0 = self.owner.warm_adjoint(b) if (warm and transpose and bool(tl.norm(b) > 0)) else None
            x, info = self._run(fn, name, transpose, b, ws, hs, x0, opts)
            _check(info, name, transpose, strict)
            if transpose:
                self.owner.record_backward(info, x)
            return x
        sizes = self.sizes()
        if "batched" in inspect.signature(fn).parameters:
            B, L = math.prod(sizes), len(sizes)
            op = self.operator(transpose, ws, hs)
            flat = lambda xs: [t.reshape(B, *t.shape[L:]) for t in xs]
            matvec = lambda u: flat(op([t.reshape(*sizes, *t.shape[1:]) for t in u]))
            x, info = _in_context(name, transpose, lambda: fn(matvec, flat(b), None, batched=True, **opts))
            _check(info, name, transpose, strict)
            return [t.reshape(*sizes, *t.shape[1:]) for t in x]
        tasks = []  # no batched kernel (gmres, minres, dense, cg_normaleq): one task at a time
        base = self.unbatched()
        for i in _tasks(self.levels):
            bi = [t[i] for t in b]
            x, info = base._run(fn, name, transpose, bi, _task(ws, self.levels, 0, i),
                                _task(hs, self.levels, self.n_w, i), None, opts)
            _check(info, name, transpose, strict)
            tasks.append(x)
        return [torch.stack([t[j] for t in tasks]).reshape(b[j].shape) for j in range(len(b))]

    def _run(self, fn, name, transpose, b, ws, hs, x0, opts):
        if name == "cg_normaleq":
            opts = dict(opts, rmatvec=self.operator(not transpose, ws, hs))
        return _in_context(name, transpose, lambda: fn(self.operator(transpose, ws, hs), b, x0, **opts))


def _in_context(name: str, transpose: bool, solve):
    """Run a core solve; its failures re-raised with the same class, saying where they happened."""
    try:
        return solve()
    except HypergradError as e:
        what = "adjoint (dF/dw)^T u = g" if transpose else "tangent (dF/dw) x = b"
        nan = "; NaN or Inf here means a derivative of the map is not finite at the solution" if isinstance(
            e, NonFiniteError) else ""
        raise type(e)(f"in the implicit layer's {what} solve (backward_solver={name!r}{nan}): {e}") from e


def _check(info: SolveInfo, name: str, transpose: bool, strict: bool) -> None:
    """A backward solve must converge: ConvergenceError (``strict``) or a warning."""
    worst = lambda v, f: f(v) if isinstance(v, Tensor) else v  # a batch of systems reports per system
    if worst(info.converged, lambda c: bool(c.all())):
        return
    what = "adjoint (dF/dw)^T u = g" if transpose else "tangent (dF/dw) x = b"
    msg = (f"the implicit layer's {what} solve ({name}) did not converge: residual "
           f"{float(worst(info.residual, torch.max)):.3e} after {int(worst(info.iterations, torch.max))} "
           "iterations; raise backward_maxiter, loosen backward_rtol, or choose another backward_solver")
    if strict:
        raise ConvergenceError(msg)
    warnings.warn("the implicit layer's backward solve did not converge (the layer's backward_info, or the "
                  "result's converged flag, has its SolveInfo); the gradient is approximate", stacklevel=2)


def _finite(xs, what: str) -> None:
    """NaN/Inf in a derivative of the map raise (outside torch.func transforms, where they can be read)."""
    xs = [x for x in xs if x is not None]
    if xs and not _wrapped(xs) and not bool(torch.stack([torch.isfinite(x).all() for x in xs]).all()):
        raise NonFiniteError(f"NaN or Inf in {what}: a derivative of the map is not finite at the solution "
                             "(e.g. sqrt or log at 0, or an overflow)")


_OWN_JVP_LEVELS = threading.local()
_OWN_JVP_LEVELS.n = 0


def _one_forward_level() -> None:
    """Two nested forward-mode transforms (jvp of jvp, jacfwd of jacfwd or of hessian) give wrong derivatives
    through any autograd.Function's jvp rule in torch (an Exp function with the exact rule returns 0 for
    exp''): refuse them."""
    levels = sum(type(i).__name__ == "JvpInterpreter" for i in retrieve_all_functorch_interpreters())
    if levels - getattr(_OWN_JVP_LEVELS, "n", 0) > 1:
        raise NotImplementedError("nested forward-mode transforms (jvp of jvp, jacfwd of jacfwd or of hessian) "
                                  "return wrong derivatives through torch's autograd.Function jvp rules: use reverse "
                                  "mode for the outer derivatives (torch.func.jacrev of jacfwd, hessian, or jacrev "
                                  "of hessian), which are exact")


def _moved(tensors, dims, size: int, expand: int) -> List[Tensor]:
    """Tensors with their vmap dimension first; the first ``expand`` are broadcast to the batch if unbatched."""
    out = []
    for j, (t, d) in enumerate(zip(tensors, dims)):
        if d is not None:
            out.append(t.movedim(d, 0))
        else:
            out.append(t.expand(size, *t.shape) if j < expand else t)
    return out


def _zeros_for(grads, like) -> List[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


class _Solve(torch.autograd.Function):
    """w* = solve(w0, lambda): the forward solver's output, with the implicit derivative."""

    @staticmethod
    def forward(prob: _Problem, *tensors):
        n = prob.n_w
        out = prob.solve(tensors[:n], tensors[n:])
        return tuple(t.clone() for t in out)  # fresh storage: a map may return an input or a closed-over tensor

    @staticmethod
    def setup_context(ctx, inputs, output):
        prob = inputs[0]
        ctx.prob = prob
        hs = inputs[1 + prob.n_w:]
        ctx.save_for_backward(*output, *hs)
        ctx.save_for_forward(*output, *hs)

    @staticmethod
    def backward(ctx, *grads):
        prob, n = ctx.prob, ctx.prob.n_w
        saved = ctx.saved_tensors
        ws, hs = saved[:n], saved[n:]
        need = ctx.needs_input_grad[1 + n:]
        if not any(need):
            return (None,) * (1 + n + len(hs))
        u = _LinearSolve.apply(prob, True, *_zeros_for(grads, ws), *ws, *hs)
        gh = _vjp(lambda *h: prob.Fb(ws, h), hs, [-t for t in u])
        _finite(gh, "the implicit gradient (dF/dlambda)^T u w.r.t. hparams")
        return (None,) * (1 + n) + tuple(g if nd else None for g, nd in zip(gh, need))

    @staticmethod
    def jvp(ctx, _prob, *tangents):
        _one_forward_level()
        prob, n = ctx.prob, ctx.prob.n_w
        saved = ctx.saved_tensors
        ws, hs = saved[:n], saved[n:]
        ht = tuple(_zeros_for(tangents[n:], hs))
        fdot = _jvp(lambda *h: prob.Fb(ws, h), hs, ht)
        _finite(fdot, "the directional derivative (dF/dlambda) lambda_dot")
        return _LinearSolve.apply(prob, False, *[-t for t in fdot], *ws, *hs)

    @staticmethod
    def vmap(info, in_dims, prob: _Problem, *tensors):
        n, dims = prob.n_w, in_dims[1:]
        if all(d is None for d in dims):
            return _Solve.apply(prob, *tensors), (None,) * n
        moved = _moved(tensors, dims, info.batch_size, n)
        mask = (True,) * n + tuple(d is not None for d in dims[n:])
        return _Solve.apply(prob.batched(info.batch_size, mask), *moved), (0,) * n


class _LinearSolve(torch.autograd.Function):
    """x = (dF/dw)^-T b (``transpose``) or (dF/dw)^-1 b at (w, lambda), differentiable in b, w and lambda:
    d x = M^-1 (d b - (d M) x), so its backward is the transposed solve and its forward mode the same solve."""

    @staticmethod
    def forward(prob: _Problem, transpose: bool, *tensors):
        n = prob.n_w
        b, ws, hs = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        return tuple(prob.linear_solve(transpose, b, ws, hs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        prob, transpose, tensors = inputs[0], inputs[1], inputs[2:]
        ctx.prob, ctx.transpose = prob, transpose
        n = prob.n_w
        ctx.save_for_backward(*output, *tensors[n:])
        ctx.save_for_forward(*output, *tensors[n:])

    @staticmethod
    def _parts(ctx):
        n = ctx.prob.n_w
        saved = ctx.saved_tensors
        return saved[:n], saved[n:2 * n], saved[2 * n:]

    @staticmethod
    def backward(ctx, *grads):
        prob, n = ctx.prob, ctx.prob.n_w
        x, ws, hs = _LinearSolve._parts(ctx)
        need_b, need_t = ctx.needs_input_grad[2:2 + n], ctx.needs_input_grad[2 + n:]
        if not any(need_b) and not any(need_t):
            return (None,) * (2 + n + len(ws) + len(hs))
        z = _LinearSolve.apply(prob, not ctx.transpose, *_zeros_for(grads, x), *ws, *hs)
        gt = (None,) * (len(ws) + len(hs))
        if any(need_t):
            pulled = _vjp(lambda *th: prob.mv(ctx.transpose, x, th[:n], th[n:]), ws + hs, [-t for t in z])
            gt = tuple(g if nd else None for g, nd in zip(pulled, need_t))
        return (None, None) + tuple(g if nd else None for g, nd in zip(z, need_b)) + gt

    @staticmethod
    def jvp(ctx, _prob, _transpose, *tangents):
        _one_forward_level()
        prob, n = ctx.prob, ctx.prob.n_w
        x, ws, hs = _LinearSolve._parts(ctx)
        bdot = _zeros_for(tangents[:n], x)
        tdot = tuple(_zeros_for(tangents[n:], ws + hs))
        mdot = _jvp(lambda *th: prob.mv(ctx.transpose, x, th[:n], th[n:]), ws + hs, tdot)
        return _LinearSolve.apply(prob, ctx.transpose, *[a - b for a, b in zip(bdot, mdot)], *ws, *hs)

    @staticmethod
    def vmap(info, in_dims, prob: _Problem, transpose: bool, *tensors):
        n, dims = prob.n_w, in_dims[2:]
        if all(d is None for d in dims):
            return _LinearSolve.apply(prob, transpose, *tensors), (None,) * n
        moved = _moved(tensors, dims, info.batch_size, n)
        mask = tuple(d is not None for d in dims[n:])
        return _LinearSolve.apply(prob.batched(info.batch_size, mask), transpose, *moved), (0,) * n
