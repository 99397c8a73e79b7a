"""Exceptions raised by the core. Each names the problem; none is ever replaced by zeros or NaN."""


class HypergradError(RuntimeError):
    """Base class of the numerical failures the core detects."""


class NonFiniteError(HypergradError, FloatingPointError):
    """NaN or Inf appeared in a loss, a gradient, or an iterate of a linear solve."""


class DivergenceError(HypergradError, FloatingPointError):
    """An iteration's residual grew far beyond its starting value (the iteration diverges)."""


class ConvergenceError(HypergradError):
    """An iterative solve ran out of iterations above its tolerance where a converged result is required.

    Raised by the forward and backward solves of an implicit layer (``strict=True``).
    """


class BreakdownError(HypergradError, ArithmeticError):
    """A Krylov method broke down (e.g. CG met zero curvature on an indefinite system)."""


class SingularSystemError(HypergradError, ArithmeticError):
    """The linear system (I - dPhi/dw)^T v = dE/dw is singular, so the hypergradient is undefined."""


class NotAFixedPointError(HypergradError, ValueError):
    """``params`` are not (close enough to) a fixed point of ``fp_map``: ||Phi(w) - w|| exceeds ``fixed_point_tol``."""


class FixedPointWarning(UserWarning):
    """``params`` are far from a fixed point of ``fp_map``: the implicit hypergradient may be meaningless."""


#: why torch.autograd.grad inside a map is refused under torch.func transforms
AUTOGRAD_UNDER_TORCH_FUNC = (
    "the map calls torch.autograd.grad (as hypertorch's GradientDescent does) inside a torch.func transform "
    "(vmap, jacrev, jacfwd, hessian), where autograd.grad does not see the transform and returns wrong "
    "derivatives: write the map with torch.func.grad, or differentiate with loss.backward() / "
    "torch.autograd.grad (create_graph=True for higher orders), which work with such maps")
