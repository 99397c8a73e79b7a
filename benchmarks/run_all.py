"""Run every benchmark of the project and write one report: ``results/report.md`` (tables + plots).

Each benchmark runs in its own process (its own thread settings, a clean allocator for the memory
figures) with ``--out`` pointing at the report's folder; its printed tables go into the report under
its name, its plots are linked below them. All figures in a benchmark are ratios taken within that
benchmark's single run.

    python benchmarks/run_all.py            # full sizes (about an hour on 2 CPU cores)
    python benchmarks/run_all.py --quick    # every benchmark at its smallest size (a few minutes)
    python benchmarks/run_all.py --only solvers batched
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

#: name -> (script, what it measures, extra arguments when the device is CUDA)
BENCHMARKS = {
    "solvers": ("bench_solvers.py", "error of every solver against Hessian-vector products (well- and "
                "ill-conditioned); cost of every core method against 10^3 ... 10^6 inner parameters", True),
    "methods": ("bench_methods.py", "upper-gradient time of methods/ (BVFIM, Implicit, RAD) against 10^3 ... "
                "10^6 lower parameters", False),
    "batched": ("bench_batched.py", "batched hypergradients of B tasks against the per-task loop", False),
    "distributed": ("bench_distributed.py", "one hypergradient with 2 data-parallel processes against 1", False),
    "memory": ("bench_memory.py", "peak memory of reverse modes against the trajectory length T", False),
    "core": ("bench_core.py", "CG against raw HVPs, warm starts, reverse vs unrolled memory", False),
    "constrained": ("bench_constrained.py", "KKT hypergradients against cvxpylayers", False),
    "vs_boat": ("bench_vs_boat.py", "methods/ against BOAT 1.1.1 (installed into its own venv) and against the same "
                "mathematics in plain autograd: time per upper iteration, hyper-cleaning and dense quadratics, "
                "float64 result checks", False),
    "stochastic": ("bench_stochastic.py", "stochastic bilevel solvers (SOBA, SABA, SRBA, AmIGO, StocBiO, MRBO, VRBO, F2SA, "
                   "BOME) and full-batch Implicit CG / RAD on benchmark_bilevel's quadratic: ||grad h||^2 against time and "
                   "oracle calls, 10 seeds", False),
    "layer": ("bench_layer.py", "implicit layer (custom_root) against torchopt 0.7.3: backward time at equal "
              "accuracy, second derivatives, vmap, 0-d solutions", False),
}


def run_one(name: str, out: str, quick: bool, device: str) -> dict:
    script, what, has_device = BENCHMARKS[name]
    cmd = [sys.executable, os.path.join(HERE, script), "--out", out] + (["--quick"] if quick else [])
    if has_device and device != "cpu":
        cmd += ["--device", device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress bars) to the terminal
    return dict(name=name, script=script, what=what, seconds=time.perf_counter() - t0, rc=proc.returncode,
                stdout=proc.stdout, plots=sorted(f for f in os.listdir(out)
                                                 if f.startswith(script[:-3]) and f.endswith(".png")))


def _markdown(text: str) -> list:
    """A benchmark's printout: its markdown tables as they are, every other run of lines fenced."""
    import itertools
    out = []
    for is_table, group in itertools.groupby(text.strip("\n").splitlines(), key=lambda l: l.startswith("|")):
        group = list(group)
        if is_table:
            out += group + [""]
        elif any(line.strip() for line in group):
            out += ["```", *group, "```", ""]
    return out


def report(results: list, args) -> str:
    lines = [f"# Benchmark report ({'quick' if args.quick else 'full'} sizes)", "",
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}; torch {torch.__version__}, Python "
             f"{platform.python_version()}, {os.cpu_count()} CPU cores, device {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "") + ".", "",
             "| benchmark | measures | status | seconds |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| [{r['name']}](#{r['name']}) | {r['what']} | {'ok' if r['rc'] == 0 else 'FAILED'} | "
                     f"{r['seconds']:.0f} |")
    for r in results:
        lines += ["", f"## {r['name']}", "", f"`python benchmarks/{r['script']}"
                  f"{' --quick' if args.quick else ''}`: {r['what']}.", ""] + _markdown(r["stdout"])
        lines += [f"![{p}]({p})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every benchmark at its smallest size")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (for the benchmarks that take a device)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    os.makedirs(args.out, exist_ok=True)
    from tqdm import tqdm
    results = [run_one(n, args.out, args.quick, args.device)
               for n in tqdm(args.only or list(BENCHMARKS), desc="benchmarks", unit="bench", file=sys.stderr)]
    path = os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write(report(results, args))
    failed = [r["name"] for r in results if r["rc"] != 0]
    print(f"wrote {path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
