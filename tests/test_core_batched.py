"""Batched hypergradients (one inner problem per task) against closed forms and the per-task loop."""
import pytest
import torch

import hypergrad as hg
from hypergrad.batched import BATCHED_SOLVERS, batched_hypergradient

DT = torch.float64


def ridge_tasks(B=6, n=16, d=10, seed=0, per_task_lam=False):
    """B ridge tasks with a shared meta-initialization theta and log-L2 weights lam (shared or per task).

    Inner_b: 1/2 ||X_b w - y_b||^2 + 1/2 sum e^lam (w - theta)^2;  outer_b: 1/2 ||V_b w - z_b||^2.
    Closed form: A_b = X_b^T X_b + diag(e^lam), w_b = A_b^-1 (X_b^T y_b + e^lam theta), q_b = A_b^-1 dE_b/dw,
    dE_b/dtheta = e^lam q_b, dE_b/dlam = -e^lam (w_b - theta) q_b.
    """
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, B, dtype=DT)  # tasks conditioned differently: different CG counts
    X = torch.randn(B, n, d, generator=g, dtype=DT) * scales[:, None, None] ** 0.5
    y = torch.randn(B, n, generator=g, dtype=DT)
    V, z = torch.randn(B, 8, d, generator=g, dtype=DT), torch.randn(B, 8, generator=g, dtype=DT)
    theta = (0.3 * torch.randn(d, generator=g, dtype=DT)).requires_grad_(True)
    lam = (0.2 * torch.randn(*((B, d) if per_task_lam else (d,)), generator=g, dtype=DT)).requires_grad_(True)
    e = lam.detach().exp().expand(B, d)
    A = X.transpose(1, 2) @ X + torch.diag_embed(e)
    w = torch.linalg.solve(A, (X.transpose(1, 2) @ y[..., None])[..., 0] + e * theta.detach())
    gE = (V.transpose(1, 2) @ (V @ w[..., None] - z[..., None]))[..., 0]
    q = torch.linalg.solve(A, gE)
    ref_theta, ref_lam = e * q, -e * (w - theta.detach()) * q  # per task, [B, d]
    step = 1.0 / torch.linalg.eigvalsh(A).max(-1).values[:, None]  # per task: Phi_b contracts

    def inner(W, h, rows=slice(None)):
        r = (X[rows] @ W[..., None])[..., 0] - y[rows]
        lam_rows = h[1][rows] if h[1].dim() == 2 else h[1]
        return 0.5 * (r ** 2).sum() + 0.5 * (lam_rows.exp() * (W - h[0]) ** 2).sum()

    def fp_map(params, hparams, rows=slice(None)):
        W = params[0]
        return [W - step[rows] * torch.autograd.grad(inner(W, hparams, rows), W, create_graph=True)[0]]

    def outer(params, hparams, rows=slice(None)):
        r = (V[rows] @ params[0][..., None])[..., 0] - z[rows]
        return 0.5 * (r ** 2).sum(-1)

    return dict(w=w, theta=theta, lam=lam, fp_map=fp_map, outer=outer, ref_theta=ref_theta, ref_lam=ref_lam,
                B=B, step=step)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def loop(p, solver, K, tol=1e-12):
    """The reference: the core's single-task hypergradient, task by task."""
    out = []
    for b in range(p["B"]):
        hp = [p["theta"], p["lam"]]
        rows = slice(b, b + 1)
        res = hg.hypergradient([p["w"][rows]], hp, lambda w, h: p["fp_map"](w, h, rows),
                               lambda w, h: p["outer"](w, h, rows).sum(), solver=solver, K=K, tol=tol,
                               set_grad=False)
        out.append(res)
    return out


@pytest.mark.parametrize("per_task_lam", [False, True])
@pytest.mark.parametrize("solver", ["cg", "fixed_point", "neumann"])
def test_batched_equals_loop_and_closed_form(solver, per_task_lam):
    p = ridge_tasks(per_task_lam=per_task_lam)
    K = 60 if solver == "cg" else 3000
    res = batched_hypergradient([p["w"]], [p["theta"], p["lam"]], p["fp_map"], p["outer"], solver=solver, K=K,
                                tol=1e-12, set_grad=False)
    assert bool(res.converged.all()), res.residual
    ref = loop(p, solver, K)
    loop_theta = sum(r.grads[0] for r in ref)
    loop_lam = sum(r.grads[1] for r in ref)
    assert rel(res.grads[0], loop_theta) <= 1e-10
    assert rel(res.grads[1], loop_lam) <= 1e-10
    assert rel(res.grads[0], p["ref_theta"].sum(0)) <= 1e-9
    ref_lam = p["ref_lam"] if per_task_lam else p["ref_lam"].sum(0)
    assert rel(res.grads[1], ref_lam) <= 1e-9
    for b, r in enumerate(ref):  # per-task adjoints agree too
        assert rel(res.v[0][b], r.v[0][0]) <= 1e-9


def test_per_task_convergence_and_error_falls_with_K():
    p = ridge_tasks()
    res = batched_hypergradient([p["w"]], [p["theta"], p["lam"]], p["fp_map"], p["outer"], K=200, tol=1e-11,
                                per_task=True, set_grad=False)
    # at a looser tolerance the better-conditioned tasks stop earlier (at 1e-11 all need the full d = 10
    # steps): per-task counts, each the count of the core's CG on that task alone
    loose = batched_hypergradient([p["w"]], [p["theta"], p["lam"]], p["fp_map"], p["outer"], K=200, tol=1e-1,
                                  set_grad=False)
    its = loose.iterations.tolist()
    assert len(set(its)) > 1, its
    single = [r.iterations for r in loop(p, "cg", 200, tol=1e-1)]
    assert its == single, (its, single)
    # at 1e-11 (near the rounding floor) batched and single arithmetic sum in different orders: a task's
    # true-residual confirmation may take one product more in one of them, on some CPUs
    its, single = res.iterations.tolist(), [r.iterations for r in loop(p, "cg", 200, tol=1e-11)]
    assert all(abs(a - b) <= 1 for a, b in zip(its, single)), (its, single)
    for b in range(p["B"]):
        assert rel(res.grads[0][b], p["ref_theta"][b]) <= 1e-8
        assert rel(res.grads[1][b], p["ref_lam"][b]) <= 1e-8
    errs = []
    for K in (2, 4, 8, 16):
        r = batched_hypergradient([p["w"]], [p["theta"], p["lam"]], p["fp_map"], p["outer"], K=K, tol=0.0,
                                  set_grad=False)
        assert not bool(r.converged.any())
        errs.append(rel(r.grads[0], p["ref_theta"].sum(0)))
    assert errs[0] > errs[1] > errs[2] > errs[3], errs


def test_warm_start_needs_fewer_products_and_set_grad_accumulates():
    p = ridge_tasks()
    args = ([p["w"]], [p["theta"], p["lam"]], p["fp_map"], p["outer"])
    cold = batched_hypergradient(*args, K=200, tol=1e-11, set_grad=False)
    warm = batched_hypergradient(*args, K=200, tol=1e-11, v0=cold.v, set_grad=True)
    assert int(warm.iterations.max()) <= 2 and bool(warm.converged.all())
    batched_hypergradient(*args, K=200, tol=1e-11, set_grad=True)
    assert rel(p["theta"].grad, 2 * cold.grads[0]) <= 1e-9


def test_caller_tensors_untouched():
    p = ridge_tasks()
    w0, th0 = p["w"].clone(), p["theta"].detach().clone()
    batched_hypergradient([p["w"]], [p["theta"], p["lam"]], p["fp_map"], p["outer"], set_grad=False)
    assert torch.equal(p["w"], w0) and torch.equal(p["theta"].detach(), th0) and not p["w"].requires_grad


def test_bad_inputs_raise_named_errors():
    p = ridge_tasks()
    hp = [p["theta"], p["lam"]]
    with pytest.raises(ValueError, match="per-task losses"):
        batched_hypergradient([p["w"]], hp, p["fp_map"], lambda w, h: p["outer"](w, h).sum())
    with pytest.raises(ValueError, match="leading task dimension"):
        batched_hypergradient([p["w"], torch.zeros(3, 2, dtype=DT)], hp, p["fp_map"], p["outer"])
    with pytest.raises(ValueError, match="unknown batched solver"):
        batched_hypergradient([p["w"]], hp, p["fp_map"], p["outer"], solver="gmres")
    with pytest.raises(ValueError, match="requires_grad"):
        batched_hypergradient([p["w"]], [p["theta"].detach()], p["fp_map"], p["outer"])
    with pytest.raises(hg.DivergenceError, match="task"):  # step 3x too long: the iteration diverges
        too_long = lambda w, h: [w[0] + 3 * (p["fp_map"](w, h)[0] - w[0])]
        batched_hypergradient([p["w"]], hp, too_long, p["outer"], solver="fixed_point", K=500)

    def mixes_tasks(w, h):  # a statistic over the task dimension couples the B systems
        out = p["fp_map"](w, h)[0]
        return [out - 0.01 * w[0].mean(0)]
    with pytest.raises(ValueError, match="fp_map mixes tasks"):
        batched_hypergradient([p["w"]], hp, mixes_tasks, p["outer"])

    def nan_in_task_2(w, h):
        out = p["fp_map"](w, h)[0]
        return [out + torch.tensor([0, 0, float("nan"), 0, 0, 0], dtype=DT)[:, None] * out]
    with pytest.raises(hg.NonFiniteError, match="task\\(s\\) 2"):
        batched_hypergradient([p["w"]], hp, nan_in_task_2, p["outer"])


@pytest.mark.parametrize("solver", sorted(BATCHED_SOLVERS))
def test_batched_solvers_on_explicit_matrices(solver):
    """B SPD systems with contraction I - A (spectrum in (0, 1]): each task's x = A_b^-1 b_b."""
    g = torch.Generator().manual_seed(1)
    B, n = 5, 7
    Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=DT))[0]
    distinct = torch.arange(n, dtype=torch.long) % (torch.arange(B)[:, None] + 2)  # task b: b + 2 eigenvalues
    ev = 0.05 + 0.95 * torch.rand(B, n, generator=g, dtype=DT).gather(1, distinct)
    A = Q @ torch.diag_embed(ev) @ Q.transpose(1, 2)
    b = [torch.randn(B, n, generator=g, dtype=DT)]
    x, info = BATCHED_SOLVERS[solver](lambda u: [(A @ u[0][..., None])[..., 0]], b, maxiter=1000, tol=1e-12)
    ref = torch.linalg.solve(A, b[0])
    assert bool(info.converged.all())
    assert (x[0] - ref).norm(dim=1).max() <= 1e-10
    true_res = (b[0] - (A @ x[0][..., None])[..., 0]).norm(dim=1)
    assert torch.allclose(info.residual, true_res, rtol=0, atol=1e-10) or solver != "cg"
    if solver == "cg":  # CG ends in as many steps as A_b has distinct eigenvalues (+1 confirming product)
        assert info.iterations.tolist() == [b + 3 for b in range(B)]
    else:
        assert info.iterations.min() < info.iterations.max()  # tasks stop at their own counts


@pytest.mark.parametrize("solver", sorted(BATCHED_SOLVERS))
def test_batched_host_reads_scale_with_checks_not_iterations(solver, host_reads):
    """With check_every=10 the device is read a few times per check, never once per iteration."""
    g = torch.Generator().manual_seed(2)
    B, n = 4, 30
    Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=DT))[0]
    A = Q @ torch.diag_embed(torch.logspace(-3, 0, n, dtype=DT).expand(B, n)) @ Q.transpose(1, 2)
    b = [torch.randn(B, n, generator=g, dtype=DT)]
    host_reads["n"] = 0  # the problem's set-up does not count
    K, every = 40, 10
    x, info = BATCHED_SOLVERS[solver](lambda u: [(A @ u[0][..., None])[..., 0]], b, maxiter=K, tol=0.0,
                                      check_every=every)
    host_reads["stop"]()
    assert int(info.iterations.min()) >= K - 1
    assert host_reads["n"] <= 4 * (K // every) + 6, host_reads["n"]


@pytest.mark.parametrize("solver", sorted(BATCHED_SOLVERS))
def test_a_converged_task_stops_moving(solver):
    """Each task's answer in the batch is bitwise its answer alone: a task that has converged is frozen
    while the others iterate (diagonal systems, so the arithmetic of a row does not depend on B)."""
    g = torch.Generator().manual_seed(3)
    n = 12
    fast = torch.linspace(0.85, 0.9, n, dtype=DT)  # condition 1.06: a few steps, residual not exactly 0
    slow = torch.linspace(0.05, 0.95, n, dtype=DT)  # condition 19: many more steps
    D = torch.stack([fast, slow])
    b = torch.randn(2, n, generator=g, dtype=DT)
    solve = BATCHED_SOLVERS[solver]
    x, info = solve(lambda u: [D * u[0]], [b], maxiter=2000, tol=1e-11)
    alone, info0 = solve(lambda u: [D[:1] * u[0]], [b[:1]], maxiter=2000, tol=1e-11)
    assert bool(info.converged.all()) and info.iterations[0] < info.iterations[1]
    assert torch.equal(x[0][0], alone[0][0]) and int(info.iterations[0]) == int(info0.iterations[0])
    assert (D * x[0] - b).norm(dim=1).max() <= 1e-11  # the tolerance, on the true residuals
