# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv, installs torch first (the CPU wheel here: torch==2.13.0), then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# The import rules (pyproject.toml [tool.importlinter]) first: a broken layer fails fast.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/bench_cli.py

clean:
	rm -rf $(VENV) demo
