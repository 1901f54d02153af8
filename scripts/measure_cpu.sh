#!/usr/bin/env bash
# The speed and churn figures the README keeps per CPU kind, in one run on this machine (issues 25
# and 27 ask for them on AMX Xeons and AVX2-only CPUs): `make measure-cpu` (~45-60 min on 2 cores;
# nothing else may run meanwhile). Each step prints its own figures; all of it goes to LOG too.
#
#   scripts/measure_cpu.sh [LOG]      (default: measure-cpu-<date>.log in the working directory)
#
# Steps: this CPU; the speed task raw against batched transformers, Ray Data and llama.cpp; chat
# prompts; a 16-question job; `--batch-size 1 --shard-size 3` on 25 questions against the defaults;
# the roofline share of the speed task's job; the load's row check and the invariance tests; five
# chaos runs; and `make test` on a fresh clone of this checkout's HEAD, timed.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
PY=${PY:-.venv/bin/python}
BULKSCORE=$(dirname "$PY")/bulkscore
LOG=${1:-measure-cpu-$(date +%Y%m%d-%H%M).log}
MODEL=$("$PY" -c "from bulkscore.workers.embedded import embedded_gguf, prepare_gguf; print(prepare_gguf(embedded_gguf()))")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step() {
	echo
	echo "== $1 ($(date -u +%H:%M:%S))"
}

{
	step "CPU"
	grep -m1 'model name' /proc/cpuinfo
	echo "flags: $(grep -o 'avx2\|avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
	echo "cores: $(nproc); commit $(git rev-parse --short HEAD)"

	step "speed task, raw"
	"$PY" scripts/bench.py --peers batched,raydata,llamacpp,bulkscore
	step "chat prompts"
	"$PY" scripts/bench.py --prompt-format chat --peers batched,raydata,bulkscore
	step "16 questions"
	"$PY" scripts/bench.py --questions 16 --peers batched,llamacpp,bulkscore
	step "25 questions, careful against the defaults"
	"$PY" scripts/bench.py --questions 25 --peers bulkscore,careful

	step "roofline of the speed task's job"
	"$BULKSCORE" run --limit 128 --prompt-format raw --max-new-tokens 32 -o "$WORK/speed.parquet" --quiet
	"$PY" scripts/measure_roofline.py "$WORK/speed.summary.json" --raw

	step "the load's row check (the decode heights its products run at), and the invariance tests"
	for dtype in float32 bfloat16; do
		"$PY" -c "import sys; from bulkscore.workers.contract import ModelSpec; from bulkscore.workers.models import PackedLinear, load_model
lm = load_model(ModelSpec('', 'embedded', dtype=sys.argv[1]))
print(sys.argv[1], 'heights', sorted({m.heights for m in lm.model.modules() if isinstance(m, PackedLinear)}), lm.load_pieces)" $dtype
	done
	"$PY" -m pytest -q -p no:cacheprovider tests/test_scoring.py

	step "chaos: five runs"
	"$PY" scripts/measure_chaos.py "$MODEL" --runs 5 --first-kill 15 --every 6

	step "make test on a fresh clone"
	git clone -q . "$WORK/clone"
	started=$(date +%s)
	(cd "$WORK/clone" && make test 2>&1 | tail -40)
	echo "make test: $(($(date +%s) - started)) s, installs included"
} 2>&1 | tee "$LOG"
