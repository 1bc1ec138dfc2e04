# One task runner: every target creates .venv itself, so a fresh machine needs only
# python3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck bench demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		(echo "mailgate needs Python >= 3.11 (set PYTHON=python3.11)"; exit 1)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mailgate serve --migrate

# Workers: one per core, at most 4 (each has its own databases and ports). The suite
# spends about half its time waiting on fsyncs, sockets and subprocesses, so two
# workers on two cores take ~60% of the serial time. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --maxprocesses 4

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

demo: $(STAMP)
	$(BIN)/mailgate demo

clean:
	rm -rf $(VENV) .mailgate .pytest_cache .mypy_cache
