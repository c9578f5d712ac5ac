# musiclib: every target creates or reuses .venv; nothing relies on what was installed by hand.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
ROOT    ?= library
PORT    ?= 7650

.PHONY: install runtime system-deps serve cluster test test-fast lint fuzz library bench clean

# What some tests need from the system: the device tests (tests/test_devices.py) PortAudio,
# ALSA's pulse plugin and a PulseAudio daemon with its tools; the cluster tests
# (tests/test_cluster.py) and `make cluster` HAProxy; the Wyoming tests espeak-ng (speech). Without them those tests skip.
SYSTEM_DEPS := libportaudio2 libasound2-plugins pulseaudio pulseaudio-utils haproxy espeak-ng

# Two installs, each done once (a stamp file in .venv says it is; editing pyproject.toml
# redoes it): what serving needs (`serve`), and that plus the dev tools (everything else).
PIP       := $(BIN)/python -m pip --disable-pip-version-check
RUNTIME   := $(VENV)/.installed-runtime
DEV       := $(VENV)/.installed-dev

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	@touch $@

$(DEV): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'
	@touch $@ $(RUNTIME)

runtime: $(RUNTIME)  ## create .venv and install musiclib with what serving needs, nothing more

install: $(DEV)  ## create .venv and install musiclib with its dev tools

system-deps:  ## install SYSTEM_DEPS with apt-get when root; never fails, says what is missing
	-@if ! command -v dpkg >/dev/null 2>&1; then \
		echo "system-deps: no dpkg to check for $(SYSTEM_DEPS); the tests needing them skip"; \
		exit 0; \
	fi; \
	missing=""; \
	for pkg in $(SYSTEM_DEPS); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'ok installed' \
			|| missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "system-deps: installing$$missing (for the device and cluster tests)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
		|| echo "system-deps: could not install$$missing; the tests needing them will skip"; \
	else \
		echo "system-deps: missing$$missing (install them as root); the tests needing them will skip"; \
	fi; \
	exit 0

serve: runtime  ## install what serving needs, then serve ./library on 127.0.0.1:7650
	$(BIN)/musiclib serve --root $(ROOT) --port $(PORT)

cluster: runtime  ## three replicas of ./library behind HAProxy on 127.0.0.1:7650, until Ctrl-C
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "cluster: installing haproxy"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends haproxy >/dev/null; \
		fi; \
	}
	BIN=$(BIN) deploy/cluster.sh $(ROOT)

test: install system-deps  ## the whole test suite, then lint
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory lint

test-fast: install  ## the suite without the real-socket end-to-end tests
	$(BIN)/python -m pytest -q -m "not e2e"

fuzz: install  ## the protocol property tests (versions 1 and 2), 40 000 generated cases each; tags.py's
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_protocol.py tests/test_protocol_live.py \
		tests/test_tags.py -k "random_bytes or any_split or generated_messages or test_tags" \
		--hypothesis-profile=fuzz \
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
