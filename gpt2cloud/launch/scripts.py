"""The scripts a launched node runs, as SkyPilot's `setup` and `run`: a training node's and a prepare
VM's. The same scripts run on `--infra local` (gpt2cloud/backends/local.py).

They are rendered from the constants below (@NAME@ placeholders), so a path, port or exit code has one
definition. Settings reach them as the task's envs (gpt2cloud/launch/task.py Job.envs); money settings
(price, caps) do not: the trainer reads them from config.json, and the run script asks `python -m
model.config` for what it needs of them.
"""

from __future__ import annotations

import math

from gpt2cloud.launch.build import NODE_REQUIREMENTS
from gpt2cloud.store.layout import CONFIG, LOGS, NODE_HOME, TIMELINE
from model import deadman  # the bounds of the phases outside the trainer, their exit codes, a full disk
from model import notify_cli  # --notify: the job's end told by its EXIT trap (notify_end)
from model.config import DIVERGED_MARKER, EXIT_DIVERGED, EXIT_NO_GPU  # a diverged run; setup's GPU check
from model.datadir import STATUS as DATA_STATUS  # the data download's status file
from model.sync import EXIT_BUCKET, EXIT_DATA, EXIT_FINAL_PUSH  # the exit codes of the node's sync steps
from model.watchdog import EXIT_STALLED, STALLED, STARTED

NODE_HOME_DEFAULT = f"$HOME/{NODE_HOME}"
MASTER_PORT = 8008
# CUDA builds of torch on PyTorch's wheel index, newest first: the node takes the newest its driver runs.
TORCH_CUDA_BUILDS = ("130", "128", "126")
TORCH_INDEX = "https://download.pytorch.org/whl"

# Shell functions both node scripts use: the deadman (model/deadman.py) and which build the node holds.
NODE_FUNCTIONS = r"""exec 3>&2  # the job's log: the deadman's line gets there even from a call whose stderr is silenced
bound() {  # bound PHASE SECONDS: the phase's bound; GPT2CLOUD_BOUND_<PHASE> shortens it (tests)
  local var
  var="@BOUND_ENV@$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  echo "${!var:-$2}"
}
tree_of() {  # tree_of PID: it and its descendants (torchrun's workers run in sessions of their own)
  local all="$1" level="$1"
  while level="$(pgrep -P "$level" | paste -sd, -)" && [ -n "$level" ]; do all="$all,$level"; done
  echo "${all//,/ }"
}
kill_tree() {  # kill_tree PID: TERM the tree, KILL what is left after 10 s; never waits longer (a process
  local pids p alive  # stuck in the kernel, as on a wedged driver, outlives even KILL)
  pids="$(tree_of "$1")"
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 100); do
    alive=""
    for p in $pids; do if kill -0 "$p" 2>/dev/null; then alive=1; fi; done
    if [ -z "$alive" ]; then return 0; fi
    sleep 0.1
  done
  kill -KILL $pids 2>/dev/null
  return 0
}
bounded() {  # bounded SECONDS CMD...: CMD, given up on after SECONDS (its tree killed, HUNG=1, status 124)
  HUNG=""
  "${@:2}" &
  local pid=$! end=$((SECONDS + $1))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$end" ]; then HUNG=1; kill_tree "$pid"; return 124; fi
    sleep 0.2
  done
  wait "$pid"
}
deadman() {  # deadman PHASE SECONDS CODE: a phase past its bound: one line and a timeline event (the caller ends)
  REASON="$1 did not finish within $2 s (a hang)"  # what the job's end notification says (notify_end)
  echo "gpt2cloud: DEADMAN: $1 did not finish within $2 s (a hang: nothing would ever end it, and the node would" \
    "bill on); the job ends here (exit $3), so that autostop removes the node" >&3
  mkdir -p "$NODE_HOME/out"
  printf '{"event": "deadman", "time": %s, "phase": "%s", "seconds": %s, "code": %s}\n' "$(date +%s.%N)" "$1" "$2" \
    "$3" >> "$NODE_HOME/out/@TIMELINE@"
}
workdir_build() {  # the sha256 of the wheel in the workdir: the build of the trainer this task ships
  { sha256sum ./gpt2cloud-*.whl 2>/dev/null || shasum -a 256 ./gpt2cloud-*.whl; } | cut -d' ' -f1
}
node_deps() {  # what the venv must hold: the task's torch pin and the node requirements
  echo "${GPT2CLOUD_TORCH_SPEC:-torch} @NODE_DEPS@"
}
notify() {  # notify EVENT TEXT [ARGS...]: tell --notify's URLs (model/notify_cli.py) within @NOTIFY_BOUND@ s; never the
  # job's status. Run from this task's wheel (a zip Python imports from): setup may not have installed it yet.
  # The URLs stay in the environment (a secret): never on a command line, never in a log.
  local py="${PY:-${GPT2CLOUD_PYTHON:-python3}}" wheel=""
  if [ -z "${GPT2CLOUD_NOTIFY:-}" ]; then return 0; fi
  for wheel in "$PWD"/gpt2cloud-*.whl; do break; done
  if [ ! -f "$wheel" ]; then wheel="$NODE_HOME/site"; fi
  if [ ! -x "$py" ]; then py="$(command -v python3)" || return 0; fi
  PYTHONPATH="$wheel" timeout -k 2 @NOTIFY_BOUND@ "$py" -m model.notify_cli "$1" --text "$2" "${@:3}" || true
}
notify_end() {  # notify_end CODE: how the job ended, told once as it exits (the scripts' EXIT trap): a failure and
  # what was saved, a stall, a deadman, a signal (a preemption's shutdown, `down`, a cancel). The trainer tells
  # its own ends (finish, stops, divergence), so 0 and EXIT_DIVERGED tell nothing here. Node 0 tells every
  # end; another node only a failure of its own (a peer's cancel reaches it as a signal).
  local code="$1" event rank="${RANK:-${SKYPILOT_SETUP_NODE_RANK:-0}}" node=()
  case "$code" in
    0|@EXIT_DIVERGED@) event="" ;;
    @EXIT_STALLED@) event=stall ;;
    @EXIT_SETUP_HUNG@|@EXIT_PULL_HUNG@|@EXIT_DATA_HUNG@|@EXIT_STARTUP_HUNG@|@EXIT_RENDEZVOUS_HUNG@) event=deadman ;;
    129|130|143) event=preemption ;;  # SIGHUP, SIGINT, SIGTERM
    *) event=failed ;;
  esac
  # the trainer was told to stop by a signal (a shutdown signals every process: the log's tee may be gone, and
  # the write that finds it gone ends this script with a status of 0 here)
  if [ -n "${SIGNALLED:-}" ]; then event=preemption REASON="${REASON:-a signal stopped the trainer}"; fi
  if [ -z "$event" ]; then return 0; fi
  if [ "$rank" != 0 ] && [ "$event" = preemption ]; then return 0; fi
  if [ "${SKYPILOT_NUM_NODES:-1}" -gt 1 ]; then node=(--node "$rank of $SKYPILOT_NUM_NODES"); fi
  notify "$event" "${REASON:-}" --code "$code" --out "$NODE_HOME/out" --in-bucket "${IN_BUCKET:-yes}" \
    "${node[@]}"
}
"""

SETUP_SCRIPT = r"""set -euo pipefail
# gpt2cloud node setup: the trainer's dependencies (never skypilot) and this exact build of the trainer.
# Fast paths, in order: dependencies already installed on this node (a relaunch: nothing to do); a baked
# image whose Python has CUDA torch (--image docker:...: torch is not downloaded again); uv, which fetches
# the ~3 GB of CUDA wheels in parallel (pip when uv is not to be had). Each part's span goes to the timeline.
# Each part has a bound (model/deadman.py SETUP_BOUNDS): a part that hangs ends the job (a job stuck in
# SETTING_UP is never idle, so autostop would never remove the node).
NODE_HOME="${GPT2CLOUD_NODE_HOME:-@NODE_HOME_DEFAULT@}"
mkdir -p "$NODE_HOME"
@NODE_FUNCTIONS@
trap 'notify_end $?' EXIT  # a setup that fails (no GPU, a part that hung) is the job's end: --notify hears of it
: > "$NODE_HOME/setup_times"
part() {  # part NAME START: a line "NAME START END" that the run script turns into timeline events
  echo "$1 $2 $(date +%s.%N)" >> "$NODE_HOME/setup_times"
}
run_part() {  # run_part PART SECONDS CMD...: CMD within its bound; past it the job ends (EXIT_SETUP_HUNG)
  local limit rc
  limit="$(bound "$1" "$2")"
  bounded "$limit" "${@:3}" && return 0
  rc=$?
  if [ -n "$HUNG" ]; then deadman "setup ($1)" "$limit" @EXIT_SETUP_HUNG@; exit @EXIT_SETUP_HUNG@; fi
  return "$rc"
}
SETUP_START="$(date +%s.%N)"
: "${GPT2CLOUD_TORCH_SPEC:=torch}"  # the task sets the exact pin; a hand-run setup gets the latest
# (the run script compares DEPS with what the node recorded in $NODE_HOME/deps)
DEPS="$GPT2CLOUD_TORCH_SPEC @NODE_DEPS@"
if [ -n "${GPT2CLOUD_PYTHON:-}" ]; then
  PY="$GPT2CLOUD_PYTHON"  # --infra local: this machine's Python already has every dependency
elif [ -x "$NODE_HOME/venv/bin/python" ] && [ "$(cat "$NODE_HOME/deps" 2>/dev/null)" = "$DEPS" ]; then
  PY="$NODE_HOME/venv/bin/python"
  echo "gpt2cloud: dependencies already on this node ($DEPS)"
else
  T="$(date +%s.%N)"
  rm -rf "$NODE_HOME/venv" "$NODE_HOME/deps"
  VENV_FLAGS=()
  if python3 -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    VENV_FLAGS=(--system-site-packages)  # a baked image: its CUDA torch is the one to use
    BAKED_TORCH="$(python3 -c 'import torch; print(torch.__version__)')"
  fi
  run_part venv @BOUND_VENV@ python3 -m venv "${VENV_FLAGS[@]}" "$NODE_HOME/venv"
  PY="$NODE_HOME/venv/bin/python"
  INSTALL=("$PY" -m pip install -q)
  if run_part venv @BOUND_VENV@ "$PY" -m pip install -q uv 2>/dev/null && "$PY" -m uv --version >/dev/null 2>&1; then
    INSTALL=("$PY" -m uv pip install -q --python "$PY")
  fi
  part venv "$T"
  T="$(date +%s.%N)"
  if [ -n "${BAKED_TORCH:-}" ]; then
    echo "gpt2cloud: torch $BAKED_TORCH from the image"
  else
    # torch built for a CUDA the driver runs: `nvidia-smi` names the newest CUDA the driver supports.
    run_part nvidia_smi @BOUND_NVIDIA_SMI@ nvidia-smi > "$NODE_HOME/nvidia-smi.txt" 2>/dev/null || true
    DRIVER_CUDA="$(sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]\).*/\1\2/p' "$NODE_HOME/nvidia-smi.txt" | head -n1)"
    TORCH_INDEX=()
    for CU in @TORCH_CUDA_BUILDS@; do
      if [ -n "$DRIVER_CUDA" ] && [ "$DRIVER_CUDA" -ge "$CU" ]; then
        if [ "${INSTALL[2]}" = uv ]; then TORCH_INDEX=(--torch-backend "cu$CU")
        else TORCH_INDEX=(--index-url "@TORCH_INDEX@/cu$CU" --extra-index-url https://pypi.org/simple); fi
        break
      fi
    done
    echo "gpt2cloud: driver supports CUDA ${DRIVER_CUDA:-unknown}; torch ${TORCH_INDEX[1]:-from PyPI} via ${INSTALL[2]}"
    run_part torch @BOUND_TORCH@ "${INSTALL[@]}" "${TORCH_INDEX[@]}" "$GPT2CLOUD_TORCH_SPEC"
  fi
  part torch "$T"
  T="$(date +%s.%N)"
  run_part deps @BOUND_DEPS@ "${INSTALL[@]}" @NODE_DEPS@
  echo "$DEPS" > "$NODE_HOME/deps"
  part deps "$T"
fi
# The run's trackers' packages (gpt2cloud/launch/build.py NODE_EXTRAS_ENV), only when it asks for them, on the
# fast path too (a relaunch may ask for another tracker): pip skips what is there. Kept out of DEPS, which
# would rebuild the venv (torch included) whenever the trackers change. --infra local: its Python has them.
if [ -z "${GPT2CLOUD_PYTHON:-}" ] && [ -n "${GPT2CLOUD_NODE_EXTRAS:-}" ]; then
  read -r -a EXTRAS <<< "$GPT2CLOUD_NODE_EXTRAS"
  run_part deps @BOUND_DEPS@ "$PY" -m pip install -q "${EXTRAS[@]}"
fi
echo "${GPT2CLOUD_NODE_EXTRAS:-}" > "$NODE_HOME/extras"
if [ "${GPT2CLOUD_DEVICE:-auto}" = cuda ]; then
  T="$(date +%s.%N)"
  # Fail in seconds, not after an hour of billing on CPU: torch must see every GPU this node was given.
  run_part gpu_check @BOUND_GPU_CHECK@ "$PY" -c 'import os, sys, torch
want = int(os.environ["GPT2CLOUD_GPUS_PER_NODE"])
seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
if seen != want:
    sys.exit(f"gpt2cloud: torch {torch.__version__} (CUDA {torch.version.cuda}) sees {seen} of the {want} GPUs this "
             "node was given: the torch build does not match the driver (nvidia-smi); the job stops here")
print(f"gpt2cloud: torch {torch.__version__} sees {seen} GPUs ({torch.cuda.get_device_name(0)})")' || exit @EXIT_NO_GPU@
  part gpu_check "$T"
fi
# This build of the trainer, from the wheel in the workdir: no network. `build` says which one it is: the
# run script compares it with the wheel its task ships (a relaunch onto a live cluster may skip setup).
T="$(date +%s.%N)"
rm -rf "$NODE_HOME/site" "$NODE_HOME/build"
run_part wheel @BOUND_WHEEL@ "$PY" -m pip install -q --no-deps --no-index --target "$NODE_HOME/site" ./gpt2cloud-*.whl
echo "$PY" > "$NODE_HOME/python"
workdir_build > "$NODE_HOME/build"
part wheel "$T"
part setup "$SETUP_START"
echo "gpt2cloud: node ready ($("$PY" --version 2>&1), build $GPT2CLOUD_BUILD)"
"""

RUN_SCRIPT = r"""set -uo pipefail
# gpt2cloud run: resume from the bucket, sync OUT to it while training, push once more at the end.
NODE_HOME="${GPT2CLOUD_NODE_HOME:-@NODE_HOME_DEFAULT@}"
@NODE_FUNCTIONS@
# A relaunch onto a cluster that is still up: SkyPilot skips setup when the task's config hash matches,
# so the node may hold another build of the trainer (or other dependencies) than this task ships. Then
# setup runs again here, taking its fast paths (the same dependencies: only the wheel, in seconds).
if [ ! -f "$NODE_HOME/python" ] || [ "$(cat "$NODE_HOME/build" 2>/dev/null)" != "$(workdir_build)" ] || {
     [ -z "${GPT2CLOUD_PYTHON:-}" ] && [ "$(cat "$NODE_HOME/deps" 2>/dev/null)" != "$(node_deps)" ]; } || {
     [ "$(cat "$NODE_HOME/extras" 2>/dev/null)" != "${GPT2CLOUD_NODE_EXTRAS:-}" ]; }; then
  echo "gpt2cloud: this node holds build $(cut -c1-16 "$NODE_HOME/build" 2>/dev/null || echo none)" \
    "(tracker packages: $(cat "$NODE_HOME/extras" 2>/dev/null || echo none)), not this task's" \
    "($(workdir_build | cut -c1-16); tracker packages: ${GPT2CLOUD_NODE_EXTRAS:-none}): setting it up again"
  IFS= read -r -d '' SETUP_AGAIN <<'GPT2CLOUD_SETUP_SCRIPT' || true
@SETUP_SCRIPT@
GPT2CLOUD_SETUP_SCRIPT
  bash -c "$SETUP_AGAIN" || exit $?  # its own exit codes: no GPU, a setup part that hung
fi
PY="$(cat "$NODE_HOME/python")"
export PYTHONPATH="$NODE_HOME/site${PYTHONPATH:+:$PYTHONPATH}"
RANK="${SKYPILOT_NODE_RANK:-0}"
# However the job ends from here, --notify hears of it once (notify_end); setup run again above told its own.
# IN_BUCKET: whether what the node holds is in the bucket: all of it came from there until the pusher starts; then
# unknown until the final push says.
REASON="" IN_BUCKET=yes SIGNALLED=""
trap 'notify_end $?' EXIT
OUT="$NODE_HOME/out"
DATA="$NODE_HOME/data"
mkdir -p "$OUT/@LOGS@"
rm -f "$OUT/@STALLED@" "$OUT/@STARTED@" "$OUT/@DISK_FULL@" "$OUT/@DIVERGED@"  # an earlier attempt's markers
# A fresh node resumes from the newest complete checkpoint in the bucket (sha256-verified), within its
# bound (a bucket that never answers would keep the job running forever).
PULL_START="$(date +%s.%N)"
PULL_LIMIT="$(bound pull @PULL_BOUND@)"
bounded "$PULL_LIMIT" "$PY" -m model.sync pull "$GPT2CLOUD_RUN_URL" "$OUT" --rank "$RANK"
PULLED=$?
if [ -n "$HUNG" ]; then deadman "the checkpoint pull" "$PULL_LIMIT" @EXIT_PULL_HUNG@; exit @EXIT_PULL_HUNG@; fi
if [ "$PULLED" = @EXIT_DISK_FULL@ ]; then exit @EXIT_DISK_FULL@; fi  # (it said so in one line)
[ "$PULLED" = 0 ] || exit @EXIT_BUCKET@
exec > >(tee -a "$OUT/@LOGS@/node-$RANK.log") 2>&1
exec 3>&2  # the deadman's lines from here on go to the node's log too
echo "gpt2cloud: run $GPT2CLOUD_RUN_ID, node $RANK of $SKYPILOT_NUM_NODES, $SKYPILOT_NUM_GPUS_PER_NODE GPUs"
stop_within() {  # stop_within SECONDS PID: SIGTERM, then SIGKILL if it is still there: a bounded wait
  kill -TERM "$2" 2>/dev/null
  for _ in $(seq $(($1 * 10))); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$2" 2>/dev/null; wait "$2" 2>/dev/null
}
disk_full() {  # whether the trainer ran out of disk: its marker, or under 64 MB and 2% free where OUT or DATA live
  local d size avail
  if [ -f "$OUT/@DISK_FULL@" ]; then return 0; fi
  for d in "$OUT" "$DATA"; do
    read -r size avail < <(df -Pk "$d" 2>/dev/null | awk 'NR == 2 {print $2, $4}')
    if [ -n "${avail:-}" ] && [ "$avail" -lt 65536 ] && [ $((avail * 50)) -lt "$size" ]; then return 0; fi
  done
  return 1
}
say_disk_full() {  # the job's one line about it
  REASON="the node's disk is full (in: $(cat "$OUT/@DISK_FULL@" 2>/dev/null || echo "$OUT or $DATA"))"
  echo "gpt2cloud: the node's disk is full (in: $(cat "$OUT/@DISK_FULL@" 2>/dev/null || echo "$OUT or $DATA")): the" \
    "task's disk_size is too small for this run; exit @EXIT_DISK_FULL@"
}
note() {  # a line of the node's timeline (node 0's is pushed): note EVENT [more JSON fields]
  printf '{"event": "%s", "time": %s%s}\n' "$1" "$(date +%s.%N)" "${2:+, $2}" >> "$OUT/@TIMELINE@"
}
# Billing starts when the node comes up (the launch time on --infra local). The trainer counts its budget
# and time limit from here, plus the earlier attempts' node time: model/config.py node_up (the host's boot,
# never before this launch; the same value every time, so two jobs on one node are one attempt).
if [ -z "${GPT2CLOUD_NODE_UP:-}" ]; then
  GPT2CLOUD_NODE_UP="$("$PY" -m model.config node-up @CONFIG@ 2>/dev/null)" \
    || GPT2CLOUD_NODE_UP="$(awk -v now="$(date +%s.%N)" '{printf "%.3f", now - $1}' /proc/uptime)"
fi
export GPT2CLOUD_NODE_UP
# The price this node bills at (config.json; an any_of launch: the cloud it landed on), for `status`.
# (a launch over GPU candidates: the one it has, as nvidia-smi names it)
GPU_NAME="$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)"
PRICE="$("$PY" -m model.config price-here @CONFIG@ --device-name "$GPU_NAME" 2>/dev/null || echo null)"
# "job" and "attempt": which managed job and which of its attempts came up (gpt2cloud/runs/attempts.py counts
# them: node_up times alone can coincide, e.g. floored at the launch in a container)
ATTEMPT="$(od -An -N6 -tx1 /dev/urandom 2>/dev/null | tr -d ' \n')"
printf '{"event": "node_up", "time": %s, "rank": %s, "price_per_gpu_hour": %s, "job": "%s", "attempt": "%s"}\n' \
  "$GPT2CLOUD_NODE_UP" "$RANK" "$PRICE" "${SKYPILOT_MANAGED_JOB_ID:-}" "${ATTEMPT:-}" >> "$OUT/@TIMELINE@"
# the setup's span, with its parts' seconds (venv, torch, deps, gpu_check, wheel: what to speed up next)
if read -r _ SETUP_START SETUP_END < <(grep '^setup ' "$NODE_HOME/setup_times" 2>/dev/null); then
  PARTS="$(awk '$1 != "setup" {printf "%s\"%s\": %.3f", (n++ ? ", " : ""), $1, $3 - $2}' "$NODE_HOME/setup_times")"
  printf '{"event": "setup", "time": %s, "start": %s, "parts": {%s}}\n' "$SETUP_END" "$SETUP_START" "$PARTS" \
    >> "$OUT/@TIMELINE@"
fi
note pull "\"start\": $PULL_START"
# The shards stream in the background, in the order the trainer reads them (model/streamdata.py); the
# trainer starts once the validation shards and the first training shard are in, and its loader waits
# for a shard still on its way. "data" is that wait (the critical path); data_complete comes when all are in.
DATA_START="$(date +%s.%N)"
rm -f "$DATA/@DATA_STATUS@"
# Only the training shards this run's steps read come (config.json's steps); every validation shard does.
"$PY" -m model.sync data "$GPT2CLOUD_DATA_URL" "$DATA" --timeline "$OUT/@TIMELINE@" --config @CONFIG@ \
  ${GPT2CLOUD_DATA_MAX_MB_PER_S:+--max-mb-per-s "$GPT2CLOUD_DATA_MAX_MB_PER_S"} &
DOWNLOADER=$!
# however the script ends, the download ends with it (and --notify hears how)
trap 'CODE=$?; kill -TERM "$DOWNLOADER" 2>/dev/null; notify_end "$CODE"' EXIT
DATA_LIMIT="$(bound data @DATA_BOUND@)"
DATA_BYTES="$("$PY" -m model.sync wait "$DATA" --pid "$DOWNLOADER" --timeout "$DATA_LIMIT")"
WAITED=$?
if [ "$WAITED" = @EXIT_DATA_HUNG@ ]; then
  deadman "the data wait" "$DATA_LIMIT" @EXIT_DATA_HUNG@
  exit @EXIT_DATA_HUNG@
fi
if [ "$WAITED" != 0 ]; then  # EXIT_DATA, or the download's own code; a full disk may not have let it say so
  if [ "$WAITED" = @EXIT_DISK_FULL@ ] || disk_full; then say_disk_full; exit @EXIT_DISK_FULL@; fi
  exit "$WAITED"
fi
note data "\"start\": $DATA_START, \"bytes\": $DATA_BYTES"
"$PY" -m model.sync push "$OUT" "$GPT2CLOUD_RUN_URL" --rank "$RANK" --every "$GPT2CLOUD_PUSH_EVERY" \
  --keep "$GPT2CLOUD_KEEP_CHECKPOINTS" --retry-seconds "${GPT2CLOUD_PUSH_RETRY_SECONDS:-5}" \
  --final-minutes "${GPT2CLOUD_FINAL_PUSH_MINUTES:-0}" &
PUSHER=$!
IN_BUCKET=unknown
MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"
LIMIT=()  # --max-hours (config.json): a hard stop for a trainer that would not stop itself
MAX_SECONDS="$("$PY" -m model.config hard-limit @CONFIG@ 2>/dev/null || echo 0)"
if [ "$MAX_SECONDS" != 0 ]; then LIMIT=(timeout --kill-after=60 "$MAX_SECONDS"); fi
meet_the_nodes() {  # several nodes: their rendezvous before torchrun's (model/deadman.py): node 0 listens on the
  # master port, the others report to it. A node that never comes is named by every node that is there, within
  # RENDEZVOUS_BOUND (exit EXIT_RENDEZVOUS_HUNG) and within the start-up's bound (which it is part of).
  local limit own
  limit="$(bound rendezvous @RENDEZVOUS_BOUND@)"
  bounded $((STARTUP_END - SECONDS)) "$PY" -m model.deadman rendezvous --rank "$RANK" \
    --nodes "$SKYPILOT_NUM_NODES" --addr "$MASTER_ADDR" \
    --port "${GPT2CLOUD_MASTER_PORT:-@MASTER_PORT@}" --timeout "$limit" \
    --run "$GPT2CLOUD_RUN_ID" --timeline "$OUT/@TIMELINE@"
  RC=$?
  if [ -n "$HUNG" ]; then
    deadman "the trainer's start-up" "$STARTUP_LIMIT" @EXIT_STARTUP_HUNG@
    RC=@EXIT_STARTUP_HUNG@
  fi
  own=$((SECONDS + $(bound startup @STARTUP_BOUND@)))  # the trainer's own start-up still gets its whole bound
  if [ "$own" -gt "$STARTUP_END" ]; then STARTUP_END=$own; STARTUP_LIMIT=$((own - STARTUP_START)); fi
}
run_trainer() {  # torchrun over every node; its start-up bounded until its watchdog starts and says so (OUT/started)
  # torchrun's own rendezvous (a store on the master port) would give up after 600 s with an error that names
  # no node: it waits longer than what is left of the start-up's bound, so the deadman's line says what hung.
  "${LIMIT[@]}" "$PY" -m torch.distributed.run --nnodes="$SKYPILOT_NUM_NODES" \
    --nproc_per_node="$SKYPILOT_NUM_GPUS_PER_NODE" --node_rank="$RANK" --master_addr="$MASTER_ADDR" \
    --master_port="${GPT2CLOUD_MASTER_PORT:-@MASTER_PORT@}" --rdzv-conf "timeout=$((STARTUP_END - SECONDS + 60))" \
    -m model.train --config @CONFIG@ --data "$DATA" --out "$OUT" --resume auto &
  TRAINER=$!
  trap 'SIGNALLED=1; kill -TERM "$TRAINER" 2>/dev/null' TERM INT  # (told as a signal, not a failure)
  while [ ! -f "$OUT/@STARTED@" ] && kill -0 "$TRAINER" 2>/dev/null && [ "$SECONDS" -lt "$STARTUP_END" ]; do
    sleep 1
  done
  if [ ! -f "$OUT/@STARTED@" ] && kill -0 "$TRAINER" 2>/dev/null; then
    kill_tree "$TRAINER"  # not waited for: a process stuck in CUDA init may never go
    deadman "the trainer's start-up" "$STARTUP_LIMIT" @EXIT_STARTUP_HUNG@
    RC=@EXIT_STARTUP_HUNG@
  else
    wait "$TRAINER"; RC=$?
    if kill -0 "$TRAINER" 2>/dev/null; then wait "$TRAINER"; RC=$?; fi
  fi
  echo "gpt2cloud: trainer exited with code $RC"
}
note train_start
# The trainer's start-up (CUDA init, the model, the rendezvous) is bounded from here. With several nodes it
# begins with their rendezvous, where a peer arrives only after its own pull and data wait: those bounds are
# added.
STARTUP_LIMIT="$(bound startup @STARTUP_BOUND@)"
if [ "${SKYPILOT_NUM_NODES:-1}" -gt 1 ]; then
  STARTUP_LIMIT=$((STARTUP_LIMIT + $(bound pull @PULL_BOUND@) + $(bound data @DATA_BOUND@)))
fi
STARTUP_START=$SECONDS
STARTUP_END=$((SECONDS + STARTUP_LIMIT))
RC=0
if [ "${SKYPILOT_NUM_NODES:-1}" -gt 1 ]; then meet_the_nodes; fi
if [ "$RC" = 0 ]; then run_trainer; fi
note train_end "\"code\": $RC"
# The trainer is done with the data: a download still going stops here. Its failure is the job's only
# when the trainer failed too (its loader then said which shard never came).
stop_within 30 "$DOWNLOADER"
if [ "$RC" -ne 0 ] && grep -q '"state": "failed"' "$DATA/@DATA_STATUS@" 2>/dev/null; then
  RC="$(sed -n 's/.*"exit_code": \([0-9][0-9]*\).*/\1/p' "$DATA/@DATA_STATUS@")"  # a full disk has its own
  RC="${RC:-@EXIT_DATA@}"
  if [ "$RC" = @EXIT_DISK_FULL@ ]; then say_disk_full
  else REASON="the data download failed (see $DATA/@DATA_STATUS@)"; echo "gpt2cloud: $REASON; exit $RC"; fi
fi
if [ -f "$OUT/@STALLED@" ]; then
  REASON="the trainer stalled ($(head -c 200 "$OUT/@STALLED@") was the last thing it finished)"
  echo "gpt2cloud: $REASON; exit @EXIT_STALLED@"
  RC=@EXIT_STALLED@
fi
# A diverged run (under torchrun its own exit code is lost): its code, which a managed job never retries.
if [ -f "$OUT/@DIVERGED@" ]; then
  echo "gpt2cloud: the run diverged ($(head -c 300 "$OUT/@DIVERGED@")); exit @EXIT_DIVERGED@"
  RC=@EXIT_DIVERGED@
fi
# A full disk (a checkpoint, the metrics, the log) is the cause whatever else failed with it, and not one
# a relaunch cures: the new node gets the same disk. Its marker (model/deadman.py), or next to no space left.
if [ "$RC" -ne 0 ] && [ "$RC" -ne @EXIT_DISK_FULL@ ] && disk_full; then
  say_disk_full
  RC=@EXIT_DISK_FULL@
fi
note final_push
kill -TERM "$PUSHER" 2>/dev/null
# Not cut short: the final push carries the last checkpoint (GBs); each request has a read timeout and
# the push FINAL_TRIES attempts with backoff (model/sync.py), so this wait ends on its own.
wait "$PUSHER"; PUSHED=$?
IN_BUCKET=yes
if [ "$PUSHED" -ne 0 ]; then
  IN_BUCKET=no
  echo "gpt2cloud: FINAL PUSH FAILED: the newest checkpoint is only on this node, in $OUT. Copy it before autostop"
  echo "gpt2cloud: removes the node: rsync -a $GPT2CLOUD_RUN_ID:$OUT/ runs/$GPT2CLOUD_RUN_ID/"
  if [ "$RC" -eq 0 ]; then RC=@EXIT_FINAL_PUSH@; fi
fi
exit "$RC"
"""


def render(script: str) -> str:
    """A node script with its @NAME@ placeholders filled from the constants."""
    # the run script holds setup, to run again on a node that holds another build (RUN_SCRIPT)
    script = script.replace("@SETUP_SCRIPT@", render(SETUP_SCRIPT)) if "@SETUP_SCRIPT@" in script else script
    values = {"NODE_HOME_DEFAULT": NODE_HOME_DEFAULT, "MASTER_PORT": MASTER_PORT, "EXIT_DATA": EXIT_DATA,
              "EXIT_BUCKET": EXIT_BUCKET, "EXIT_FINAL_PUSH": EXIT_FINAL_PUSH, "EXIT_STALLED": EXIT_STALLED,
              "EXIT_NO_GPU": EXIT_NO_GPU, "EXIT_DIVERGED": EXIT_DIVERGED, "DIVERGED": DIVERGED_MARKER,
              "STALLED": STALLED, "LOGS": LOGS, "CONFIG": CONFIG, "TIMELINE": TIMELINE,
              "DATA_STATUS": DATA_STATUS,
              "TORCH_CUDA_BUILDS": " ".join(TORCH_CUDA_BUILDS), "TORCH_INDEX": TORCH_INDEX,
              "NODE_DEPS": " ".join(NODE_REQUIREMENTS), "NOTIFY_BOUND": math.ceil(notify_cli.CLI_WAIT_S) + 3,
              **deadman_values()}
    script = script.replace("@NODE_FUNCTIONS@", NODE_FUNCTIONS.rstrip("\n"))
    for name, value in values.items():
        script = script.replace(f"@{name}@", str(value))
    return script


def deadman_values() -> dict:
    """The deadman's constants (model/deadman.py) by their placeholder names."""
    values = {f"BOUND_{part.upper()}": seconds for part, seconds in deadman.SETUP_BOUNDS.items()}
    values.update(BOUND_ENV=deadman.BOUND_ENV, PULL_BOUND=deadman.PULL_BOUND, DATA_BOUND=deadman.DATA_BOUND,
                  STARTUP_BOUND=deadman.STARTUP_BOUND, RENDEZVOUS_BOUND=deadman.RENDEZVOUS_BOUND,
                  STARTED=STARTED, DISK_FULL=deadman.DISK_FULL,
                  EXIT_SETUP_HUNG=deadman.EXIT_SETUP_HUNG, EXIT_PULL_HUNG=deadman.EXIT_PULL_HUNG,
                  EXIT_DATA_HUNG=deadman.EXIT_DATA_HUNG, EXIT_STARTUP_HUNG=deadman.EXIT_STARTUP_HUNG,
                  EXIT_DISK_FULL=deadman.EXIT_DISK_FULL, EXIT_RENDEZVOUS_HUNG=deadman.EXIT_RENDEZVOUS_HUNG)
    return values


PREPARE_SETUP_SCRIPT = """\
# gpt2cloud prepare job: everything is installed by the run step, so that a failure there is an ended
# job, which autodown removes (SkyPilot keeps a cluster whose setup failed).
echo "gpt2cloud: prepare job on $(nproc) CPUs"
"""

PREPARE_RUN_SCRIPT = r"""set -euo pipefail
# gpt2cloud prepare job: tokenize SOURCE on this VM's cores, upload the set (manifest last), exit.
NODE_HOME="${GPT2CLOUD_NODE_HOME:-$HOME/.gpt2cloud-prepare}"
mkdir -p "$NODE_HOME"
if [ -n "${GPT2CLOUD_PYTHON:-}" ]; then
  PY="$GPT2CLOUD_PYTHON"  # --infra local: this machine's Python has the requirements already
else
  if [ ! -x "$NODE_HOME/venv/bin/python" ]; then
    if command -v uv >/dev/null 2>&1 || [ -x "$HOME/.local/bin/uv" ]; then
      UV="$(command -v uv || echo "$HOME/.local/bin/uv")"
      "$UV" venv --seed --python 3.11 "$NODE_HOME/venv" || "$UV" venv --seed "$NODE_HOME/venv"
    else
      python3 -m venv "$NODE_HOME/venv"
    fi
  fi
  PY="$NODE_HOME/venv/bin/python"
  "$PY" -m pip install -q --upgrade pip
  read -r -a REQUIREMENTS <<< "$GPT2CLOUD_PREPARE_REQUIREMENTS"
  "$PY" -m pip install -q "${REQUIREMENTS[@]}"
fi
rm -rf "$NODE_HOME/site"
"$PY" -m pip install -q --no-deps --no-index --target "$NODE_HOME/site" ./gpt2cloud-*.whl
export PYTHONPATH="$NODE_HOME/site${PYTHONPATH:+:$PYTHONPATH}"
ARGS=(--shard-tokens "$GPT2CLOUD_SHARD_TOKENS" --val-tokens "$GPT2CLOUD_VAL_TOKENS")
if [ -n "${GPT2CLOUD_LIMIT_TOKENS:-}" ]; then ARGS+=(--limit-tokens "$GPT2CLOUD_LIMIT_TOKENS"); fi
if [ -n "${GPT2CLOUD_SHARD_NAME:-}" ]; then ARGS+=(--name "$GPT2CLOUD_SHARD_NAME"); fi
if [ -n "${GPT2CLOUD_WORKERS:-}" ]; then ARGS+=(--workers "$GPT2CLOUD_WORKERS"); fi
echo "gpt2cloud: tokenizing $GPT2CLOUD_SOURCE (build $GPT2CLOUD_BUILD)"
"$PY" -m gpt2cloud data prepare "$GPT2CLOUD_SOURCE" --out "$NODE_HOME/shards" "${ARGS[@]}"
echo "gpt2cloud: uploading to $GPT2CLOUD_OUT"
"$PY" -m gpt2cloud data upload "$NODE_HOME/shards" "$GPT2CLOUD_OUT"
echo "gpt2cloud: prepared $GPT2CLOUD_OUT"
"""
