"""Peak resident-memory growth of a fresh process (Linux /proc), shared by the memory benchmarks.

In the child (code run by :func:`run_child`, which can ``import _memory``): warm up, then
``base = reset_peak()``, the measured work, and ``peak_growth_kib(base)``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def status(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak)."""
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key)).split()[1])


def reset_peak() -> int:
    """Reset the peak (VmHWM) to the current RSS, so earlier peaks (imports) do not count; returns it."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status("VmRSS")


def peak_growth_kib(base: int) -> int:
    """Peak RSS since :func:`reset_peak` above its ``base`` (KiB, at least 1)."""
    return max(status("VmHWM") - base, 1)


#: environment for children whose RSS should follow the live tensors: glibc serves every block of
#: 128 KiB or more by its own mmap and unmaps it when freed (no dynamic threshold, no cached free blocks)
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(code: str, *args, env: Optional[Dict[str, str]] = None) -> str:
    """Run ``python -c code args...`` in a fresh process (``_memory`` importable, ``env`` added to the
    environment); its last stdout line."""
    env = dict(os.environ, **(env or {}),
               PYTHONPATH=os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]
