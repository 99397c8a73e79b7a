"""examples/distributed_hpo.py runs under torchrun with 2 processes and alone, and matches one process."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "distributed_hpo.py")


def run(launcher, steps: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *launcher, SCRIPT, "--steps", str(steps), "--inner-steps", "50"],
                       capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def table(out: str):
    return [[float(x) for x in line.split()] for line in out.splitlines() if re.match(r"^\s+\d+\s+\d", line)]


def check_output(out: str, world: int, steps: int):
    assert f"world size {world}: 341 training rows" in out
    assert "step   val loss  val acc  test acc  |hypergrad|  CG its" in out
    rows = table(out)
    assert [int(r[0]) for r in rows] == list(range(steps))
    assert rows[-1][1] < rows[0][1]  # the validation loss goes down
    assert all(r[4] > 0 for r in rows)
    diff = float(re.search(r"vs 1 process with all rows: relative difference (\S+)", out).group(1))
    assert diff < 1e-8
    return rows


def test_torchrun_two_processes_match_one_process():
    out = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], steps=2)
    assert "training rows as [171, 170]" in out and "validation rows as [57, 56]" in out  # unequal shards
    two = check_output(out, world=2, steps=2)
    one = check_output(run([], steps=2), world=1, steps=2)
    for a, b in zip(one, two):  # the same optimization path, up to rounding (which may move CG's stopping
        assert abs(a[1] - b[1]) <= 1e-9 * abs(a[1]) and abs(a[5] - b[5]) <= 1  # test across one iteration)
