PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: demo demo-net test install proto bench clean deps-net fuzz fuzz-ci mutation chaos soak

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(TSTAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vfkeep demo

# Real ping and TCP from a guest network namespace across every servicing path (root).
demo-net: $(STAMP) deps-net
	$(VENV)/bin/vfkeep demo --network

test: $(TSTAMP) deps-net
	$(PY) -m pytest -q

# Debian packages the guest network (`vfkeep run --guest netns`, `make demo-net`) and its tests need:
# iproute2 (ip, ss) and iputils-ping. Only as root and only what is missing; without root nothing is
# installed and those tests skip, saying they need root (CAP_NET_ADMIN).
NET_TOOLS := ip:iproute2 ping:iputils-ping
deps-net:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for t in $(NET_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "deps-net: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	fi

# Regenerate the committed protobuf modules from vfkeep/proto/*.proto.
proto: $(TSTAMP)
	$(PY) -m vfkeep.proto.generate

# Do the tests bite? Named breaks of critical behaviours, one at a time on a copy of the tree (tests/mutation.py).
mutation: $(TSTAMP)
	$(PY) tests/mutation.py

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Structure-aware saved-state fuzzing (issue 15 item 3; tests/saved_state_fuzz.py): mutated ServicingState blobs
# restored in-process against the MANA and NVMe emulators; prints count, rate and every crash or violation, and
# fails on any. `fuzz` is the campaign (100,000 cases), `fuzz-ci` the 10,000-case slice .ci/run runs.
FUZZ_JOBS ?= 2
fuzz: $(TSTAMP)
	$(PY) tests/saved_state_fuzz.py --cases 100000 --seed 1 --jobs $(FUZZ_JOBS)

fuzz-ci: $(TSTAMP)
	$(PY) tests/saved_state_fuzz.py --cases 10000 --seed 1 --jobs $(FUZZ_JOBS)

# Reliability campaign (issue 15): 100 servicings under random faults (seed 1), every invariant checked after
# each; exit 1 on any violation (report: chaos-report.json). The suite runs a shorter seeded slice.
CHAOS_SERVICINGS ?= 100
CHAOS_SEED ?= 1
chaos: $(STAMP)
	$(VENV)/bin/vfkeep chaos --servicings $(CHAOS_SERVICINGS) --seed $(CHAOS_SEED) --json chaos-report.json

# Leak soak: SOAK_SERVICINGS consecutive keepalive servicings on one host, then the pool, worker RAM, processes and
# fds must be as before (tests/test_servicing_soak.py; the suite runs 8).
SOAK_SERVICINGS ?= 50
soak: $(TSTAMP)
	VFKEEP_SOAK_SERVICINGS=$(SOAK_SERVICINGS) $(PY) -m pytest -q -p no:cacheprovider \
	  tests/test_servicing_soak.py::test_keepalive_servicings_no_leaks

clean:
	rm -rf $(VENV) build *.egg-info demo-report chaos-report.json
