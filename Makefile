# One entry point for humans and CI. `make demo` and `make test` work on a fresh machine
# that has Python >= 3.11 and a RabbitMQ broker (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact versions of the dev environment, the ones the suite passed with: the install
# takes them as constraints, so a fresh clone gets them too. `make lock` regenerates it.
LOCK := requirements/dev.lock

.PHONY: install lock demo test test-rabbitmq4 rabbitmq4 promtool check-rules dashboard-png unit \
	integration lint typecheck bench bench-quick clean chromium test-browser console-screenshots

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# Resolve '.[dev,bench]' afresh in a throwaway venv (the newest versions pyproject.toml
# allows) and write them to $(LOCK); run `make test` before committing the new lock.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && \
	"$$tmp/bin/pip" install --quiet --upgrade pip && \
	"$$tmp/bin/pip" install --quiet -e '.[dev,bench]' && \
	{ printf '%s\n' \
	  "# The dev environment's exact versions (Python $$("$$tmp/bin/python" -c 'import platform; print(platform.python_version())'), $$(uname -sm))." \
	  "# make install uses them as constraints: pip install -c $(LOCK) -e '.[dev,bench]'." \
	  "# Regenerate with make lock (resolves pyproject.toml afresh), then run make test." && \
	  "$$tmp/bin/pip" freeze --exclude-editable; } > $(LOCK).new && \
	mv $(LOCK).new $(LOCK) && echo "wrote $(LOCK)"

demo: $(STAMP)
	$(BIN)/memory-worker demo

# The tests marked `slow` (the ten-minute outage test) mostly wait, so they run beside the
# rest of the suite; once both are done their summary (the outage test's ledger) is printed,
# or the end of their log when they failed; either failing fails the target.
SLOW_LOG := $(VENV)/slow-tests.log

test: lint typecheck
	@$(BIN)/pytest -q -s -p no:cacheprovider -m slow > $(SLOW_LOG) 2>&1 & slow=$$!; \
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"; suite=$$?; \
	echo "waiting for the slow tests (a ten-minute outage)..."; wait $$slow; long=$$?; \
	if [ $$long -eq 0 ]; then grep -E -o 'outage [0-9]+ s: .*|outage ledger: .*|[0-9]+ passed.*' $(SLOW_LOG); \
	else grep -v '^{' $(SLOW_LOG) | tail -n 40; fi; \
	test $$suite -eq 0 && test $$long -eq 0

# The integration and fault suites once more, on a private RabbitMQ 4.3 node instead of the
# machine's broker (README, Development). The first run prepares 4.3 from Debian's packages
# into ~/.cache/memory-worker/rabbitmq-4.3 (or $MEMORY_WORKER_RABBITMQ4_DIR); the ten-minute
# outage test stays out unless asked for: `make test-rabbitmq4 RABBITMQ4_MARK=slow`.
RABBITMQ4_MARK ?= not slow

rabbitmq4:
	tests/rabbitmq4/prepare.sh

test-rabbitmq4: $(STAMP) rabbitmq4
	MEMORY_WORKER_TEST_RABBITMQ=4.3 $(BIN)/pytest -q -p no:cacheprovider -m "$(RABBITMQ4_MARK)" \
	  tests/integration tests/faults

# promtool from Debian's prometheus package, unpacked into ~/.cache/memory-worker/promtool
# (or $MEMORY_WORKER_PROMTOOL_DIR); tests/unit/test_deploy.py uses it and fails without it in CI.
promtool:
	tests/promtool/prepare.sh

PROMTOOL = $$(tests/promtool/prepare.sh 2>/dev/null)

check-rules: promtool
	$(PROMTOOL) check rules deploy/prometheus/memory-worker.rules.yml
	$(PROMTOOL) test rules deploy/prometheus/memory-worker.rules.test.yml
	$(PROMTOOL) check config deploy/prometheus/prometheus.yml

# The README's picture of the dashboard's layout, drawn from the dashboard JSON.
dashboard-png: $(STAMP)
	$(BIN)/python deploy/grafana/render_layout.py

# Debian's Chromium, unpacked into ~/.cache/memory-worker/chromium (or
# $MEMORY_WORKER_CHROMIUM_DIR) for the console's browser tests, which fail without it in CI.
chromium:
	tests/browser/prepare.sh

test-browser: $(STAMP) chromium
	$(BIN)/pytest -q -p no:cacheprovider tests/browser

# The README's pictures of the console (docs/console-*.png), taken in headless Chromium from
# a console on a worker, the stand-in and valid and broken items on the local broker.
console-screenshots: $(STAMP) chromium
	$(BIN)/python -m tests.browser.screenshots

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

lint: $(STAMP)
	$(BIN)/ruff check worker tests loadtest deploy
	$(BIN)/ruff format --check worker tests loadtest deploy

typecheck: $(STAMP)
	$(BIN)/mypy worker

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench all

bench-quick: $(STAMP)
	$(BIN)/python -m loadtest.bench all --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
