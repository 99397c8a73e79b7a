"""Simulated finite-sum quadratic bilevel problems with a controlled spectrum (benchmark_bilevel's setting).

Each sample i carries a quadratic of the lower variable y (dim p) and the upper variable x (dim q):

    f_i(y, x) = 1/2 (a_i . y)^2 + 1/2 (b_i . x)^2 + (c_i . x)(e_i . y) + l_i . y + m_i . x

so its Hessians are rank one, H_i = a_i a_i^T, G_i = b_i b_i^T, and its cross term is C_i = c_i e_i^T
(q x p). The features are drawn so that the means have a chosen spectrum (the recipe of benchopt's
benchmark_bilevel ``gen_matrices``, restated):

* a_i = z_i S with z_i ~ N(0, I_p) and S = U diag(s) U^T, U a random orthogonal basis and s log-spaced in
  [sqrt(mu), sqrt(L_inner)]: E[H_i] = S^2 has its spectrum in [mu, L_inner];
* b_i likewise in dimension q, with one zero singular value (E[G_i] is only positive semi-definite);
* c_i = U' D z_i', e_i = V' z_i' (z_i' ~ N(0, I_p)) for random orthogonal U', V' and D (q x p) with
  log-spaced singular values in [mu, L_cross]: E[C_i] = U' D V'^T;
* l_i ~ N(0, I_p), m_i ~ N(0, I_q).

Storing the factors instead of the matrices keeps n = 32768 samples at O(n (p + q)) memory. A problem is an
inner and an outer quadratic drawn this way (with their own L's), kept only when the Hessian of the value
function h(x) = F(y*(x), x) is positive definite (up to ``max_tries`` draws).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


def _orthogonal(d: int, g: torch.Generator, dtype) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


@dataclass
class SampleQuadratics:
    """The factors of n per-sample quadratics in (y in R^p, x in R^q), one row per sample.

    f_i(y, x) = 1/2 (a_i . y)^2 + 1/2 (b_i . x)^2 + (c_i . x)(e_i . y) + l_i . y + m_i . x, with the rows
    a_i, b_i, c_i, e_i, l_i, m_i of ``a``, ``b``, ``c``, ``e``, ``l_``, ``m_``. ``loss(y, x, idx)`` is the mean
    over ``idx``; ``H, G, C, l, m`` are the means (the full-batch quadratic's matrices)."""
    a: Tensor
    b: Tensor
    c: Tensor
    e: Tensor
    l_: Tensor
    m_: Tensor

    @property
    def n(self) -> int:
        """The number of samples n."""
        return self.a.shape[0]

    def loss(self, y: Tensor, x: Tensor, idx: Tensor) -> Tensor:
        """mean_{i in idx} f_i(y, x)."""
        ay, bx = self.a[idx] @ y, self.b[idx] @ x
        cross = (self.c[idx] @ x) * (self.e[idx] @ y)
        return (0.5 * ay * ay + 0.5 * bx * bx + cross + self.l_[idx] @ y + self.m_[idx] @ x).mean()

    def batch_loss(self, params: Sequence[Tensor], hparams: Sequence[Tensor], idx: Tensor) -> Tensor:
        """[`loss`][methods.stochastic.quadratics.SampleQuadratics.loss] in the oracle convention (one-tensor lists)."""
        return self.loss(params[0], hparams[0], idx)

    @property
    def H(self) -> Tensor:
        """The mean of H_i = a_i a_i^T, (p, p): the full-batch Hessian in y."""
        return self.a.T @ self.a / self.n

    @property
    def G(self) -> Tensor:
        """The mean of G_i = b_i b_i^T, (q, q): the full-batch Hessian in x."""
        return self.b.T @ self.b / self.n

    @property
    def C(self) -> Tensor:
        """The mean of C_i = c_i e_i^T, (q, p): the full-batch cross term, grad2_xy f."""
        return self.c.T @ self.e / self.n

    @property
    def l(self) -> Tensor:  # noqa: E743
        """The mean of l_i, (p,): the full-batch linear term in y."""
        return self.l_.mean(0)

    @property
    def m(self) -> Tensor:
        """The mean of m_i, (q,): the full-batch linear term in x."""
        return self.m_.mean(0)

    def to(self, *args, **kwargs) -> "SampleQuadratics":
        """The same quadratics with every factor converted by ``Tensor.to(*args, **kwargs)`` (device, dtype)."""
        return SampleQuadratics(*(t.to(*args, **kwargs) for t in (self.a, self.b, self.c, self.e, self.l_, self.m_)))


def sample_quadratics(n: int, p: int, q: int, L_inner: float, L_outer: float, L_cross: float, mu: float,
                      g: torch.Generator, dtype=torch.float64) -> SampleQuadratics:
    """n per-sample quadratics in (y in R^p, x in R^q) whose means have prescribed spectra.

    E[H_i] has its spectrum log-spaced in [mu, L_inner], E[G_i] in [mu, L_outer] plus one zero eigenvalue,
    and E[C_i] its singular values log-spaced in [mu, L_cross] (the recipe of benchopt's benchmark_bilevel,
    restated in the docstring of the module [`methods.stochastic.quadratics`][methods.stochastic.quadratics]).

    Args:
        n: the number of samples.
        p: the dimension of y.
        q: the dimension of x.
        L_inner: the largest eigenvalue of the mean Hessian in y.
        L_outer: the largest eigenvalue of the mean Hessian in x.
        L_cross: the largest singular value of the mean cross term.
        mu: the smallest eigenvalue (and singular value) of those spectra.
        g: the ``torch.Generator`` of every draw.
        dtype: the dtype of the factors.
    """
    U = _orthogonal(p, g, dtype)
    S = U @ torch.diag(torch.logspace(0.5 * torch.log10(torch.tensor(mu)).item(),
                                      0.5 * torch.log10(torch.tensor(L_inner)).item(), p, dtype=dtype)) @ U.T
    a = torch.randn(n, p, generator=g, dtype=dtype) @ S
    U = _orthogonal(q, g, dtype)
    s = torch.cat([torch.zeros(1, dtype=dtype),
                   torch.logspace(0.5 * torch.log10(torch.tensor(mu)).item(),
                                  0.5 * torch.log10(torch.tensor(L_outer)).item(), q - 1, dtype=dtype)])
    b = torch.randn(n, q, generator=g, dtype=dtype) @ (U @ torch.diag(s) @ U.T)
    U, V = _orthogonal(q, g, dtype), _orthogonal(p, g, dtype)
    k = min(p, q)
    D = torch.zeros(q, p, dtype=dtype)
    D[:k, :k] = torch.diag(torch.logspace(torch.log10(torch.tensor(mu)).item(),
                                          torch.log10(torch.tensor(L_cross)).item(), k, dtype=dtype))
    z = torch.randn(n, p, generator=g, dtype=dtype)
    c, e = z @ (U @ D).T, z @ V.T
    return SampleQuadratics(a, b, c, e, torch.randn(n, p, generator=g, dtype=dtype),
                            torch.randn(n, q, generator=g, dtype=dtype))


@dataclass
class QuadraticBilevel:
    """A synthetic bilevel problem: an inner (f) and an outer (F) set of sample quadratics.

    ``min_eig`` is the smallest eigenvalue of the value function's Hessian (> 0 by construction)."""
    inner: SampleQuadratics
    outer: SampleQuadratics
    min_eig: float

    def value_hessian(self) -> Tensor:
        """Hessian of h(x) = F(y*(x), x): J^T H_F J + G_F + C_F J + (C_F J)^T with J = -H_f^-1 C_f^T."""
        J = -torch.linalg.solve(self.inner.H, self.inner.C.T)
        CJ = self.outer.C @ J
        return J.T @ self.outer.H @ J + self.outer.G + CJ + CJ.T


def make_quadratic_bilevel(n_inner: int = 1024, n_outer: int = 1024, dim_inner: int = 100, dim_outer: int = 10, *,
                           mu: float = 0.1, L_inner_inner: float = 1.0, L_inner_outer: float = 1.0,
                           L_outer_inner: float = 1.0, L_outer_outer: float = 1.0, L_cross_inner: float = 0.1,
                           L_cross_outer: float = 0.1, seed: int = 2442, dtype=torch.float64,
                           max_tries: int = 20) -> QuadraticBilevel:
    """The benchmark's ``simulated`` data set: a [`QuadraticBilevel`][methods.stochastic.quadratics.QuadraticBilevel].

    Draws inner and outer sample quadratics ([`sample_quadratics`][methods.stochastic.quadratics.sample_quadratics])
    until the value function's Hessian is positive definite (smallest eigenvalue >= 1e-12), else raises
    ``ValueError``. The defaults are its own; the issue's setting is ``n_inner=32768, dim_outer=10``.

    Args:
        n_inner: the samples of f.
        n_outer: the samples of F.
        dim_inner: the dimension p of y.
        dim_outer: the dimension q of x.
        mu: the smallest eigenvalue of every spectrum.
        L_inner_inner: f's largest eigenvalue in y (``L_inner`` of its draw).
        L_inner_outer: F's largest eigenvalue in y.
        L_outer_inner: f's largest eigenvalue in x (``L_outer`` of its draw).
        L_outer_outer: F's largest eigenvalue in x.
        L_cross_inner: f's largest cross singular value.
        L_cross_outer: F's largest cross singular value.
        seed: the seed of the draws.
        dtype: the dtype of the factors.
        max_tries: the draws before giving up.
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_tries):
        inner = sample_quadratics(n_inner, dim_inner, dim_outer, L_inner_inner, L_outer_inner, L_cross_inner,
                                  mu, g, dtype)
        outer = sample_quadratics(n_outer, dim_inner, dim_outer, L_inner_outer, L_outer_outer, L_cross_outer,
                                  mu, g, dtype)
        pb = QuadraticBilevel(inner, outer, 0.0)
        pb.min_eig = float(torch.linalg.eigvalsh(pb.value_hessian()).min())
        if pb.min_eig >= 1e-12:
            return pb
    raise ValueError(f"no draw of {max_tries} had a positive definite value-function Hessian")
