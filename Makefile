# Two commands for a newcomer: `make demo` and `make test`. Each builds .venv itself.
# `make docs` builds the documentation site (site/) strictly; `make dist` builds and checks the sdist and wheel.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test docs serve-docs dist bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first: an unpinned torch could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.3" --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install --quiet -e ".[test,bench,examples]"
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench,examples,docs]"
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(PY) examples/hyper_cleaning.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

serve-docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist
	$(PY) -m twine check --strict dist/*

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) site dist build
