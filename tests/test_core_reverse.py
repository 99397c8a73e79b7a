"""reverse / reverse_unroll / exact against autograd through the same steps written plainly here."""
import pytest
import torch

import hypergrad as hg
from core_problems import rel_err, ridge


def _plain_unroll(p, w0, T, lam):
    """T gradient steps written out by hand (no hypergrad code)."""
    w = w0
    for _ in range(T):
        (g,) = torch.autograd.grad(p["inner_loss"]([w], [lam]), w, create_graph=True)
        w = w - p["step"] * g
    return w


@pytest.mark.parametrize("T", [1, 7, 40])
def test_reverse_equals_reverse_unroll_and_plain_autograd(T):
    p = ridge(cond=500)
    lam = p["lam"]
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    w0 = torch.full_like(p["w_star"], 0.1).requires_grad_(True)  # nonzero: w_1 depends on lam
    history, w = [[w0]], [w0]
    for _ in range(T):
        w = gd(w, [lam])
        history.append(w)
    g_unroll = hg.reverse_unroll(history[-1], [lam], p["outer_loss"], set_grad=False)
    g_rev = hg.reverse(history, [lam], [gd] * T, p["outer_loss"], set_grad=False)
    (g_plain,) = torch.autograd.grad(p["outer_loss"]([_plain_unroll(p, w0, T, lam)], [lam]), lam)
    assert rel_err(g_unroll[0], g_plain) <= 1e-12
    assert rel_err(g_rev[0], g_plain) <= 1e-12


@pytest.mark.parametrize("k", [1, 5, 20])
def test_truncated_reverse_equals_autograd_through_last_k_steps(k):
    p = ridge(cond=None)
    lam, T = p["lam"], 30
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    history = [[torch.zeros_like(p["w_star"])]]
    for _ in range(T):
        w = [history[-1][0].detach().requires_grad_(True)]
        history.append([t.detach() for t in gd(w, [lam])])
    g_trunc = hg.reverse(history[-(k + 1):], [lam], [gd] * k, p["outer_loss"], set_grad=False)
    w_start = history[T - k][0].detach().requires_grad_(True)
    (g_plain,) = torch.autograd.grad(p["outer_loss"]([_plain_unroll(p, w_start, k, lam)], [lam]), lam)
    assert rel_err(g_trunc[0], g_plain) <= 1e-12
    # truncation is an approximation: it approaches the implicit hypergradient only as k grows
    if k == 20:
        assert rel_err(g_trunc[0], p["ref"]) < 0.5


def test_exact_matches_closed_form():
    p = ridge(cond=None)
    X, y = p["X"], p["y"]

    def w_opt(h):
        return [torch.linalg.solve(X.T @ X + torch.diag(torch.exp(h[0])), X.T @ y)]

    g = hg.exact(w_opt, [p["lam"]], p["outer_loss"], set_grad=False)
    assert rel_err(g[0], p["ref"]) <= 1e-12


def test_reverse_rejects_mismatched_history():
    p = ridge()
    gd = hg.GradientDescent(p["inner_loss"], p["step"])
    with pytest.raises(ValueError, match="one update map per step"):
        hg.reverse([[p["w_star"]]] * 3, [p["lam"]], [gd], p["outer_loss"])
