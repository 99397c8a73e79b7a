"""Arithmetic and checks on lists of tensors (the ``params`` / ``hparams`` convention)."""
from __future__ import annotations

import collections
import math
import operator
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .errors import NonFiniteError

TensorList = List[Tensor]


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """<xs, ys> = sum_i <x_i, y_i>, a 0-d tensor on the tensors' device (no host sync)."""
    if len(xs) == 1 and xs[0].dim() == 1:  # the common case, without reshape calls
        return torch.dot(xs[0], ys[0])
    total = torch.dot(xs[0].reshape(-1), ys[0].reshape(-1))
    for x, y in zip(xs[1:], ys[1:]):
        total = total + torch.dot(x.reshape(-1), y.reshape(-1))
    return total


def dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """[<x_i, y_i>] per tensor pair, stacked (the per-tensor inner products of the fixed-point residuals)."""
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys)])


def norm(xs: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of ``xs`` (0-d tensor)."""
    return torch.sqrt(dot(xs, xs))


def global_norm(xs: Sequence[Tensor]) -> Tensor:
    """||concat(xs)|| of detached tensors, the per-tensor norms by one multi-tensor kernel (no graph)."""
    if len(xs) == 1:
        return torch.linalg.vector_norm(xs[0].detach())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([x.detach() for x in xs])))


def axpy(a, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
    """a * xs + ys (``a`` a float or a 0-d tensor); returns new tensors."""
    if isinstance(a, (int, float)):
        return [torch.add(y, x, alpha=a) for x, y in zip(xs, ys)]
    return [y + a * x for x, y in zip(xs, ys)]


def sub(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
    """xs - ys."""
    return [x - y for x, y in zip(xs, ys)]


def scale(a, xs: Sequence[Tensor]) -> TensorList:
    """a * xs."""
    return [a * x for x in xs]


def zeros_like(xs: Sequence[Tensor]) -> TensorList:
    return [torch.zeros_like(x) for x in xs]


def flatten(xs: Sequence[Tensor]) -> Tensor:
    """Concatenate a list of tensors into one vector."""
    return torch.cat([x.reshape(-1) for x in xs])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> TensorList:
    """Split a vector into tensors shaped like ``like`` (inverse of ``flatten``)."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[i:i + n].reshape(t.shape))
        i += n
    return out


def pack(xs: Sequence[Tensor], rows: bool = False) -> TensorList:
    """Several tensors as a list holding one flat vector (the layout in which a solver iterates on one tensor);
    ``rows``: tensors [B, ...] as one [B, N] (a batch of systems)."""
    return [torch.cat([x.reshape(x.shape[0], -1) for x in xs], 1)] if rows else [flatten(xs)]


def unpack(xs: Sequence[Tensor], shapes: Sequence[torch.Size], rows: bool = False) -> TensorList:
    """The inverse of ``pack``: views of the one tensor ``xs[0]`` shaped like ``shapes`` (after the
    leading B with ``rows``)."""
    parts = xs[0].split([math.prod(s) for s in shapes], 1 if rows else 0)
    return [v.reshape(v.shape[0], *s) if rows else v.view(s) for v, s in zip(parts, shapes)]


def grad_or_zeros(outputs, inputs: Sequence[Tensor], grad_outputs=None, retain_graph: bool = True,
                  create_graph: bool = False) -> TensorList:
    """torch.autograd.grad with zeros for inputs the outputs do not depend on."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                                create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def step_vjp(outputs: Sequence[Tensor], params: Sequence[Tensor], hparams: Sequence[Tensor],
             cotangents: Sequence[Tensor]):
    """One step of reverse accumulation: ((d out/d params)^T c, (d out/d hparams)^T c), zeros for outputs
    that are constant and for unused inputs; the step's graph is freed."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        return zeros_like(params), zeros_like(hparams)
    outs, cots = zip(*pairs)
    g = grad_or_zeros(list(outs), list(params) + list(hparams), grad_outputs=list(cots), retain_graph=False)
    return g[:len(params)], g[len(params):]


def walk_graph(outputs: Sequence[Tensor]):
    """The autograd nodes ``outputs`` depend on, breadth first, each once."""
    queue, seen = collections.deque(o.grad_fn for o in outputs if o.grad_fn is not None), set()
    while queue:
        fn = queue.popleft()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        yield fn
        queue.extend(nxt for nxt, _ in fn.next_functions)


def graph_leaves(outputs: Sequence[Tensor]) -> TensorList:
    """The leaf tensors that require grad and that ``outputs`` depend on."""
    return [o for o in outputs if o.requires_grad and o.grad_fn is None] + [
        fn.variable for fn in walk_graph(outputs) if hasattr(fn, "variable")]


def accumulate_grads(hparams: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """hparam.grad += grad for each pair, creating ``.grad`` where missing (like ``.backward()``)."""
    for h, g in zip(hparams, grads):
        h.grad = g.clone() if h.grad is None else h.grad + g


def finite_each(xs: Sequence[Tensor]) -> Tensor:
    """One bool per tensor, True where it holds no NaN or Inf: the max-abs of every tensor by one multi-tensor
    reduction (``_foreach_norm``, inf-norm: NaN propagates, no overflow) where it applies, else per tensor."""
    m = _max_abs_each(xs)
    return torch.isfinite(m) if m is not None else torch.stack([torch.isfinite(x.detach()).all() for x in xs])


def _max_abs_each(xs: Sequence[Tensor]) -> Optional[Tensor]:
    """The max-abs of every tensor (NaN where it holds a NaN) by one multi-tensor kernel; None where that
    kernel does not apply (non-floating or empty tensors, several devices)."""
    xs = [x.detach() for x in xs]
    if all(x.is_floating_point() and x.numel() > 0 for x in xs) and len({x.device for x in xs}) == 1:
        return torch.stack(torch._foreach_norm(xs, ord=float("inf")))
    return None


def assert_finite(xs: Sequence[Tensor], what: str) -> None:
    """Raise [`NonFiniteError`][hypergrad.NonFiniteError] naming ``what`` if any entry is NaN or Inf (one host sync)."""
    if not xs:
        return
    m = _max_abs_each(xs)
    ok = math.isfinite(m.max().item()) if m is not None else bool(finite_each(xs).all())  # max keeps a NaN
    if not ok:
        raise NonFiniteError(f"{what} contains NaN or Inf")


def as_tensor_list(xs, name: str) -> TensorList:
    """Accept a list/tuple of tensors (or one tensor) and return a list; reject anything else."""
    if isinstance(xs, Tensor):
        return [xs]
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(x).__name__}")
    return list(xs)


def check_hparams(hparams: Sequence[Tensor]) -> None:
    """Every hparam must be a floating tensor with ``requires_grad=True``."""
    if len(hparams) == 0:
        raise ValueError("hparams is empty: pass the list of outer variables")
    for i, h in enumerate(hparams):
        if not h.is_floating_point():
            raise TypeError(f"hparams[{i}] has dtype {h.dtype}; hypergradients need floating-point tensors")
        if not h.requires_grad:
            raise ValueError(f"hparams[{i}] (shape {tuple(h.shape)}) does not have requires_grad=True; "
                             "call .requires_grad_() on every outer variable")


def check_inputs(params, hparams, name: str = "params"):
    """``(params, hparams)`` as lists after checking them: tensors, params non-empty, hparams floating with
    ``requires_grad=True``, one dtype and one device for all, no NaN/Inf in either."""
    params, hparams = as_tensor_list(params, name), as_tensor_list(hparams, "hparams")
    check_hparams(hparams)
    if len(params) == 0:
        raise ValueError(f"{name} is empty: pass the list of inner variables")
    names = [f"{name}[{i}]" for i in range(len(params))] + [f"hparams[{i}]" for i in range(len(hparams))]
    check_same_kind(params + hparams, names)
    check_finite(params + hparams, names)
    return params, hparams


def check_finite(xs: Sequence[Tensor], names: Sequence[str]) -> None:
    """Raise [`NonFiniteError`][hypergrad.NonFiniteError] naming the first tensor with NaN or Inf (one host read)."""
    m = _max_abs_each(xs)
    ok = [math.isfinite(v) for v in m.tolist()] if m is not None else finite_each(xs).tolist()
    for good, n in zip(ok, names):
        if not good:
            raise NonFiniteError(f"{n} contains NaN or Inf (before any solve): check the values passed as {n}")


def check_count(value, name: str, minimum: int = 0) -> int:
    """An integral number >= ``minimum`` (int, numpy integer, 0-d integer tensor) as an int; bools rejected."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be a non-negative integer, got the bool {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be a non-negative integer, got a tensor {value!r}")
        value = int(value.item())
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})") from None
    if as_int < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {as_int}")
    if as_int < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {as_int}")
    return as_int


def check_flag(value, name: str) -> bool:
    """A real bool (older hypertorch code passed a tolerance where ``set_grad`` now stands)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}); older hypertorch "
                        f"releases took a tolerance in this position: pass it by name (tol=...) if you meant one")
    return value


def check_same_kind(tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    """All tensors share one floating dtype and one device; the error names the first mismatch."""
    ref, ref_name = tensors[0], names[0]
    for t, n in zip(tensors, names):
        if not t.is_floating_point():
            raise TypeError(f"{n} has dtype {t.dtype}; expected a floating-point tensor")
        if t.dtype != ref.dtype:
            raise TypeError(f"dtype mismatch: {n} is {t.dtype} but {ref_name} is {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"device mismatch: {n} is on {t.device} but {ref_name} is on {ref.device}")


def check_like(xs, like: Sequence[Tensor], what: str, like_name: str = "params") -> TensorList:
    """``xs`` must be a list of tensors with the shapes of ``like``; returns it as a list."""
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{what} must return/be a list of tensors (one per entry of {like_name}), "
                        f"got {type(xs).__name__}")
    if len(xs) != len(like):
        raise ValueError(f"{what} has {len(xs)} tensors but {like_name} has {len(like)}")
    for i, (x, w) in enumerate(zip(xs, like)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{what}[{i}] is {type(x).__name__}, expected a tensor")
        if x.shape != w.shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(x.shape)} but {like_name}[{i}] has shape "
                             f"{tuple(w.shape)}")
        if x.dtype != w.dtype or x.device != w.device:
            raise TypeError(f"{what}[{i}] is {x.dtype} on {x.device} but {like_name}[{i}] is {w.dtype} on {w.device}: "
                            f"{what} must keep the dtype and device of {like_name} (a silent cast loses precision)")
    return list(xs)


def scalar_loss(fn: Callable, params, hparams, name: str) -> Tensor:
    """Call ``fn(params, hparams)`` and check it returns a finite scalar tensor."""
    loss = fn(params, hparams)
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name} must return a scalar, got a tensor of shape {tuple(loss.shape)}")
    if not math.isfinite(loss.item()):
        raise NonFiniteError(f"{name} returned {loss.item()}")
    return loss.reshape(())


def detached_leaves(params: Sequence[Tensor]) -> TensorList:
    """Fresh leaves that share storage with ``params`` but never touch the caller's tensors' flags."""
    return [p.detach().requires_grad_(True) for p in params]


def maybe_clone(xs: Optional[Sequence[Tensor]]) -> Optional[TensorList]:
    return None if xs is None else [x.detach().clone() for x in xs]
