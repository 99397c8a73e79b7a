"""The main demo (data hyper-cleaning): data preparation, a tiny end-to-end run, and its command line."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import hyper_cleaning as hc  # noqa: E402


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5])
def test_prepare_data_splits_and_corruption(rate):
    d = hc.prepare_data(200, 100, 150, corruption=rate, seed=1)
    assert d["X_train"].shape == (200, 64) and d["X_val"].shape == (100, 64) and d["X_test"].shape == (150, 64)
    assert d["y_train"].shape == d["y_train_clean"].shape == d["corrupted"].shape == (200,)
    bad = d["corrupted"]
    assert bad.sum().item() == round(rate * 200)  # exactly the requested rate
    assert (d["y_train"][bad] != d["y_train_clean"][bad]).all()  # every corrupted label is a different class
    assert (d["y_train"][~bad] == d["y_train_clean"][~bad]).all()
    assert d["y_train"].min() >= 0 and d["y_train"].max() <= 9
    # the three splits are disjoint draws of the same 1797 digits: no test image appears in train or val
    tr = {tuple(r.tolist()) for r in d["X_train"]}
    va = {tuple(r.tolist()) for r in d["X_val"]}
    assert not any(tuple(r.tolist()) in tr or tuple(r.tolist()) in va for r in d["X_test"])


def test_prepare_data_is_seeded():
    a, b = hc.prepare_data(100, 50, 50, seed=3), hc.prepare_data(100, 50, 50, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_f1_score():
    pred = torch.tensor([True, True, False, False])
    truth = torch.tensor([True, False, True, False])
    assert hc.f1_score(pred, truth) == pytest.approx(0.5)
    assert hc.f1_score(truth, truth) == 1.0


def test_tiny_run_every_method_ranks_corrupted_samples_lower(tmp_path):
    rows = hc.main(["--tiny", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == hc.METHODS
    for r in rows:
        assert r["lam_corrupted"] < r["lam_clean"], r["method"]  # corrupted samples get smaller weights
        assert 0 <= r["f1"] <= 1 and 0.3 < r["test_acc"] <= 1 and r["sec_per_iter"] > 0
        assert 0.3 < r["test_acc_retrained"] <= 1
    with open(tmp_path / "hyper_cleaning.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == hc.METHODS
    data = json.loads((tmp_path / "hyper_cleaning.json").read_text())
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["seed"] == 0
    assert (tmp_path / "hyper_cleaning.png").stat().st_size > 5000


@pytest.mark.parametrize("args,message", [
    (["--methods", "RAD,Foo"], "unknown method(s) Foo"),
    (["--n-train", "-5"], "--n-train must be a positive integer"),
    (["--corruption", "1.0"], "--corruption must lie in [0, 1)"),
    (["--corruption", "-0.1"], "--corruption must lie in [0, 1)"),
    (["--n-train", "1700", "--n-val", "200"], "exceeds the 1797 digits"),
])
def test_command_line_rejects_impossible_arguments(args, message):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "hyper_cleaning.py"), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr
