# fedpacs: `make demo` runs a local federation with real data; `make test` runs the tests.
# Both do all set-up on a fresh machine (virtual environment, pinned torch, fedpacs).
VENV ?= .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: setup system-deps demo demo-classification test lint bench clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(VENV)/.installed

# A real PACS for the tests: Debian's Orthanc (+ DICOMweb plugin) and dcmtk; iproute2's
# `ip` for the test hosts (network namespaces, tests/netns.py).
system-deps:
	@{ command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null && \
	  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && \
	  command -v dcmqrscp >/dev/null && \
	  { command -v ip || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ]; } >/dev/null || \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends orthanc orthanc-dicomweb dcmtk iproute2 )

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: the CPU wheel on this machine (a bare `torch` pulls CUDA)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/fedpacs demo --task hippocampus --sites 3 --rounds 5 --workdir runs/demo

demo-classification: setup
	$(VENV)/bin/fedpacs demo --classification --sites 3 --rounds 3 --workdir runs/demo-breast

test: setup system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy common server client deploy
	$(VENV)/bin/pytest -q --cov=fedpacs --cov-report=term:skip-covered

lint: setup
	$(VENV)/bin/ruff check .

bench: setup system-deps
	$(PY) bench/train_step.py
	$(PY) bench/ingest.py
	$(PY) bench/secagg.py
	$(PY) bench/round_overhead.py --json runs/bench/round_overhead.json
	$(PY) bench/many_sites.py --json runs/bench/many_sites.json
	$(PY) bench/zoo.py --json runs/bench/zoo.json
	$(PY) bench/zoo.py --hippocampus-recipe --json runs/bench/zoo-recipe.json
	$(PY) bench/transfer.py --json runs/bench/transfer.json
	$(PY) bench/memory.py
	$(PY) bench/accuracy.py --quick --json runs/bench/accuracy.json

clean:
	rm -rf runs .pytest_cache
