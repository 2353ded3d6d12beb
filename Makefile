# The two commands a newcomer runs: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt src/modelpress/codecs/_fcodec.c src/modelpress/nn/_qmatmul.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Compress the bundled all-MiniLM-L6-v2 with the default recipe and print the report.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/modelpress compress minilm --recipe int8 --out out/minilm-int8 --overwrite --store .modelpress/store --eval

# The layer contract (pyproject.toml, docs/ARCHITECTURE.md) first: an upward import fails the build.
# Then every test, the real-model ones included, on two worker processes (the suite is ~9 minutes on one).
test: $(STAMP)
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist worksteal --durations=25

# Everything but the real-model, process-killing, fault-injecting and fuzz tests, a worker per core, with
# bytecode (and pytest's rewritten asserts) cached between runs: 57 s the first time, 52 s after (quiet 2-core machine).
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -n 2 --dist worksteal

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_quant.py

clean:
	rm -rf $(VENV) out .pytest_cache
