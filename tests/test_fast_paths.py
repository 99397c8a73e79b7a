"""The fast paths of issue 12 against independent references: many params tensors solved as one flat vector,
the parameter-slot ModuleView against functional_call, the multi-tensor finiteness check, the _foreach lower
step against the general SGD rule."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergrad as hg
import hypergrad.hypergradients as H
from hypergrad import tensor_list as tl
from hypergrad.errors import NonFiniteError
from methods import ModuleView, SGDRule
from methods.base import parameter_slots

DT = torch.float64
SHAPES = [(3, 2), (2,), (1, 4), (4,), (2, 2, 1), (1,)] * 7  # 42 tensors of assorted shapes


def _many_tensor_problem(seed=0):
    """f(w, lam) = 1/2 w^T A w - c^T w + 1/2 sum_i e^{lam_i} ||w_i||^2 over the concatenation w of 42 tensors,
    E = 1/2 ||w - t||^2. Closed forms by a dense solve: w* = H^-1 c, H = A + diag(e^{lam_i} on block i),
    dE/dlam_i = -e^{lam_i} <w*_i, (H^-1 (w* - t))_i>."""
    g = torch.Generator().manual_seed(seed)
    sizes = [math.prod(s) for s in SHAPES]
    n = sum(sizes)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * torch.linspace(0.5, 3.0, n, dtype=DT)) @ Q.T
    c, t = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    lam = (0.3 * torch.randn(len(SHAPES), generator=g, dtype=DT)).requires_grad_(True)
    block = torch.repeat_interleave(torch.arange(len(SHAPES)), torch.tensor(sizes))
    Hm = A + torch.diag(lam.detach().exp()[block])
    w_star = torch.linalg.solve(Hm, c)
    u = torch.linalg.solve(Hm, w_star - t)
    ref = -lam.detach().exp() * torch.zeros(len(SHAPES), dtype=DT).index_add_(0, block, w_star * u)

    def inner(ws, hs):
        w = torch.cat([x.reshape(-1) for x in ws])
        return 0.5 * w @ (A @ w) - c @ w + 0.5 * sum(hs[0][i].exp() * (x * x).sum() for i, x in enumerate(ws))

    def outer(ws, hs):
        return 0.5 * ((torch.cat([x.reshape(-1) for x in ws]) - t) ** 2).sum()

    params = [p.clone() for p in tl.unflatten(w_star, [torch.empty(s) for s in SHAPES])]
    return params, lam, inner, outer, ref, tl.unflatten(u, params)


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "dense", "cg_normaleq", "fixed_point", "neumann"])
def test_many_tensors_match_the_dense_reference(solver):
    params, lam, inner, outer, ref, u = _many_tensor_problem()
    before = [p.clone() for p in params]
    seen = []

    def fp_map(ws, hs):
        seen.append([tuple(w.shape) for w in ws])
        return [w - 0.2 * g for w, g in zip(ws, torch.autograd.grad(inner(ws, hs), ws, create_graph=True))]

    K = 2000 if solver in ("fixed_point", "neumann") else 400
    r = hg.hypergradient(params, [lam], fp_map, outer, solver=solver, K=K, set_grad=False)
    assert r.converged
    assert torch.allclose(r.grads[0], ref, rtol=1e-8, atol=1e-11), (r.grads[0] - ref).abs().max()
    # the adjoint comes back shaped like params: v = (I - J^T)^-1 dE/dw = H^-1 (w* - t) / 0.2
    assert [tuple(v.shape) for v in r.v] == [tuple(s) for s in SHAPES]
    assert max(float((a - b / 0.2).abs().max()) for a, b in zip(r.v, u)) < 1e-7
    assert all(s == [tuple(x) for x in SHAPES] for s in seen)  # the map always sees tensors shaped like params
    assert all(torch.equal(a, b) for a, b in zip(params, before))  # the caller's tensors are not touched


def test_many_tensors_reach_the_solver_as_one_vector(monkeypatch):
    """No per-tensor work per solver iteration: the solver is handed one flat vector, not 42 tensors."""
    import hypergrad.linear_solvers as LS
    params, lam, inner, outer, ref, _ = _many_tensor_problem()
    got = []

    def spy(matvec, b, x0=None, **kw):
        got.append(len(b))
        return LS.solve_cg(matvec, b, x0, **kw)

    monkeypatch.setitem(H.SOLVERS, "cg", LS.one_vector(spy))
    r = hg.hypergradient(params, [lam], hg.GradientDescent(inner, 0.2), outer, K=300, set_grad=False)
    assert got == [1]
    assert torch.allclose(r.grads[0], ref, rtol=1e-8, atol=1e-11)


def test_many_tensors_warm_start_in_param_shapes():
    params, lam, inner, outer, ref, _ = _many_tensor_problem()
    gd = hg.GradientDescent(inner, 0.2)
    cold = hg.hypergradient(params, [lam], gd, outer, K=300, set_grad=False)
    warm = hg.hypergradient(params, [lam], gd, outer, K=300, set_grad=False, v0=cold.v)
    assert warm.iterations <= 2 < cold.iterations
    assert torch.allclose(warm.grads[0], ref, rtol=1e-8, atol=1e-11)
    with pytest.raises(ValueError, match=r"v0 \(warm start\)\[0\] has shape \(6,\)"):
        hg.hypergradient(params, [lam], gd, outer, K=5, set_grad=False, v0=[v.reshape(-1) for v in cold.v])


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.register_buffer("shift", torch.full((3,), 0.5))

    def forward(self, x, fail=False):
        if fail:
            raise RuntimeError("boom")
        return self.b(torch.tanh(self.a(x))) * self.frozen + self.shift


def test_module_view_equals_functional_call_with_tied_weights():
    torch.manual_seed(0)
    m = _Tied().double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names == ["a.weight", "a.bias", "b.bias"]  # the tied weight appears once
    tensors = [torch.randn_like(p, requires_grad=True) for n, p in m.named_parameters() if p.requires_grad]
    x = torch.randn(5, 3, dtype=DT)
    view = ModuleView(m, names, tensors, parameter_slots(m, names))
    out, ref = view(x), functional_call(m, dict(zip(names, tensors)), (x,), tie_weights=True)
    assert torch.equal(out, ref)
    g1 = torch.autograd.grad(out.sum(), tensors)
    g2 = torch.autograd.grad(ref.sum(), tensors)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    own = dict(m.named_parameters(remove_duplicate=False))
    assert own["b.weight"] is own["a.weight"] and isinstance(own["a.weight"], nn.Parameter)  # restored
    with pytest.raises(RuntimeError, match="boom"):
        view(x, fail=True)
    assert all(isinstance(p, nn.Parameter) for p in m.parameters())  # restored after the error too
    assert m.a.weight is own["a.weight"] and m.b.weight is own["a.weight"]


def test_finite_each_names_the_bad_tensor_among_many():
    xs = [torch.ones(s, dtype=DT) for s in SHAPES]
    assert bool(tl.finite_each(xs).all())
    for bad in (float("nan"), float("inf"), -float("inf")):
        ys = [x.clone() for x in xs]
        ys[17].view(-1)[-1] = bad
        assert tl.finite_each(ys).tolist() == [i != 17 for i in range(len(ys))]
        with pytest.raises(NonFiniteError, match=r"p\[17\]"):
            tl.check_finite(ys, [f"p[{i}]" for i in range(len(ys))])
    mixed = [torch.ones(2), torch.empty(0), torch.arange(3), torch.tensor([1.0, float("nan")], dtype=DT)]
    assert tl.finite_each(mixed).tolist() == [True, True, True, False]  # the per-tensor fallback


def test_global_norm_is_the_norm_of_the_concatenation():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=g, dtype=DT, requires_grad=True) for s in SHAPES]
    ref = torch.cat([x.detach().reshape(-1) for x in xs]).norm()
    assert abs(float(tl.global_norm(xs)) - float(ref)) <= 1e-14 * float(ref)
    assert not tl.global_norm(xs).requires_grad


def test_plain_sgd_step_equals_the_general_rule_and_its_derivative():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    ps = [x * 1.5, (x[:2] ** 2)]
    gs = [torch.sin(x), x[:2] * x[2]]
    plain = SGDRule.plain(0.3, 2)
    general = SGDRule([0.3, 0.3], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [False, False], [False, False])
    general._plain = False  # force the per-tensor formula
    a, _ = plain.step(ps, gs, plain.init(ps))
    b, _ = general.step(ps, gs, general.init(ps))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    da = torch.autograd.grad(sum((u ** 3).sum() for u in a), x, retain_graph=True)[0]
    db = torch.autograd.grad(sum((v ** 3).sum() for v in b), x)[0]
    assert torch.allclose(da, db, rtol=1e-15, atol=0)
    assert not SGDRule([0.3, 0.2], [0.0] * 2, [0.0] * 2, [0.0] * 2, [False] * 2, [False] * 2).is_plain()
    assert not SGDRule([0.3], [0.9], [0.0], [0.0], [False], [False]).is_plain()


def _bench_vs_boat():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_vs_boat.py")
    spec = importlib.util.spec_from_file_location("bench_vs_boat_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["RAD", "CG", "Neumann"])
@pytest.mark.parametrize("workload", ["quadratic", "hyper_cleaning"])
def test_the_plain_autograd_floor_computes_what_ours_computes(method, workload):
    """benchmarks/bench_vs_boat.py times a plain-autograd version of RAD / CG / Neumann as the floor: it must
    compute the same hypergradients as methods/ (float64, 3 upper iterations), else the floor is meaningless."""
    B = _bench_vs_boat()
    torch.set_default_dtype(DT)
    try:
        wl = B.Quadratic(30, DT) if workload == "quadratic" else B.HyperCleaning(DT)
        (ou, ol), (pu, pl) = B._pair(method, wl)
        ours, plain = B.Ours(method, wl, ou, ol), B.Plain(method, wl, pu, pl)
        for _ in range(3):
            go, gp = ours.step(capture=True), plain.step(capture=True)
            assert B._rel(go, gp) < 1e-10, (method, workload, B._rel(go, gp))
        assert B._rel(list(ol.parameters()), list(pl.parameters())) < 1e-10
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "dense", "cg_normaleq", "fixed_point", "neumann"])
def test_a_param_the_map_leaves_constant(solver):
    """A params tensor that fp_map returns as a constant (no graph) and an empty tensor it uses: the constant
    component contributes nothing (its adjoint is its dE/dw), for every solver (cg_normaleq used to crash)."""
    g = torch.Generator().manual_seed(3)
    n = 6
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = M @ M.T / n + torch.eye(n, dtype=DT)
    c = torch.randn(n, generator=g, dtype=DT)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    H = A + lam.detach().exp() * torch.eye(n, dtype=DT)
    w = torch.linalg.solve(H, c)
    frozen, empty = torch.randn(3, generator=g, dtype=DT), torch.zeros(0, dtype=DT)

    def fp_map(ws, hs):
        y, k, e = ws
        grad = A @ y - c + hs[0].exp() * y + e.sum()
        return [y - 0.3 * grad, k.detach() * 1.0, e * 0.5]

    def outer(ws, hs):
        return 0.5 * (ws[0] ** 2).sum() + (ws[1] ** 2).sum()

    ref = -lam.detach().exp() * w @ torch.linalg.solve(H, w)  # dE/dlam = -(H^-1 w)^T (e^lam w)
    r = hg.hypergradient([w, frozen, empty], [lam], fp_map, outer, solver=solver, K=500, set_grad=False)
    assert abs(float(r.grads[0]) - float(ref)) <= 1e-8 * abs(float(ref)), (solver, float(r.grads[0]), float(ref))
    assert torch.allclose(r.v[1], 2 * frozen)  # (I - 0)^T v = dE/dk


@pytest.mark.parametrize("solver", ["cg", "gmres", "minres"])
def test_the_implicit_layer_solves_many_tensors_as_one_vector(solver, monkeypatch):
    """The layer's adjoint solve goes through the same one-vector wrapper (hypergrad.linear_solvers.one_vector):
    the raw solver gets one tensor, and the gradient matches the dense closed form."""
    import hypergrad.linear_solvers as LS
    params, lam, inner, outer, ref, _ = _many_tensor_problem()
    got = []
    raw = {"cg": LS.solve_cg, "gmres": LS.solve_gmres, "minres": LS.solve_minres}[solver]

    def spy(matvec, b, x0=None, **kw):
        got.append(len(b))
        return raw(matvec, b, x0, **kw)

    monkeypatch.setitem(LS.SOLVERS, solver, LS.one_vector(spy))
    step = hg.GradientDescent(inner, 0.2)
    solve = hg.custom_fixed_point(step, backward_solver=solver, backward_maxiter=400)(lambda w0, h: w0)
    w = solve(params, [lam])
    (g,) = torch.autograd.grad(outer(w, [lam]), lam)
    assert got and all(n == 1 for n in got)
    assert torch.allclose(g, ref, rtol=1e-8, atol=1e-11), (g - ref).abs().max()


@pytest.mark.parametrize("solver", ["cg", "fixed_point", "neumann"])
def test_a_batch_of_many_tensor_systems_is_solved_on_one_matrix(solver, monkeypatch):
    """batched=True with several tensors: the raw solver gets one [B, N] tensor; every row matches its dense
    solve; a mismatched batch still gets the solver's own error."""
    import hypergrad.linear_solvers as LS
    from hypergrad.batched import BATCHED_SOLVERS
    g = torch.Generator().manual_seed(4)
    B, shapes = 3, [(2, 3), (4,), (1, 2)]
    n = sum(math.prod(s) for s in shapes)
    Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=DT))[0]
    A = Q @ torch.diag_embed(torch.linspace(0.2, 0.9, n, dtype=DT).expand(B, n)) @ Q.transpose(1, 2)
    b = [torch.randn(B, *s, generator=g, dtype=DT) for s in shapes]

    def matvec(u):
        flat = torch.cat([t.reshape(B, -1) for t in u], 1)
        out = (A @ flat[..., None])[..., 0]
        return [v.reshape(B, *s) for v, s in zip(out.split([math.prod(s) for s in shapes], 1), shapes)]

    got = []
    raw = {"cg": LS.solve_cg, "fixed_point": LS.solve_fixed_point, "neumann": LS.solve_neumann}[solver]

    def spy(mv, rhs, x0=None, **kw):
        got.append([tuple(t.shape) for t in rhs])
        return raw(mv, rhs, x0, **kw)

    monkeypatch.setitem(LS.SOLVERS, solver, LS.one_vector(spy))
    # every solver solves A x = b (fixed point / Neumann: x <- x + (b - A x), a contraction as ||I - A|| < 1)
    x, info = LS.SOLVERS[solver](matvec, b, None, maxiter=2000, batched=True)
    assert got == [[(B, n)]]
    ref = torch.linalg.solve(A, torch.cat([t.reshape(B, -1) for t in b], 1))
    assert [tuple(t.shape) for t in x] == [(B, *s) for s in shapes]
    assert torch.allclose(torch.cat([t.reshape(B, -1) for t in x], 1), ref, rtol=1e-8, atol=1e-9)
    assert bool(info.converged.all()) and info.iterations.shape == (B,)
    with pytest.raises(ValueError, match="leading dimension B"):
        BATCHED_SOLVERS[solver](matvec, [b[0], b[1][:2]], maxiter=5)
