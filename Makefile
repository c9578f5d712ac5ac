# musiclib: every target creates or reuses .venv; nothing relies on what was installed by hand.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
ROOT    ?= library
PORT    ?= 7650

.PHONY: install serve test test-fast lint fuzz library bench clean

$(BIN)/musiclib: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/musiclib  ## create .venv and install musiclib with its dev tools

serve: install  ## install, then serve ./library on 127.0.0.1:7650
	$(BIN)/musiclib serve --root $(ROOT) --port $(PORT)

test: install  ## the whole test suite, then lint
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory lint

test-fast: install  ## the suite without the real-socket end-to-end tests
	$(BIN)/python -m pytest -q -m "not e2e"

fuzz: install  ## the protocol's three property tests, 40 000 generated cases each
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_protocol.py \
		-k "random_bytes or any_split or generated_messages" --hypothesis-profile=fuzz \
		--hypothesis-show-statistics

lint: install  ## ruff and mypy --strict
	$(BIN)/ruff check musiclib tests library bench
	$(BIN)/ruff format --check musiclib tests
	$(BIN)/mypy musiclib

library: install  ## regenerate the shipped demo library (byte-identical on rerun)
	$(BIN)/python library/generate.py

bench: install  ## the benchmark suite (issue 5); BENCH_ARGS=--quick for a one-minute run
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
