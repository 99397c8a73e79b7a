"""hypertorch's ``hypergrad.CG_torch``: ``cg(Ax, b, max_iter, epsilon)`` on lists of tensors.

A thin wrapper over ``hypergrad.linear_solvers.solve_cg`` (one CG, with its safety checks). Unlike
hypertorch's, it returns the *latest* iterate when the tolerance is met (hypertorch returns the one
before), and it raises instead of returning NaN when the system is singular or indefinite.
"""
from __future__ import annotations

from . import tensor_list as tl
from .linear_solvers import solve_cg


def cg(Ax, b, max_iter=100, epsilon=1.0e-5):
    """Conjugate gradient for A x = b from x = 0, A symmetric positive definite given by ``Ax(list) -> list``.

    At most ``max_iter`` products; stops when ||b - A x|| <= ``epsilon``. Returns x as a list of tensors.
    """
    x, _ = solve_cg(Ax, list(b), maxiter=max_iter, tol=epsilon)
    return x


def cat_list_to_tensor(list_tx):
    """Concatenate a list of tensors into one vector."""
    return tl.flatten(list_tx)
