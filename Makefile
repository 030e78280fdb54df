# The workspace's commands. `make help` lists them. Variables pass through to every stage:
#   CONFIG=configs/pipeline.yaml  PROFILE=cpu_tiny  SET="finetune.lora_rank=16 finetune.max_steps=50"  GPU=1
SHELL := /bin/bash
PY3   ?= python3
VENV  := .venv
PY    := $(VENV)/bin/python
CONFIG ?= configs/pipeline.yaml
PROFILE ?=
SET ?=
GPU ?= 0
CFG_ARGS := --config $(CONFIG) $(if $(PROFILE),--profile $(PROFILE)) $(foreach s,$(SET),--set $(s))

ORCH_PORT ?= 4200
UI_PORT ?= 5000
DEPLOYMENT ?= pipeline/default
PARAMS ?=

.PHONY: help setup envs gpu-kit gpu-smoke lock plan base-model rebuild-base-model data doctor test test-fast bench-model-key bench-plan bench-tests pipeline prepare finetune finetune-worker eval gate promote card harvest loop leaderboard rollback serve gateway token rag ask bench bench-prepare bench-finetune bench-eval bench-loop bench-rag bench-serve bench-gateway bench-pipeline bench-gate bench-decoding calibrate-gate bench-pii clean-models ui prefect-ui prefect-up prefect-down prefect-status deploy-run monitoring rehearse-team

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: envs base-model  ## build the venvs from requirements/*.lock (idempotent; GPU=1 adds the CUDA ones) and the base model if missing

envs:  ## the virtual environments only: workspace, train, serve (GPU=1: also .venv-train-gpu, .venv-serve-gpu)
	@GPU=$(GPU) $(PY3) workspace/setup_env.py

gpu-kit: envs  ## the wheels the lent GPU machine lacks for cuda_tiny, in .gpu-kit/ (LOCK=1 re-closes requirements/gpu-kit.in first); checks size and consistency
	@$(PY) -m llmops gpu-kit $(if $(LOCK),--lock)

gpu-smoke:  ## the cuda_tiny path on one GPU in one command, report in OUT (default .cache/gpu-smoke); DEVICE=cpu: the rehearsal here (docs/gpu-servers.md)
	@bash benchmarks/gpu_smoke.sh $(or $(OUT),.cache/gpu-smoke) $(or $(DEVICE),cuda) $(ARGS)

lock: envs  ## compile requirements/{train,serve}-gpu.lock from their .in files (uv; Linux x86-64 / Python 3.11); CHECK=1 only checks
	@$(PY) -m llmops gpu-lock $(if $(CHECK),--check)

plan: setup  ## preflight PROFILE=<name>: configs, engine parsers, train/serve fit, hardware, hub fetches; NO_HW=1: no hardware check, QUICK=1: no parsers
	@$(PY) -m llmops plan $(CFG_ARGS) $(if $(NO_HW),--no-hardware-check) $(if $(QUICK),--no-engine-check)

base-model: envs  ## build models/base-tiny when missing or its build settings changed (FORCE does not rebuild it)
	@$(PY) -m llmops base-model $(CFG_ARGS)

rebuild-base-model: envs  ## rebuild models/base-tiny from scratch (~5 min on 2 cores; every cached result on it is redone)
	@$(PY) -m llmops base-model $(CFG_ARGS) --force

data:  ## regenerate the shipped data under data/raw from the seeded generators in data/datagen
	@$(PY3) -c "import sys; sys.path.insert(0, 'data'); import runpy; runpy.run_module('datagen', run_name='__main__')"

doctor: envs  ## check the three environments and engines for real; non-zero exit names what is broken
	@$(PY) -m llmops doctor

# test-fast: the tests that launch no engine, on two pytest-xdist workers that steal work (they wait on subprocesses
# and sockets more than they compute: 157 s instead of 224 s in one process on 2 cores).
# test: every test in one run, each worker and the engines it starts on a core of its own (LLMOPS_TEST_PIN=1,
# tests/pinning.py; unpinned, two workers ran the cold pipeline fixture past its timeout) and each test file on one
# worker (--dist loadgroup, tests/lanes.py: a file is a group, except files that share a server), the costliest
# first: the cold pipeline's file is the longest chain (about 11 min on its core), and the other worker runs
# everything else beside it, the fast files last. One run instead of the fast lane then the slow one: the fast
# tests fill the time the second worker used to idle at the end (docs/BENCHMARKS.md, tests). On a one-core machine
# TEST_WORKERS is 0: one process (nproc, with OMP_NUM_THREADS, which nproc would report instead, left out).
TEST_WORKERS ?= $(shell [ "$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)" -ge 2 ] && echo 2 || echo 0)
test-fast: setup  ## the inner loop: the import contracts and every test that launches no LLaMA-Factory or vLLM (2 workers)
	@$(VENV)/bin/lint-imports --no-cache
	@$(PY) -m pytest -m "not slow" -n 2 --dist worksteal $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: PYTEST_ARGS chose none here

test: setup  ## the import contracts, then every test in one run (real engines on tiny inputs), a file per worker
	@$(VENV)/bin/lint-imports --no-cache
	@LLMOPS_TEST_PIN=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) || [ $$? -eq 5 ]

pipeline: setup  ## the whole job (one Prefect flow): prepare -> finetune -> eval -> gate -> promote -> rag -> serve check; cached stages are skipped
	@$(PY) -m llmops pipeline $(CFG_ARGS) $(if $(FORCE),--force)

prepare: setup  ## validate, clean, mask and split data/raw into data/processed/<hash> (FORCE=1 redoes it)
	@$(PY) -m llmops prepare $(CFG_ARGS) $(if $(FORCE),--force)

finetune: setup  ## QLoRA/LoRA with LLaMA-Factory on the prepared data (resumes; skips when done; FORCE=1 retrains)
	@$(PY) -m llmops finetune $(CFG_ARGS) $(if $(FORCE),--force)

finetune-worker: setup  ## a NODE_RANK>0 host of a multi-host run (finetune.nnodes): train only; NODE_RANK, MASTER_ADDR set
	@$(PY) -m llmops finetune $(CFG_ARGS) --worker

eval: setup  ## KoBEST (lm-eval) + custom DeepEval metrics for base and candidate; report + MLflow runs
	@$(PY) -m llmops evaluate $(CFG_ARGS)

gate: setup  ## the gate only: candidate vs champion (or base), rule table; non-zero exit when it fails
	@$(PY) -m llmops promote $(CFG_ARGS) --gate-only

promote: setup  ## gate, then register the candidate in MLflow and move @champion (all or nothing); VERSION=n: promote a registered candidate (make loop's)
	@$(PY) -m llmops promote $(CFG_ARGS) $(if $(VERSION),--version $(VERSION))

card: envs  ## print the model card of a registered version: make card VERSION=n
	@$(PY) -m llmops promote $(CFG_ARGS) --card "$(VERSION)"

harvest: envs  ## export the gateway's ratings, corrections and arena votes to data/raw/feedback/<date>/ (SINCE=2026-11-01 or SINCE_VERSION=n)
	@$(PY) -m llmops harvest $(CFG_ARGS) $(if $(SINCE),--since $(SINCE)) $(if $(SINCE_VERSION),--since-version $(SINCE_VERSION))

leaderboard: setup  ## base model(s) + every registered version on identical items: KoBEST acc/F1 + custom metrics with intervals (Markdown, PNG, MLflow)
	@$(PY) -m llmops leaderboard $(CFG_ARGS)

loop: setup  ## harvest -> prepare -> DPO from the champion -> evaluate -> gate -> register as @candidate (the gateway's canary serves it)
	@$(PY) -m llmops loop $(CFG_ARGS) $(if $(SINCE),--since $(SINCE)) $(if $(FORCE),--force)

rollback: setup  ## move @champion back to @previous
	@$(PY) -m llmops promote $(CFG_ARGS) --rollback

serve: setup  ## serve models:/<name>@champion with vLLM on 127.0.0.1 until Ctrl-C (PORT=8000)
	@$(PY) -m llmops serve $(CFG_ARGS) $(if $(PORT),--port $(PORT))

rag: setup  ## index data/raw/rag into Qdrant (incremental) and measure dense/sparse/hybrid retrieval
	@$(PY) -m llmops rag $(CFG_ARGS)

ask: setup  ## answer Q="..." from the corpus with the served model (`make serve` first), citing documents
	@$(PY) -m llmops rag $(CFG_ARGS) --ask "$(Q)"

bench: bench-prepare bench-finetune bench-eval bench-gate bench-rag bench-serve bench-gateway bench-pipeline bench-model-key bench-plan bench-pii  ## every benchmark; each writes its section of docs/BENCHMARKS.md

bench-model-key: envs  ## the model fingerprint of a synthetic >= 4 GB safetensors folder (target < 1 s)
	@$(PY) -m llmops bench model-key

bench-pii: envs  ## the PII masker on 1 MB adversarial, ordinary and dense texts (target < 100 ms adversarial)
	@$(PY) -m llmops bench pii $(ARGS)

bench-plan: setup  ## the GPU path on this machine: CUDA lock resolution, make plan for every GPU profile, fit per profile
	@$(PY) -m llmops bench plan

bench-tests: setup  ## time `make test-fast` (FULL=1: and `make test`) -> docs/BENCHMARKS.md (section tests)
	@$(PY) -m llmops bench suite $(if $(FULL),--full)

bench-finetune: setup  ## the finetune stage on the profile vs plain llamafactory-cli (target < 5 min)
	@$(PY) -m llmops bench finetune $(CFG_ARGS)

bench-loop: setup  ## harvest speed, DPO from the champion on harvested corrections (effect, gate), leaderboard first/cached (needs a champion)
	@$(PY) -m llmops bench loop $(CFG_ARGS) $(ARGS)

bench-eval: setup  ## base vs candidate quality, hf vs vLLM scoring speed (needs `make finetune`)
	@$(PY) -m llmops bench eval $(CFG_ARGS)

bench-gate: setup  ## the default recipe on 8 seeds x 2 base builds, min_effect from a held-out null, simulated power (hours on 2 cores)
	@$(PY) -m llmops bench gate $(CFG_ARGS) $(ARGS)

bench-decoding: setup  ## serving.decoding with and without one setting (ARGS="--without grammar|stop|penalty") on trained adapters (ADAPTERS="models/adapters/...")
	@$(PY) -m llmops bench decoding $(CFG_ARGS) $(ADAPTERS) $(ARGS)

calibrate-gate: setup  ## min_effect for YOUR recipe and hardware: trains SEEDS (default 6), prints the evidence and the config line
	@$(PY) -m llmops bench gate --calibrate $(CFG_ARGS) $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

bench-rag: setup  ## RAG indexing speed (shipped + 10k synthetic chunks), query latency, retrieval per mode
	@$(PY) -m llmops bench rag

bench-pipeline: setup  ## the pipeline from empty state, then cached (targets: < 15 min, rerun < 10% of it)
	@$(PY) -m llmops bench pipeline $(CFG_ARGS)

bench-serve: setup  ## load benchmark of the champion: vLLM vs `transformers serve`, concurrency 1/5/10 x prompts to 2k, SLO, plots
	@$(PY) -m llmops bench serve $(CFG_ARGS)

bench-gateway: setup  ## the gateway in front of the champion: overhead vs direct (c 1/5/10), SOAK=300 s soak, failover, KPIs
	@$(PY) -m llmops bench gateway $(CFG_ARGS) $(if $(SOAK),--soak-s $(SOAK))

rehearse-team: setup  ## docs/team-service.md's one-host layout, every command run together on its ports (PostgreSQL, Redis, MLflow server, 2 vLLM replicas, gateway, Prometheus, Prefect), backups restored (needs make pipeline's champion; ~5 min)
	@$(PY) -m llmops bench team-host $(CFG_ARGS)

bench-prepare: setup  ## 100k rows through the prepare stage (target < 60 s)
	@$(PY) -m llmops bench prepare

gateway: setup  ## the OpenAI-compatible gateway + chat page on 127.0.0.1:8080 in front of `make serve` (tokens, limits, usage, aliases)
	@$(PY) -m llmops gateway $(CFG_ARGS) $(if $(PORT),--port $(PORT))

monitoring: envs  ## Prometheus on the service plan's KPIs: .cache/monitoring/ (scrape config, recording + alerting rules from gate.slo, their unit tests), checked with promtool
	@$(PY) -m llmops monitoring $(CFG_ARGS)

token: envs  ## create a gateway API token: make token NAME=alice ROLE=user|admin [EXPIRES=30d] (printed once, stored as a digest); REVOKE=alice revokes
	@$(if $(REVOKE),$(PY) -m llmops gateway $(CFG_ARGS) --revoke "$(REVOKE)",$(PY) -m llmops gateway $(CFG_ARGS) --token "$(NAME)" --role $(or $(ROLE),user) $(if $(EXPIRES),--expires "$(EXPIRES)"))

ui: envs  ## the MLflow UI on 127.0.0.1 (one worker) for the configured store, until Ctrl-C (UI_PORT=5000)
	@$(PY) -m llmops ui $(CFG_ARGS) --port $(UI_PORT)

prefect-ui: envs  ## a local Prefect server + UI on 127.0.0.1:4200 (ORCH_PORT=) in the background (`make prefect-down` stops it)
	@$(PY) -m llmops deploy server --port $(ORCH_PORT)

prefect-up: envs  ## local Prefect server, the `local-process` work pool, prefect.yaml's deployments and a worker (background)
	@$(PY) -m llmops deploy up --port $(ORCH_PORT)

prefect-down:  ## stop the worker and server started by prefect-up / prefect-ui (by their recorded PIDs)
	@$(PY) -m llmops deploy down

prefect-status:  ## is the local Prefect server / worker up
	@$(PY) -m llmops deploy status --port $(ORCH_PORT)

deploy-run: setup  ## run a deployment through the worker: DEPLOYMENT=pipeline/default PARAMS="--param profile=cpu_smoke"
	@$(PY) -m llmops deploy run $(DEPLOYMENT) --port $(ORCH_PORT) $(PARAMS)

clean-models:  ## delete generated models and adapters (the base model is rebuilt by the next `make setup`)
	rm -rf models/base-tiny models/*.tmp-build models/adapters
