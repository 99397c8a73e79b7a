"""``nn.Module`` adapters: module parameters as ``params``/``hparams`` lists, without ``higher``.

A ``DistributedDataParallel`` wrapper is accepted everywhere and unwrapped: its reducer acts only on
``.backward()`` into ``.grad``, so data-parallel hypergradients come from ``hypergrad.distributed``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel


def _unwrap(module: nn.Module) -> nn.Module:
    """The wrapped module of a ``DistributedDataParallel``; any other module as it is."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def module_params(module: nn.Module, requires_grad: bool = True) -> List[Tensor]:
    """Detached copies of the module's parameters (in ``named_parameters`` order).

    Ready to be ``params`` or ``hparams``; the module itself is not modified.

    Args:
        module: an ``nn.Module`` (or a ``DistributedDataParallel`` wrapping one).
        requires_grad: the ``requires_grad`` flag of the copies.

    Returns:
        One cloned, detached tensor per parameter.
    """
    module = _unwrap(module)
    return [p.detach().clone().requires_grad_(requires_grad) for p in module.parameters()]


def param_dict(module: nn.Module, tensors: Sequence[Tensor]) -> Dict[str, Tensor]:
    """Name the tensors of a params list after the module's parameters.

    Args:
        module: an ``nn.Module`` (or a ``DistributedDataParallel`` wrapping one).
        tensors: one tensor per parameter, in ``named_parameters`` order, each of its parameter's shape
            (otherwise a ``ValueError``).

    Returns:
        A dict from parameter name to the given tensor (the tensors themselves, not copies).
    """
    module = _unwrap(module)
    names = [n for n, _ in module.named_parameters()]
    if len(names) != len(tensors):
        raise ValueError(f"{type(module).__name__} has {len(names)} parameters but {len(tensors)} tensors "
                         "were given")
    for n, (name, p), t in zip(names, module.named_parameters(), tensors):
        if p.shape != t.shape:
            raise ValueError(f"tensor for {name!r} has shape {tuple(t.shape)}, parameter has {tuple(p.shape)}")
    return dict(zip(names, tensors))


def functional(module: nn.Module):
    """``f(params, *inputs)``: the module evaluated with ``params`` in place of its parameters.

    Buffers are used as they are; the call goes through ``torch.func.functional_call``.
    """
    module = _unwrap(module)

    def call(params: Sequence[Tensor], *args, **kwargs):
        return functional_call(module, param_dict(module, params), args, kwargs)

    return call


def load_params(module: nn.Module, params: Sequence[Tensor]) -> None:
    """Copy a params list back into the module's parameters (in place, without tracking).

    Args:
        module: an ``nn.Module`` (or a ``DistributedDataParallel`` wrapping one), modified in place.
        params: one tensor per parameter, in ``named_parameters`` order, each of its parameter's shape.
    """
    module = _unwrap(module)
    with torch.no_grad():
        for p, t in zip(module.parameters(), param_dict(module, params).values()):
            p.copy_(t)
