"""The cases of tests/test_distributed.py, written once for both sides of the comparison.

Logistic regression with per-feature log-weight-decay hparams lambda and a logit log-temperature tau:

    inner  L(w, b; lambda, tau) = mean_i BCE(e^tau (x_i.w + b), y_i) + 1/2 sum_j e^lambda_j w_j^2
    outer  E(w, b; lambda)      = mean_i BCE(xv_i.w + b, yv_i) + 1e-3 ||lambda||^2

Every case is a function ``case(data, wrap)`` returning ``{name: [tensors]}``. The reference calls it in
one process with all the data and ``wrap`` the identity; the workers call it on their shard with
``wrap = data_parallel``. ``data`` holds the shard and the global sizes, so that ``reduce="sum"`` cases can
weight their local losses by 1 / N.
"""
from __future__ import annotations

import datetime
import math
import os
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
from hypergrad import distributed as hgd

DT = torch.float64
D, N_TRAIN, N_VAL = 10, 80, 80
STEP, T, K = 0.5, 25, 200
UNEQUAL = {"train": [30, 50], "val": [25, 55]}  # shard sizes of the reduce="sum" case
Wrap = Callable[..., Callable]


def full_data(seed: int = 0) -> Dict[str, Tensor]:
    """All the data, generated identically in every process."""
    g = torch.Generator().manual_seed(seed)
    scales = 0.5 + torch.rand(D, generator=g, dtype=DT)
    w_true = torch.randn(D, generator=g, dtype=DT)

    def sample(n):
        X = torch.randn(n, D, generator=g, dtype=DT) * scales
        y = torch.bernoulli(torch.sigmoid(X @ w_true + 0.3), generator=g)
        return X, y

    (Xtr, ytr), (Xva, yva) = sample(N_TRAIN), sample(N_VAL)
    return dict(Xtr=Xtr, ytr=ytr, Xva=Xva, yva=yva)


def shard(data: Dict[str, Tensor], rank: int, sizes: Dict[str, List[int]]) -> Dict:
    """This rank's rows of the training and validation sets (consecutive blocks of the given sizes)."""
    out = {}
    for split, X, y in (("train", "Xtr", "ytr"), ("val", "Xva", "yva")):
        start = sum(sizes[split][:rank])
        rows = slice(start, start + sizes[split][rank])
        out[X], out[y] = data[X][rows], data[y][rows]
    out["Ntr"], out["Nva"] = len(data["ytr"]), len(data["yva"])
    return out


def hparams0() -> List[Tensor]:
    g = torch.Generator().manual_seed(1)
    lam = torch.log(torch.tensor(0.1, dtype=DT)) + 0.5 * torch.randn(D, generator=g, dtype=DT)
    return [lam.requires_grad_(True), torch.tensor(0.2, dtype=DT, requires_grad=True)]


def params0() -> List[Tensor]:
    return [torch.zeros(D, dtype=DT, requires_grad=True), torch.zeros((), dtype=DT, requires_grad=True)]


def bce(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, y, reduction=reduction)


def reg(params, hparams) -> Tensor:
    return 0.5 * (torch.exp(hparams[0]) * params[0] ** 2).sum()


def losses(data) -> tuple:
    """Local inner and outer losses (means over the shard)."""
    def inner(params, hparams):
        return bce(torch.exp(hparams[1]) * (data["Xtr"] @ params[0] + params[1]), data["ytr"]) + reg(params, hparams)

    def outer(params, hparams):
        return bce(data["Xva"] @ params[0] + params[1], data["yva"]) + 1e-3 * (hparams[0] ** 2).sum()

    return inner, outer


def identity_wrap(fn, reduce="mean"):
    return fn


def detach(xs) -> List[Tensor]:
    return [x.detach().clone() for x in xs]


def inner_solution(data=None) -> List[Tensor]:
    """w*(lambda0) on all the data by Newton's method (to machine precision)."""
    inner, _ = losses(data or full_data())
    h = [t.detach() for t in hparams0()]
    x = torch.zeros(D + 1, dtype=DT)

    def f(z):
        return inner([z[:D], z[D]], h)

    for _ in range(30):
        g = torch.autograd.functional.jacobian(f, x)
        x = x - torch.linalg.solve(torch.autograd.functional.hessian(f, x), g)
    return [x[:D].clone(), x[D].clone()]


def case_implicit(data, wrap: Wrap, w_star) -> Dict[str, List[Tensor]]:
    """``hypergradient`` with each solver at w*, fp_map a gradient step on the wrapped inner loss; the
    hypertorch wrapper ``cg``; a wrapped map (``wrap(GradientDescent)``); a second-order product."""
    inner, outer = losses(data)
    fp_map, E = hg.GradientDescent(wrap(inner), STEP), wrap(outer)
    out = {}
    for solver, k, tol in (("cg", K, 1e-13), ("minres", K, 1e-13), ("gmres", K, 1e-13), ("cg_normaleq", K, 1e-13),
                           ("dense", K, 1e-13), ("fixed_point", 150, 0.0), ("neumann", 150, 0.0)):
        hp = hparams0()
        r = hg.hypergradient(w_star, hp, fp_map, E, solver=solver, K=k, tol=tol)
        out[solver] = detach(r.grads) + detach(r.v) + [torch.tensor(float(r.iterations))]
        out[solver + "_dotgrad"] = detach([h.grad for h in hp])  # set_grad added it to .grad
    out["cg_wrapper"] = detach(hg.cg(w_star, hparams0(), K, fp_map, E, tol=1e-13, set_grad=False))
    out["cg_wrapped_map"] = detach(hg.cg(w_star, hparams0(), K, wrap(hg.GradientDescent(inner, STEP)), E,
                                         tol=1e-13, set_grad=False))
    hp = hparams0()
    r = hg.hypergradient(w_star, hp, fp_map, E, solver="cg", K=K, tol=1e-13, create_graph=True, set_grad=False)
    z = [torch.linspace(-1.0, 1.0, D, dtype=DT), torch.tensor(0.7, dtype=DT)]
    s = sum((g * zz).sum() for g, zz in zip(r.grads, z))
    out["second_order"] = detach(torch.autograd.grad(s, hp))
    return out


def gd_history(fp_map, hparams, steps: int) -> List[List[Tensor]]:
    """Iterates w_0 .. w_T of gradient descent, without a graph between them."""
    history = [params0()]
    for _ in range(steps):
        history.append([t.detach().requires_grad_(True) for t in fp_map(history[-1], hparams, create_graph=False)])
    return history


def case_reverse(data, wrap: Wrap) -> Dict[str, List[Tensor]]:
    """``reverse`` over stored iterates and ``reverse_unroll`` through T differentiable steps."""
    inner, outer = losses(data)
    fp_map, E = hg.GradientDescent(wrap(inner), STEP), wrap(outer)
    hp = hparams0()
    history = gd_history(fp_map, hp, T)
    out = {"trajectory": detach(history[-1]),
           "reverse": detach(hg.reverse(history, hp, [fp_map] * T, E, set_grad=False))}
    params = params0()
    for _ in range(T):
        params = fp_map(params, hp)
    out["reverse_unroll"] = detach(hg.reverse_unroll(params, hp, E, set_grad=False))
    return out


def case_sum_unequal(data, wrap: Wrap, w_star) -> Dict[str, List[Tensor]]:
    """``reduce="sum"``: local data terms summed over the shard and divided by the global N; the
    data-free regularizer is added outside the wrapper. Same global functions as the other cases."""
    def inner_data(params, hparams):
        logits = torch.exp(hparams[1]) * (data["Xtr"] @ params[0] + params[1])
        return bce(logits, data["ytr"], "sum") / data["Ntr"]

    def outer_data(params, hparams):
        return bce(data["Xva"] @ params[0] + params[1], data["yva"], "sum") / data["Nva"]

    inner_g, outer_g = wrap(inner_data, reduce="sum"), wrap(outer_data, reduce="sum")

    def inner(params, hparams):
        return inner_g(params, hparams) + reg(params, hparams)

    def outer(params, hparams):
        return outer_g(params, hparams) + 1e-3 * (hparams[0] ** 2).sum()

    fp_map = hg.GradientDescent(inner, STEP)
    out = {"sum_cg": detach(hg.cg(w_star, hparams0(), K, fp_map, outer, tol=1e-13, set_grad=False))}
    hp, params = hparams0(), params0()
    for _ in range(T):
        params = fp_map(params, hp)
    out["sum_reverse_unroll"] = detach(hg.reverse_unroll(params, hp, outer, set_grad=False))
    return out


def linear_model() -> nn.Module:
    torch.manual_seed(123)
    return nn.Linear(D, 1).to(DT)


def case_module(data, wrap: Wrap, wrap_module: Callable[[nn.Module], nn.Module]) -> Dict[str, List[Tensor]]:
    """An ``nn.Linear`` (DDP-wrapped on the workers) through ``hypergrad.functional``: T inner steps, then
    the implicit hypergradient by CG at the last iterate; the iterate is loaded back into the module."""
    module = wrap_module(linear_model())
    f = hg.functional(module)

    def inner(params, hparams):
        logits = torch.exp(hparams[1]) * f(params, data["Xtr"]).squeeze(1)
        return bce(logits, data["ytr"]) + 0.5 * (torch.exp(hparams[0]) * params[0].squeeze(0) ** 2).sum()

    def outer(params, hparams):
        return bce(f(params, data["Xva"]).squeeze(1), data["yva"])

    fp_map = hg.GradientDescent(wrap(inner), STEP)
    hp, params = hparams0(), hg.module_params(module)
    for _ in range(4 * T):
        params = [t.detach().requires_grad_(True) for t in fp_map(params, hp, create_graph=False)]
    grads = hg.cg(params, hp, K, fp_map, wrap(outer), tol=1e-13, set_grad=False)
    hg.load_params(module, params)
    loaded = [p.detach().clone() for p in getattr(module, "module", module).parameters()]
    names = sorted(hg.param_dict(module, params))
    return {"module": detach(grads) + detach(params), "module_loaded": loaded,
            "module_names_ok": [torch.tensor(float(names == ["bias", "weight"]))]}


def case_methods(data, distributed: bool) -> Dict[str, List[Tensor]]:
    """One ``compute_gradients`` of each solver of ``methods/`` (Implicit CG, Dynamic RAD, BDA, T-RAD,
    BVFIM) with per-feature log-L2 weights as the upper model; ``.data_parallel()`` on the workers."""
    import methods

    class Upper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lam = nn.Parameter(hparams0()[0].detach().clone())

    def ll_objective(state):
        w = state["lower_model"]
        return bce(w(state["data"]).squeeze(1), state["target"]) + 0.5 * (state["upper_model"].lam.exp()
                                                                          * w.weight.squeeze(0) ** 2).sum()

    def ul_objective(state):
        return bce(state["lower_model"](state["data"]).squeeze(1), state["target"])

    builds = {
        "methods_implicit": lambda u, l: methods.Implicit(ul_objective, u, ll_objective, l, STEP, 60, 1e-13,
                                                          lower_loop=T),
        "methods_rad": lambda u, l: methods.Dynamic(ll_objective, T, u, ul_objective, l, lr=STEP),
        "methods_bda": lambda u, l: methods.Dynamic(ll_objective, T, u, ul_objective, l, lr=STEP, alpha=0.3),
        "methods_trad": lambda u, l: methods.Dynamic(ll_objective, T, u, ul_objective, l, lr=STEP, truncate_iters=10),
        "methods_bvfim": lambda u, l: methods.BVFIM(ul_objective, u, ll_objective, ll_model=l, lower_loop=T, y_loop=T),
    }
    out = {}
    for name, build in builds.items():
        upper, lower = Upper(), linear_model()
        solver = build(upper, lower)
        if distributed:
            solver.data_parallel()
        loss = solver.compute_gradients(data["Xva"], data["yva"], data["Xtr"], data["ytr"])
        out[name] = [upper.lam.grad.detach().clone(), loss.detach().reshape(1)]
    return out


def case_local(data) -> Dict[str, List[Tensor]]:
    """The hypergradient of this rank's shard alone (no wrapping), to show it is not the global one."""
    inner, outer = losses(data)
    return {"local_cg": detach(hg.cg(inner_solution(data), hparams0(), K, hg.GradientDescent(inner, STEP),
                                     outer, tol=1e-13, set_grad=False))}


def all_cases(data, wrap: Wrap, w_star, wrap_module=lambda m: m) -> Dict[str, List[Tensor]]:
    """The cases with equal shards (all but ``case_sum_unequal``)."""
    out = case_implicit(data, wrap, w_star)
    out.update(case_reverse(data, wrap))
    out.update(case_module(data, wrap, wrap_module))
    return out


def _message(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def error_cases(rank: int) -> Dict[str, str]:
    """Error messages raised inside an initialized group (identical on every rank)."""
    inner, _ = losses(shard(full_data(), rank, {"train": [40, 40], "val": [40, 40]}))
    per_sample = hgd.data_parallel(lambda p, h: p[0] * 2.0)
    return {
        "non_scalar": _message(lambda: per_sample(params0(), hparams0())),
        "not_a_list": _message(lambda: hgd.data_parallel(inner)(params0()[0], hparams0())),
        "differs": _message(lambda: hgd.assert_replicated([torch.ones(3), torch.tensor([1.0, float(rank)])],
                                                          name="hparams")),
        "shape_differs": _message(lambda: hgd.assert_replicated([torch.ones(2 + rank)], name="params")),
        "same": _message(lambda: hgd.assert_replicated(hparams0() + params0(), name="inputs")),
        # the trust checks decide from replicated quantities, so every rank raises the same error
        "cg_heavy_ball": _message(lambda: hg.hypergradient(
            params0() + params0(), hparams0(), hg.HeavyBall(hgd.data_parallel(inner), STEP, 0.9), _zero_outer,
            solver="cg", K=30, set_grad=False, fixed_point_tol=math.inf)),
        "fixed_point_diverges": _message(lambda: hg.hypergradient(
            params0(), hparams0(), hg.GradientDescent(hgd.data_parallel(inner), 1e3), _zero_outer,
            solver="fixed_point", K=30, set_grad=False, fixed_point_tol=math.inf)),
    }


def _zero_outer(params, hparams):
    """An outer loss whose gradient is the same nonzero vector on every rank."""
    return sum((p * (1.0 + torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 7)).sum() for p in params[:2])


def worker(rank: int, world_size: int, port: int, out_dir: str, w_star: List[Tensor]) -> None:
    """One rank: run every case on its shard with ``data_parallel`` and save the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = full_data()
        half = {"train": [N_TRAIN // 2] * 2, "val": [N_VAL // 2] * 2}
        mine = shard(data, rank, half)
        w_before = detach(w_star)
        ddp = torch.nn.parallel.DistributedDataParallel
        results = all_cases(mine, hgd.data_parallel, w_star, wrap_module=ddp)
        results.update(case_sum_unequal(shard(data, rank, UNEQUAL), hgd.data_parallel, w_star))
        results.update(case_local(mine))
        results.update(case_methods(mine, distributed=True))
        results["w_star_unchanged"] = [torch.tensor(float(all(torch.equal(a, b) for a, b in zip(w_star, w_before))))]
        results["errors"] = error_cases(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
