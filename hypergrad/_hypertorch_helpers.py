"""hypertorch's utilities from ``hypergrad.hypergradients`` (re-exported there and by the package)."""
from __future__ import annotations

import torch

from . import CG_torch  # noqa: F401  (hypertorch's hypergradients module imports it)
from . import tensor_list as tl
from .CG_torch import cat_list_to_tensor  # noqa: F401


def grd(a, b):
    """torch.autograd.grad(a, b) keeping the graph (create_graph and retain_graph).

    Args:
        a: the output to differentiate: a scalar tensor (or a sequence of scalars, whose gradients add up).
        b: the input tensor or sequence of tensors; ``a`` must depend on each (unused inputs raise).

    Returns:
        A tuple with the gradient of ``a`` w.r.t. each input, with a graph (differentiable again).
    """
    return torch.autograd.grad(a, b, create_graph=True, retain_graph=True)


def list_dot(l1, l2):
    """Extended dot product of two lists of tensors (a 0-d tensor).

    Args:
        l1: a non-empty list of tensors.
        l2: a list of tensors paired in order with ``l1``, as long, each of its partner's shape (or broadcastable
            to it); lists of different lengths are a ``ValueError`` (``zip`` would drop the extra terms).

    Returns:
        The 0-d tensor sum_i sum(l1[i] * l2[i]).
    """
    l1, l2 = list(l1), list(l2)
    if len(l1) != len(l2):
        raise ValueError(f"list_dot: the lists have {len(l1)} and {len(l2)} tensors; they must pair one to one")
    return torch.stack([(a * b).sum() for a, b in zip(l1, l2)]).sum()


def jvp(fp_map, params, vs):
    """(d fp_map / d params) vs, a tuple shaped like fp_map(params), by the double-VJP trick.

    ``fp_map`` takes params only. Differentiable (built with create_graph). hypertorch evaluates
    ``fp_map`` twice (once only for the shapes); this evaluates it once, so a stochastic map draws once.
    Outputs or params the map does not connect give zeros instead of an error.

    Args:
        fp_map: ``fp_map(params) -> sequence`` of tensors (hparams, if any, closed over).
        params: the point, a list of tensors with ``requires_grad=True``.
        vs: the tangent, one tensor per param, shaped like ``params``.

    Returns:
        A tuple with one tensor per output of ``fp_map(params)``, shaped like it, with a graph.
    """
    out = fp_map(params)
    dummy = [torch.ones_like(o).requires_grad_(True) for o in out]
    g1 = tl.grad_or_zeros(list_dot(out, dummy), params, retain_graph=True, create_graph=True)
    inner = list_dot(vs, g1)
    if not inner.requires_grad:  # the map does not depend on params at all
        return tuple(torch.zeros_like(o) for o in out)
    return tuple(tl.grad_or_zeros(inner, dummy, retain_graph=True, create_graph=True))
