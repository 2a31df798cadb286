# One entry point for humans and CI. `make demo` and `make test` work on a fresh machine
# that has Python >= 3.11 and a RabbitMQ broker (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration lint typecheck bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/memory-worker demo

# The tests marked `slow` (the ten-minute outage test) mostly wait, so they run beside the
# rest of the suite; their output is printed once both are done, and either failing fails
# the target.
SLOW_LOG := $(VENV)/slow-tests.log

test: lint typecheck
	@$(BIN)/pytest -q -s -p no:cacheprovider -m slow > $(SLOW_LOG) 2>&1 & slow=$$!; \
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"; suite=$$?; \
	echo "waiting for the slow tests (a ten-minute outage)..."; wait $$slow; long=$$?; \
	grep -v '^{' $(SLOW_LOG) | tail -n 20; \
	test $$suite -eq 0 && test $$long -eq 0

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

lint: $(STAMP)
	$(BIN)/ruff check worker tests loadtest
	$(BIN)/ruff format --check worker tests loadtest

typecheck: $(STAMP)
	$(BIN)/mypy worker

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench all

bench-quick: $(STAMP)
	$(BIN)/python -m loadtest.bench all --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
