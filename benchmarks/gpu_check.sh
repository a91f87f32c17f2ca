#!/usr/bin/env bash
# One GPU check of the trainer on the first GPU that comes: at most 7 minutes in all (one `timeout` around
# everything), each part under its own bound (they add up to 380 s), each row printed and appended to a
# JSON lines results file the moment its part ends, so a run killed from outside keeps what it measured.
#   rows (benchmarks/gpu_check.py; each beside the estimate's figure for exactly that step on that GPU):
#     device                 the GPU, torch, CUDA
#     124M AdamW / Muon      gpt2-124m and gpt2-124m-fast, compiled, 1 GPU, the recipes' micro-batch 64:
#                            ms/step, tokens/s, MFU, the optimizer's ms/step (Muon: all 72 matrices on one GPU)
#     1558M AdamW / Muon     gpt2-1558m and gpt2-1558m-fast, compiled, 1 GPU, micro-batch 8: ms/step, peak
#                            allocated (tensors) and reserved memory, the process's whole GPU memory
#     HellaSwag / checkpoint ms per example (batched), a 124M checkpoint's write time
#
#     bash benchmarks/gpu_check.sh [--results FILE]      # on the GPU machine
#     bash benchmarks/gpu_check.sh --dry                 # the same parts on CPU, tiny models, no compile, one process
#     python benchmarks/gpu_results_to_calibration.py FILE [--append]   # its rows -> kind: measured MFU points
#
# The work directory (the results file by default, each part's log) is kept and named at the start and end.
# At the limit the running part is ended and recorded as FAILED; every row written before stays (exit 124).
# GPU_CHECK_TOTAL=SECONDS sets another limit (to try the stop).
set -u
CALLER_DIR=${GPU_CHECK_CALLER_DIR:-$PWD}   # a relative --results is the caller's
cd "$(dirname "$0")/.."
TOTAL=${GPU_CHECK_TOTAL:-420}   # the hard limit: 7 minutes for everything
if [ -z "${GPU_CHECK_INNER:-}" ]; then  # run the whole script under one timeout (-k: then KILL)
  exec timeout -k 5 "$TOTAL" env GPU_CHECK_INNER=1 GPU_CHECK_CALLER_DIR="$CALLER_DIR" bash "$0" "$@"
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
DRY=""; RESULTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY="--dry" ;;
    --results) RESULTS="$2"; shift ;;
    --results=*) RESULTS="${1#--results=}" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry] [--results FILE]" >&2; exit 2 ;;
  esac
  shift
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")   # kept: the logs (and the results, by default)
RESULTS=${RESULTS:-$WORK/results.jsonl}
case "$RESULTS" in /*) ;; *) RESULTS="$CALLER_DIR/$RESULTS" ;; esac
mkdir -p "$(dirname "$RESULTS")"; touch "$RESULTS"
# CPU threads: the GPU parts need few; the dry run's tiny ops only slow down when split (1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ -n "$DRY" ] && echo 1 || echo 2)}
echo "gpt2cloud GPU check$([ -n "$DRY" ] && echo ' (dry run: CPU, tiny models)'): rows go to $RESULTS as they finish (logs in $WORK)"

# part SECONDS NAME...: parts in one process under one bound (a GPU check gives each part its own process
# and bound; the dry run all of them one process, importing torch once). A part that fails writes its own
# FAILED row; one that runs out of time or crashes gets one from here.
PART_PID=""; PART_NAMES=""; PART_BEFORE=0
part() {
  local bound=$1 rc log; shift
  log="$WORK/$1.log"; PART_BEFORE=$(wc -l < "$RESULTS"); PART_NAMES="$*"
  # in the background and waited for, so that the limit's TERM reaches the trap below at once; timeout makes
  # the part its own process group (the python and its compile workers), which the trap ends
  timeout -k 5 "$bound" "$PY" benchmarks/gpu_check.py "$@" --results "$RESULTS" $DRY > >(tee "$log") 2>"$log.err" &
  PART_PID=$!
  wait "$PART_PID"; rc=$?
  PART_PID=""
  if [ "$rc" != 0 ]; then
    why="exit $rc"; { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && why="not done within its ${bound} s"
    why="$why; $(grep -v '^\s*$' "$log.err" | tail -1 | cut -c1-100)"
    "$PY" benchmarks/gpu_check.py failed "$@" --since "$PART_BEFORE" --why "$why" --results "$RESULTS" $DRY || true
  fi
}
# the 7-minute limit (the outer timeout's TERM): end the running part, record it, keep every row written so far
on_limit() {
  if [ -n "$PART_PID" ]; then
    kill -TERM -- "-$PART_PID" 2>/dev/null
    timeout 4 "$PY" benchmarks/gpu_check.py failed $PART_NAMES --since "$PART_BEFORE" --results "$RESULTS" $DRY \
      --why "ended by the ${TOTAL} s limit of the whole check" || true
  fi
  echo "gpt2cloud GPU check: stopped at its ${TOTAL} s limit; the rows so far are in $RESULTS (logs in $WORK)" >&2
  exit 124
}
trap on_limit TERM

# bounds (seconds; 380 in all, under the 420 of the whole): compilation is most of each
if [ -n "$DRY" ]; then
  part 380 info 124m-adamw 124m-muon 1558m 1558m-fast small
else
  part 15 info
  part 85 124m-adamw
  part 55 124m-muon    # the same model: the 124M AdamW part's kernels are in Inductor's cache (/tmp, shared)
  part 135 1558m       # 48 layers to trace and compile
  part 60 1558m-fast
  part 30 small
fi

echo
echo "gpt2cloud GPU check: $RESULTS (logs in $WORK)"
"$PY" benchmarks/gpu_check.py table "$RESULTS"
