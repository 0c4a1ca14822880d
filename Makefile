# The two commands of the README: `make demo` and `make test`. Every target
# first runs the idempotent bootstrap (Redis and HAProxy from Debian, .venv).
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: bootstrap demo test lint bench bench-quick clean

bootstrap:
	@./scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/oddsgate demo $(DEMO_ARGS)

test: bootstrap
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: bootstrap
	$(VENV)/bin/ruff check .

bench: bootstrap
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: bootstrap
	$(PY) -m bench --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
