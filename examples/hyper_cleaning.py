"""Data hyper-cleaning on scikit-learn's digits: every method of the library side by side.

Half of the training labels are replaced by a different random class. One weight per training sample,
sigma(lambda_i), scales its cross-entropy in the lower problem; the upper problem is the cross-entropy of
the lower classifier on a clean validation split. A good method drives the corrupted samples' weights
down: the corrupted-sample detector sigma(lambda_i) < 0.5 is scored by F1 (the setting of the BVFIM
paper, Section 6.2, and of benchopt's bilevel benchmark, at a size that runs on 2 CPU cores).

    lower:  W*(lambda) = argmin_W  mean_i sigma(lambda_i) CE(W x_i, y~_i) + r ||W||^2     (linear, 10 classes)
    upper:  min_lambda  CE_val(W*(lambda))

Methods, each through the public API as a user calls it: RAD, T-RAD, BDA (methods.Dynamic), Implicit CG
and Neumann (methods.Implicit), BVFIM (methods.BVFIM), and the core's hypergrad.cg / hypergrad.minres
written the hypertorch way. Outputs: a table (terminal, CSV, JSON) and a PNG of validation loss and F1
against time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

METHODS = ["RAD", "T-RAD", "BDA", "CG", "Neumann", "BVFIM", "hg.cg", "hg.minres"]
SIZES = {"default": dict(n_train=1000, n_val=300, n_test=497, outer_steps=300, inner_steps=20),
         "full": dict(n_train=1000, n_val=300, n_test=497, outer_steps=1000, inner_steps=50),
         "tiny": dict(n_train=120, n_val=60, n_test=100, outer_steps=15, inner_steps=20)}


# ---------------------------------------------------------------------------------------------------- data
def prepare_data(n_train: int, n_val: int, n_test: int, corruption: float = 0.5, seed: int = 0,
                 dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Disjoint train/val/test splits of ``load_digits``; a fraction ``corruption`` of the training labels
    (exactly round(corruption * n_train) of them) replaced by a uniformly drawn *different* class."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    if n_train + n_val + n_test > len(y):
        raise ValueError(f"splits of {n_train}+{n_val}+{n_test} samples exceed the {len(y)} digits")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X = torch.tensor(X, dtype=dtype)[perm] / 16.0
    y = torch.tensor(y, dtype=torch.long)[perm]
    tr, va, te = perm.new_tensor(range(n_train)), perm.new_tensor(range(n_train, n_train + n_val)), \
        perm.new_tensor(range(n_train + n_val, n_train + n_val + n_test))
    y_clean = y[tr]
    n_bad = int(round(corruption * n_train))
    bad = torch.zeros(n_train, dtype=torch.bool)
    bad[torch.randperm(n_train, generator=g)[:n_bad]] = True
    shift = torch.randint(1, 10, (n_train,), generator=g)  # 1..9: never the true class
    y_noisy = torch.where(bad, (y_clean + shift) % 10, y_clean)
    return dict(X_train=X[tr], y_train=y_noisy, y_train_clean=y_clean, corrupted=bad,
                X_val=X[va], y_val=y[va], X_test=X[te], y_test=y[te])


def f1_score(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tp = (pred & truth).sum().item()
    fp = (pred & ~truth).sum().item()
    fn = (~pred & truth).sum().item()
    return 2 * tp / max(2 * tp + fp + fn, 1)


# --------------------------------------------------------------------------------------------- the problem
class SampleWeights(nn.Module):
    """The upper model: one logit lambda_i per training sample (weight sigma(lambda_i))."""

    def __init__(self, n: int):
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(n))


def objectives(data, reg: float):
    """Lower and upper objectives in the reference documentation's ``objective(state)`` style."""

    def lower(state):
        W = state["lower_model"]
        ce = F.cross_entropy(W(state["data"]), state["target"], reduction="none")
        penalty = sum((p ** 2).sum() for p in W.parameters())
        return (torch.sigmoid(state["upper_model"].lam) * ce).mean() + reg * penalty

    def upper(state):
        return F.cross_entropy(state["lower_model"](state["data"]), state["target"])

    return lower, upper


def build(method: str, data, args, device):
    """Models and a ``step()`` closure doing one outer iteration (upper gradient + upper update)."""
    torch.manual_seed(args.seed)
    n, d = data["X_train"].shape
    ul_model = SampleWeights(n).to(device, data["X_train"].dtype)
    ll_model = nn.Linear(d, 10).to(device, data["X_train"].dtype)
    ul_opt = torch.optim.Adam(ul_model.parameters(), lr=args.outer_lr)
    lower, upper = objectives(data, args.reg)
    T, lr = args.inner_steps, args.inner_lr
    batch = (data["X_val"], data["y_val"], data["X_train"], data["y_train"])
    if method in ("RAD", "T-RAD", "BDA"):
        from methods import Dynamic
        kw = dict(truncate_iters=T // 2) if method == "T-RAD" else dict(alpha=args.bda_alpha) if method == "BDA" else {}
        solver = Dynamic(lower, T, ul_model, upper, ll_model, lr=lr, **kw)
    elif method in ("CG", "Neumann"):
        from methods import Implicit
        solver = Implicit(upper, ul_model, lower, ll_model, lr, args.K, lower_loop=T,
                          solver="cg" if method == "CG" else "neumann")
    elif method == "BVFIM":
        from methods import BVFIM
        solver = BVFIM(upper, ul_model, lower, ll_model=ll_model, lower_loop=T, y_loop=T, z_lr=lr, y_lr=lr,
                       reg_decay=args.bvfim_decay)
    else:
        return build_hypertorch_way(method, data, args, ul_model, ll_model, ul_opt)

    def step():
        ul_opt.zero_grad()
        loss = solver.compute_gradients(*batch)
        ul_opt.step()
        return loss

    return ul_model, ll_model, step


def build_hypertorch_way(method, data, args, ul_model, ll_model, ul_opt):
    """The core alone, as a hypertorch user writes it: params/hparams lists, an inner GD loop, hg.cg."""
    f = hg.functional(ll_model)
    Xtr, ytr, Xva, yva = data["X_train"], data["y_train"], data["X_val"], data["y_val"]

    def inner_loss(params, hparams):
        ce = F.cross_entropy(f(params, Xtr), ytr, reduction="none")
        return (torch.sigmoid(hparams[0]) * ce).mean() + args.reg * sum((p ** 2).sum() for p in params)

    def outer_loss(params, hparams):
        return F.cross_entropy(f(params, Xva), yva)

    fp_map = hg.GradientDescent(inner_loss, args.inner_lr)
    hypergrad_fn = hg.cg if method == "hg.cg" else hg.minres
    hparams = [ul_model.lam]
    state = {"params": hg.module_params(ll_model)}

    def step():
        params = state["params"]
        for _ in range(args.inner_steps):
            params = [w.detach().requires_grad_(True) for w in fp_map(params, hparams)]
        state["params"] = params
        ul_opt.zero_grad()
        hypergrad_fn(params, hparams, args.K, fp_map, outer_loss)
        ul_opt.step()
        hg.load_params(ll_model, params)
        return outer_loss(params, hparams).detach()

    return ul_model, ll_model, step


# ------------------------------------------------------------------------------------------------- running
def evaluate(ul_model, ll_model, data) -> Dict[str, float]:
    with torch.no_grad():
        lam = ul_model.lam.detach().cpu()
        val_loss = F.cross_entropy(ll_model(data["X_val"]), data["y_val"]).item()
        test_acc = (ll_model(data["X_test"]).argmax(1) == data["y_test"]).double().mean().item()
        bad = data["corrupted"].cpu()
        return dict(val_loss=val_loss, test_acc=test_acc, f1=f1_score(torch.sigmoid(lam) < 0.5, bad),
                    lam_clean=lam[~bad].mean().item(), lam_corrupted=lam[bad].mean().item())


def retrained_test_accuracy(lam: torch.Tensor, data, args, steps: int = 500) -> float:
    """Test accuracy of a fresh lower model trained to convergence on the training split with the learned
    weights sigma(lambda): the same yardstick for every method (BVFIM's own lower iterate y also fits the
    validation split, through the F term of its barrier problem)."""
    torch.manual_seed(args.seed)
    model = nn.Linear(data["X_train"].shape[1], 10).to(data["X_train"].device, data["X_train"].dtype)
    opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    weights = torch.sigmoid(lam.detach())
    for _ in range(steps):
        opt.zero_grad()
        ce = F.cross_entropy(model(data["X_train"]), data["y_train"], reduction="none")
        ((weights * ce).mean() + args.reg * sum((p ** 2).sum() for p in model.parameters())).backward()
        opt.step()
    with torch.no_grad():
        return (model(data["X_test"]).argmax(1) == data["y_test"]).double().mean().item()


def run_method(method, data, args, device, bar=None) -> Dict:
    ul_model, ll_model, step = build(method, data, args, device)
    curve, elapsed = [], 0.0
    for it in range(args.outer_steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        if not torch.isfinite(torch.as_tensor(loss)).all():
            raise FloatingPointError(f"{method}: the upper loss became {loss} at outer step {it}")
        if it % args.eval_every == 0 or it == args.outer_steps - 1:
            curve.append(dict(step=it, seconds=elapsed, **evaluate(ul_model, ll_model, data)))
        if bar is not None:
            bar.update(1)
    final = curve[-1]
    return dict(method=method, test_acc=final["test_acc"], f1=final["f1"], val_loss=final["val_loss"],
                test_acc_retrained=retrained_test_accuracy(ul_model.lam, data, args),
                lam_clean=final["lam_clean"], lam_corrupted=final["lam_corrupted"],
                sec_per_iter=elapsed / args.outer_steps, total_sec=elapsed, curve=curve)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--full", action="store_true", help="longer run: 1000 outer x 50 inner steps (default 300 x 20)")
    ap.add_argument("--tiny", action="store_true", help="seconds-long run (for CI)")
    ap.add_argument("--n-train", type=int), ap.add_argument("--n-val", type=int), ap.add_argument("--n-test", type=int)
    ap.add_argument("--outer-steps", type=int)
    ap.add_argument("--inner-steps", type=int, help="lower steps per outer step (all methods)")
    ap.add_argument("--inner-lr", type=float, default=1.0)
    ap.add_argument("--outer-lr", type=float, default=0.1, help="Adam step size on lambda")
    ap.add_argument("--K", type=int, default=20, help="linear-solver iterations (CG, Neumann, hg.*)")
    ap.add_argument("--reg", type=float, default=1e-3, help="L2 weight r of the lower problem")
    ap.add_argument("--bda-alpha", type=float, default=0.3)
    ap.add_argument("--bvfim-decay", type=float, default=1.01, help="BVFIM reg_decay rate (divisor r**t)")
    ap.add_argument("--corruption", type=float, default=0.5, help="fraction of corrupted training labels, in [0, 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these sizes)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    size = SIZES["full" if args.full else "tiny" if args.tiny else "default"]
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    args.methods = methods
    for key in ("n_train", "n_val", "n_test", "outer_steps", "inner_steps", "K", "eval_every", "threads"):
        if getattr(args, key) <= 0:
            ap.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    for key in ("inner_lr", "outer_lr"):
        if not getattr(args, key) > 0:
            ap.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if not 0 <= args.corruption < 1:
        ap.error(f"--corruption must lie in [0, 1), got {args.corruption}")
    if args.n_train + args.n_val + args.n_test > 1797:
        ap.error(f"--n-train + --n-val + --n-test = {args.n_train + args.n_val + args.n_test} exceeds the 1797 digits")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = {k: v.to(device) for k, v in prepare_data(args.n_train, args.n_val, args.n_test, args.corruption,
                                                       args.seed).items()}
    versions = dict(torch=torch.__version__, hypergrad=hg.__version__, python=platform.python_version(),
                    seed=args.seed, device=str(device), threads=torch.get_num_threads())
    print(f"data hyper-cleaning on digits: {args.n_train} train ({args.corruption:.0%} corrupted), {args.n_val} "
          f"val, {args.n_test} test; {args.outer_steps} outer x {args.inner_steps} inner steps; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    rows = []
    with tqdm(total=len(args.methods) * args.outer_steps, desc="hyper-cleaning", file=sys.stderr,
              disable=None) as bar:
        for m in args.methods:
            bar.set_postfix(method=m)
            rows.append(run_method(m, data, args, device, bar))
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    save(rows, versions, args)
    plot(rows, os.path.join(args.out, "hyper_cleaning.png"))
    return rows


def print_table(rows: List[Dict]):
    head = (f"{'method':10s} {'test acc':>9s} {'retrained':>10s} {'F1':>7s} {'val loss':>9s} {'s/iter':>8s} "
            f"{'total s':>8s}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['method']:10s} {100 * r['test_acc']:8.2f}% {100 * r['test_acc_retrained']:9.2f}% "
              f"{100 * r['f1']:6.2f}% {r['val_loss']:9.4f} {r['sec_per_iter']:8.4f} {r['total_sec']:8.2f}")
    print("test acc: the method's own lower iterate; retrained: a fresh classifier trained on the training split "
          "with the learned weights sigma(lambda)")


def save(rows, versions, args):
    keys = ["method", "test_acc", "test_acc_retrained", "f1", "val_loss", "sec_per_iter", "total_sec", "lam_clean",
            "lam_corrupted"]
    with open(os.path.join(args.out, "hyper_cleaning.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in keys})
    with open(os.path.join(args.out, "hyper_cleaning.json"), "w") as fh:
        json.dump(dict(versions=versions, args={k: v for k, v in vars(args).items()}, results=rows), fh, indent=1)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        t = [c["seconds"] for c in r["curve"]]
        ax[0].plot(t, [c["val_loss"] for c in r["curve"]], label=r["method"])
        ax[1].plot(t, [100 * c["f1"] for c in r["curve"]], label=r["method"])
    ax[0].set(xlabel="seconds", ylabel="validation loss", title="upper objective")
    ax[1].set(xlabel="seconds", ylabel="F1 of corrupted-sample detection (%)", title="F1")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
