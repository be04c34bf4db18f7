#!/usr/bin/env bash
# The GPU check, v2: the core figures first (device, host and steady-state time for every
# provider, with the pairs that move the same bytes, and tritonadam's quantized state on the
# Llama layers), then host time against its floor, then
# every test that can run on a GPU, then first-use tuning (ranked against the core's sweep,
# not sweeping again), then peers' optimizers from a wheelhouse, then the full bench while
# time remains. At most TOTAL_S (390 s) in all, each step time-boxed, and every file
# rewritten as soon as its step ends, so a run cut short returns what it measured.
#
#   TRITONADAM_COMMIT=$(git rev-parse --short HEAD) OUT=./out bash tritonadam/bench/gpu_check.sh
#
# It runs the checkout in place (PYTHONPATH, no pip install from the network) with python3,
# torch, triton, pytest, tabulate, numpy and filelock; pytest-timeout, pytest-xdist and
# matplotlib are used when present. $OUT receives seven files (a GPU machine hands back 8):
#   header.txt      GPU, driver, CUDA, torch, triton, python, commit, the exact command
#   results.json    step core: copy bandwidth; every provider's three figures; rewritten
#                   after every group of cases
#   nvidia-smi.csv  SM and memory clocks, power, temperature every second, the whole run
#   host_time.txt   step host_time: the step's host time against the one-pass floor (CPU
#                   tensors, launches stubbed; and CUDA tensors, real launches), per pass
#   pytest.txt      step pytest: the GPU tests, -rA --durations=30, streamed as they run
#   summary.md      goals, key results, each step's status, test counts, first use, peers
#   all.tgz         everything else (logs, the tuner's, peers' and the full bench's reports,
#                   the autotune cache, junit XML)
#
# Budget (seconds, each a cap; a step ends early when done, and none starts past TOTAL_S less
# 10 s kept for the end): header 10, core 170, host_time 20, pytest 110, tuning 25, peers 45
# (380), then the full bench while time remains (usually none) and autotune-show (at most
# 10 s, within the 10 s kept). So one run is about 6.5 minutes plus start-up: one command
# of the device tool (10 minutes at most); with the machine's start (1-3 minutes) a
# 15-minute lease leaves about 5 minutes for a shorter rerun. The core step took 164 s of
# its 170 on the H200 (2026-12-04); its time budget (the limit less 15 s) cuts the config
# sweep, which runs last, before any provider's default row.
#
# DRY_RUN=1 runs the same steps on the CPU in Triton's interpreter with tiny sizes, after
# checking each GPU command line with `--plan`, and the GPU tests with --collect-only
# (tests/test_gpu_check.py does this in CI).
# Exit status: 0 when every step exited 0, else 1.
set -u

# The exact command: the script and every variable it reads that was set.
COMMAND=""
for var in TRITONADAM_COMMIT OUT DRY_RUN PYTHON TOTAL_S GPU_TESTS PYTEST_WORKERS WHEELHOUSE \
        TRITONADAM_AUTOTUNE_BUDGET TRITONADAM_AUTOTUNE_COMPILE_BUDGET; do
    [ -n "${!var+x}" ] && COMMAND="$COMMAND$var=$(printf '%q' "${!var}") "
done
COMMAND="${COMMAND}bash tritonadam/bench/gpu_check.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # the checkout
cd "$ROOT"
OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tritonadam-gpu-check.XXXXXX")"
SMI_PID=""
cleanup() {
    [ -n "$SMI_PID" ] && kill "$SMI_PID" 2> /dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
PY="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
START=$(date +%s)
TOTAL_S="${TOTAL_S:-390}"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/bench/wheelhouse}"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITONADAM_CACHE_DIR="$WORK/autotune-cache"
export TRITON_CACHE_DIR="$WORK/triton-cache"  # shared by the test workers: compile once
# First use tunes inside the timed run: short budgets, so a workload costs seconds.
export TRITONADAM_AUTOTUNE_BUDGET="${TRITONADAM_AUTOTUNE_BUDGET:-2}"
export TRITONADAM_AUTOTUNE_COMPILE_BUDGET="${TRITONADAM_AUTOTUNE_COMPILE_BUDGET:-15}"
# FMA fusion: the bench times what users launch (tritonadam pins it on at every launch; the
# prediction in docs/performance.md counts that code); the tests' conftest turns it off to
# compare bits.
unset TRITON_DEFAULT_FP_FUSION
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1
    export TRITONADAM_BENCH_NO_SMI=1
else
    unset TRITON_INTERPRET
fi

# ------------------------------------------------------------------ what each step runs
# The goal workloads (Llama-like layers, 10,000 x 4,096, one huge tensor) in the dense core
# setups (fp32; bf16 with fp32 state; bf16 state, which torch's fused bf16 step keeps: the
# same bytes); on the Llama layers only, also the quantized core setups (bf16-8bit-remainder,
# bf16-4bit-sr, fp32-8bit) and bf16-remainder (the same exact master with fp32 state: the
# quantized goals compare with it and with torch's fp32 step there); each provider's three
# figures, the captured (CUDA graph) steps, clip + step in bf16, and the configs nearest the
# default. torch has no quantized state: its rows are those of the dense twin setups.
CORE=(--profiles llama-layers@400M,many-small,one-huge@1B --setups fp32,bf16,bf16-bf16state
      --setups-for llama-layers@400M=core,bf16-remainder --clip bf16
      --providers tritonadam,torch-fused,tritonadam-graph,torch-fused-graph --autotune off
      --sweep --sweep-max 3 --rounds 5 --rep-ms 100)
CORE_DRY=(--device cpu --profiles many-small@8K --setups bf16
          --setups-for many-small@8K=bf16,bf16-8bit-remainder --clip bf16
          --providers tritonadam,torch-fused --sweep --sweep-max 2 --rounds 2
          --warmup-ms 0 --rep-ms 1 --min-reps 1 --max-reps 1 --check-steps 1)
# Every test module that can run on a GPU (TRITONADAM_TEST_DEVICE=cuda), most important
# first; extend the list as modules become device-portable. Modules that import torch's
# internal test helpers need expecttest: without it they skip, saying so.
GPU_TESTS="${GPU_TESTS:-tests/test_low_precision.py tests/test_precision.py tests/test_cuda_graphs.py
    tests/test_parity.py tests/test_amp.py tests/test_misuse.py tests/test_state_dict.py
    tests/test_launches.py tests/test_state.py tests/test_step_cache.py tests/test_clip.py
    tests/test_quant.py tests/test_torch_contract.py tests/test_host.py
    tests/test_autotune.py::test_event_timer_measures_a_gpu_op
    tests/test_autotune.py::test_first_use_tuning_on_a_gpu_writes_a_valid_cache
    tests/test_bench_cli.py::test_gpu_small_bench tests/test_bench_cli.py::test_gpu_captured_step_host_time}"
# The GPU tests compile many kernel variants: on the H200 machine (16 CPUs) the list took
# 120 s at -n 12 and did not finish in 70 s at -n 4 (2026-12-04).
PYTEST_WORKERS="${PYTEST_WORKERS:-$(n=$(nproc 2> /dev/null || echo 4); [ "$n" -gt 14 ] && echo 12 || echo $(( n > 2 ? n - 2 : 1 )))}"
# First use with an empty cache, ranked among the fixed configs the core step swept.
TUNING=(--tuning --profiles llama-layers@400M,many-small --setups bf16 --rounds 3
        --sweep-from "$OUT/results.json")
TUNING_DRY=()  # on the CPU --tuning checks its arguments, says it needs a GPU and exits 0
# Peers from the wheelhouse, in the quantized setups they do too (8-bit moments with the
# exact master: torchao, bitsandbytes and FlashOptim; 4-bit with stochastic rounding:
# torchao's AdamW4bit with bf16_stochastic_round) beside tritonadam, on one 400M tensor
# (torchao compiles its step per shape and flags: tens of seconds each).
PEERS=(--profiles one-huge@400M --setups bf16-8bit-remainder,bf16-4bit-sr --clip none --rounds 3
       --providers tritonadam,torchao-8bit,torchao-4bit,flashoptim,bnb-8bit)
PEERS_DRY=(--device cpu --profiles one-huge@4K --setups bf16 --clip none --providers torch-fused
           --rounds 1 --warmup-ms 0 --rep-ms 1 --max-reps 1)
BENCH=()  # the default matrix: every profile, setup and provider, clip + step in fp32 and bf16
BENCH_DRY=(--device cpu --profiles one-huge@10K --setups fp32 --providers torch-fused,torch-foreach
           --rounds 1 --warmup-ms 0 --rep-ms 1 --max-reps 1)

# ------------------------------------------------------------------------------ helpers
FAILED=0
printf 'step\trc\tseconds\tnote\n' > "$WORK/steps.tsv"

left() { echo $(( START + TOTAL_S - $(date +%s) )); }

pack() {  # everything but the files $OUT already holds, as one archive
    tar -czf "$OUT/all.tgz.part" -C "$WORK" --exclude=./triton-cache --exclude=./peers . 2> /dev/null \
        && mv "$OUT/all.tgz.part" "$OUT/all.tgz"
}

summarize() {  # summary.md from what exists now (no Python: a step costs no extra start-up)
    {
        if [ -s "$WORK/core-summary.md" ]; then
            cat "$WORK/core-summary.md"
        else
            echo "# tritonadam GPU check"
            echo
            echo "No results yet: see the steps below."
        fi
        echo
        echo "## Steps"
        echo
        echo "| step | exit | seconds | note |"
        echo "|------|------|---------|------|"
        tail -n +2 "$WORK/steps.tsv" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
        if [ -s "$OUT/host_time.txt" ]; then
            echo
            echo "## Host time against the floor"
            echo
            echo '```'
            cat "$OUT/host_time.txt"
            echo '```'
        fi
        if [ -s "$OUT/pytest.txt" ]; then
            echo
            echo "## GPU tests"
            echo
            grep -E '^=+ .*(passed|failed|error|no tests ran|collected).* =+$' "$OUT/pytest.txt" | tail -n 1 \
                || echo "(no pytest summary line: the run was cut short; pytest.txt lists what ran)"
            grep -E '^(FAILED|ERROR) ' "$OUT/pytest.txt" | head -n 30 | sed 's/^/    /'
        fi
        if [ -s "$WORK/tuning-summary.md" ]; then
            echo
            echo "## Autotuner"
            sed -n '/^## /,$p' "$WORK/tuning-summary.md" | sed 's/^## /### /'
        fi
        if [ -s "$WORK/peers-summary.md" ]; then
            echo
            echo "## Peers (other libraries' AdamW)"
            sed -n '/^## Results/,/^## [^R]/p' "$WORK/peers-summary.md" | sed '$d' | sed 's/^## /### /'
        fi
        echo
        echo "Everything else is in all.tgz. Command: \`$COMMAND\`"
    } > "$WORK/summary.md.part"
    mv "$WORK/summary.md.part" "$OUT/summary.md"
}

finish_step() {  # finish_step NAME RC T0 NOTE
    local seconds=$(( $(date +%s) - $3 )) note="$4"
    [ "$2" -eq 124 ] || [ "$2" -eq 137 ] && note="timed out${note:+; $note}"
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$seconds" "$note" >> "$WORK/steps.tsv"
    echo "== $1: exit $2, ${seconds}s${note:+ ($note)}" >&2
    [ "$2" -eq 0 ] || FAILED=1
    summarize
    pack
}

limit_for() {  # limit_for WANTED: seconds a step may take, keeping 10 s for the end
    local l=$(( $(left) - 10 ))
    [ "$l" -gt "$1" ] && l=$1
    echo "$l"
}

bench_step() {  # bench_step NAME WANTED_S GPU_ARGS_VAR DRY_ARGS_VAR OUT_ARGS...
    local name="$1" wanted="$2" gpu_var="$3[@]" dry_var="$4[@]"
    shift 4
    local limit t0 rc=0 note=""
    limit=$(limit_for "$wanted")
    t0=$(date +%s)
    if [ "$limit" -lt 20 ]; then
        finish_step "$name" 0 "$t0" "skipped: no time left"
        return
    fi
    echo "== $name (limit ${limit}s)" >&2
    local args=("${!gpu_var}")
    if [ "$DRY_RUN" = 1 ] && [ -z "${!dry_var+x}" ]; then
        args+=(--device cpu)
    elif [ "$DRY_RUN" = 1 ]; then
        # The GPU command line must parse and name real workloads: checked here, in CI.
        "$PY" -m tritonadam.bench ${args[@]+"${args[@]}"} --plan > "$WORK/$name.plan.txt" 2>&1 || rc=$?
        if [ "$rc" -ne 0 ]; then
            finish_step "$name" "$rc" "$t0" "the GPU arguments do not parse: see $name.plan.txt"
            return
        fi
        args=("${!dry_var}")
    fi
    # The bench stops starting cases 15 s before its limit and writes what it has on SIGTERM.
    timeout -k 10 "$limit" "$PY" -m tritonadam.bench ${args[@]+"${args[@]}"} \
        --time-budget $(( limit > 40 ? limit - 15 : limit / 2 )) "$@" > "$WORK/$name.log" 2>&1 || rc=$?
    finish_step "$name" "$rc" "$t0" "$note"
}

# ------------------------------------------------------------------------- 1. header
t0=$(date +%s)
{
    echo "tritonadam GPU check"
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command: $COMMAND"
    echo "commit:  ${TRITONADAM_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo 'unknown (set TRITONADAM_COMMIT)')}"
    echo "host:    $(uname -srm), $(nproc 2> /dev/null || echo '?') CPUs"
    echo
    if command -v nvidia-smi > /dev/null 2>&1; then
        timeout 20 nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit \
            --format=csv || echo "nvidia-smi query failed"
    else
        echo "nvidia-smi: not found"
    fi
    echo
    timeout 60 "$PY" - << 'EOF' || echo "python version probe failed"
import importlib.util, platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "| CUDA (torch build):", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except Exception as e:
    print("triton: unavailable:", e)
print("cuda available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
def have(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
print("optional:", ", ".join(f"{m} {'yes' if have(m) else 'no'}"
                             for m in ("pytest_timeout", "xdist", "matplotlib", "expecttest", "platformdirs")))
EOF
    echo "wheelhouse: $(ls "$WHEELHOUSE"/*.whl 2> /dev/null | xargs -r -n1 basename | tr '\n' ' ')"
} > "$OUT/header.txt" 2>&1
# Clocks, power and temperature beside the results, the whole run (the bench also samples
# them per group of cases into its reports).
if [ "$DRY_RUN" != 1 ] && command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
        --format=csv -l 1 > "$OUT/nvidia-smi.csv" 2> /dev/null &
    SMI_PID=$!
else
    echo "timestamp, note" > "$OUT/nvidia-smi.csv"
    echo "$(date -u +%Y/%m/%d\ %H:%M:%S), no nvidia-smi sampling (dry run or no nvidia-smi)" >> "$OUT/nvidia-smi.csv"
fi
finish_step header 0 "$t0" ""

# ------------------------------------------------------------------ 2. the core figures
bench_step core 170 CORE CORE_DRY --out "$OUT/results.json" --out "$WORK/results.md" \
    --summary "$WORK/core-summary.md"

# ------------------------------------------------------------------ 3. host time, floor
t0=$(date +%s)
# The dry run steps in the interpreter, which a busy 2-core CI machine stretches past 20 s.
limit=$(limit_for "$([ "$DRY_RUN" = 1 ] && echo 45 || echo 20)")
if [ "$limit" -lt 10 ]; then
    finish_step host_time 0 "$t0" "skipped: no time left"
else
    rc=0
    {
        if [ "$DRY_RUN" = 1 ]; then
            timeout -k 5 "$limit" "$PY" -m tritonadam.bench.host_time --breakdown --tensors 30 --reps 2 --numel 8
        else
            # two commands, one limit: each gets half (the first run's pair took 38 s of 20)
            timeout -k 5 $(( limit / 2 )) "$PY" -m tritonadam.bench.host_time --breakdown --tensors 10000 300 --reps 20 &&
                timeout -k 5 $(( limit / 2 )) "$PY" -m tritonadam.bench.host_time --device cuda --tensors 10000 300 --reps 20
        fi
    } > "$OUT/host_time.txt" 2>&1 || rc=$?
    finish_step host_time "$rc" "$t0" ""
fi

# --------------------------------------------------------------------- 4. GPU tests
t0=$(date +%s)
limit=$(limit_for 110)
if [ "$limit" -lt 20 ]; then
    finish_step pytest 0 "$t0" "skipped: no time left"
else
    echo "== pytest (limit ${limit}s)" >&2
    rc=0
    missing=""
    tests=""
    for f in $GPU_TESTS; do
        if [ -e "${f%%::*}" ]; then tests="$tests $f"; else missing="$missing $f"; fi
    done
    extra=()
    if "$PY" -c "import pytest_timeout" 2> /dev/null; then extra+=(--timeout=60); fi
    if [ "$DRY_RUN" = 1 ]; then
        extra+=(--collect-only)
    elif [ "$PYTEST_WORKERS" -gt 1 ] && "$PY" -c "import xdist" 2> /dev/null; then
        extra+=(-n "$PYTEST_WORKERS")  # one GPU, several processes: compiling dominates
    fi
    # shellcheck disable=SC2086 # $tests is a word list on purpose
    timeout -k 10 "$limit" env TRITONADAM_TEST_DEVICE="$([ "$DRY_RUN" = 1 ] && echo cpu || echo cuda)" \
        TRITONADAM_AUTOTUNE=off "$PY" -u -m pytest -rA --durations=30 -p no:cacheprovider \
        --continue-on-collection-errors --junitxml="$WORK/pytest.xml" ${extra[@]+"${extra[@]}"} $tests \
        > "$OUT/pytest.txt" 2>&1 || rc=$?
    finish_step pytest "$rc" "$t0" "${missing:+missing test files:$missing}"
fi

# -------------------------------------------------------------------- 5. the autotuner
bench_step tuning 25 TUNING TUNING_DRY --out "$WORK/tuning.json" --out "$WORK/tuning.md" \
    --summary "$WORK/tuning-summary.md"

# ------------------------------------------------------------------------ 6. peers
t0=$(date +%s)
wheels=$(ls "$WHEELHOUSE"/*.whl 2> /dev/null || true)
if [ -z "$wheels" ] && [ "$DRY_RUN" != 1 ]; then
    finish_step peers 0 "$t0" "skipped: no wheels in bench/wheelhouse (bash tritonadam/bench/wheelhouse.sh where PyPI is reachable, then bring bench/wheelhouse along)"
else
    if [ -n "$wheels" ]; then
        # No network: the wheels alone, without their dependencies (torch is there).
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --no-deps --target "$WORK/peers" $wheels > "$WORK/peers-install.log" 2>&1 \
            || echo "pip install of the wheelhouse failed: see peers-install.log" >&2
    fi
    PYTHONPATH="$WORK/peers:$PYTHONPATH" bench_step peers 45 PEERS PEERS_DRY --out "$WORK/peers.json" \
        --out "$WORK/peers.md" --summary "$WORK/peers-summary.md"
fi

# ------------------------------------------------------- 7. the full bench, time allowing
PLOT=()
if "$PY" -c "import matplotlib" 2> /dev/null; then PLOT=(--plot "$WORK/bench.png"); fi
bench_step bench 600 BENCH BENCH_DRY --out "$WORK/bench.json" --out "$WORK/bench.md" \
    --out "$WORK/bench.csv" ${PLOT[@]+"${PLOT[@]}"}

if [ -d "$TRITONADAM_CACHE_DIR" ]; then  # what first use tuned, with the compiler's reports
    t0=$(date +%s)
    rc=0
    limit=$(left)
    [ "$limit" -gt 10 ] && limit=10
    [ "$limit" -lt 5 ] && limit=5
    timeout "$limit" "$PY" -m tritonadam.autotune show > "$WORK/autotune-show.log" 2>&1 || rc=$?
    finish_step autotune-show "$rc" "$t0" ""
fi
echo "== done in $(( $(date +%s) - START ))s: $([ "$FAILED" -eq 0 ] && echo 'every step exited 0' || echo 'some step FAILED'); files in $OUT" >&2
exit "$FAILED"
