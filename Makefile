# labelpipe: `make demo` and `make test` are the whole set-up on a fresh clone with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the builds that install from this machine's local wheel files.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,export,weights]'
	# byte-code for the checkout, as pip writes it for an installed copy: a fresh `labelpipe` process then
	# compiles nothing (~30 ms a command where PYTHONDONTWRITEBYTECODE is set)
	$(BIN)/python -m compileall -q labelpipe
	touch $(STAMP)

demo: install
	$(BIN)/labelpipe run stages/demo.yaml --run runs/demo

# One pytest worker per CPU core (pytest-xdist): the suite is CPU-bound, one torch thread a test, and on
# 2 cores it takes 5 min 17 s instead of 8 min 49 s. Each worker builds its own session fixtures.
test: install
	$(BIN)/python -m pytest -q -n auto --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -n auto -m "not slow"

bench: install
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/pseudolabel.py --quick
	$(BIN)/python benchmarks/contrastive_loss.py

lint: install
	$(BIN)/ruff check labelpipe tests benchmarks
	$(BIN)/ruff format --check labelpipe tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
