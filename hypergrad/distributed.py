"""Data-parallel hypergradients on ``torch.distributed``: the data shard across processes, the algorithms do not change.

Every rank holds the same ``params`` w and ``hparams`` lambda and its own shard of the data, with a local
loss (or map) ``F_r(w, lambda)``. The global function is ``F = (1/R) sum_r F_r`` (``reduce="mean"``: equal
shards, each ``F_r`` a mean over its shard) or ``F = sum_r F_r`` (``reduce="sum"``: each ``F_r`` already
weighted by n_r / N, e.g. a sum over the shard divided by the global N). Two collectives make any
differentiable computation of ``F`` global:

- [`replicate`][hypergrad.distributed.replicate] on the inputs: identity forward; backward all-reduces the cotangents,
  so the gradient w.r.t. a replicated input is the (mean or sum) of the local gradients, i.e. the gradient of ``F``.
- [`reduce_mean`][hypergrad.distributed.reduce_mean] / [`reduce_sum`][hypergrad.distributed.reduce_sum] on the outputs:
  all-reduce forward (the value of ``F``, identical on every rank); backward identity, since the cotangent of a
  replicated value is the same on every rank.

Each one's backward *is* the other (Megatron-LM's f/g pair), so differentiating a backward pass again
(Hessian-vector products, reverse mode through differentiable inner steps, ``create_graph=True``) keeps
the same meaning. [`data_parallel`][hypergrad.distributed.data_parallel] puts both around a function of the interface
``fn(params, hparams)``; every hypergradient function of the core then returns, on every rank, the hypergradient of one
process holding all the data. Launch with ``torchrun`` (see ``examples/distributed_hpo.py``).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import tensor_list as tl

Tensors = Union[Tensor, Sequence[Tensor]]
_REDUCTIONS = ("mean", "sum")

__all__ = ["data_parallel", "replicate", "reduce_mean", "reduce_sum", "assert_replicated"]


def _check_reduce(reduce: str) -> None:
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be 'mean' (equal shards, local means) or 'sum' (local losses already "
                         f"weighted by n_local / N), got {reduce!r}")


def _world_size(group) -> int:
    """Size of ``group``; a clear error when no process group exists."""
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; data-parallel hypergradients need it")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group("
                           "backend='gloo' or 'nccl') first in every process (torchrun sets the environment it "
                           "reads; for a single process pass store=torch.distributed.HashStore(), rank=0, "
                           "world_size=1)")
    return dist.get_world_size(group)


def _all_reduce(tensors: Sequence[Tensor], group, reduce: str) -> Tuple[Tensor, ...]:
    """New tensors holding the sum (or mean) over the ranks of each tensor; one collective per dtype and
    device, in list order (the same on every rank). The inputs are not modified."""
    size = _world_size(group)
    buckets: Dict[tuple, List[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    out: List[Optional[Tensor]] = [None] * len(tensors)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])  # a fresh buffer
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if reduce == "mean":
            flat.div_(size)
        for i, chunk in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = chunk.view(tensors[i].shape)
    return tuple(out)


class _Replicate(torch.autograd.Function):
    """Identity forward; backward = all-reduce (mean or sum) of the cotangents, as a ``_Reduce``."""

    @staticmethod
    def forward(ctx, group, reduce, *tensors):
        ctx.group, ctx.reduce = group, reduce
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_Reduce.apply(ctx.group, ctx.reduce, *grads))


class _Reduce(torch.autograd.Function):
    """All-reduce (mean or sum) forward; backward = identity, as a ``_Replicate``."""

    @staticmethod
    def forward(ctx, group, reduce, *tensors):
        ctx.group, ctx.reduce = group, reduce
        return _all_reduce(tensors, group, reduce)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_Replicate.apply(ctx.group, ctx.reduce, *grads))


def _apply(fn: type, x: Tensors, group, reduce: str, name: str) -> Tensors:
    _check_reduce(reduce)
    tensors = tl.as_tensor_list(x, name)
    _world_size(group)
    out = list(fn.apply(group, reduce, *tensors)) if tensors else []
    return out[0] if isinstance(x, Tensor) else out


def replicate(x: Tensors, group=None, reduce: str = "mean") -> Tensors:
    """Mark tensors that hold the same value on every rank as inputs of a per-rank computation.

    Forward: the tensors themselves (views). Backward: the cotangents all-reduced with ``reduce`` over
    ``group``, so d/dx of the global function (mean or sum of the per-rank ones) arrives on every rank.
    Pair it with [`reduce_mean`][hypergrad.distributed.reduce_mean] (``reduce="mean"``) or
    [`reduce_sum`][hypergrad.distributed.reduce_sum] (``reduce="sum"``) on the outputs.

    Args:
        x: a tensor or a list of tensors (returned in the same form).
        group: the ``torch.distributed`` process group (None: the default group).
        reduce: "mean" or "sum", the reduction of the cotangents.
    """
    return _apply(_Replicate, x, group, reduce, "replicate(x)")


def reduce_mean(x: Tensors, group=None) -> Tensors:
    """(1/R) sum over the R ranks of ``group`` of x, on every rank.

    Backward: [`replicate`][hypergrad.distributed.replicate] (mean). ``x`` is a tensor or a list of tensors;
    ``group`` None is the default process group.
    """
    return _apply(_Reduce, x, group, "mean", "reduce_mean(x)")


def reduce_sum(x: Tensors, group=None) -> Tensors:
    """The sum over the ranks of ``group`` of x, on every rank.

    Backward: [`replicate`][hypergrad.distributed.replicate] (sum). ``x`` is a tensor or a list of tensors;
    ``group`` None is the default process group.
    """
    return _apply(_Reduce, x, group, "sum", "reduce_sum(x)")


def _reduce_output(out, group, reduce: str, name: str):
    """Reduce a loss (a one-element tensor) or a list of tensors (a fixed-point map) in one collective."""
    if isinstance(out, Tensor):
        if out.numel() != 1:
            raise ValueError(f"{name} returned a tensor of shape {tuple(out.shape)}; data_parallel expects a "
                             "scalar loss (reduce per-sample losses on the shard first) or a list of tensors")
        return _Reduce.apply(group, reduce, out)[0]
    if isinstance(out, (list, tuple)):
        return list(_Reduce.apply(group, reduce, *tl.as_tensor_list(out, name)))
    raise TypeError(f"{name} must return a scalar tensor (a loss) or a list of tensors (a fixed-point map), "
                    f"got {type(out).__name__}")


def data_parallel(fn: Callable, group=None, reduce: str = "mean") -> Callable:
    """``fn(params, hparams, *args)`` computed on this rank's shard -> the same function of all the data.

    Returns ``g(params, hparams, *args, **kwargs) = reduce(fn(replicate(params), replicate(hparams), *args,
    **kwargs))`` over ``group``: the mean over ranks (``reduce="mean"``: equal shards, ``fn`` a mean over
    its shard) or the sum (``reduce="sum"``: ``fn`` already weighted by n_local / N). Extra arguments (e.g. a
    data batch) are passed through unreduced. ``fn`` returns a scalar loss or a list of tensors (a
    fixed-point map); the result is identical on every rank, and so are its gradients w.r.t. params and
    hparams (which must hold the same values on every rank: see
    [`assert_replicated`][hypergrad.distributed.assert_replicated]).

    Wrap losses (``GradientDescent(data_parallel(inner_loss), lr)`` is then a global gradient step). Wrapping
    a map is right only with ``reduce="mean"`` and a map affine in the per-rank terms (a gradient step on a
    local mean loss is: the mean of w - s grad F_r is w - s grad F).

    Args:
        fn: the per-rank function ``fn(params, hparams, *args, **kwargs)``, a scalar loss or a list of tensors.
        group: the ``torch.distributed`` process group (None: the default group).
        reduce: "mean" (equal shards, ``fn`` a mean over its shard) or "sum" (``fn`` already weighted).
    """
    _check_reduce(reduce)
    _world_size(group)
    name = f"{getattr(fn, '__name__', type(fn).__name__)}(params, hparams)"

    def global_fn(params, hparams, *args, **kwargs):
        if isinstance(params, Tensor) or isinstance(hparams, Tensor):
            raise TypeError(f"{name}: params and hparams must be lists of tensors, not a tensor")
        # two nodes, not one: autograd can then skip the data terms' graph when only hparams need a gradient
        p = replicate(tl.as_tensor_list(params, "params"), group, reduce)
        h = replicate(tl.as_tensor_list(hparams, "hparams"), group, reduce)
        return _reduce_output(fn(p, h, *args, **kwargs), group, reduce, name)

    return functools.update_wrapper(global_fn, fn, updated=())


def assert_replicated(tensors: Sequence[Tensor], group=None, name: str = "tensors") -> None:
    """Raise ``ValueError`` on every rank if some tensor's shape, dtype or value differs across the ranks.

    Checks over the ranks of ``group`` (None: the default group) and names the first such ``name[i]`` (one
    object all-gather of shapes, one all-reduce of values).
    """
    tensors = tl.as_tensor_list(tensors if isinstance(tensors, Tensor) else list(tensors), name)
    size = _world_size(group)
    meta = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    gathered: List = [None] * size
    dist.all_gather_object(gathered, meta, group=group)
    first = gathered[0]
    for rank, other in enumerate(gathered):
        if other != first:
            i = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), min(len(first), len(other)))
            at = (lambda m: "missing" if i >= len(m) else f"shape {m[i][0]}, {m[i][1]}")
            raise ValueError(f"{name} differ across ranks: {name}[{i}] is {at(first)} on rank 0 but {at(other)} "
                             f"on rank {rank} ({len(first)} vs {len(other)} tensors)")
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(tensors[0].device, torch.float64) for t in tensors])
    nan = torch.isnan(flat).to(torch.float64)
    vals = torch.nan_to_num(flat, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    both = torch.cat([vals, nan, -vals, -nan])  # max and -min of values and NaN masks in one collective
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = flat.numel()
    hi, lo = both[:2 * n], -both[2 * n:]
    differs = (hi[:n] != lo[:n]) | (hi[n:] != lo[n:])
    spread = torch.where(differs, hi[:n] - lo[:n], torch.zeros_like(flat))
    sizes = [t.numel() for t in tensors]
    for i, (d, s) in enumerate(zip(differs.split(sizes), spread.split(sizes))):
        if bool(d.any()):
            k = int(d.nonzero()[0])
            raise ValueError(f"{name}[{i}] (shape {tuple(tensors[i].shape)}) differs across ranks at flat index "
                             f"{k} (max |difference| {float(s.max()):.3e}, or NaN on some ranks only); every rank "
                             "must hold the same params and hparams (broadcast them from rank 0)")
