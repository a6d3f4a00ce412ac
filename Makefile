# The two commands a user types: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Reinstall when dependencies or the set of modules change (the editable install
# is a link tree, so static checkers see the mapped package names).
STAMP  := $(VENV)/.installed-$(shell { cat pyproject.toml; find proxy adapters -name '*.py' | sort; } | cksum | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help setup run test lint format clean chaos bench helm-sync

help:
	@echo "make run    - start the example ticket tool and idemproxy in front of it (Ctrl-C stops both)"
	@echo "make test   - run the whole test suite (installs redis-server when missing)"
	@echo "make lint   - ruff and mypy"
	@echo "make chaos  - a long chaos campaign (OPERATIONS=10000) with faults and the invariant checker"
	@echo "make bench  - benchmark idemproxy against nginx and a naive proxy (BENCH_ARGS=--quick for a smoke run)"

$(STAMP):
	@sh scripts/bootstrap.sh venv "$(PYTHON)" "$(VENV)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint,autogen,camel]' --config-settings editable_mode=strict
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	@sh scripts/bootstrap.sh redis
	@sh scripts/bootstrap.sh monitoring
	@sh scripts/bootstrap.sh deploy-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	@sh scripts/bootstrap.sh redis
	@sh scripts/bootstrap.sh bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)

helm-sync: $(STAMP)
	$(BIN)/python -m tests.deploy.sync_chart

chaos: $(STAMP)
	@sh scripts/bootstrap.sh redis
	$(BIN)/python -m tests.chaos.harness --operations $(or $(OPERATIONS),10000)

lint: $(STAMP)
	$(BIN)/ruff check proxy adapters tests examples bench
	$(BIN)/ruff format --check proxy adapters tests examples bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format proxy adapters tests examples bench
	$(BIN)/ruff check --fix proxy adapters tests examples bench

clean:
	rm -rf $(VENV) .idemproxy .pytest_cache .mypy_cache .ruff_cache *.egg-info
