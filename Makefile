# cm — see README.md. `make demo` and `make test` are the two commands a new user runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FERRETDB := .build/bin/cm-ferretdb
NODES ?= 4
PARTITIONS ?=
# USER from the command line names a cluster user; the one in the environment (who runs make) does not
CM_USER := $(if $(filter command line,$(origin USER)),$(USER))

.PHONY: all up setup demo test mutants soak bench fuzz local-up local-down exec-head stop adduser engine clean dist wheelhouse dist-check

all: up

# The Docker cluster: the database, head, 2 gpu + 2 cpu compute nodes (docker/cluster.sh, docker-compose.yml).
# Without a Docker engine it says so in one line, points at `make engine` and `make local-up`, and fails
# (a script that runs `make` must not think the cluster is up).
up:
	@if ! timeout 20 docker info >/dev/null 2>&1; then \
	  echo "no Docker engine here: 'make engine' (root) installs and starts one, or 'make local-up' runs the same cluster as local processes" >&2; \
	  exit 1; fi; \
	bash docker/cluster.sh up

exec-head:
	@bash docker/cluster.sh exec $(CM_USER)

stop:
	@bash docker/cluster.sh stop

adduser:
	@bash docker/cluster.sh adduser $(CM_USER)

# Installs (Debian's docker.io, Compose v2 from its Go module) and starts a Docker engine here (root).
engine:
	@bash docker/engine.sh install
	@bash docker/engine.sh start

# Compiled modules: the commands load them (~10 ms less each start), and users cannot write them into this checkout.
setup: $(STAMP) db-server
	@$(PY) -m compileall -q cm >/dev/null

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat  # a path in a .pth: the import hook of the default mode costs every command ~10 ms
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
	$(PY) -m pytest -q -rs -p no:cacheprovider

# Breaks the code on purpose, one breakage of scripts/mutants.toml at a time in a scratch copy, and fails
# when the tests that claim a row of docs/RELIABILITY.md or docs/SECURITY.md do not notice (long: not in `make test`).
mutants: setup
	$(PY) scripts/mutants.py $(if $(MUTANTS),--only '$(MUTANTS)')

# The fuzz tests of `make test`, many more examples from a random seed (printed: replay with CM_FUZZ_SEED=N).
FUZZ_EXAMPLES ?= 3000
fuzz: setup
	@seed=$${CM_FUZZ_SEED:-$$RANDOM}; echo "fuzz seed $$seed ($(FUZZ_EXAMPLES) examples per door)"; \
	CM_FUZZ_SEED=$$seed CM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# The model-based test with random seeds (each printed, so a failure can be replayed with
# CM_MODEL_SEED=N) for SOAK_SECONDS; a failure prints the shortest sequence that reproduces it.
SOAK_SECONDS ?= 900
soak: setup
	CM_MODEL_SOAK=1 CM_MODEL_SECONDS=$(SOAK_SECONDS) CM_MODEL_OPS=$${CM_MODEL_OPS:-120} \
	  $(PY) -m pytest -q -s -p no:cacheprovider --timeout=0 tests/test_model.py -k keeps_its_promises

# bench_peers and bench_slurm apt-get install their peers (fpart, rclone, slurm-wlm, munge) when missing
# and report any they cannot have. BENCH_QUICK=1: small data, one run (a short check).
bench: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/bench_commands.py
	$(PY) bench/bench_sched.py
	$(PY) bench/bench_sync.py
	$(PY) bench/bench_datapath.py
	$(PY) bench/bench_sparse.py
	$(PY) bench/bench_scale.py
	$(PY) bench/bench_intercom.py
	$(PY) bench/bench_slurm.py
	$(PY) bench/bench_peers.py $(if $(filter-out 0 no false,$(BENCH_QUICK)),--quick --out /tmp/cm-bench-peers-quick.json)
	$(PY) bench/plot.py $(if $(filter-out 0 no false,$(BENCH_QUICK)),/tmp/cm-bench-peers-quick.json /tmp/cm-benchmarks-quick.png)
	$(PY) bench/bench_many.py $(if $(filter-out 0 no false,$(BENCH_QUICK)),--files 20000 --reps 1)
	$(PY) bench/bench_api.py
	$(PY) bench/bench_ui.py
	$(PY) bench/bench_waits.py

# A site's machines (docs/DEPLOY.md): cm's wheel and sdist in dist/; `make wheelhouse` adds its dependencies'
# wheels in dist/wheelhouse, so `pip install --no-index --find-links dist/wheelhouse dist/cm-*.whl` needs no
# network. The embedded database server is not in the wheel: `cmdaemon db` says how to build it.
dist: $(STAMP)
	@$(PY) -c 'import build.__main__' 2>/dev/null || $(PY) -m pip install -q build
	rm -rf dist/cm-*.whl dist/cm-*.tar.gz
	$(PY) -m build -q --outdir dist . >/dev/null; rm -rf build  # setuptools leaves build/ here
	@ls dist/cm-*

wheelhouse: dist
	$(PY) -m pip wheel -q -w dist/wheelhouse dist/cm-*.whl

# the wheel installed offline into a fresh venv, as docs/DEPLOY.md does (scripts/check_dist.sh)
dist-check: wheelhouse
	bash scripts/check_dist.sh

clean: local-down
	rm -rf .build $(VENV) drive/run dist
