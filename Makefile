# Developer entry points. `make test` is the one test command: it creates .venv, builds
# the C core and the Cython bindings into it, and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# torch is only needed for the tests that copy into torch CPU tensors; on the machines
# this project tests on, 2.13.0 resolves to a CPU build. TORCH= skips it.
TORCH ?= torch==2.13.0

setup: $(PY)
	$(PY) -m pip install -e '.[test]' $(TORCH)

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf build ems/_core.c ems/*.so *.egg-info
