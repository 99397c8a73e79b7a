"""Checkpointed reverse mode against autograd through the same steps written plainly here; its memory
(stored iterates and autograd-saved bytes, counted with weak references) against reverse_unroll's."""
import itertools
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hypergrad as hg
from hypergrad.checkpointed import (NondeterministicMapError, checkpoint_steps, checkpointed_hypergradient,
                                    reverse_checkpointed)

DT = torch.float64
LR = 0.3


def _mlp_problem(n=12, d=5, hidden=8, seed=0):
    """2-layer tanh regression; hparams: log weight decays (2,) and per-sample weight logits (n,).
    The outer loss depends on the hparams directly too."""
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)
    Xv, yv = torch.randn(7, d, generator=g, dtype=DT), torch.randn(7, 1, generator=g, dtype=DT)
    w0 = [0.5 * torch.randn(d, hidden, generator=g, dtype=DT), 0.1 * torch.randn(hidden, generator=g, dtype=DT),
          0.5 * torch.randn(hidden, 1, generator=g, dtype=DT)]
    hp = [torch.tensor([-1.0, -2.0], dtype=DT, requires_grad=True),
          (0.3 * torch.randn(n, generator=g, dtype=DT)).requires_grad_(True)]

    def net(p, A):
        return torch.tanh(A @ p[0] + p[1]) @ p[2]

    def inner(p, h, batch=None):
        idx = slice(None) if batch is None else batch
        r = (net(p, X[idx]) - y[idx]).squeeze(1)
        return (torch.sigmoid(h[1][idx]) * r ** 2).mean() + 0.5 * (
            h[0][0].exp() * (p[0] ** 2).sum() + h[0][1].exp() * (p[2] ** 2).sum())

    def outer(p, h):
        return ((net(p, Xv) - yv) ** 2).mean() + 1e-2 * (h[0] ** 2).sum() + 1e-3 * h[1].sum()

    return dict(w0=w0, hp=hp, inner=inner, outer=outer, n=n)


def _plain(p, T, lrs=None, batches=None):
    """Reference: T gradient steps by hand with a graph, then autograd -> (dE/dhp, dE/dw0, w_T)."""
    w0 = [t.clone().requires_grad_(True) for t in p["w0"]]
    w = w0
    for t in range(T):
        loss = p["inner"](w, p["hp"]) if batches is None else p["inner"](w, p["hp"], batches[t])
        gs = torch.autograd.grad(loss, w, create_graph=True)
        w = [x - (LR if lrs is None else lrs[t]) * gx for x, gx in zip(w, gs)]
    E = p["outer"](w, p["hp"])
    g = torch.autograd.grad(E, p["hp"] + w0, allow_unused=True)
    g = [torch.zeros_like(x) if gx is None else gx for gx, x in zip(g, p["hp"] + w0)]
    return g[:2], g[2:], [x.detach() for x in w]


def _assert_close(got, ref, tol):
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert (a - b).norm().item() <= tol * max(b.norm().item(), 1e-300), ((a - b).norm(), b.norm())


CASES = [(0, None), (1, None), (1, 1), (2, 2), (10, None), (10, 1), (10, 3), (10, 4), (10, 10), (17, None),
         (17, 5), (17, 17)]


@pytest.mark.parametrize("store_segments", [True, False])
@pytest.mark.parametrize("T,c", CASES)
def test_equals_plain_autograd_through_the_same_steps(T, c, store_segments):
    p = _mlp_problem()
    g_ref, a_ref, w_ref = _plain(p, T)
    r = checkpointed_hypergradient(p["w0"], p["hp"], hg.GradientDescent(p["inner"], LR), T, p["outer"],
                                   checkpoints=c, store_segments=store_segments, set_grad=False)
    _assert_close(r.grads, g_ref, 1e-12)
    _assert_close(r.adjoint, a_ref, 1e-12)
    _assert_close(r.params, w_ref, 1e-13)
    assert r.checkpoints == checkpoint_steps(T, c) and r.vjps == T
    segs = [e - s for s, e in zip(r.checkpoints, r.checkpoints[1:] + [T])] if T else []
    extra = sum(L - 1 for L in segs) if store_segments else sum(L * (L - 1) // 2 for L in segs)
    assert r.map_evals == T + extra


@pytest.mark.parametrize("T,c", [(1, None), (13, None), (13, 2)])
def test_equals_reverse_unroll_and_reverse_of_the_library(T, c):
    p = _mlp_problem(seed=1)
    gd = hg.GradientDescent(p["inner"], LR)
    w, hist = [t.clone().requires_grad_(True) for t in p["w0"]], [p["w0"]]
    for _ in range(T):
        w = gd(w, p["hp"])
        hist.append([t.detach() for t in w])
    g_unroll = hg.reverse_unroll(w, p["hp"], p["outer"], set_grad=False)
    g_rev = hg.reverse(hist, p["hp"], [gd] * T, p["outer"], set_grad=False)
    g_ck = reverse_checkpointed(p["w0"], p["hp"], gd, T, p["outer"], checkpoints=c, set_grad=False)
    _assert_close(g_ck, g_unroll, 1e-13)
    for a, b in zip(g_ck, g_rev):  # the same VJPs in the same order on bitwise-equal recomputed iterates
        assert torch.equal(a, b)


def test_time_varying_maps_one_batch_and_step_size_per_step():
    p, T = _mlp_problem(), 11
    batches = [torch.arange(4 * (t % 3), 4 * (t % 3) + 4) for t in range(T)]
    lrs = [LR / (1 + 0.2 * t) for t in range(T)]
    maps = [hg.GradientDescent(lambda w, h, b=b: p["inner"](w, h, b), lr) for b, lr in zip(batches, lrs)]
    g_ref, a_ref, _ = _plain(p, T, lrs=lrs, batches=batches)
    r = checkpointed_hypergradient(p["w0"], p["hp"], maps, T, p["outer"], set_grad=False)
    _assert_close(r.grads, g_ref, 1e-12)
    _assert_close(r.adjoint, a_ref, 1e-12)


def test_a_plain_recurrent_map_not_an_optimizer():
    """w <- tanh(A w + B lambda), E = ||w_T||^2 + lambda . w_T (no inner loss anywhere)."""
    g = torch.Generator().manual_seed(3)
    A, B = 0.6 * torch.randn(6, 6, generator=g, dtype=DT), torch.randn(6, 3, generator=g, dtype=DT)
    lam = torch.randn(3, generator=g, dtype=DT, requires_grad=True)
    w0, T = torch.randn(6, generator=g, dtype=DT), 23

    def phi(w, h):
        return [torch.tanh(A @ w[0] + B @ h[0])]

    def outer(w, h):
        return (w[0] ** 2).sum() + (h[0] * w[0][:3]).sum()

    w = w0
    for _ in range(T):
        w = phi([w], [lam])[0]
    (ref,) = torch.autograd.grad(outer([w], [lam]), lam)
    for c in (None, 1, 5, T):
        _assert_close(reverse_checkpointed([w0], [lam], phi, T, outer, checkpoints=c, set_grad=False), [ref], 1e-12)


class _Live:
    """Running total of the bytes of the storages still alive among those registered (weak references)."""

    def __init__(self):
        self.seen, self.bytes = weakref.WeakSet(), 0

    def add(self, storage):
        if storage not in self.seen:
            self.seen.add(storage)
            self.bytes += storage.nbytes()
            weakref.finalize(storage, self._dead, storage.nbytes())

    def _dead(self, nbytes):
        self.bytes -= nbytes


class _AllTensors(TorchDispatchMode):
    """Registers the storage of every tensor any op creates (below autograd: saved tensors included)."""

    def __init__(self, live):
        super().__init__()
        self.live = live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.live.add(t.untyped_storage())
        return out


class _Tracker:
    """Instruments a step map: at every call, the number of its output iterates still alive (one is
    alive while any of its tensors' storages is) and the bytes held by all tensors created since the start."""

    def __init__(self, step_map):
        self.step_map, self.alive, self.all = step_map, 0, _Live()
        self.max_iterates, self.max_bytes = 0, 0

    def __call__(self, params, hparams):
        self.max_iterates = max(self.max_iterates, self.alive)
        self.max_bytes = max(self.max_bytes, self.all.bytes)
        out = self.step_map(params, hparams)
        storages = {s.data_ptr(): s for s in (o.untyped_storage() for o in out)}.values()
        left = [len(storages)]
        self.alive += 1
        for st in storages:
            weakref.finalize(st, self._dead, left)
        return out

    def _dead(self, left):
        left[0] -= 1
        self.alive -= left[0] == 0

    def run(self, fn):
        with _AllTensors(self.all):
            fn()
        return self


def _measure(mode, T, **kw):
    p = _mlp_problem()
    tr = _Tracker(hg.GradientDescent(p["inner"], LR))

    def unroll():
        w = [t.clone().requires_grad_(True) for t in p["w0"]]
        for _ in range(T):
            w = tr(w, p["hp"])
        hg.reverse_unroll(w, p["hp"], p["outer"], set_grad=False)

    def checkpointed():
        reverse_checkpointed(p["w0"], p["hp"], tr, T, p["outer"], set_grad=False, **kw)

    def low_memory():
        checkpointed_hypergradient(p["w0"], p["hp"], tr, T, p["outer"], set_grad=False, checkpoints=1,
                                   store_segments=False)

    return tr.run(dict(unroll=unroll, checkpointed=checkpointed, low_memory=low_memory)[mode])


def test_memory_sqrt_T_iterates_while_unroll_grows_like_T():
    unroll = {T: _measure("unroll", T) for T in (9, 36)}
    ck = {T: _measure("checkpointed", T) for T in (9, 36, 144)}
    for T, m in unroll.items():
        assert m.max_iterates >= T - 1
    for T, m in ck.items():  # c checkpoints + a segment of L = sqrt(T) iterates
        assert m.max_iterates <= 2 * math.isqrt(T) + 2, (T, m.max_iterates)
    # all bytes held: 4x the steps gives 4x for unroll, at most 2x (sqrt) for checkpointed
    assert unroll[36].max_bytes > 3.5 * unroll[9].max_bytes
    assert ck[36].max_bytes < 2.5 * ck[9].max_bytes and ck[144].max_bytes < 2.5 * ck[36].max_bytes
    assert ck[36].max_bytes < unroll[36].max_bytes / 5


def test_memory_constant_in_T_with_one_checkpoint_and_no_stored_segment():
    a, b = _measure("low_memory", 8), _measure("low_memory", 24)
    assert a.max_iterates == b.max_iterates <= 5 and a.max_bytes == b.max_bytes


def test_checkpoint_steps():
    assert checkpoint_steps(10, 4) == [0, 3, 6, 9]
    assert checkpoint_steps(17) == [0, 4, 8, 12, 16]  # c = ceil(sqrt 17) = 5, L = 4
    assert checkpoint_steps(100) == list(range(0, 100, 10))
    assert checkpoint_steps(5, 1) == [0] and checkpoint_steps(5, 5) == [0, 1, 2, 3, 4] and checkpoint_steps(0) == [0]


@pytest.fixture
def p():
    return _mlp_problem()


def _call(p, **kw):
    args = dict(params0=p["w0"], hparams=p["hp"], step_map=hg.GradientDescent(p["inner"], LR), T=5,
                outer_loss=p["outer"], set_grad=False)
    args.update(kw)
    return checkpointed_hypergradient(**args)


@pytest.mark.parametrize("T", [-1, 2.0, True, "5", None])
def test_bad_T(p, T):
    with pytest.raises(ValueError, match="T .*non-negative int"):
        _call(p, T=T)


@pytest.mark.parametrize("T,c", [(5, 0), (5, 6), (5, 2.0), (0, 2), (5, True)])
def test_checkpoints_out_of_range(p, T, c):
    with pytest.raises(ValueError, match=r"checkpoints must be an int in \[1, "):
        _call(p, T=T, checkpoints=c)


def test_step_map_wrong_shapes_and_types(p):
    with pytest.raises(ValueError, match=r"step_map\(params, hparams\) at step 0.*shape \(4,\).*shape \(5, 8\)"):
        _call(p, step_map=lambda w, h: [w[0][0, :4], w[1], w[2]])
    with pytest.raises(ValueError, match=r"at step 0 has 2 tensors but params has 3"):
        _call(p, step_map=lambda w, h: w[:2])
    with pytest.raises(TypeError, match="list of tensors"):
        _call(p, step_map=lambda w, h: w[0])
    with pytest.raises(TypeError, match="list of T = 5"):
        _call(p, step_map=[hg.GradientDescent(p["inner"], LR)] * 4)
    with pytest.raises(ValueError, match=r"step_map\[3\]\(params, hparams\) at step 3"):
        gd = hg.GradientDescent(p["inner"], LR)
        _call(p, step_map=[gd] * 3 + [lambda w, h: w[:1]] + [gd])


def test_hparams_without_requires_grad_and_empty_params(p):
    with pytest.raises(ValueError, match=r"hparams\[1\].*requires_grad"):
        _call(p, hparams=[p["hp"][0], p["hp"][1].detach()])
    with pytest.raises(ValueError, match="params0 is empty"):
        _call(p, params0=[])


def test_nan_in_the_trajectory_names_the_step(p):
    gd = hg.GradientDescent(p["inner"], LR)
    maps = [gd] * 5 + [lambda w, h: [w[0] * float("nan"), w[1], w[2]]] + [gd] * 4
    with pytest.raises(hg.NonFiniteError, match=r"w_6 = step_map\(w_5, hparams\) at step 5 of T = 10"):
        _call(p, step_map=maps, T=10)
    with pytest.raises(hg.NonFiniteError, match="params0"):
        _call(p, params0=[p["w0"][0] * float("inf")] + p["w0"][1:])


def test_nan_in_the_hypergradient():
    """sqrt(0 * w) is 0 forward but its VJP is inf * 0 = NaN: the trajectory is finite, the gradient not."""
    lam = torch.ones(3, dtype=DT, requires_grad=True)

    def phi(w, h):
        return [0.5 * w[0] + h[0] * torch.sqrt(0 * w[0])]

    with pytest.raises(hg.NonFiniteError, match="the hypergradient"):
        reverse_checkpointed([torch.ones(3, dtype=DT)], [lam], phi, 4, lambda w, h: (w[0] ** 2).sum() + h[0].sum())


def test_random_map_is_detected_and_per_step_batches_are_the_fix(p):
    batches = itertools.cycle([torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)])
    gd_iter = hg.GradientDescent(p["inner"], LR, data_or_iter=batches)  # a new batch per call
    with pytest.raises(NondeterministicMapError, match="deterministic step maps"):
        _call(p, step_map=gd_iter, T=8)
    with pytest.raises(NondeterministicMapError):
        _call(p, step_map=lambda w, h: [x + 1e-3 * torch.randn_like(x) for x in w], T=8)


def test_inputs_untouched_and_set_grad_accumulates(p):
    w0 = [t.clone() for t in p["w0"]]
    g = _call(p, set_grad=True).grads
    g2 = _call(p, set_grad=True).grads
    for h, a, b in zip(p["hp"], g, g2):
        assert torch.equal(a, b) and torch.equal(h.grad, a + b)
    for a, b in zip(p["w0"], w0):
        assert torch.equal(a, b) and not a.requires_grad and a.grad is None
    r = _call(p, T=0)  # w_T = w_0: handed back as a copy, so the caller can update it in place
    for x, a, b in zip(r.params, p["w0"], w0):
        x.add_(1.0)
        assert torch.equal(a, b)


def test_works_under_no_grad(p):
    ref = _call(p).grads
    with torch.no_grad():
        _assert_close(_call(p).grads, ref, 0.0)
