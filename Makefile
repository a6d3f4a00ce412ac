# The two commands a user types: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Reinstall when dependencies or the set of modules change (the editable install
# is a link tree, so static checkers see the mapped package names).
STAMP  := $(VENV)/.installed-$(shell { cat pyproject.toml; find proxy adapters -name '*.py' | sort; } | cksum | cut -d' ' -f1)
# The mypyc-compiled build (what the image ships) in a venv of its own; rebuilt
# whenever any source changes, since the compiled modules shadow the .py files.
COMPILED_VENV ?= .venv-compiled
CBIN   := $(COMPILED_VENV)/bin
CSTAMP := $(COMPILED_VENV)/.installed-$(shell { cat pyproject.toml setup.py; find proxy adapters -name '*.py' | sort | xargs cat; } | cksum | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help setup run test lint format clean chaos bench helm-sync compiled test-compiled

help:
	@echo "make run    - start the example ticket tool and idemproxy in front of it (Ctrl-C stops both)"
	@echo "make test   - run the whole test suite (installs redis-server when missing)"
	@echo "make test-compiled - the whole suite against the mypyc-compiled build (the one the image ships)"
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

# Dependencies (and mypy, which brings mypyc) come from a plain install first: the
# compiled build runs without build isolation, because mypyc type-checks against them.
$(CSTAMP):
	@sh scripts/bootstrap.sh venv "$(PYTHON)" "$(COMPILED_VENV)"
	@sh scripts/bootstrap.sh compiler "$(CBIN)/python"
	$(CBIN)/python -m pip install --quiet --upgrade pip 'setuptools>=68' wheel
	$(CBIN)/python -m pip install --quiet '.[test,lint,autogen,camel]'
	IDEMPROXY_COMPILE=1 $(CBIN)/python -m pip install --quiet --no-build-isolation --no-deps --force-reinstall .
	$(CBIN)/python -m idemproxy.build_info --require-compiled
	@rm -f $(COMPILED_VENV)/.installed-*
	@touch $@

compiled: $(CSTAMP)

run: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	@sh scripts/bootstrap.sh redis
	@sh scripts/bootstrap.sh monitoring
	@sh scripts/bootstrap.sh deploy-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-compiled: $(CSTAMP)
	@sh scripts/bootstrap.sh redis
	@sh scripts/bootstrap.sh monitoring
	@sh scripts/bootstrap.sh deploy-tools
	EXPECT_COMPILED=1 $(CBIN)/python -m pytest $(PYTEST_ARGS)

# The scenarios run the compiled build; forward-redis-pure runs the pure one beside it.
bench: $(STAMP) $(CSTAMP)
	@sh scripts/bootstrap.sh redis
	@sh scripts/bootstrap.sh bench-tools
	$(BIN)/python -m bench --idemproxy-python $(CBIN)/python $(BENCH_ARGS)

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
	rm -rf $(VENV) $(COMPILED_VENV) build .idemproxy .pytest_cache .mypy_cache .ruff_cache *.egg-info
