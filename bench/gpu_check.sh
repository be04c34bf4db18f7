#!/usr/bin/env bash
# One-shot GPU check for tritonadam: the test suite on the GPU, the autotuner, the bench.
#
#   OUT=./out bash bench/gpu_check.sh          # from anywhere; runs from the checkout root
#
# Everything it writes goes under ${OUT:-./out}:
#   header.txt                      date, GPU, driver, CUDA, torch, triton, python, commit
#   pytest.log, pytest.xml          python -m pytest -q $GPU_TESTS  (TRITONADAM_TEST_DEVICE=cuda;
#                                   the device-generic and GPU-marked test files)
#   autotune-tune.log, autotune-tune-master.log, autotune-show.log, autotune-cache/
#                                   python -m tritonadam.autotune tune (the bench's launch sizes,
#                                   fp32/bf16/fp16, then bf16 master weights) and show, if that
#                                   CLI exists; the bench then runs with the tuned cache
#   tuning.json, tuning.md, tuning.log
#                                   python -m tritonadam.bench --tuning: the first step's extra
#                                   time with an empty autotune cache (each case in its own
#                                   temporary cache dir), and the tuned step against every fixed
#                                   config the tuner considers (best fixed, default, tuned/best)
#   bench.json, bench.md, bench.csv, bench.log, bench.png (with matplotlib)
#                                   python -m tritonadam.bench, json + md (+ csv, plot)
#   summary.txt                     each step's exit status and seconds
#
# It downloads nothing and uses the checkout through PYTHONPATH. Each step is time-boxed
# with `timeout` so a hang costs only its own step; the defaults add up to at most 7 min 20 s
# (T_PYTEST 115 + T_TUNE 65 + T_TUNE_MASTER 25 + T_SHOW 10 + T_TUNING 60 + T_BENCH 165; the
# earlier steps were shortened by 5-15 s each when the tuning step was added) and can be
# changed (seconds). BENCH_ARGS / TUNING_ARGS replace the workload selections; STEPS picks
# steps (default "pytest autotune tuning bench"). Exit status: 0 when every step passed, else 1.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITONADAM_CACHE_DIR="${TRITONADAM_CACHE_DIR:-$OUT/autotune-cache}"
# First-use tuning (tests, the bench's odd sizes) gets a short budget per entry.
export TRITONADAM_AUTOTUNE_BUDGET="${TRITONADAM_AUTOTUNE_BUDGET:-2}"
unset TRITON_INTERPRET
PY="${PYTHON:-python}"

T_PYTEST="${T_PYTEST:-115}"
GPU_TESTS="${GPU_TESTS:-tests/test_cuda_graphs.py tests/test_low_precision.py tests/test_parity.py tests/test_launches.py tests/test_amp.py tests/test_state_dict.py tests/test_errors.py tests/test_autotune.py tests/test_bench_cli.py}"
T_TUNE="${T_TUNE:-65}"
T_TUNE_MASTER="${T_TUNE_MASTER:-25}"
T_SHOW="${T_SHOW:-10}"
T_TUNING="${T_TUNING:-60}"
T_BENCH="${T_BENCH:-165}"
# Tune the launch sizes the bench uses (one launch per param group: its total elements).
TUNE_SIZES="${TUNE_SIZES:-60K 10M 41M 125M 405M 1B 1.1B}"
TUNE_ARGS="${TUNE_ARGS:---optimizer adamw --param-dtype fp32 bf16 fp16 --numel $TUNE_SIZES --budget 2}"
TUNE_MASTER_ARGS="${TUNE_MASTER_ARGS:---optimizer adamw --param-dtype bf16 --master-weights --numel $TUNE_SIZES --budget 2}"
# The bench starts no case after BENCH_BUDGET s (launch counting may run ~20 s longer);
# on the timeout's SIGTERM it still writes what it has.
BENCH_BUDGET=$(( T_BENCH > 80 ? T_BENCH - 40 : T_BENCH / 2 ))
# The workloads issue 4's goals are judged on (Llama-like 400M in bf16, 10,000 x 4,096 small
# tensors), a real model's mix (GPT-2) and one huge tensor; torch-compile runs last.
BENCH_ARGS="${BENCH_ARGS:---profiles llama-layers@400M,many-small,gpt2-124m,one-huge@1B --rep-ms 150}"
# The tuning step: bf16 on the goal workloads (one dtype, so Triton compiles each config once);
# it starts nothing new after TUNING_BUDGET s and writes what it has on the timeout's SIGTERM.
# First-use tuning runs with TRITONADAM_AUTOTUNE_BUDGET (2 s here).
TUNING_BUDGET=$(( T_TUNING > 40 ? T_TUNING - 20 : T_TUNING / 2 ))
TUNING_ARGS="${TUNING_ARGS:---profiles llama-layers@400M,gpt2-124m,many-small --setups bf16 --rep-ms 60}"

: > "$OUT/summary.txt"
FAILED=0
STEPS="${STEPS:-pytest autotune tuning bench}"
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

step() {  # step NAME SECONDS CMD... : run CMD with a time limit, log to $OUT/NAME.log
    local name="$1" limit="$2"
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt" >&2
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local msg="rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && msg="$msg (timed out after ${limit}s)"
    echo "   $name: $msg, $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt" >&2
    [ "$rc" -eq 0 ] || FAILED=1
    tail -n 5 "$OUT/$name.log" >&2
    return 0
}

# ---------------------------------------------------------------------------- header
{
    echo "tritonadam GPU check"
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:    $(uname -srm)"
    echo "command: OUT=$OUT bash bench/gpu_check.sh"
    if command -v git > /dev/null 2>&1 && git -C "$ROOT" rev-parse HEAD > /dev/null 2>&1; then
        echo "commit:  $(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet 2> /dev/null || echo ' (dirty)')"
    else
        echo "commit:  unknown (no git metadata in this copy)"
    fi
    echo
    if command -v nvidia-smi > /dev/null 2>&1; then
        timeout 20 nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.memory,power.limit \
            --format=csv || echo "nvidia-smi query failed"
        echo
        timeout 20 nvidia-smi || true
    else
        echo "nvidia-smi: not found"
    fi
    echo
    timeout 60 "$PY" - << 'EOF' || echo "python version probe failed"
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "| CUDA (torch build):", torch.version.cuda,
      "| cuDNN:", torch.backends.cudnn.version())
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
try:
    import tritonadam
    print("tritonadam:", tritonadam.__version__)
except Exception as e:
    print("tritonadam: import failed:", e)
EOF
} > "$OUT/header.txt" 2>&1
cat "$OUT/header.txt" >&2

# ----------------------------------------------------------------------------- tests
if want pytest; then
    # GPU-relevant files first (a time-out then still leaves their results in the log);
    # the CPU-only rest of the suite is CI's job.
    step pytest "$T_PYTEST" env TRITONADAM_TEST_DEVICE=cuda \
        "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$OUT/pytest.xml" $GPU_TESTS
fi

# -------------------------------------------------------------------------- autotune
if ! want autotune; then
    :
elif "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('tritonadam.autotune.__main__') else 1)" 2> /dev/null; then
    # shellcheck disable=SC2086 # TUNE_ARGS is a word list on purpose
    step autotune-tune "$T_TUNE" "$PY" -m tritonadam.autotune tune $TUNE_ARGS
    # shellcheck disable=SC2086
    step autotune-tune-master "$T_TUNE_MASTER" "$PY" -m tritonadam.autotune tune $TUNE_MASTER_ARGS
    step autotune-show "$T_SHOW" "$PY" -m tritonadam.autotune show
else
    echo "   autotune: skipped (tritonadam.autotune has no __main__ CLI in this checkout)" \
        | tee -a "$OUT/summary.txt" >&2
fi

# ---------------------------------------------------------------------------- tuning
if want tuning; then
    # shellcheck disable=SC2086 # TUNING_ARGS is a word list on purpose
    step tuning "$T_TUNING" "$PY" -m tritonadam.bench --tuning $TUNING_ARGS \
        --time-budget "$TUNING_BUDGET" --out "$OUT/tuning.json" --out "$OUT/tuning.md"
fi

# ----------------------------------------------------------------------------- bench
if want bench; then
    PLOT=()
    if "$PY" -c "import matplotlib" 2> /dev/null; then PLOT=(--plot "$OUT/bench.png"); fi
    # shellcheck disable=SC2086 # BENCH_ARGS is a word list on purpose
    step bench "$T_BENCH" "$PY" -m tritonadam.bench $BENCH_ARGS --time-budget "$BENCH_BUDGET" \
        --out "$OUT/bench.json" --out "$OUT/bench.md" --out "$OUT/bench.csv" ${PLOT[@]+"${PLOT[@]}"}
fi

echo "== done: $( [ "$FAILED" -eq 0 ] && echo 'all steps passed' || echo 'some step FAILED' ); files in $OUT" \
    | tee -a "$OUT/summary.txt" >&2
exit "$FAILED"
