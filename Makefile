# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install the project, run the CLIP quickstart on the embedded world
#   make test   - create .venv, install the project, run the default test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint attack-table defense-table bench gpu-suite clean

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

bench: $(STAMP)
	$(PY) bench/bench_triggers.py && $(PY) bench/bench_training_step.py && $(PY) bench/bench_generation.py --threads 1

gpu-suite: $(STAMP)  # one large GPU, under 8 minutes (README: GPU suite)
	$(PY) bench/gpu_suite.py

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
