# Two commands for a newcomer: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first: an unpinned torch could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.3" --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install --quiet -e ".[test,bench,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/hyper_cleaning.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV)
