"""The package installs like a real one: ``python -m build`` gives an sdist and a wheel that ``twine check``
accepts, and the wheel, installed into a fresh virtual environment, imports all three packages from outside the
source tree, at one version, with their ``py.typed`` markers and every module of the source tree.

The fresh environment gets the wheel with ``--no-deps``; its dependencies (torch, cvxpy, ...) are those of the
running environment, appended to its path by a ``.pth`` file *after* its own site-packages, so the packages
imported are the wheel's (checked by their ``__file__``) and each declared requirement is checked to be met.
"""
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import tomllib
import zipfile

import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("hypergrad", "constrained", "methods")


def _run(cmd, cwd, **kw):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _source_modules():
    mods = set()
    for pkg in PACKAGES:
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, pkg)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            mods.update(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")
                        for f in files if f.endswith(".py") or f == "py.typed")
    return mods


def _clean_copy(dest):
    """The files a clean checkout has (tracked, or untracked and not ignored): no stale ``*.egg-info`` or build
    folder of this working tree can leak files into the sdist."""
    try:
        files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).split("\0")
    except (AssertionError, OSError):      # not a git checkout: everything but what builds and runs leave behind
        skip = {".git", ".venv", "site", "dist", "build", "results", "__pycache__", ".pytest_cache"}
        files = []
        for dirpath, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info") and not d.startswith(".boat")]
            files += [os.path.relpath(os.path.join(dirpath, n), ROOT) for n in names if not n.endswith(".pyc")]
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    src = _clean_copy(str(tmp_path_factory.mktemp("src")))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), src], cwd=str(out))
    wheels = list(out.glob("*.whl"))
    sdists = list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    return wheels[0], sdists[0]


def test_twine_accepts_both(dist):
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)], cwd=ROOT)
    assert out.count("PASSED") == 2, out


def test_version_has_one_source(dist):
    import constrained
    import hypergrad
    import methods
    from hypergrad._version import __version__
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert hypergrad.__version__ == constrained.__version__ == methods.__version__ == __version__
    wheel, sdist = dist
    assert wheel.name.startswith(f"hypergrad_bilevel-{__version__}-") and sdist.name == f"hypergrad_bilevel-{__version__}.tar.gz"
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## {__version__}" in f.read(), "CHANGELOG.md has no section for the current version"


def test_wheel_holds_every_module_license_and_markers(dist):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = _source_modules() - names
    assert not missing, f"modules of the source tree missing from the wheel: {sorted(missing)}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in meta
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert f.readline().strip() == "MIT License"
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"} <= members
    assert not (_source_modules() - members)


def test_wheel_installs_and_imports_outside_the_source_tree(dist, tmp_path):
    wheel, _ = dist
    env = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=str(tmp_path))
    py = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", "--no-index",
          str(wheel)], cwd=str(tmp_path))
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=str(tmp_path))
    # The running environment's packages (torch, cvxpy, ...) after the fresh site-packages: path lines only, so
    # no .pth file of the running environment (e.g. an editable install of this repository) is executed.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site.strip(), "zz_deps.pth"), "w") as f:
        f.write("\n".join(sorted(deps)) + "\n")
    check = textwrap.dedent(f"""
        import importlib.metadata as md, os, sys
        from packaging.requirements import Requirement
        import hypergrad, constrained, methods, methods.stochastic
        env = os.path.realpath({str(env)!r})
        for m in (hypergrad, constrained, methods, methods.stochastic):
            assert os.path.realpath(m.__file__).startswith(env), m.__file__
            assert not os.path.realpath(m.__file__).startswith(os.path.realpath({ROOT!r})), m.__file__
        for m in (hypergrad, constrained, methods):
            assert os.path.exists(os.path.join(os.path.dirname(m.__file__), "py.typed")), m
        assert md.version("hypergrad-bilevel") == hypergrad.__version__
        for r in map(Requirement, md.requires("hypergrad-bilevel")):
            if r.marker is None:
                assert r.specifier.contains(md.version(r.name), prereleases=True), (r, md.version(r.name))
        import torch
        w = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
        lam = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        fp_map = lambda params, hparams: [params[0] - 0.1 * (hparams[0] * params[0] - 1.0)]
        outer = lambda params, hparams: (params[0] ** 2).sum()
        w_star = (1.0 / lam).detach().requires_grad_(True)
        g = hypergrad.cg([w_star], [lam], 50, fp_map, outer, set_grad=False)[0]
        assert abs(g.item() - (-2.0 / 2.0 ** 3)) < 1e-12, g     # d/dlam (1/lam)^2 = -2/lam^3
        print("ok", hypergrad.__version__)
    """)
    out = _run([str(py), "-I", "-c", check], cwd=str(tmp_path))
    assert out.startswith("ok "), out
