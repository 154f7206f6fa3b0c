# Two commands do all the set-up on a fresh machine:
#   make quickstart   -> venv + install + the two-stage DMDR run on the embedded digits benchmark
#   make test         -> venv + install + the test suite
PY ?= python3
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints-cpu.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $@

.PHONY: install quickstart test test-slow
install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/dmdr train recipes/digits.yaml

test: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/python -m pytest

test-slow: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/python -m pytest -m slow
