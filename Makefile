# cm — see README.md. `make demo` and `make test` are the two commands a new user runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FERRETDB := .build/bin/cm-ferretdb
NODES ?= 4
PARTITIONS ?=
COMPOSE := docker compose

.PHONY: all up setup demo test soak bench local-up local-down exec-head stop clean

all: up

# The Docker cluster: head, 2 gpu + 2 cpu compute nodes, MongoDB.
up:
	@if ! docker info >/dev/null 2>&1; then \
	  echo "no Docker engine here: run 'make local-up' for the same cluster as local processes"; exit 0; fi; \
	mkdir -p drive/run/docker drive/db/mongo drive/data/gpu drive/data/cpu drive/home && \
	$(COMPOSE) up -d --build --scale computenode-gpu=2 --scale computenode-cpu=2

exec-head:
	$(COMPOSE) exec headnode bash

stop:
	$(COMPOSE) down

setup: $(STAMP) db-server

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# The embedded MongoDB-compatible server, unless a real one is at hand.
.PHONY: db-server
db-server:
	@if [ -n "$$MONGODB_URI" ]; then echo "database: MONGODB_URI=$$MONGODB_URI"; \
	elif command -v mongod >/dev/null 2>&1; then echo "database: $$(command -v mongod)"; \
	else bash cm/cluster/ferretdb/build.sh; fi

local-up: setup
	$(PY) -m cm.cluster.local up --nodes $(NODES) $(if $(PARTITIONS),--partitions $(PARTITIONS)) $(if $(filter-out 0 no false,$(NETNS)),--netns)

local-down:
	@if [ -x $(PY) ]; then $(PY) -m cm.cluster.local down; else echo "nothing to stop"; fi

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The model-based test with random seeds (each printed, so a failure can be replayed with
# CM_MODEL_SEED=N) for SOAK_SECONDS; a failure prints the shortest sequence that reproduces it.
SOAK_SECONDS ?= 900
soak: setup
	CM_MODEL_SOAK=1 CM_MODEL_SECONDS=$(SOAK_SECONDS) CM_MODEL_OPS=$${CM_MODEL_OPS:-120} \
	  $(PY) -m pytest -q -s -p no:cacheprovider --timeout=0 tests/test_model.py -k keeps_its_promises

bench: setup
	$(PY) bench/bench_sched.py
	$(PY) bench/bench_sync.py
	$(PY) bench/bench_scale.py

clean: local-down
	rm -rf .build $(VENV) drive/run
