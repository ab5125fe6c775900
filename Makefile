# tickbridge: every target installs what it needs first (scripts/deps.sh is idempotent and quick).
SHELL := /bin/bash
PY := .venv/bin/python
RATE ?= 10000
DURATION ?= 60
SOURCE ?= sim
#: Exchanges beside Binance for `make demo` (issue 18), e.g. VENUES=coinbase,kraken.
VENUES ?=
#: `make load-test EXCHANGES=3` (or binance_spot,coinbase,kraken): every exchange at RATE trades/s.
EXCHANGES ?= 1
#: The fast suite's selection (make test-fast, and make test-pythons in each other Python).
FAST_MARKERS := not slow and not chaos and not load
#: pytest-xdist workers of `make test`: each test file runs whole on one worker (its servers on that worker's
#: share of the ports). Most of the suite waits on real servers and faults, so two workers on two cores take
#: ~8 min for what took ~13 in one process. The 7 tests marked `alone` (a sub-second freshness bound, a rate
#: under load) run after that, one at a time (~3 min): beside another heavy test one missed its 1 s p99 by 36 ms.
#: TEST_WORKERS=0 runs the first part in one process too.
TEST_WORKERS ?= 2
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: help deps lint typecheck test test-fast test-pythons demo bench bench-collector bench-forwarder bench-brain \
        load-test chaos-test fuzz certs secrets clean

help:
	@echo "make demo        full VPS + Brain pipeline on this machine with a live status (SOURCE=binance for the real exchange;"
	@echo "                 VENUES=coinbase,kraken adds their simulators and each its own collector, forwarder, consumer)"
	@echo "make test        the whole test suite (unit, integration with real servers, chaos and load smokes;"
	@echo "                 on two pytest workers, then the tests marked alone one at a time; TEST_WORKERS=0: one process)"
	@echo "make test-fast   the suite without the slow, chaos and load tests"
	@echo "make test-pythons   install and run the fast suite under Python 3.12 and 3.13 too (PYTHONS=\"3.12 3.13\")"
	@echo "make bench       all benchmarks (bench-collector, bench-forwarder, bench-brain)"
	@echo "make load-test RATE=10000 DURATION=60   end-to-end load test with a report under docs/results/"
	@echo "                 EXCHANGES=3 SYMBOLS=150 RATE=1200: Binance, Coinbase and Kraken at RATE each (issue 18)"
	@echo "make chaos-test  every fault scenario with the zero-loss/zero-duplicate oracle"
	@echo "make fuzz        longer fuzz run of the parsers and the stream decoder"
	@echo "make certs       private CA, server and client certificates for the VPS->Brain TLS link"
	@echo "make secrets HOST=vps|brain   the compose secrets of that host under secrets/ (one file per password)"

deps:
	@bash scripts/deps.sh

lint: deps
	$(PY) -m ruff check services tests
	$(PY) -m ruff format --check services tests

typecheck: deps
	$(PY) -m mypy

test: deps lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not alone"
	$(PY) -m pytest -q -p no:cacheprovider -m alone

test-fast: deps
	$(PY) -m pytest -q -p no:cacheprovider -m "$(FAST_MARKERS)"

test-pythons: deps
	FAST_MARKERS="$(FAST_MARKERS)" bash scripts/test-pythons.sh

demo: deps
	$(PY) -m tickbridge_dev.devstack.demo --source $(SOURCE) --venues "$(VENUES)" $(DEMO_ARGS)

bench: bench-collector bench-forwarder bench-brain

bench-collector: deps
	$(PY) -m tickbridge_dev.bench.collector

bench-forwarder: deps
	$(PY) -m tickbridge_dev.bench.forwarder

bench-brain: deps
	$(PY) -m tickbridge_dev.bench.brain

load-test: deps
	if [ "$(EXCHANGES)" = "1" ]; then $(PY) -m tickbridge_dev.devstack.loadtest --rate $(RATE) --duration $(DURATION); \
	else $(PY) -m tickbridge_dev.devstack.venueload --exchanges $(EXCHANGES) --rate $(RATE) --duration $(DURATION) \
	  $(if $(SYMBOLS),--symbols $(SYMBOLS)); fi

chaos-test: deps
	$(PY) -m tickbridge_dev.devstack.chaos

fuzz: deps
	$(PY) -m pytest -q -p no:cacheprovider tests -k fuzz --hypothesis-profile=long

certs: deps
	bash scripts/certs.sh

secrets:
	bash scripts/secrets.sh $(HOST)

clean:
	rm -rf .venv .venv-3.* .cache .mypy_cache .ruff_cache
