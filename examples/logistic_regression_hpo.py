"""Hyperparameter optimization of an L2-regularized logistic regression, the hypertorch way.

One L2 weight per feature, lambda_j = exp(h_j), tuned on a validation split of scikit-learn's bundled
breast-cancer data. The model is an ``nn.Linear``; its parameters enter the library as a params list
through ``hypergrad.functional`` (torch.func.functional_call), no ``higher`` needed.

    inner:  w*(h) = argmin_w  CE(train; w) + 1/2 sum_j e^{h_j} w_j^2     (T gradient steps)
    outer:  min_h  CE(val; w*(h))                                        (hypergradient by CG)

Run ``python examples/logistic_regression_hpo.py --help``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg


def load_data(seed: int, dtype=torch.float64):
    """Standardized breast-cancer data split 50/25/25 into train/val/test."""
    from sklearn.datasets import load_breast_cancer
    X, y = load_breast_cancer(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X, y = torch.tensor(X, dtype=dtype)[perm], torch.tensor(y, dtype=dtype)[perm]
    n_tr, n_va = len(y) // 2, len(y) // 4
    mean, std = X[:n_tr].mean(0), X[:n_tr].std(0) + 1e-8
    X = (X - mean) / std
    return (X[:n_tr], y[:n_tr]), (X[n_tr:n_tr + n_va], y[n_tr:n_tr + n_va]), (X[n_tr + n_va:], y[n_tr + n_va:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outer-steps", type=int, default=40, help="hyperparameter (outer) steps")
    ap.add_argument("--inner-steps", type=int, default=100, help="gradient steps of the inner problem")
    ap.add_argument("--K", type=int, default=20, help="maximum iterations of the linear solver")
    ap.add_argument("--solver", default="cg", choices=["cg", "minres", "fixed_point", "neumann", "gmres"],
                    help="hypergrad function used, called with hypertorch's signature")
    ap.add_argument("--outer-lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a few steps only (for CI)")
    ap.add_argument("--out", default="results", help="folder for the JSON and PNG outputs")
    args = ap.parse_args(argv)
    for name in ("outer_steps", "inner_steps", "K"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.tiny:
        args.outer_steps, args.inner_steps = 5, 30
    torch.manual_seed(args.seed)
    from tqdm import tqdm

    (Xtr, ytr), (Xva, yva), (Xte, yte) = load_data(args.seed)
    d = Xtr.shape[1]
    model = nn.Linear(d, 1).to(torch.float64)
    f = hg.functional(model)

    def inner_loss(params, hparams):  # the hypertorch convention: (params, hparams) -> scalar
        logits = f(params, Xtr).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, ytr) + 0.5 * (torch.exp(hparams[0]) * params[0] ** 2).sum() / len(ytr)

    def val_loss(params, hparams):
        return F.binary_cross_entropy_with_logits(f(params, Xva).squeeze(1), yva)

    def accuracy(params, X, y):
        with torch.no_grad():
            return ((f(params, X).squeeze(1) > 0).to(y.dtype) == y).double().mean().item()

    hparams = [torch.full((1, d), 0.0, dtype=torch.float64, requires_grad=True)]
    outer_opt = torch.optim.Adam(hparams, lr=args.outer_lr)
    fp_map = hg.GradientDescent(inner_loss, step_size=1.0)
    hypergrad_fn = {"cg": hg.CG, "minres": hg.minres, "fixed_point": hg.fixed_point,
                    "neumann": hg.neumann, "gmres": hg.gmres}[args.solver]
    params = hg.module_params(model)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.outer_steps), desc=f"outer steps ({args.solver})", file=sys.stdout,
               disable=not sys.stdout.isatty())
    for step in bar:
        for _ in range(args.inner_steps):  # inner problem, warm-started from the last solution
            params = [w.detach().requires_grad_(True) for w in fp_map(params, hparams)]
        outer_opt.zero_grad()
        hypergrad_fn(params, hparams, args.K, fp_map, val_loss)  # writes hparams[0].grad
        outer_opt.step()
        rec = dict(step=step, val_loss=val_loss(params, hparams).item(), val_acc=accuracy(params, Xva, yva),
                   test_acc=accuracy(params, Xte, yte), mean_log_l2=hparams[0].mean().item(),
                   seconds=time.perf_counter() - t0)
        history.append(rec)
        bar.set_postfix(val_loss=f"{rec['val_loss']:.4f}", test_acc=f"{rec['test_acc']:.3f}")
        if not sys.stdout.isatty():
            print(f"step {step:3d}  val loss {rec['val_loss']:.4f}  val acc {rec['val_acc']:.3f}  "
                  f"test acc {rec['test_acc']:.3f}")

    # Check the last hypergradient against central finite differences of the same pipeline (one direction).
    check = finite_difference_check(inner_loss, val_loss, params, hparams, fp_map)
    first, last = history[0], history[-1]
    print(f"\nvalidation loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}; "
          f"test accuracy {first['test_acc']:.3f} -> {last['test_acc']:.3f}; "
          f"{last['seconds']:.1f} s for {args.outer_steps} outer steps")
    print(f"hypergradient vs finite differences along a random direction: relative error {check:.2e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "logistic_regression_hpo.json"), "w") as fh:
        json.dump(dict(args=vars(args), history=history, fd_check_rel_error=check,
                       torch=torch.__version__, hypergrad=hg.__version__), fh, indent=1)
    plot(history, os.path.join(args.out, "logistic_regression_hpo.png"))
    return history, check


def finite_difference_check(inner_loss, val_loss, params, hparams, fp_map, eps=1e-4):
    """Relative error of <hypergradient, u> against a central difference of E(w*(h + t u)) in t,
    with the inner problem solved to machine precision by Newton's method (an independent solver)."""
    shapes = [p.shape for p in params]

    def solve_inner(h):
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        unflat = lambda v: list(torch.split(v, [s.numel() for s in shapes]))
        loss = lambda v: inner_loss([t.reshape(s) for t, s in zip(unflat(v), shapes)], h)
        for _ in range(30):
            g = torch.autograd.functional.jacobian(loss, flat)
            H = torch.autograd.functional.hessian(loss, flat)
            flat = flat - torch.linalg.solve(H, g)
        return [t.reshape(s).requires_grad_(True) for t, s in zip(unflat(flat.detach()), shapes)]

    h = [hparams[0].detach().clone().requires_grad_(True)]
    w = solve_inner(h)
    g = hg.hypergradient(w, h, fp_map, val_loss, solver="cg", K=500, tol=1e-13, set_grad=False).grads[0]
    u = torch.randn_like(h[0])
    with torch.no_grad():
        plus = val_loss(solve_inner([h[0] + eps * u]), None).item()
        minus = val_loss(solve_inner([h[0] - eps * u]), None).item()
    fd = (plus - minus) / (2 * eps)
    return abs((g * u).sum().item() - fd) / max(abs(fd), 1e-12)


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in history]
    ax[0].plot(steps, [r["val_loss"] for r in history])
    ax[0].set(xlabel="outer step", ylabel="validation loss", title="outer objective")
    ax[1].plot(steps, [r["val_acc"] for r in history], label="validation")
    ax[1].plot(steps, [r["test_acc"] for r in history], label="test")
    ax[1].set(xlabel="outer step", ylabel="accuracy", title="accuracy")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
