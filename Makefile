# The two commands: `make run` brings the whole system up, `make test` runs every test.
# Both install what they need into .venv first (only Python 3.11+ is required).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test check proto install bench clean

# What `make check` lints and type-checks (ruff and mypy, configured in pyproject.toml).
CHECK_PATHS := services tools tests bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet pip==26.3  # pinned like everything else
	$(VENV)/bin/pip install --quiet -e '.[local,test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m devstack run

# Test workers: most of a test's time is spent waiting on the processes it starts, so more
# workers than cores; each worker runs whole files (--dist loadfile) on a stack of its own,
# the longest files first (tests/conftest.py, LONGEST_FIRST; xdist would order by test count).
TEST_WORKERS ?= 3

# ruff and mypy first, then every test, then line coverage
test: check
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --cov --cov-report=term $(PYTEST_ARGS)

check: install
	$(VENV)/bin/ruff check $(CHECK_PATHS)
	$(VENV)/bin/mypy $(CHECK_PATHS)

proto: install
	$(PY) -m devstack proto

bench: install
	$(PY) bench/turns.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .data
