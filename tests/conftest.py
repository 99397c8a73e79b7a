import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch

# One thread: the sizes here are small, and OpenMP threads that wait on a busy second core make
# small ops 100x slower (measured on the 2-core machines this suite runs on).
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def host_reads(monkeypatch):
    """A dict whose "n" counts device-to-host reads (bool/float/item/tolist on a tensor) from now on;
    call ``host_reads["stop"]()`` to stop counting."""
    reads = {"n": 0, "stop": monkeypatch.undo}
    for name in ("__bool__", "__float__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads
