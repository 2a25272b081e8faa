# Everything sets itself up: `make run` and `make test` create .venv on first use.
PY ?= python3
VENV ?= .venv
# The CPU wheel; set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" for CUDA.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
# Test files run in 3 processes (servers and subprocesses wait more than they compute),
# whole files each, heaviest first (the order tests/conftest.py gives; xdist's own order
# would start the few-test pipeline files last).
PYTEST_WORKERS ?= -n 3 --dist loadfile --no-loadscope-reorder
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test lint format bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 needed (set PY=python3.11)")'
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	# the book's package for `gptflow bench --vs-book`, without its conflicting pins
	$(VENV)/bin/python -m pip install -q --no-deps "llms-from-scratch==1.0.19"
	touch $(STAMP)

# set-up only (a worker machine, or before `source .venv/bin/activate`)
setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/gptflow run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest $(PYTEST_WORKERS) --durations=10 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(VENV)/bin/gptflow bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
