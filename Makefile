# Two commands matter: `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the test suite needs: binary name (or file) -> package name.
TEST_TOOLS := redis-server:redis-server chromium:chromium \
	/usr/share/fonts/truetype/wqy/wqy-microhei.ttc:fonts-wqy-microhei \
	turnserver:coturn certutil:libnss3-tools openssl:openssl \
	/usr/sbin/nginx:nginx

.PHONY: run test lint typecheck pytest venv dev-venv system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev-venv: $(VENV)/.installed-dev

run: venv
	$(BIN)/telemed db upgrade
	$(BIN)/telemed serve --dev

# Installs what the tests need from Debian when it is missing and we may (root).
system-deps:
	@missing=""; for pair in $(TEST_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || test -e $$tool || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run as root or install them)" >&2; exit 1; fi; \
	fi

lint: dev-venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: dev-venv
	$(BIN)/mypy

# Browser and network-lab tests run on their own, in a network namespace with only loopback
# (root, or an unprivileged user namespace), so Chromium offers no other interface's addresses
# and the lab (tests/netlab) adds its devices to no network of the machine's.
pytest: dev-venv system-deps
	$(BIN)/pytest -q -m "not browser and not lab"
	if [ "$$(id -u)" = 0 ]; then ns="unshare --net"; else ns="unshare -rn"; fi; \
	$$ns sh -c 'ip link set lo up && exec $(BIN)/pytest -q -m "browser or lab" tests/browser tests/lab'

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
