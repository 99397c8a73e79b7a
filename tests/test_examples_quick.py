"""No example or benchmark may rot: each runs at its smallest size, with sane, well-formed outputs."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["examples/hyper_cleaning.py", "examples/logistic_regression_hpo.py", "examples/svm_hyperparameters.py",
           "examples/nonconvex_toy.py", "examples/imaml_digits.py", "examples/distributed_hpo.py",
           "benchmarks/bench_core.py", "benchmarks/bench_constrained.py",
           "benchmarks/bench_methods.py", "benchmarks/bench_batched.py",
           "benchmarks/bench_solvers.py", "benchmarks/run_all.py",
           "benchmarks/bench_distributed.py", "benchmarks/bench_memory.py",
           "examples/deq_digits.py", "benchmarks/bench_layer.py",
           "examples/stochastic_logreg.py", "benchmarks/bench_stochastic.py"]


def _load(rel):
    import importlib.util
    spec = importlib.util.spec_from_file_location(os.path.basename(rel)[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout.lower()


def test_nonconvex_toy_quick(tmp_path):
    rows = _load("examples/nonconvex_toy.py").main(["--quick", "--out", str(tmp_path)])
    assert {(r["x0"], r["y0"]) for r in rows} == {(0.0, 0.0), (4.0, 4.0)}
    assert all(r["dist"] >= 0 and r["phi"] >= 0 for r in rows)
    bvfim_44 = [r for r in rows if r["method"] == "BVFIM" and (r["x0"], r["y0"]) == (4.0, 4.0)][0]
    assert bvfim_44["reached"]  # the paper's claim, where it holds (see tests/test_methods_toy.py)
    data = json.loads((tmp_path / "nonconvex_toy.json").read_text())
    assert len(data["rows"]) == 6 and (tmp_path / "nonconvex_toy.png").stat().st_size > 5000


def test_bench_core_quick(tmp_path):
    res = _load("benchmarks/bench_core.py").main(["--quick", "--out", str(tmp_path)])
    assert all(r["ratio"] > 0 for r in res["cost"])
    assert all(w["warm_max_rel_err"] <= 10 * w["rtol"] for w in res["warm"])  # the warm solves hit the tolerance
    assert res["memory"]["ratio"] < 1  # reverse stores iterates only: less than the unrolled graph
    assert (tmp_path / "bench_core.png").exists()


def test_bench_methods_quick(tmp_path):
    mod = _load("benchmarks/bench_methods.py")
    out = mod.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "bench_methods.csv").exists() and out is not None


def test_imaml_quick(tmp_path):
    rows, history = _load("examples/imaml_digits.py").main(["--quick", "--out", str(tmp_path)])
    assert rows[1]["meta_test_acc"] > rows[0]["meta_test_acc"]  # meta-learning helps even in 6 steps
    assert all(h["inner_residual"] < 1e-5 and h["converged"] == 8 for h in history)  # inner and adjoint solved
    assert (tmp_path / "imaml_digits.png").stat().st_size > 5000


def test_bench_batched_quick(tmp_path):
    res = _load("benchmarks/bench_batched.py").main(["--quick", "--out", str(tmp_path)])
    row = res["rows"][0]
    assert row["B"] == 64 and row["max_rel_diff"] <= 1e-10 and row["ratio"] > 0
    assert (tmp_path / "bench_batched.json").exists()


def test_bench_solvers_quick(tmp_path):
    res = _load("benchmarks/bench_solvers.py").main(["--quick", "--out", str(tmp_path)])
    err = {(r["cond"], r["solver"], r["K"]): r["rel_err"] for r in res["accuracy"]}
    for s in ("cg", "minres", "gmres"):  # Krylov solvers reach rounding level on the easy problem
        assert err[(10.0, s, 64)] <= 1e-12
    assert err[(1e4, "cg", 256)] < err[(1e4, "fixed_point", 256)]  # and beat Richardson on the hard one
    assert {r["method"] for r in res["cost"]} >= {"cg", "reverse_unroll", "reverse_checkpointed"}
    assert all(r["ratio"] > 0 for r in res["cost"]) and (tmp_path / "bench_solvers.png").exists()
