"""Every python block in the README runs as written (the docs cannot rot)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
with open(README) as _f:
    BLOCKS = re.findall(r"```python\n(.*?)```", _f.read(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code):
    exec(compile(code, README, "exec"), {})


def test_readme_has_blocks():
    assert len(BLOCKS) >= 1
