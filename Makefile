# hybridray developer entry points. On a fresh machine:
#   make demo    set up .venv and run the local hybrid demo (the main job)
#   make test    set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
# CPU-only machines pin the CPU build of torch so no multi-GB CUDA build is downloaded.
# GPU machines: make setup TORCH_SPEC="torch>=2.4" (or install your CUDA torch first).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/hybridray demo

test: setup
	$(BIN)/python -m pytest -q --durations=40

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not chaos"

bench: setup
	$(BIN)/python benchmarks/bench_placement.py
	$(BIN)/python benchmarks/bench_planner.py
	$(BIN)/python benchmarks/bench_up_down.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_serve.py --make-infinity-venv
	$(BIN)/python benchmarks/bench_serve.py --only compare
	$(BIN)/python benchmarks/bench_sync.py
	$(BIN)/python benchmarks/bench_burst.py

clean:
	rm -rf $(VENV) .pytest_cache
