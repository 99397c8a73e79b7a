"""hypertorch's utilities from ``hypergrad.hypergradients`` (re-exported there and by the package)."""
from __future__ import annotations

import torch

from . import CG_torch  # noqa: F401  (hypertorch's hypergradients module imports it)
from . import tensor_list as tl
from .CG_torch import cat_list_to_tensor  # noqa: F401


def grd(a, b):
    """torch.autograd.grad(a, b) keeping the graph (create_graph and retain_graph)."""
    return torch.autograd.grad(a, b, create_graph=True, retain_graph=True)


def list_dot(l1, l2):
    """Extended dot product of two lists of tensors (a 0-d tensor)."""
    return torch.stack([(a * b).sum() for a, b in zip(l1, l2)]).sum()


def jvp(fp_map, params, vs):
    """(d fp_map / d params) vs, a tuple shaped like fp_map(params), by the double-VJP trick.

    ``fp_map`` takes params only. Differentiable (built with create_graph). hypertorch evaluates
    ``fp_map`` twice (once only for the shapes); this evaluates it once, so a stochastic map draws once.
    Outputs or params the map does not connect give zeros instead of an error.
    """
    out = fp_map(params)
    dummy = [torch.ones_like(o).requires_grad_(True) for o in out]
    g1 = tl.grad_or_zeros(list_dot(out, dummy), params, retain_graph=True, create_graph=True)
    inner = list_dot(vs, g1)
    if not inner.requires_grad:  # the map does not depend on params at all
        return tuple(torch.zeros_like(o) for o in out)
    return tuple(tl.grad_or_zeros(inner, dummy, retain_graph=True, create_graph=True))
