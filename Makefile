# Two commands do all the set-up: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: install prometheus serve test lint typecheck protos bench fuzz models clean

install: $(STAMP) prometheus

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[server,dev]'
	touch $(STAMP)

# Debian's `prometheus` package (with `promtool`) for tests/test_prometheus.py, which scrapes a
# real server and evaluates the dashboard's and the alert rules' queries. Costs nothing when both
# are on PATH; needs apt-get as root (or password-less sudo); never fatal (the test then skips).
# The package does not start a Prometheus by itself.
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || (sudo -n true 2>/dev/null && echo sudo apt-get))
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ -z "$(APT)" ] || ! command -v apt-get >/dev/null; then \
	  echo "note: prometheus not installed (needs apt-get as root); its test will skip"; \
	else \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(APT) install -y --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { $(APT) update -qq && $(APT) install -y --no-install-recommends prometheus >/dev/null; } || \
	  echo "note: could not install prometheus with apt-get; its test will skip"; \
	fi

serve: install
	$(VENV)/bin/sidelight serve --models examples/models

test: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q

protos: install
	$(PY) protos/generate.py

models: install
	$(PY) examples/build_models.py

bench: install
	$(PY) -m benchmarks.run

# 10,000 random and malformed requests over every RPC; per-status counts into docs/benchmarks.md.
fuzz: install
	$(PY) -m benchmarks.fuzz --count 10000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
