"""Per-sample SVM weights by hypergradient descent (Xu & Zhu, AAAI 2023), with the constrained layer.

Inner problem (a soft-margin SVM with squared hinge and one weight C_i = exp(c_i) per training sample):

    min_{w, b, xi}  1/2 ||w||^2 + 1/2 sum_i exp(c_i) xi_i^2   s.t.  1 - xi_i - y_i (w . x_i + b) <= 0

solved by cvxpy; outer loss: a smoothed 0-1 loss on a validation split, mean sigmoid(-y_j f(x_j) / T).
Each outer step solves the SVM, takes the hypergradient with respect to c through the KKT map
(``constrained.hypergradient``) and updates c with Adam. The first hypergradient is checked against
cvxpylayers' own derivative. Data: scikit-learn's breast-cancer set, standardized.

Run: ``python examples/svm_hyperparameters.py [--tiny] [--steps 30] [--out results]``.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import cvxpy as cp
import numpy as np
import torch

import constrained as C

DT = torch.float64


def load_data(n_train: int, n_val: int, seed: int):
    """Standardized breast-cancer data split into train/validation/test, labels in {-1, +1}."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    X, y = X[idx], 2.0 * y[idx] - 1.0
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    mean, std = X[tr].mean(0), X[tr].std(0) + 1e-12
    X = (X - mean) / std
    t = lambda a: torch.tensor(a, dtype=DT)  # noqa: E731
    return t(X[tr]), t(y[tr]), t(X[va]), t(y[va]), t(X[te]), t(y[te])


def build(Xtr: torch.Tensor, ytr: torch.Tensor):
    """The SVM as a cvxpy problem (parameter s = exp(c / 2), DPP) and as a torch ConstrainedProblem."""
    n, d = Xtr.shape
    Xn, yn = Xtr.numpy(), ytr.numpy()
    w, b, xi = cp.Variable(d), cp.Variable(), cp.Variable(n)
    s = cp.Parameter(n, nonneg=True)
    margin = [1 - xi - cp.multiply(yn, Xn @ w + b) <= 0]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(w) + 0.5 * cp.sum_squares(cp.multiply(s, xi))), margin)

    def objective(params, hparams):
        w_, _, xi_ = params
        return 0.5 * (w_ ** 2).sum() + 0.5 * (torch.exp(hparams[0]) * xi_ ** 2).sum()

    def ineq(params, hparams):
        w_, b_, xi_ = params
        return 1 - xi_ - ytr * (Xtr @ w_ + b_)

    return prob, s, [w, b, xi], margin, C.ConstrainedProblem(objective, ineq)


def accuracy(w, b, X, y) -> float:
    return float(((X @ w + b) * y > 0).to(DT).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description="Per-sample SVM weights C_i = exp(c_i) by hypergradient descent "
                                             "through the KKT map of the constrained inner problem.")
    ap.add_argument("--steps", type=int, default=30, help="outer steps")
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-val", type=int, default=120)
    ap.add_argument("--lr", type=float, default=0.2, help="Adam step on c")
    ap.add_argument("--temperature", type=float, default=0.2, help="of the smoothed 0-1 loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", "--quick", dest="tiny", action="store_true", help="a few seconds (CI)")
    ap.add_argument("--out", default="results", help="directory for the plot and the JSON log")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.n_train, args.n_val = 4, 40, 40
    torch.manual_seed(args.seed)
    Xtr, ytr, Xva, yva, Xte, yte = load_data(args.n_train, args.n_val, args.seed)
    prob, s_par, variables, margin, problem = build(Xtr, ytr)
    c = torch.zeros(len(ytr), dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([c], lr=args.lr)

    def outer_loss(params, hparams):
        w, b, _ = params
        return torch.sigmoid(-yva * (Xva @ w + b) / args.temperature).mean()

    log = []
    for step in range(args.steps):
        sol = C.solve_cvxpy(prob, [s_par], [torch.exp(c.detach() / 2)], variables, ineq=margin,
                            torch_problem=problem, hparams=[c])
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", C.DegenerateConstraintWarning)  # margins exactly 1 are rare
            res = C.hypergradient(problem, sol.params, [c], outer_loss, sol.mu)
        if step == 0:
            check = check_against_cvxpylayers(prob, s_par, variables, margin, c, outer_loss, res.grads[0])
        w, b, _ = sol.params
        row = dict(step=step, outer_loss=float(outer_loss(sol.params, [c])), val_acc=accuracy(w, b, Xva, yva),
                   test_acc=accuracy(w, b, Xte, yte), active=len(res.report.active), solver=res.solver)
        log.append(row)
        print(f"step {step:3d}  val loss {row['outer_loss']:.4f}  val acc {row['val_acc']:.3f}  "
              f"test acc {row['test_acc']:.3f}  ({row['active']} margin constraints active)")
        opt.step()
    os.makedirs(args.out, exist_ok=True)
    plot(log, os.path.join(args.out, "svm_hyperparameters.png"))
    with open(os.path.join(args.out, "svm_hyperparameters.json"), "w") as f:
        json.dump(dict(config=vars(args), first_step_check=check, log=log), f, indent=2)
    print(f"wrote {args.out}/svm_hyperparameters.png and .json")
    return log, check


def check_against_cvxpylayers(prob, s_par, variables, margin, c, outer_loss, ours) -> dict:
    """cvxpylayers' derivative of the same outer loss (through s = exp(c / 2)) as a reference."""
    layer = C.DualLayer(prob, [s_par], variables, ineq=margin)
    c_ref = c.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sol = layer(torch.exp(c_ref / 2))
        ref, = torch.autograd.grad(outer_loss(sol.params, [c_ref]), c_ref)
    err = float((ours - ref).norm() / ref.norm())
    print(f"first hypergradient vs cvxpylayers (SCS, eps=1e-10): relative difference {err:.2e}")
    if not err < 1e-4:
        raise RuntimeError(f"hypergradient disagrees with cvxpylayers: relative difference {err:.2e}")
    return dict(rel_diff=err, norm=float(ref.norm()))


def plot(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(steps, [r["outer_loss"] for r in log], marker="o")
    a1.set(xlabel="outer step", ylabel="smoothed 0-1 loss (validation)", title="outer loss")
    a2.plot(steps, [r["val_acc"] for r in log], marker="o", label="validation")
    a2.plot(steps, [r["test_acc"] for r in log], marker="s", label="test")
    a2.set(xlabel="outer step", ylabel="accuracy", title="SVM with per-sample weights")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
