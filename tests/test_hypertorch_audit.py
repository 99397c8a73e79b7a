"""hypertorch's public API, audited: every public name at hypertorch's module paths with hypertorch's
parameter names and defaults (a table taken from hypertorch's source, github.com/prolearner/hypertorch at
6241dfa), inner-optimizer steps bitwise equal to hypertorch's formulas, and hypertorch's CG_torch module.

(The PyPI package named ``hypertorch`` is an unrelated hypergraph library; prolearner's hypertorch installs
from git as the package ``hypergrad``, which is what these names and paths are.)"""
import importlib
import inspect
import subprocess
import sys

import pytest
import torch

import hypergrad as hg

R = inspect.Parameter.empty  # "required": no default

# (module, name, [(parameter, default)]) for every public function, class and method of hypertorch.
# Classes: their __init__ without self; "Class.method": the method without self.
HYPERTORCH_API = [
    ("hypergrad.hypergradients", "reverse_unroll", [("params", R), ("hparams", R), ("outer_loss", R),
                                                    ("set_grad", True)]),
    ("hypergrad.hypergradients", "reverse", [("params_history", R), ("hparams", R), ("update_map_history", R),
                                             ("outer_loss", R), ("set_grad", True)]),
    ("hypergrad.hypergradients", "fixed_point", [("params", R), ("hparams", R), ("K", R), ("fp_map", R),
                                                 ("outer_loss", R), ("tol", 1e-10), ("set_grad", True),
                                                 ("stochastic", False)]),
    ("hypergrad.hypergradients", "CG", [("params", R), ("hparams", R), ("K", R), ("fp_map", R), ("outer_loss", R),
                                        ("tol", 1e-10), ("set_grad", True), ("stochastic", False)]),
    ("hypergrad.hypergradients", "CG_normaleq", [("params", R), ("hparams", R), ("K", R), ("fp_map", R),
                                                 ("outer_loss", R), ("tol", 1e-10), ("set_grad", True)]),
    ("hypergrad.hypergradients", "neumann", [("params", R), ("hparams", R), ("K", R), ("fp_map", R),
                                             ("outer_loss", R), ("tol", 1e-10), ("set_grad", True)]),
    ("hypergrad.hypergradients", "exact", [("opt_params_f", R), ("hparams", R), ("outer_loss", R),
                                           ("set_grad", True)]),
    ("hypergrad.hypergradients", "stoch_AID", [
        ("params", R), ("hparams", R), ("outer_loss", R), ("K", R), ("J_inner", 1), ("J_outer", 1),
        ("fp_map", None), ("inner_loss", None), ("linsys_start", None), ("stoch_outer", False),
        ("stoch_inner", False), ("optim_build", None), ("opt_params", None), ("set_grad", True),
        ("verbose", True)]),
    ("hypergrad.hypergradients", "grd", [("a", R), ("b", R)]),
    ("hypergrad.hypergradients", "list_dot", [("l1", R), ("l2", R)]),
    ("hypergrad.hypergradients", "jvp", [("fp_map", R), ("params", R), ("vs", R)]),
    ("hypergrad.hypergradients", "get_outer_gradients", [("outer_loss", R), ("params", R), ("hparams", R),
                                                         ("retain_graph", True)]),
    ("hypergrad.hypergradients", "cat_list_to_tensor", [("list_tx", R)]),
    ("hypergrad.hypergradients", "update_tensor_grads", [("hparams", R), ("grads", R)]),
    ("hypergrad.hypergradients", "grad_unused_zero", [("output", R), ("inputs", R), ("grad_outputs", None),
                                                      ("retain_graph", False), ("create_graph", False)]),
    ("hypergrad.diff_optimizers", "DifferentiableOptimizer", [("loss_f", R), ("dim_mult", R),
                                                              ("data_or_iter", None)]),
    ("hypergrad.diff_optimizers", "DifferentiableOptimizer.get_opt_params", [("params", R)]),
    ("hypergrad.diff_optimizers", "DifferentiableOptimizer.step", [("params", R), ("hparams", R),
                                                                   ("create_graph", R)]),
    ("hypergrad.diff_optimizers", "DifferentiableOptimizer.__call__", [("params", R), ("hparams", R),
                                                                       ("create_graph", True)]),
    ("hypergrad.diff_optimizers", "DifferentiableOptimizer.get_loss", [("params", R), ("hparams", R)]),
    ("hypergrad.diff_optimizers", "HeavyBall", [("loss_f", R), ("step_size", R), ("momentum", R),
                                                ("data_or_iter", None)]),
    ("hypergrad.diff_optimizers", "HeavyBall.step", [("params", R), ("hparams", R), ("create_graph", R)]),
    ("hypergrad.diff_optimizers", "Momentum", [("loss_f", R), ("step_size", R), ("momentum", R),
                                               ("data_or_iter", None)]),
    ("hypergrad.diff_optimizers", "Momentum.step", [("params", R), ("hparams", R), ("create_graph", R)]),
    ("hypergrad.diff_optimizers", "GradientDescent", [("loss_f", R), ("step_size", R), ("data_or_iter", None)]),
    ("hypergrad.diff_optimizers", "GradientDescent.step", [("params", R), ("hparams", R), ("create_graph", R)]),
    ("hypergrad.diff_optimizers", "gd_step", [("params", R), ("loss", R), ("step_size", R),
                                              ("create_graph", True)]),
    ("hypergrad.diff_optimizers", "heavy_ball_step", [("params", R), ("aux_params", R), ("loss", R),
                                                      ("step_size", R), ("momentum", R), ("create_graph", True)]),
    ("hypergrad.diff_optimizers", "torch_momentum_step", [("params", R), ("aux_params", R), ("loss", R),
                                                          ("step_size", R), ("momentum", R),
                                                          ("create_graph", True)]),
    ("hypergrad.CG_torch", "cg", [("Ax", R), ("b", R), ("max_iter", 100), ("epsilon", 1.0e-5)]),
    ("hypergrad.CG_torch", "cat_list_to_tensor", [("list_tx", R)]),
]
# hypertorch's hypergrad/__init__.py star-imports hypergradients and diff_optimizers (which has no __all__),
# and hypergradients imports the module CG_torch: all of these are names of the package too.
HYPERTORCH_MODULES = {"hypergrad.hypergradients": ["CG_torch"]}
# Defaults of hypertorch that are bugs, which we deliberately change: {(module, name, parameter): why}.
# None found: every hypertorch default is kept.
KNOWN_DEFAULT_BUGS = {}


def _resolve(module, name):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _parameters(obj, name):
    params = list(inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters.values())
    if inspect.isclass(obj) or "." in name:
        assert params[0].name == "self"
        params = params[1:]
    return params


def compatibility_errors(params, expected, key=("?", "?")):
    """Ways ``params`` (ours) breaks hypertorch code written for ``expected``: a removed or renamed or
    reordered parameter, a changed kind or default, or an addition that is not keyword-only with a default."""
    errors = []
    if [p.name for p in params[:len(expected)]] != [n for n, _ in expected]:
        return [f"parameters {[p.name for p in params]} do not start with hypertorch's {[n for n, _ in expected]}"]
    for p, (n, default) in zip(params, expected):
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            errors.append(f"{n} is {p.kind.description}, hypertorch's is positional or keyword")
        same = (p.default is default if default is R or default is None or isinstance(default, bool)
                else type(p.default) is type(default) and p.default == default)
        if not same and (*key, n) not in KNOWN_DEFAULT_BUGS:
            errors.append(f"{n} defaults to {p.default!r}, hypertorch's to {default!r}")
    for p in params[len(expected):]:
        if not (p.kind is inspect.Parameter.VAR_KEYWORD
                or (p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not R)):
            errors.append(f"extra parameter {p.name} is not keyword-only with a default")
    return errors


@pytest.mark.parametrize("module,name,expected", HYPERTORCH_API, ids=[f"{m}.{n}" for m, n, _ in HYPERTORCH_API])
def test_hypertorch_signature(module, name, expected):
    obj = _resolve(module, name)
    assert compatibility_errors(_parameters(obj, name), expected, (module, name)) == []
    top = name.split(".")[0]
    if module != "hypergrad.CG_torch":  # the package has every name of hypertorch's two star-imported modules
        assert getattr(hg, top) is getattr(importlib.import_module(module), top)


def test_compatibility_check_rejects_what_breaks_hypertorch_code():
    def sig(f):
        return list(inspect.signature(f).parameters.values())
    expected = [("a", R), ("tol", 1e-10), ("set_grad", True)]
    assert compatibility_errors(sig(lambda a, tol=1e-10, set_grad=True, *, extra=None, **kw: 0), expected) == []
    for bad in (lambda a, tol=1e-10: 0,                                # removed
                lambda a, eps=1e-10, set_grad=True: 0,                 # renamed
                lambda a, set_grad=True, tol=1e-10: 0,                 # reordered
                lambda a, tol=1e-8, set_grad=True: 0,                  # changed default
                lambda a, tol=1e-10, set_grad=1: 0,                    # True -> 1
                lambda a, *, tol=1e-10, set_grad=True: 0,              # no longer positional
                lambda a, tol=1e-10, set_grad=True, extra=None: 0,     # positional addition
                lambda a, tol=1e-10, set_grad=True, *, extra: 0):      # addition without a default
        assert compatibility_errors(sig(bad), expected) != []


def test_package_exposes_hypertorch_names_and_modules_without_extra_imports():
    names = sorted({n.split(".")[0] for m, n, _ in HYPERTORCH_API if m != "hypergrad.CG_torch"}
                   | {n for names in HYPERTORCH_MODULES.values() for n in names})
    code = ("import hypergrad as hg\n"
            "assert hg.diff_optimizers.GradientDescent is hg.GradientDescent\n"
            "assert hg.hypergradients.CG is hg.CG and hg.CG_torch.cg is hg.hypergradients.CG_torch.cg\n"
            "from hypergrad import CG_torch\n"
            "ns = {}\n"
            "exec('from hypergrad import *', ns)\n"
            f"missing = [n for n in {names!r} if n not in ns]\n"
            "assert not missing, missing\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_optimizer_attributes_are_hypertorchs():
    def f(params, hparams):
        return (params[0] ** 2).sum()
    for opt in (hg.GradientDescent(f, 0.1), hg.HeavyBall(f, 0.1, 0.5), hg.Momentum(f, 0.1, 0.5)):
        for attr in ("loss_f", "dim_mult", "curr_loss", "data_iterator", "step_size_f"):
            assert hasattr(opt, attr)
        assert opt.step_size_f(None) == 0.1 and opt.loss_f is f
    assert hg.HeavyBall(f, 0.1, 0.5).momentum_f(None) == 0.5 and hg.Momentum(f, 0.1, 0.5).dim_mult == 2


# ---------------------------------------------------------------- bitwise: the same float32 operations

def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(20, 5, generator=g), torch.randn(20, generator=g)
    Xv, yv = torch.randn(10, 5, generator=g), torch.randn(10, generator=g)
    lam = (0.3 * torch.randn(5, generator=g)).requires_grad_(True)
    log_s = torch.tensor(-3.0, requires_grad=True)
    w0 = [(0.5 * torch.randn(3, generator=g)).requires_grad_(True),
          (0.5 * torch.randn(2, generator=g)).requires_grad_(True)]

    def inner(params, hparams):
        w = torch.cat(params)
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (torch.exp(hparams[0]) * w * w).sum()

    def outer(params, hparams):
        return 0.5 * ((Xv @ torch.cat(params) - yv) ** 2).mean()
    return inner, outer, [lam, log_s], w0


def _plain_steps(kind, inner, hparams, w0, step, mu, T):
    """T steps written out following hypertorch's diff_optimizers formulas (no hypergrad code)."""
    p, aux = list(w0), [torch.zeros_like(w) for w in w0]
    traj = []
    for _ in range(T):
        s, m = step(hparams), mu(hparams)
        grads = torch.autograd.grad(inner(p, hparams), p, create_graph=True)
        if kind == "gd":
            p = [w - s * g for w, g in zip(p, grads)]
        elif kind == "heavy_ball":
            p, aux = [w - s * g + m * (w - v) for g, w, v in zip(grads, p, aux)], p
        else:
            aux = [m * v + g for v, g in zip(aux, grads)]
            p = [w - s * nv for w, nv in zip(p, aux)]
        traj.append(p + ([] if kind == "gd" else aux))
    return traj


def _our_steps(kind, inner, hparams, w0, step, mu, T):
    opt = {"gd": lambda: hg.GradientDescent(inner, step), "heavy_ball": lambda: hg.HeavyBall(inner, step, mu),
           "momentum": lambda: hg.Momentum(inner, step, mu)}[kind]()
    params, traj = opt.get_opt_params(w0), []
    for _ in range(T):
        params = opt(params, hparams)
        traj.append(params)
    return traj


@pytest.mark.parametrize("hyper_step", [False, True], ids=["float_step", "hparam_step"])
@pytest.mark.parametrize("kind", ["gd", "heavy_ball", "momentum"])
def test_float32_unrolled_loop_and_hypergradient_bitwise_hypertorchs(kind, hyper_step):
    inner, outer, hparams, w0 = _problem()
    if hyper_step:  # step size and momentum as callables of hparams (tensors in the graph)
        step, mu = (lambda h: torch.exp(h[1])), (lambda h: torch.sigmoid(h[1] + 5.0))
    else:
        step, mu = 0.037, 0.9
    T = 16
    ours = _our_steps(kind, inner, hparams, w0, step, mu, T)
    plain = _plain_steps(kind, inner, hparams, w0, step if hyper_step else (lambda h: step),
                         mu if hyper_step else (lambda h: mu), T)
    for a, b in zip(ours, plain):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    n = len(w0)
    g_ours = hg.reverse_unroll(ours[-1][:n], hparams, outer, set_grad=False)
    g_plain = torch.autograd.grad(outer(plain[-1][:n], hparams), hparams, allow_unused=True)
    g_plain = [torch.zeros_like(h) if g is None else g for g, h in zip(g_plain, hparams)]
    assert all(torch.equal(a, b) for a, b in zip(g_ours, g_plain))
    assert g_plain[0].abs().sum() > 0 and (not hyper_step or g_plain[1].abs() > 0)  # the check has content


def test_step_functions_are_hypertorchs():
    inner, _, hparams, w0 = _problem(1)
    aux = [torch.randn_like(w) for w in w0]
    grads = torch.autograd.grad(inner(w0, hparams), w0)
    out = hg.diff_optimizers.gd_step(w0, inner(w0, hparams), 0.1, create_graph=False)
    assert all(torch.equal(o, w - 0.1 * g) for o, w, g in zip(out, w0, grads))
    new, prev = hg.diff_optimizers.heavy_ball_step(w0, aux, inner(w0, hparams), 0.1, 0.8)
    assert prev is w0 and all(torch.equal(o, w - 0.1 * g + 0.8 * (w - v)) for o, w, g, v in zip(new, w0, grads, aux))
    new, new_aux = hg.diff_optimizers.torch_momentum_step(w0, aux, inner(w0, hparams), 0.1, 0.8)
    assert all(torch.equal(b, 0.8 * v + g) for b, v, g in zip(new_aux, aux, grads))
    assert all(torch.equal(o, w - 0.1 * b) for o, w, b in zip(new, w0, new_aux))


# ---------------------------------------------------------------- data_or_iter, curr_loss, get_opt_params

def test_data_or_iter_follows_hypertorch():
    seen = []

    def loss(params, hparams, *data):
        seen.append(data)
        return (hparams[0] * params[0] ** 2).sum()
    w, h = [torch.ones(2, requires_grad=True)], [torch.tensor(2.0, requires_grad=True)]
    for empty in (None, (), []):  # hypertorch's `if data_or_iter:`: falsy means loss_f(params, hparams)
        seen.clear()
        hg.GradientDescent(loss, 0.1, data_or_iter=empty)(w, h)
        assert seen == [()]
    seen.clear()
    opt = hg.GradientDescent(loss, 0.1, data_or_iter=iter([1, 2, 3]))  # an iterator: next() at every step
    opt(w, h), opt(w, h)
    assert seen == [(1,), (2,)]
    seen.clear()
    batch = (torch.zeros(3), torch.ones(3))  # anything else: repeated
    opt = hg.GradientDescent(loss, 0.1, data_or_iter=batch)
    opt(w, h), opt(w, h)
    assert [d[0] for d in seen] == [batch, batch]
    seen.clear()  # a tensor (hypertorch raises on its truth value): data
    t = torch.arange(3.0)
    hg.HeavyBall(loss, 0.1, 0.5, data_or_iter=t)(w + w, h)
    assert seen[0][0] is t
    assert torch.equal(opt.curr_loss, loss(w, h))  # curr_loss: the loss of the last step


def test_get_opt_params_order_for_any_dim_mult():
    class ThreeState(hg.DifferentiableOptimizer):
        def __init__(self, loss_f):
            super().__init__(loss_f, dim_mult=3)
    p = [torch.ones(2), torch.ones(3)]
    out = ThreeState(None).get_opt_params(p)
    assert out[0] is p[0] and out[1] is p[1]
    assert [t.shape[0] for t in out[2:]] == [2, 2, 3, 3]  # hypertorch: each param's states together
    assert all(torch.equal(t, torch.zeros_like(t)) for t in out[2:])


# ---------------------------------------------------------------- utilities of hypergrad.hypergradients

def test_jvp_grd_list_dot_cat_list_to_tensor():
    from hypergrad.hypergradients import cat_list_to_tensor, grd, jvp, list_dot
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    params = [torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)]
    vs = [torch.randn(2, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    calls = []

    def fp_map(ps):
        calls.append(1)
        z = A @ torch.tanh(torch.cat(ps))
        return [z[:2], z[2:]]
    out = jvp(fp_map, params, vs)
    J = torch.autograd.functional.jacobian(lambda x: A @ torch.tanh(x), cat_list_to_tensor(params).detach())
    ref = J @ torch.cat(vs)
    assert isinstance(out, tuple) and out[0].requires_grad  # differentiable, as hypertorch's
    assert (torch.cat(out) - ref).norm() <= 1e-12 * ref.norm()
    assert len(calls) == 1  # hypertorch evaluates fp_map twice; one evaluation gives the same product
    assert abs(list_dot(vs, vs) - torch.cat(vs) @ torch.cat(vs)) <= 1e-14 * (torch.cat(vs) @ torch.cat(vs))
    with pytest.raises(ValueError, match="pair one to one"):   # zip would silently drop the second term
        list_dot(vs, vs[:1])
    (d,) = grd((params[0] ** 3).sum(), params[0])
    assert d.requires_grad and torch.allclose(d, 3 * params[0] ** 2)
    assert torch.equal(cat_list_to_tensor(list_tx=[torch.ones(2, 2), torch.zeros(1)]),
                       torch.tensor([1.0, 1, 1, 1, 0]))


# ---------------------------------------------------------------- CG_torch

def _spd(n=13, cond=1e3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return Q @ torch.diag(evals) @ Q.T, Q, evals


def _as_list(v):
    return [v[:4].clone(), v[4:].reshape(3, 3).clone()]


def _Ax(A):
    return lambda xs: _as_list(A @ torch.cat([x.reshape(-1) for x in xs]))


def test_cg_torch_matches_dense_solve():
    from hypergrad import CG_torch
    A, _, _ = _spd()
    b = torch.randn(13, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = CG_torch.cg(_Ax(A), _as_list(b), max_iter=100, epsilon=1e-12)
    ref = torch.linalg.solve(A, b)
    assert isinstance(x, list) and [t.shape for t in x] == [torch.Size([4]), torch.Size([3, 3])]
    assert (CG_torch.cat_list_to_tensor(x) - ref).norm() <= 1e-10 * ref.norm()


def test_cg_torch_returns_the_latest_iterate():
    from hypergrad import CG_torch
    A, Q, evals = _spd()
    b = Q[:, 3] * 2.0  # an eigenvector: CG is exact after one iteration (hypertorch returns x = 0 then)
    x = CG_torch.cat_list_to_tensor(CG_torch.cg(_Ax(A), _as_list(b), 50, 1e-8))
    ref = b / evals[3]
    assert (x - ref).norm() <= 1e-12 * ref.norm()
    b = torch.randn(13, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 0.3 * b.norm().item()  # loose: met after a few iterations; the previous iterate does not meet it
    x = CG_torch.cat_list_to_tensor(CG_torch.cg(_Ax(A), _as_list(b), 50, eps))
    assert (b - A @ x).norm() <= eps


def test_cg_torch_max_iter_steps_are_cg_steps():
    """max_iter=3 on a system that needs 13: the third CG iterate of the textbook recurrence."""
    from hypergrad import CG_torch
    A, _, _ = _spd(cond=1e4)
    b = torch.randn(13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x, r = torch.zeros(13, dtype=torch.float64), b.clone()
    p = r.clone()
    for _ in range(3):
        alpha = (r @ r) / (p @ A @ p)
        x, r_new = x + alpha * p, r - alpha * (A @ p)
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    out = CG_torch.cat_list_to_tensor(CG_torch.cg(_Ax(A), _as_list(b), max_iter=3, epsilon=1e-12))
    assert (out - x).norm() <= 1e-12 * x.norm()
    assert (out - torch.linalg.solve(A, b)).norm() > 1e-3 * x.norm()  # really stopped after 3


def test_hypertorch_style_cg_over_cg_torch_gives_the_hypergradient():
    """hypertorch's own CG, as user code writes it on top of CG_torch and the hypergradients utilities."""
    from hypergrad import CG_torch
    from hypergrad.hypergradients import get_outer_gradients, update_tensor_grads
    from core_problems import rel_err, ridge
    p = ridge()
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    params = [p["w_star"].clone().requires_grad_(True)]
    hparams = [p["lam"]]
    gw, gh = get_outer_gradients(p["outer_loss"](params, hparams), params, hparams)
    w_mapped = gd(params, hparams)
    vs = CG_torch.cg(lambda xs: [x - j for x, j in zip(xs, torch.autograd.grad(
        w_mapped, params, grad_outputs=xs, retain_graph=True))], gw, max_iter=40, epsilon=1e-12)
    grads = [g + v for g, v in zip(torch.autograd.grad(w_mapped, hparams, grad_outputs=vs), gh)]
    assert rel_err(grads[0], p["ref"]) <= 1e-9
    h = torch.zeros(2, requires_grad=True)
    update_tensor_grads([h], [torch.ones(2)])
    assert torch.equal(h.grad, torch.ones(2))

