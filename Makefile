# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install the project, run the CLIP quickstart on the embedded world
#   make test   - create .venv, install the project, run the default test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint attack-table defense-table fmnist-data bench gpu-suite clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/quickstart.py

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

attack-table: $(STAMP)
	$(PY) scripts/attack_table.py

defense-table: $(STAMP)  # needs the poisoned models of attack-table
	$(PY) scripts/defense_table.py --threads 1

FMNIST_SOURCE ?= /usr/share/datasets/fashion-mnist
fmnist-data: $(STAMP)  # the Fashion-MNIST world (apt-get install dataset-fashion-mnist; docs/invertune.md)
	$(PY) scripts/build_fashion_mnist.py --source $(FMNIST_SOURCE) --out data/fashion_mnist
	$(PY) scripts/clean_folder_from_captions.py --csv data/fashion_mnist/defender.csv \
		--class-names data/fashion_mnist/class_names.txt --out data/fashion_mnist/defender

bench: $(STAMP)
	$(PY) bench/bench_triggers.py && $(PY) bench/bench_training_step.py && $(PY) bench/bench_generation.py --threads 1

gpu-suite: $(STAMP)  # one large GPU, under 8 minutes (README: GPU suite)
	$(PY) bench/gpu_suite.py

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
