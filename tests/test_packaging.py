"""The package installs like a real one: ``python -m build`` gives an sdist and a wheel that ``twine check``
accepts, and the wheel, installed into a fresh virtual environment, imports all three packages from outside the
source tree, at one version, with their ``py.typed`` markers and every module of the source tree.

The fresh environment gets the wheel with ``--no-deps``; its dependencies (torch, cvxpy, ...) are the closure of the
wheel's declared requirements, each checked to be installed here at an accepted version and linked into a folder
that a ``.pth`` file appends *after* the venv's own site-packages: the modules imported are the wheel's (checked by
their ``__file__``), and an import the package does not declare fails.
"""
import json
import os
import re
import subprocess
import sys
import shutil
import tarfile
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("hypergrad", "constrained", "methods")


def _run(cmd, cwd, **kw):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _tree_files():
    """The files a clean checkout has (tracked, or untracked and not ignored)."""
    try:
        files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).split("\0")
    except (AssertionError, OSError):      # not a git checkout: everything but what builds and runs leave behind
        skip = {".git", ".venv", "site", "dist", "build", "results", "__pycache__", ".pytest_cache"}
        files = []
        for dirpath, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info") and not d.startswith(".boat")]
            files += [os.path.relpath(os.path.join(dirpath, n), ROOT) for n in names if not n.endswith(".pyc")]
    return [rel for rel in files if rel and os.path.isfile(os.path.join(ROOT, rel))]


def _source_modules():
    """The package files of the tree: every module and the ``py.typed`` markers."""
    return {rel for rel in _tree_files() if rel.split("/")[0] in PACKAGES and rel.endswith((".py", "/py.typed"))}


def _clean_copy(dest):
    """A copy of the clean checkout's files: no stale ``*.egg-info`` or build folder of this working tree can leak
    files into the sdist."""
    for rel in _tree_files():
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
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
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    project = re.search(r"^\[project\]\n(.*?)(?=^\[)", pyproject, re.M | re.S).group(1)    # the [project] table
    assert not re.search(r"^version\s*=", project, re.M) and re.search(r'^dynamic = \["version"\]', project, re.M)
    assert 'version = { attr = "hypergrad._version.__version__" }' in pyproject
    assert hypergrad.__version__ == constrained.__version__ == methods.__version__ == __version__
    wheel, sdist = dist
    assert wheel.name.startswith(f"hypergrad_bilevel-{__version__}-")
    assert sdist.name == f"hypergrad_bilevel-{__version__}.tar.gz"
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
    tree = {rel for rel in _tree_files() if not rel.startswith(".")}     # not .ci/, .gitignore
    assert not tree - members, f"files of the source tree missing from the sdist: {sorted(tree - members)}"


def _requirements(metadata_text):
    """The unconditional ``Requires-Dist`` requirements of a METADATA file (no extras)."""
    from packaging.requirements import Requirement
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in metadata_text.splitlines()
            if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _dependency_closure(requirements):
    """Every distribution the requirements pull in, recursively (with the extras asked for), each checked to be
    installed here at a version the requirement accepts."""
    from importlib import metadata
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    seen, todo = {}, list(requirements)
    while todo:
        r = todo.pop()
        dist = metadata.distribution(r.name)      # PackageNotFoundError: a dependency this environment lacks
        assert r.specifier.contains(dist.version, prereleases=True), f"{r} but {dist.version} is installed"
        name = canonicalize_name(r.name)
        if name in seen and r.extras <= seen[name][1]:
            continue
        extras = r.extras | (seen[name][1] if name in seen else set())
        seen[name] = (dist, extras)
        for q in map(Requirement, dist.requires or []):
            if q.marker is None or any(q.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append(q)
    return [d for d, _ in seen.values()]


def _link_distributions(dists, dest):
    """A folder holding (symlinks to) exactly these distributions' top-level files: a site of only the declared
    dependencies, so an import the package does not declare fails in the fresh environment."""
    os.makedirs(dest)
    for dist in dists:
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or os.path.lexists(os.path.join(dest, top)):
                continue
            src = dist.locate_file(top)
            if os.path.exists(src):
                os.symlink(src, os.path.join(dest, top))
    return dest


def test_wheel_installs_and_imports_outside_the_source_tree(dist, tmp_path):
    """The wheel in a fresh venv whose only other packages are the declared dependencies (linked from this
    environment, versions checked): every module of all three packages imports there, from the venv."""
    wheel, _ = dist
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}   # no PYTHONPATH to the source tree
    env = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=str(tmp_path), env=clean)
    py = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", "--no-index",
          "--ignore-installed", str(wheel)], cwd=str(tmp_path), env=clean)
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    deps = _link_distributions(_dependency_closure(_requirements(meta)), str(tmp_path / "deps"))
    site = _run([str(py), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=str(tmp_path), env=clean).strip()
    with open(os.path.join(site, "zz_deps.pth"), "w") as f:   # after the venv's own site-packages
        f.write(deps + "\n")
    check = textwrap.dedent("""
        import importlib, importlib.metadata as md, json, os, pkgutil, sys
        import hypergrad, constrained, methods
        files = {}
        for pkg in (hypergrad, constrained, methods):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                files[m.name] = importlib.import_module(m.name).__file__
            files[pkg.__name__] = pkg.__file__
        typed = [os.path.exists(os.path.join(os.path.dirname(p.__file__), "py.typed"))
                 for p in (hypergrad, constrained, methods)]
        import torch
        lam = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        w = (1.0 / lam).detach().requires_grad_(True)       # w* = 1/lam, the fixed point of the map below
        fp_map = lambda p, h: [p[0] - 0.1 * (h[0] * p[0] - 1.0)]
        g = hypergrad.cg([w], [lam], 50, fp_map, lambda p, h: (p[0] ** 2).sum(), set_grad=False)[0]
        print(json.dumps(dict(files=files, typed=typed, version=md.version("hypergrad-bilevel"),
                              versions=[hypergrad.__version__, constrained.__version__, methods.__version__],
                              grad=g.item())))
    """)
    out = json.loads(_run([str(py), "-I", "-c", check], cwd=str(tmp_path), env=clean).strip().splitlines()[-1])
    from hypergrad._version import __version__
    venv = os.path.realpath(str(env))
    modules = {rel[:-3].replace("/", ".").removesuffix(".__init__") for rel in _source_modules() if rel.endswith(".py")}
    assert set(out["files"]) == modules, sorted(set(out["files"]) ^ modules)     # every module of the tree, imported
    for name, path in out["files"].items():
        assert os.path.realpath(path).startswith(venv), f"{name} imported from {path}, not from the fresh venv"
    assert all(out["typed"]) and out["version"] == __version__ and out["versions"] == [__version__] * 3
    assert abs(out["grad"] - (-2.0 / 2.0 ** 3)) < 1e-12      # d/dlam (1/lam)^2 = -2/lam^3
