"""The documentation cannot rot: every python block of the README and of the site's pages runs as written, every
public name is on the API pages, every example and benchmark script is on its page, every relative link of the
README leads to a file and heading, docstrings have one style and the site's lists render as lists. (`make docs`
builds the site with ``--strict``: broken links and references fail it.)"""
import dataclasses
import glob
import importlib
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
OPEN = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`{]*)")
LANGUAGES = {"python", "bash", ""}    # python blocks run; bash blocks are commands; bare blocks are text


def _read(path):
    with open(path) as f:
        return f.read()


def fences(text):
    """Every fenced block as (language, code): backtick or tilde fences of any length, at any indentation (a block
    inside a list item is dedented), closed by the same character at least as long, as Markdown does."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3)
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        out.append((lang, "\n".join(line[indent:] if not line[:indent].strip() else line.lstrip()
                                     for line in lines[i + 1:j]) + "\n"))
        i = j + 1
    return out


def test_fences_are_found_however_they_are_written():
    text = "a\n```python\nx = 1\n```\n- item\n\n    ~~~python\n    y = 2\n    ~~~\n````py\nz\n````\n"
    assert fences(text) == [("python", "x = 1\n"), ("python", "y = 2\n"), ("py", "z\n")]


def _blocks():
    for page in PAGES:
        for i, (lang, code) in enumerate(b for b in fences(_read(page)) if b[0] == "python"):
            yield pytest.param(page, code, id=f"{os.path.relpath(page, ROOT)}#{i}")


@pytest.mark.parametrize("page,code", list(_blocks()))
def test_code_block_runs(page, code):
    exec(compile(code, page, "exec"), {"__name__": "__docs__"})


def test_every_fence_is_known():
    """A block in another language (```py, ```pycon) would escape the test above."""
    for page in PAGES:
        for lang, _ in fences(_read(page)):
            assert lang in LANGUAGES, f"{page}: a ```{lang} block; use ```python (run by this test) or ```bash"


def test_pages_have_blocks():
    pages = {os.path.relpath(p.values[0], ROOT) for p in _blocks()}
    assert {"README.md", "docs/getting-started.md", "docs/guides/core.md", "docs/porting.md"} <= pages


def _own_docstring(obj):
    """The docstring written for ``obj``, not the signature that ``@dataclass`` puts where there is none."""
    doc = (obj.__doc__ or "").strip()
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("):
        return ""
    return doc


API = [("hypergrad", "hypergrad"), ("hypergrad.distributed", "hypergrad"), ("constrained", "constrained"),
       ("methods", "methods"), ("methods.stochastic", "stochastic"), ("methods.stochastic.quadratics", "stochastic")]


@pytest.mark.parametrize("package,page", API)
def test_every_public_name_is_on_the_api_page_with_a_docstring(package, page):
    mod = importlib.import_module(package)
    text = _read(os.path.join(ROOT, "docs", "api", f"{page}.md"))
    pkg = re.escape(package)
    # ``pkg.name``, or ``pkg.name.name`` where a function shares its module's name (hypergrad.functional)
    shown = {a for a, b in re.findall(rf"^::: {pkg}\.(\w+)(?:\.(\w+))?\s*$", text, re.M) if b in ("", a)}
    public = getattr(mod, "__all__", None) or [n for n, o in vars(mod).items() if not n.startswith("_")
                                               and getattr(o, "__module__", None) == package]
    missing = set(public) - shown - {"stochastic"}    # methods.stochastic has its own page
    assert not missing, f"public names of {package} missing from docs/api/{page}.md: {sorted(missing)}"
    for name in shown:
        assert hasattr(mod, name) or importlib.util.find_spec(f"{package}.{name}"), \
            f"docs/api/{page}.md shows {package}.{name}, which does not exist"
    for name in public:
        obj = getattr(mod, name)
        if callable(obj) and not isinstance(obj, (dict, list)):
            assert _own_docstring(obj), f"{package}.{name} has no docstring of its own"


@pytest.mark.parametrize("folder,page,pattern", [("examples", "examples.md", "*.py"),
                                                 ("benchmarks", "benchmarks.md", "bench_*.py")])
def test_every_script_is_on_its_page(folder, page, pattern):
    text = _read(os.path.join(ROOT, "docs", page))
    for path in glob.glob(os.path.join(ROOT, folder, pattern)):
        assert f"{folder}/{os.path.basename(path)}" in text, f"{folder}/{os.path.basename(path)} is not on docs/{page}"


def _slug(heading):
    """The anchor of a heading, as GitHub and the site's toc extension make it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_lead_to_files_and_headings():
    text = _read(os.path.join(ROOT, "README.md"))
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = os.path.join(ROOT, target) if target else os.path.join(ROOT, "README.md")
        assert os.path.exists(path), f"README links to {target}, which does not exist"
        if anchor:
            headings = {_slug(h) for h in re.findall(r"^#+ (.*)$", _read(path), re.M)}
            assert anchor in headings, f"README links to {target}#{anchor}: no such heading"


def test_readme_has_the_two_commands():
    text = _read(os.path.join(ROOT, "README.md"))
    setup = [b for lang, b in fences(text) if lang == "bash" and re.search(r"^make ", b, re.M)]
    assert len(setup) == 1 and re.findall(r"^make (\w+)", setup[0], re.M) == ["demo", "test"]


def test_docstrings_use_one_style():
    """mkdocstrings renders Markdown: a Sphinx role (:func:`x`) would show as raw text on the API pages."""
    role = re.compile(r":(func|class|meth|mod|attr|data|exc|obj):`")
    for pkg in ("hypergrad", "constrained", "methods"):
        for path in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True):
            for n, line in enumerate(_read(path).splitlines(), 1):
                where = f"{os.path.relpath(path, ROOT)}:{n}"
                assert not role.search(line), f"{where}: a Sphinx role; write [`x`][pkg.x] or ``x``"


def test_site_lists_render_as_lists():
    """Python-Markdown (the site's renderer) needs a blank line before a list and four spaces per nesting level;
    GitHub does not, so a page can look right in the repository and come out as one paragraph on the site."""
    item = re.compile(r"(\s*)([-*]|\d+\.) ")
    for page in PAGES:
        if page.endswith("README.md"):
            continue
        fence, prev = False, ""
        for n, line in enumerate(_read(page).splitlines(), 1):
            if OPEN.match(line):
                fence = not fence
            m = None if fence else item.match(line)
            if m:
                where = f"{os.path.relpath(page, ROOT)}:{n}"
                assert len(m.group(1)) % 4 == 0, f"{where}: nest a list item by four spaces"
                assert not (m.group(1) == "" and prev.strip() and not prev.startswith(" ") and not item.match(prev)
                            and not prev.startswith("|")), f"{where}: a blank line is needed before the list"
            prev = line
