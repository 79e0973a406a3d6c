# Two commands set everything up on a fresh clone (see README.md):
#   make demo   - create .venv if needed, install, run every method's main job on built-in data
#   make test   - create/update the same .venv and run the whole pytest suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

install: $(STAMP)

# torch is pinned to 2.13.0 unless a torch is already installed (a CUDA build, say), so pip
# never swaps it out; everything else comes from pyproject.toml.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	# torchattacks (MIT) is the independent implementation the attack tests cross-check against;
	# its declared dependencies would swap torch for a CUDA build and pull torchvision, neither of
	# which it imports, so it is installed on its own.
	$(BIN)/python -m pip install -q --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deepimaging demo --out demo-output

# Two xdist workers with one torch thread each (Testing/conftest.py) fit CI's 2 cores best;
# --dist loadfile keeps each file on one worker, so module-scoped fixtures are built once.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python Testing/bench/bench_chanvese.py
	$(BIN)/python Testing/bench/bench_rog_vs_monai.py --quick
	$(BIN)/python Testing/bench/bench_robustness.py --quick

clean:
	rm -rf $(VENV) demo-output .pytest_cache
