# The two commands a user types: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Every install comes from the locks in requirements/ (make lock regenerates them).
LOCK   := requirements/dev.txt
# Reinstall when the lock or the set of modules change (the editable install
# is a link tree, so static checkers see the mapped package names).
STAMP  := $(VENV)/.installed-$(shell { cat $(LOCK) pyproject.toml; find proxy adapters -name '*.py' | sort; } | cksum | cut -d' ' -f1)
# `make run`: the runtime dependencies alone (requirements/runtime.txt), not the test and
# lint tools; the project itself editable, built with the locked build backend.
RUN_VENV ?= .venv-run
RBIN   := $(RUN_VENV)/bin
RSTAMP := $(RUN_VENV)/.installed-$(shell { cat requirements/runtime.txt requirements/build-system.txt pyproject.toml; find proxy adapters -name '*.py' | sort; } | cksum | cut -d' ' -f1)
# The mypyc-compiled build (what the image ships) in a venv of its own; rebuilt
# whenever any source changes, since the compiled modules shadow the .py files.
COMPILED_VENV ?= .venv-compiled
CBIN   := $(COMPILED_VENV)/bin
CSTAMP := $(COMPILED_VENV)/.installed-$(shell { cat $(LOCK) pyproject.toml setup.py; find proxy adapters -name '*.py' | sort | xargs cat; } | cksum | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help setup run test lint audit format clean chaos bench helm-sync compiled test-compiled lock dist

help:
	@echo "make run    - the example ticket tool with idemproxy in front: a scripted tour (replay, a lost answer reconciled, an operator resolving one), then both keep running (Ctrl-C stops)"
	@echo "make test   - run the whole test suite (installs redis-server when missing)"
	@echo "make test-compiled - the whole suite against the mypyc-compiled build (the one the image ships)"
	@echo "make lint   - ruff, mypy, the locks' freshness and a vulnerability audit of the locks"
	@echo "make lock   - regenerate requirements/*.txt at the newest versions pyproject.toml allows"
	@echo "make dist   - the sdist and wheels in dist/ (the compiled wheel too where a C compiler is present)"
	@echo "make chaos  - a long chaos campaign (OPERATIONS=10000) with faults and the invariant checker"
	@echo "make bench  - benchmark idemproxy against nginx and a naive proxy (BENCH_ARGS=--quick for a smoke run)"

$(STAMP):
	@sh scripts/bootstrap.sh venv "$(PYTHON)" "$(VENV)"
	@sh scripts/bootstrap.sh sync "$(VENV)" $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

# Dependencies (and mypy, which brings mypyc) come from the lock first: the compiled
# build runs without build isolation, because mypyc type-checks against them.
$(CSTAMP):
	@sh scripts/bootstrap.sh venv "$(PYTHON)" "$(COMPILED_VENV)"
	@sh scripts/bootstrap.sh compiler "$(CBIN)/python"
	@sh scripts/bootstrap.sh sync "$(COMPILED_VENV)" $(LOCK)
	IDEMPROXY_COMPILE=1 $(CBIN)/python -m pip install --quiet --no-build-isolation --no-deps --force-reinstall .
	$(CBIN)/python -m idemproxy.build_info --require-compiled
	@rm -f $(COMPILED_VENV)/.installed-*
	@touch $@

compiled: $(CSTAMP)

$(RSTAMP):
	@sh scripts/bootstrap.sh venv "$(PYTHON)" "$(RUN_VENV)"
	@sh scripts/bootstrap.sh sync "$(RUN_VENV)" requirements/runtime.txt
	$(RUN_VENV)/.uv/bin/uv pip install --quiet --python $(RBIN)/python --no-deps \
		--build-constraints requirements/build-system.txt -e .
	@rm -f $(RUN_VENV)/.installed-*
	@touch $@

run: $(RSTAMP)
	$(RBIN)/python examples/demo.py

test: $(STAMP)
	@sh scripts/bootstrap.sh redis
	@sh scripts/bootstrap.sh test-tools
	@sh scripts/bootstrap.sh monitoring
	@sh scripts/bootstrap.sh deploy-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Left to `make test`: what runs no compiled module, so it would be the same work twice. The
# chart, image and release tests (the image's and the distribution's build environments of
# their own from the base interpreter, whichever venv runs pytest) but the one that checks
# which build runs, the bench harness, the framework adapters, the operator console and CLI,
# and the test harness itself.
COMPILED_LEAVES_OUT := --ignore=tests/deploy --ignore=tests/release/test_audit.py --ignore=tests/release/test_dist.py \
	--ignore=tests/release/test_docs_links.py --ignore=tests/release/test_locks.py --ignore=tests/bench \
	--ignore=tests/adapters --ignore=tests/harness --ignore-glob='tests/ops/test_console*.py' \
	--ignore-glob='tests/ops/test_ops_cli*.py'

test-compiled: $(CSTAMP)
	@sh scripts/bootstrap.sh redis
	@sh scripts/bootstrap.sh test-tools
	@sh scripts/bootstrap.sh monitoring
	@sh scripts/bootstrap.sh deploy-tools
	EXPECT_COMPILED=1 $(CBIN)/python -m pytest $(COMPILED_LEAVES_OUT) $(PYTEST_ARGS)

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
	$(BIN)/ruff check proxy adapters tests examples bench scripts
	$(BIN)/ruff format --check proxy adapters tests examples bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/locks.py check
	$(BIN)/python scripts/audit.py requirements/*.txt

audit: $(STAMP)
	$(BIN)/python scripts/audit.py --strict requirements/*.txt

# The newest versions the ranges in pyproject.toml allow, for every install set.
lock:
	@sh scripts/bootstrap.sh venv "$(PYTHON)" "$(VENV)"
	@sh scripts/bootstrap.sh uv "$(VENV)"
	$(PYTHON) scripts/locks.py compile --upgrade $(VENV)/.uv/bin/uv

# Built from the lock's build backend (no isolation), then checked; the mypyc-compiled
# platform wheel where a C compiler and Python's headers are present.
dist: $(STAMP)
	rm -rf dist build/compiled
	$(BIN)/python -m build --no-isolation --outdir dist .
	@if sh scripts/bootstrap.sh has-compiler $(BIN)/python; then \
		IDEMPROXY_COMPILE=1 $(BIN)/python -m build --no-isolation --wheel --outdir dist . ; \
	else echo "dist: no C compiler or Python headers here: the pure wheel only"; fi
	$(BIN)/python -m twine check --strict dist/*
	@ls -l dist

format: $(STAMP)
	$(BIN)/ruff format proxy adapters tests examples bench scripts
	$(BIN)/ruff check --fix proxy adapters tests examples bench scripts

clean:
	rm -rf $(VENV) $(COMPILED_VENV) $(RUN_VENV) build dist .idemproxy .pytest_cache .mypy_cache .ruff_cache *.egg-info
