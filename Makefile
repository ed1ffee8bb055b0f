# The two commands a newcomer needs: `make run` and `make test`. Everything else is a helper for them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

## run: serve on http://127.0.0.1:5000 (development defaults unless .env says otherwise), with the
## local Clerk stand-in on http://127.0.0.1:5001 (stopped again when the app stops)
run: $(VENV)/.installed
	FLASK_DEBUG=1 $(BIN)/flask db upgrade
	$(BIN)/python -m clerk_standin --host 127.0.0.1 --port 5001 \
		--key-file instance/clerk-standin-key.pem & standin=$$!; \
	trap 'kill $$standin 2>/dev/null' EXIT INT TERM; \
	FLASK_DEBUG=1 $(BIN)/flask run --host 127.0.0.1 --port 5000

## test: the whole suite against real PostgreSQL (TEST_DATABASE_URL overrides 127.0.0.1:5432)
test: $(VENV)/.installed
	$(BIN)/python -m pytest

## test-fast: the suite without the tests marked slow (drills, schemathesis, real servers), while working
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow"

## lint: ruff lint and format check, as CI runs them
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) instance .pytest_cache
