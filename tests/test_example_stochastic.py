"""The stochastic example and benchmark run at their smallest sizes and write well-formed outputs."""
import json
import math

from test_examples_quick import _load


def test_stochastic_logreg_quick(tmp_path):
    rows = _load("examples/stochastic_logreg.py").main(
        ["--quick", "--only", "SABA", "Implicit CG (full batch)", "--out", str(tmp_path)])
    assert {r["method"] for r in rows} == {"SABA", "Implicit CG (full batch)"}
    start = math.log(2.0)                                    # y0 = 0: the validation loss is log 2
    assert all(0 < r["best_val"] < start and r["steps"] > 0 and r["oracle_calls"] > 0 for r in rows)
    data = json.loads((tmp_path / "stochastic_logreg.json").read_text())
    assert set(data["curves"]) == {"SABA", "Implicit CG (full batch)"}
    assert (tmp_path / "stochastic_logreg.png").stat().st_size > 5000


def test_bench_stochastic_quick(tmp_path):
    _load("benchmarks/bench_stochastic.py").main(["--quick", "--only", "SABA", "SOBA", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_stochastic.json").read_text())
    s = data["summary"]
    assert set(s) == {"SABA", "SOBA"} and all(len(v["time_quartiles"]) == 60 for v in s.values())
    assert s["SABA"]["final_median"] < data["start"] and s["SOBA"]["final_median"] < data["start"]
    assert (tmp_path / "bench_stochastic.png").stat().st_size > 5000
    assert (tmp_path / "bench_stochastic.md").read_text().count("|") > 10
