# LPMOS — see README.md.  `make demo` and `make test` install what they need.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
LPMOS := $(VENV)/bin/lpmos
STATE ?= /tmp/lpmos-run
PYTEST_ARGS ?=
LAB_WORKERS ?= 2

.PHONY: help setup test test-fast lint typecheck demo lab bench run run-regional run-agent deb clean

help:
	@echo "make demo        - everything on this machine: etcd, control plane, regional node, QEMU lab"
	@echo "make test        - the whole test suite (installs what it needs first)"
	@echo "make test-fast   - unit and integration tests only (no QEMU lab, no browser)"
	@echo "make lint        - ruff and mypy"
	@echo "make bench       - benchmarks side by side with dnsmasq and tftpd-hpa"
	@echo "make run         - control plane on 127.0.0.1:8080 (state in $(STATE))"
	@echo "make run-regional- regional node for IDC dc1 on loopback high ports"
	@echo "make run-agent   - agent against the local regional node"
	@echo "make deb         - the Debian package, in build/deb (docs/packaging.md)"

setup:
	@scripts/setup.sh all

# Two runs: everything but the QEMU lab, then the lab files in LAB_WORKERS
# pytest-xdist workers (--dist loadfile keeps a file's tests together), so the
# VMs of two files run side by side; fails when either run fails ("no tests
# collected", exit 5, is not a failure: PYTEST_ARGS may select one kind only).
test: setup lint
	@rc=0; \
	$(PY) -m pytest -m "not lab" $(PYTEST_ARGS) || rc=$$?; [ $$rc = 5 ] && rc=0; \
	$(PY) -m pytest -m lab -n $(LAB_WORKERS) --dist loadfile $(PYTEST_ARGS) || \
	  { r=$$?; [ $$r = 5 ] || rc=$$r; }; \
	exit $$rc

test-fast: setup
	$(PY) -m pytest -m "not lab and not browser and not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check $(wildcard lpmos bootsvc agent web lab tests bench images)
	$(VENV)/bin/mypy

demo: setup
	$(LPMOS) demo --state-dir $(STATE)

lab: setup
	$(LPMOS) demo --state-dir $(STATE) --lab-only

bench: setup
	$(PY) -m bench.all

run: setup
	$(LPMOS) control-plane --state-dir $(STATE)

run-regional: setup
	$(LPMOS) regional --state-dir $(STATE) --idc dc1 --listen 127.0.0.1 \
	  --dhcp-port 6767 --dhcp-proxy-port 4011 --tftp-port 6969 --http-port 8081

run-agent: setup
	$(LPMOS) agent --server http://127.0.0.1:8081 --state-dir $(STATE)/agent --no-reboot

deb:
	@scripts/setup.sh system
	packaging/build-deb.sh build/deb

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
