# The two commands a newcomer needs: `make run` and `make test`. Everything else is a helper for them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint format clean reset bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Two installs, each redone only when its requirements change: `run` needs only requirements.txt; `test`,
# `lint` and `format` need the test tools of requirements-dev.txt too (Playwright, schemathesis, ruff, ...).
# pip shows its progress rather than a silent terminal: a first install takes a while on a slow network.
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check --progress-bar on

$(VENV)/.installed-run: requirements.txt | $(BIN)/python
	@echo "Installing runtime dependencies into $(VENV) (first run only, under a minute on a good network)..."
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PIP_INSTALL) -r requirements.txt
	@touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	@echo "Installing runtime and test dependencies into $(VENV) (first time only, a minute or two)..."
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PIP_INSTALL) -r requirements-dev.txt
	@touch $@

# Options of the local Clerk stand-in under `make run` (python -m clerk_standin --help); scripts/dev.py adds
# the host and port. RUN_ARGS goes to scripts/dev.py itself, e.g. RUN_ARGS="--port 5050 --standin-port 5051".
# The stand-in keeps its users and sessions in a state file next to its key, as the app keeps its accounts
# in instance/iris.sqlite3: a restart keeps the two sides of every registration together.
STANDIN_ARGS := --key-file instance/clerk-standin-key.pem --state-file instance/clerk-standin-state.json
RUN_ARGS :=

## run: serve on http://127.0.0.1:5000 (development defaults unless .env says otherwise), with the
## local Clerk stand-in on http://127.0.0.1:5001; Ctrl-C or TERM stops both (scripts/dev.py)
run: $(VENV)/.installed-run
	@$(BIN)/python scripts/dev.py $(RUN_ARGS) -- $(STANDIN_ARGS)

# Clerk's own @clerk/backend, pinned by tests/node/package-lock.json, judges the stand-in's handshake
# (tests/test_standin_handshake.py). Installed again only when the lock changes; without npm that test skips
# (and fails in CI, where .ci/run needs Node.js 20 and npm on the machine).
NODE_CHECK := tests/node/node_modules/.package-lock.json
$(NODE_CHECK): tests/node/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/node --no-audit --no-fund; \
	else echo "npm not found: tests/test_standin_handshake.py's check by Clerk's own code will skip"; fi

## test: the whole suite against real PostgreSQL (TEST_DATABASE_URL overrides 127.0.0.1:5432)
test: $(VENV)/.installed-dev $(NODE_CHECK)
	$(BIN)/python -m pytest

## test-fast: the suite without the tests marked slow (drills, schemathesis, real servers), while working
test-fast: $(VENV)/.installed-dev $(NODE_CHECK)
	$(BIN)/python -m pytest -m "not slow"

## lint: ruff lint and format check, as CI runs them
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## bench: the benchmark (docs/performance.md): wrk straight at gunicorn and through nginx, with
## gunicorn.conf.py; needs PostgreSQL on 127.0.0.1:5432, wrk and nginx; about three minutes
bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## reset: start `make run` afresh (stop it first): removes the development database and the stand-in's
## users, sessions and signing key, so every cookie or token made before no longer verifies
DEV_STATE := instance/iris.sqlite3 instance/iris.sqlite3-journal instance/iris.sqlite3-wal \
	instance/iris.sqlite3-shm instance/clerk-standin-state.json instance/clerk-standin-key.pem
reset:
	@removed=0; for file in $(DEV_STATE); do \
		if [ -e "$$file" ]; then rm -f "$$file" && echo "removed $$file" && removed=1; fi; \
	done; [ $$removed = 1 ] || echo "nothing to remove: instance/ holds no development state"

clean:
	rm -rf $(VENV) instance .pytest_cache tests/node/node_modules
