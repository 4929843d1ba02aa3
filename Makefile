# StyleRec developer commands. `make demo` and `make test` set up what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := requirements.txt requirements-nodeps.txt pyproject.toml scripts/setup.sh $(wildcard protos/stylerec/v1/*.proto)

.PHONY: setup up down status demo demo-check test test-reliability lint bench load eval clean

$(STAMP): $(SETUP_INPUTS)
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

up: setup
	$(VENV)/bin/stylerec up

down:
	@if [ -x $(VENV)/bin/stylerec ]; then $(VENV)/bin/stylerec down; fi

status: setup
	$(VENV)/bin/stylerec status

demo: setup
	$(PY) -m cli.demo

# Re-check out/demo/index.html (links, stylized images) and re-take out/demo/screenshot.png.
demo-check: setup
	$(PY) -m cli.demo.check

test: setup
	$(PY) -m pytest -q -ra --durations=15

# Fault injection only (docs/reliability.md): components SIGKILLed and restarted under load; also part of `make test`.
test-reliability: setup
	$(PY) -m pytest -q -ra tests/reliability

# Heavier than `make test`: every benchmark (JSON under out/bench/), a 2-minute load run
# (out/bench/load/), then the table of all of them (out/bench/summary.md), ~15 minutes on 2 cores.
# A failing benchmark does not stop the others ('-'); the table shows its errors or unmet goals, and
# `bench summary` exits 1 when a benchmark's JSON is missing (each input's write time is listed).
bench: setup
	-$(VENV)/bin/stylerec bench ingest
	-$(VENV)/bin/stylerec bench scoring
	-$(VENV)/bin/stylerec bench style
	-$(VENV)/bin/stylerec bench gateway
	-$(VENV)/bin/stylerec bench load --minutes 2 --step-seconds 5 --out-dir out/bench/load
	$(VENV)/bin/stylerec bench summary

# Max sustainable throughput, then a 10-minute open-loop soak at 70% of it (out/load/), ~13 minutes.
load: setup
	$(VENV)/bin/stylerec bench load --minutes 10

# Offline quality: CF accuracy (out/eval/), style-transfer quality (out/style-eval/), the λ experiment.
eval: setup
	$(VENV)/bin/stylerec eval ml-100k
	$(VENV)/bin/stylerec eval online-retail
	$(VENV)/bin/stylerec style-eval --json
	$(VENV)/bin/stylerec experiment style-lambda

lint: setup
	$(VENV)/bin/ruff check cli libs services tests scripts deploy
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy scripts deploy/grafana

clean: down
	rm -rf gen out .pytest_cache .mypy_cache .ruff_cache
