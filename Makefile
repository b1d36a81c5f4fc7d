# The two commands of the README: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE ?= 1
export PYTHONDONTWRITEBYTECODE ?= 1

.PHONY: venv demo test bench lint clean

# Idempotent: reinstalls only when pyproject.toml changed (the stamp holds its hash).
venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(VENV)/bin/vtw demo --out runs/demo

# One intra-op thread per test process: the suite runs several processes at once (DDP test, data
# workers) and oversubscribed cores make torch's thread pools spin; override with OMP_NUM_THREADS=N.
test: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -ra --durations=15

bench: venv
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f; done

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs lightning_logs .pytest_cache
