"""The logistic-regression example runs at tiny size, its outputs are well-formed and sane."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_logistic_regression_example_tiny(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import logistic_regression_hpo as ex
    history, check = ex.main(["--tiny", "--out", str(tmp_path)])
    assert len(history) == 5
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # hypergradient descent lowers the outer loss
    assert check < 1e-6  # the hypergradient agrees with finite differences of the whole pipeline
    data = json.loads((tmp_path / "logistic_regression_hpo.json").read_text())
    assert data["history"][-1]["step"] == 4 and (tmp_path / "logistic_regression_hpo.png").stat().st_size > 1000


def test_logistic_regression_example_rejects_bad_arguments():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "logistic_regression_hpo.py"),
                        "--K", "-3"], capture_output=True, text=True)
    assert r.returncode == 2 and "--K must be positive" in r.stderr and "Traceback" not in r.stderr
