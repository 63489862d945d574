# Everything a fresh machine needs: `make run` runs the service, `make test` runs the tests.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench

$(BIN)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m worker dev

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(BIN)/.installed lint
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python -m bench
