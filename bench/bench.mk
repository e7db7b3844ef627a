# Benchmarks built on the `bench` load generator (python -m bench --help). Each prints its tables
# and writes JSON under bench-results/ (git-ignored). Included by the Makefile.
BENCH_ARGS ?=

.PHONY: bench-routing bench-pools bench-run

bench-routing: setup ## Scheduling profiles vs round-robin on the workload matrix in the simulator (TTFT at 80% load, sustainable rate at p99 SLO, hit rate vs oracle and capacity bound; --mode live for samples on a mesh) (3 seeds per workload: about an hour on 2 cores; --seeds 1 for a quick look)
	$(PY) -m bench routing $(BENCH_ARGS)

bench-pools: setup ## Shared pool vs short/long pools on a mixed long/short workload at 80% load: short p50/p99 TTFT, long goodput (simulator, seconds; --mode live on a mesh)
	$(PY) -m bench pools $(BENCH_ARGS)

bench-run: setup ## Replay a workload against a running mesh: make bench-run BENCH_ARGS="--workload mooncake ..."
	$(PY) -m bench run --gateway $(GATEWAY) $(BENCH_ARGS)

.PHONY: bench-registry

bench-registry: setup ## kv_registry core in-process: lookup latency, ingest rate, memory at 1M blocks x 16 replicas vs the previous core (~3 min)
	$(PY) -m bench.registry $(BENCH_ARGS)

.PHONY: bench-gateway

bench-gateway: setup ## Gateway fronts: OpenAI HTTP (SSE) vs gRPC vs Triton direct: added TTFT, tokens/s, gateway CPU per token (1/32 streams, ~1 min)
	$(PY) -m bench.gateway $(BENCH_ARGS)

.PHONY: bench-autoscale

bench-autoscale: setup ## Static-for-peak vs autoscaler (local actuator) on a compressed day of the Azure trace: replica-seconds, TTFT-SLO, scale events, PNG (~16 min)
	$(PY) -m bench.autoscale $(BENCH_ARGS)

.PHONY: bench-chaos

bench-chaos: setup ## Chaos: kill a replica / backend stub / orchestrator(s) / kv_registry / gateway, drain a replica under 200 greedy streams; lost & duplicated tokens vs a reference run, failures, TTFT, stalls, time back in rotation, PNG (~10 min)
	$(PY) -m bench.chaos $(BENCH_ARGS)

.PHONY: bench-overload

bench-overload: setup ## Overload: capacity (p99 TTFT <= 2 s), then 1/2/5/10x capacity open loop (20/60/20% interactive/standard/batch), without and with retry-after-honouring clients: goodput, refusals, TTFT per priority, RSS, engine deaths, PNG (~15 min; BENCH_ARGS="--step-s 20" for a short run)
	$(PY) -m bench.overload $(BENCH_ARGS)

.PHONY: bench-burst

bench-burst: setup ## The overload issue's reproduction: 100/400/1000 requests at once on 2 emulator replicas (shipped settings): served, refusals (retry-after), streams cut, engine deaths, recovery (~3 min)
	$(PY) -m bench.burst $(BENCH_ARGS)

.PHONY: bench-sim-fidelity bench-sim-scale

bench-sim-fidelity: setup ## Simulator vs live local mesh: shared-prefix + Mooncake sample, 4 replicas, round-robin and default, 3 live runs each, and an autoscaled compressed Azure day; TTFT, throughput, hit rate, replica-seconds side by side (~15 min)
	$(PY) -m bench.sim_fidelity $(BENCH_ARGS)

bench-sim-scale: setup ## Simulator at scale: full Mooncake and Azure traces at 32 and 256 replicas, Mooncake at 1000: CPU s and simulated events/s (~10 min)
	for w in mooncake azure; do for n in 32 256; do $(PY) -m llmmesh.sim --workload $$w --replicas $$n --profiles default --no-png --out sim-scale-$$w-$$n.json || exit 1; done; done
	$(PY) -m llmmesh.sim --workload mooncake --replicas 1000 --profiles default --no-png --out sim-scale-mooncake-1000.json

.PHONY: bench-envoy

bench-envoy: setup mesh-setup ## Envoy where Istio puts it (ingress, sidecars, mTLS) vs the direct mesh: added TTFT, Envoy CPU per token, gRPC and SSE (1/16 streams, ~2 min)
	$(PY) -m bench.envoy $(BENCH_ARGS)

.PHONY: bench-admit

bench-admit: setup ## Orchestrator alone: Admit decision latency (client and internal), CPU per decision, time per plugin; 16/64 emulated replicas, 1k/32k-token shared-prefix prompts, 100/500/1000 Admit/s open loop (~3 min)
	$(PY) -m bench.admit $(BENCH_ARGS)

.PHONY: bench-backlog

bench-backlog: setup ## Orchestrator in process while long requests queue for a full pool: CPU per short Admit and completion with 0/100/1000 queued, x the empty queue (~1 min)
	$(PY) -m bench.backlog $(BENCH_ARGS)

.PHONY: bench-coldpath

bench-coldpath: setup ## One request's gateway and orchestrator Python, in process on the mesh's CPU: hot (back to back) vs after 1/5/20/50 ms idle, with a pure-Python reference; the factor behind added TTFT at one stream (~1 min)
	$(PY) -m bench.coldpath $(BENCH_ARGS)
