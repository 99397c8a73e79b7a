"""The constrained inner problem  y*(x) = argmin_y g(x, y)  s.t.  p(x, y) <= 0,  q(x, y) = 0.

All callables follow the project's one interface: ``f(params, hparams)`` with ``params`` the inner
variables y (a list of tensors) and ``hparams`` the outer variables x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

Fn = Callable[[List[Tensor], List[Tensor]], Tensor]


@dataclass(frozen=True)
class ConstrainedProblem:
    """The inner problem min_y g(params, hparams) s.t. p(params, hparams) <= 0, q(params, hparams) = 0.

    Args:
        objective: ``objective(params, hparams) -> scalar``, g.
        ineq: ``ineq(params, hparams) -> 1-D tensor``, p (p <= 0); None: no inequality constraints.
        eq: ``eq(params, hparams) -> 1-D tensor``, q (q = 0); None: no equality constraints.
        hessian: optional ``hessian(params, hparams, mu, nu) -> (n, n) tensor``, the Hessian of
            L = g + mu^T p + nu^T q w.r.t. the flattened params (``mu`` full-length, zero on the inactive
            constraints), when it is known in closed form (Q for a QP). It replaces the autodiff Hessian of
            the dense KKT path and is checked against one autodiff Hessian-vector product.
    """
    objective: Fn
    ineq: Optional[Fn] = None
    eq: Optional[Fn] = None
    hessian: Optional[Callable[..., Tensor]] = None

    def __post_init__(self):
        for name in ("objective", "ineq", "eq", "hessian"):
            fn = getattr(self, name)
            if (fn is not None or name == "objective") and not callable(fn):
                raise TypeError(f"ConstrainedProblem.{name} must be callable, got {type(fn).__name__}")

    def value(self, params: Sequence[Tensor], hparams: Sequence[Tensor]) -> Tensor:
        """g(params, hparams), checked to be a scalar tensor."""
        g = self.objective(list(params), list(hparams))
        if not isinstance(g, Tensor) or g.numel() != 1:
            raise ValueError("ConstrainedProblem.objective must return a scalar tensor, got "
                             f"{type(g).__name__ if not isinstance(g, Tensor) else tuple(g.shape)}")
        return g.reshape(())

    def p(self, params: Sequence[Tensor], hparams: Sequence[Tensor]) -> Optional[Tensor]:
        """The inequality constraints p (1-D), or None without any."""
        return self._constraint("ineq", params, hparams)

    def q(self, params: Sequence[Tensor], hparams: Sequence[Tensor]) -> Optional[Tensor]:
        """The equality constraints q (1-D), or None without any."""
        return self._constraint("eq", params, hparams)

    def _constraint(self, name: str, params, hparams) -> Optional[Tensor]:
        fn = getattr(self, name)
        if fn is None:
            return None
        out = fn(list(params), list(hparams))
        if not isinstance(out, Tensor) or out.dim() != 1:
            raise ValueError(f"ConstrainedProblem.{name} must return a 1-D tensor, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out

    def lagrangian(self, params: Sequence[Tensor], hparams: Sequence[Tensor], mu: Optional[Tensor] = None,
                   nu: Optional[Tensor] = None, index: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> Tensor:
        """L = g + mu^T p + nu^T q.

        ``index`` restricts the inequalities to p[index] (``mu`` then has one entry per index: the
        inactive ones dropped). ``mask`` (0/1 per inequality, full-length ``mu``) keeps the masked-in
        terms mu_i p_i and replaces each masked-out one by mu_i^2 / 2, so that in the Hessian of L the
        inactive multipliers decouple with a unit diagonal (a fixed-size map for batches).
        """
        L = self.value(params, hparams)
        if mu is not None and mu.numel() > 0:
            p = self.p(params, hparams)
            if index is not None:
                p = p[index]
            if mask is None:
                L = L + torch.sum(mu * p)
            else:
                L = L + torch.sum(mask * mu * p) + 0.5 * torch.sum((1 - mask) * mu * mu)
        if nu is not None and nu.numel() > 0:
            L = L + torch.sum(nu * self.q(params, hparams))
        return L
