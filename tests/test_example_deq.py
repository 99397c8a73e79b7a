"""The deep-equilibrium example: a quick end-to-end run, and the layer's gradient against a dense
implicit-function-theorem reference on one small batch of the trained model."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hypergrad as hg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import deq_digits as deq  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("deq")
    return deq.main(["--quick", "--out", str(out)]), out


def test_quick_run_learns_and_every_solve_converges(quick):
    res, out = quick
    assert res["history"][0]["test_acc"] < 0.3  # the random start is near chance (10 classes)
    assert res["test_acc"] > 0.6 and res["train_acc"] > 0.6  # 15 Adam steps already learn the digits
    steps = res["steps"]
    assert len(steps) == 15
    assert all(s["fwd_converged"] and s["bwd_converged"] for s in steps)
    assert all(0 < s["fwd_its"] < 200 and 0 < s["bwd_its"] < 200 for s in steps)
    assert all(s["loss"] > 0 for s in steps) and steps[-1]["loss"] < steps[0]["loss"]
    data = json.loads((out / "deq_digits.json").read_text())
    assert len(data["steps"]) == 15 and data["versions"]["torch"] == torch.__version__
    assert (out / "deq_digits.png").stat().st_size > 5000


def test_anderson_needs_fewer_iterations_than_plain_iteration(quick):
    cmp = quick[0]["comparison"]
    fp, an = cmp["fixed_point"], cmp["anderson"]
    assert fp["converged"] and an["converged"]
    assert fp["relative_residual"] <= 1.01e-8 and an["relative_residual"] <= 1.01e-8  # the same tolerance
    assert an["iterations"] < fp["iterations"]
    assert cmp["max_abs_diff"] < 1e-5  # the same fixed point


def _dense_ift_gradients(model, X, y):
    """Gradients of CE(A z* + c, y) in (V, U, b, A, c) by the implicit function theorem, densely:
    z* by plain iteration, J = dPhi/dz as a matrix, u = (I - J)^-T dL/dz by a direct solve."""
    hs = [h.detach() for h in model.hparams(X)]
    z = torch.zeros(X.shape[0], model.V.shape[0], dtype=X.dtype)
    for _ in range(2000):  # ||W|| <= 0.9: 0.9^2000 is far below rounding
        z = deq.fp_map([z], hs)[0]
    assert float((deq.fp_map([z], hs)[0] - z).norm()) <= 1e-13 * float(z.norm())
    shape = z.shape
    J = torch.autograd.functional.jacobian(lambda zf: deq.fp_map([zf.view(shape)], hs)[0].reshape(-1), z.reshape(-1),
                                           vectorize=True)
    zl = z.clone().requires_grad_()
    loss = F.cross_entropy(zl @ model.A.T + model.c, y)
    gz, gA, gc = torch.autograd.grad(loss, [zl, model.A, model.c])  # dL/dz and the direct terms
    u = torch.linalg.solve((torch.eye(J.shape[0], dtype=J.dtype) - J).T, gz.reshape(-1))
    phi = deq.fp_map([z], model.hparams(X))[0]  # W = W(V) in the graph: dL/dV through the parametrization
    gV, gU, gb = torch.autograd.grad(phi, [model.V, model.U, model.b], u.view(shape))
    phi = deq.fp_map([z], model.hparams(X))[0]
    naive = torch.autograd.grad(phi, [model.U], gz)[0]  # u = dL/dz: no implicit term (one-step gradient)
    return z, [gV, gU, gb, gA, gc], naive


def test_layer_gradient_matches_dense_implicit_function_theorem(quick):
    model = quick[0]["model"]
    data = deq.load_data(497, 0, torch.float64)
    X, y = data["X_test"][:6], data["y_test"][:6]
    assert model.V.dtype == torch.float64
    z_ref, ref, naive = _dense_ift_gradients(model, X, y)
    assert float((naive - ref[1]).norm() / ref[1].norm()) > 0.05  # the reference sees the (I - J)^-T factor
    layer = hg.FixedPointLayer(deq.fp_map, solver="anderson", backward_solver="gmres")  # default tolerances: 1e-10
    z = model.equilibrium(X, layer)
    assert layer.forward_info.converged
    assert float((z.detach() - z_ref).norm()) <= 1e-8 * float(z_ref.norm())
    loss = F.cross_entropy(z @ model.A.T + model.c, y)
    got = torch.autograd.grad(loss, model.parameters())
    assert layer.backward_info.converged
    for name, g, r in zip("VUbAc", got, ref):
        rel = float((g - r).norm() / r.norm())
        assert rel <= 1e-6, (name, rel)
    # the same through loss.backward() and the example's own layer (tolerance 1e-8), as in training
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model.logits(X), y).backward()
    for name, p, r in zip("VUbAc", model.parameters(), ref):
        rel = float((p.grad - r).norm() / r.norm())
        assert rel <= 1e-6, (name, rel)
    for p in model.parameters():
        p.grad = None


def test_command_line_rejects_a_non_contraction():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "deq_digits.py"), "--contraction", "1.5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--contraction must lie in (0, 1)" in r.stderr and "Traceback" not in r.stderr
