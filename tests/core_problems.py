"""Reference problems for the core tests, with closed forms computed independently of hypergrad."""
import torch

DT = torch.float64


def ridge(d=8, n=40, cond=None, seed=0):
    """Ridge regression with per-feature L2 weights e^lambda.

    Inner: L(w, lam) = 1/2 ||X w - y||^2 + 1/2 sum e^lam_i w_i^2; outer: E(w) = 1/2 ||Xv w - yv||^2.
    Closed form: A = X^T X + diag(e^lam), w* = A^-1 X^T y, dE/dlam = -e^lam * w* * A^-1 grad_w E.
    ``cond`` sets the condition number of A (approximately) by shaping X's spectrum.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    if cond is not None:
        U, _, Vt = torch.linalg.svd(X, full_matrices=False)
        s = torch.sqrt(torch.logspace(0, torch.log10(torch.tensor(float(cond))).item(), d, dtype=DT)) * 0.999
        X = U @ torch.diag(s.flip(0)) @ Vt
    y = torch.randn(n, generator=g, dtype=DT)
    Xv, yv = torch.randn(30, d, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    lam0 = torch.full((d,), -7.0 if cond is not None else 0.0, dtype=DT) + 0.1 * torch.randn(d, generator=g, dtype=DT)
    lam = lam0.clone().requires_grad_(True)
    A = X.T @ X + torch.diag(torch.exp(lam0))
    w_star = torch.linalg.solve(A, X.T @ y)
    gE = Xv.T @ (Xv @ w_star - yv)
    ref = -torch.exp(lam0) * w_star * torch.linalg.solve(A, gE)
    evals = torch.linalg.eigvalsh(A)

    def inner_loss(params, hparams):
        w = params[0]
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (torch.exp(hparams[0]) * w * w).sum()

    def outer_loss(params, hparams):
        return 0.5 * ((Xv @ params[0] - yv) ** 2).sum()

    return dict(X=X, y=y, lam=lam, w_star=w_star, ref=ref, A=A, inner_loss=inner_loss,
                outer_loss=outer_loss, step=1.0 / evals.max().item(), cond=(evals.max() / evals.min()).item())


def rel_err(a, b):
    return (a - b).norm().item() / b.norm().item()
