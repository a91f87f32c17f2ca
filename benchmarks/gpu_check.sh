#!/usr/bin/env bash
# One GPU check of the trainer, at most ~8 minutes on one H100/H200, each part under its own timeout:
#   124M tokens/s and MFU through the real trainer (torchrun, 1 process, compiled) and the bare step
#   (bench_train.py); peak memory vs the estimate for 124M and 1558M (capped to 80 GB); HellaSwag ms per
#   example; checkpoint seconds. Prints one table.
#     bash benchmarks/gpu_check.sh          # on the GPU machine
#     bash benchmarks/gpu_check.sh --dry    # end to end on CPU with gpt2-tiny (no compile), ~1-2 minutes
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
DRY=0; [ "${1:-}" = "--dry" ] && DRY=1
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
RES="$WORK/results.tsv"; : > "$RES"
if [ $DRY = 1 ]; then
  DEV=cpu; SMALL=gpt2-tiny; BIG=gpt2-tiny; COMPILE=""; STEPS=6; T_TRAIN=90; T_BENCH=60; T_MEM=60; T_SMALL=60
  MB_SMALL=8; MB_BIG=8
else
  DEV=cuda; SMALL=gpt2-124m; BIG=gpt2-1558m; COMPILE="--compile"; STEPS=30; T_TRAIN=170; T_BENCH=130; T_MEM=50; T_SMALL=30
  MB_SMALL=64; MB_BIG=8
fi
row() { printf '%s\t%s\n' "$1" "$2" >> "$RES"; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# ---- 1. the real trainer: torchrun, 1 process, random shards ----
timeout $T_TRAIN "$PY" - "$WORK" "$SMALL" "$STEPS" "$DEV" "$([ -n "$COMPILE" ] && echo 1 || echo 0)" <<'PYEOF' >"$WORK/train.log" 2>&1
import json, subprocess, sys, statistics
from pathlib import Path
import numpy as np
from gpt2cloud.cost.recipes import load_recipe
from model.shards import write_shard
work, recipe, steps, dev, comp = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
cfg = load_recipe(recipe).to_train_config(compile=comp, val_every=10**6, sample_every=10**6, checkpoint_every=10**6,
                                          hellaswag_every=0, device="cuda" if dev == "cuda" else "auto")
cfg.steps = steps
if dev == "cuda":
    from gpt2cloud.cost.hardware import gpu_from_device_name, gpu_spec
    import torch
    g = gpu_from_device_name(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30)
    cfg.peak_flops_per_gpu = gpu_spec(g).peak_bf16_tflops * 1e12 if g else 0.0
data = work / "data"; data.mkdir()
n = cfg.tokens_per_step * (steps + 2) + 1
rng = np.random.default_rng(0)
write_shard(data / "x_val_000000.bin", rng.integers(0, 50257, cfg.micro_batch * cfg.model.block_size * 2 + 1))
write_shard(data / "x_train_000001.bin", rng.integers(0, 50257, n))
(work / "config.json").write_text(cfg.to_json())
subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "model.train",
                "--config", str(work / "config.json"), "--data", str(data), "--out", str(work / "out")], check=True)
rows = [json.loads(l) for l in (work / "out" / "metrics.jsonl").read_text().splitlines()]
start = rows[0]
steady = [r for r in rows if "loss" in r][max(2, steps // 3):]
tok = statistics.median(r["tokens_per_second"] for r in steady)
mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
print(f"RESULT\ttrainer {recipe} (torchrun 1 proc, ddp {start['ddp']}, compile {comp})\t"
      f"{tok:,.0f} tok/s, MFU {statistics.median(mfu):.1%}" if mfu else
      f"RESULT\ttrainer {recipe} (torchrun 1 proc, ddp {start['ddp']}, compile {comp})\t{tok:,.0f} tok/s")
PYEOF
rc=$?; grep -h '^RESULT' "$WORK/train.log" | cut -f2- >> "$RES" || true
[ $rc = 0 ] || row "trainer $SMALL" "FAILED (exit $rc; $(tail -1 "$WORK/train.log" | cut -c1-80))"

# ---- 2. the bare step ----
if out=$(timeout $T_BENCH "$PY" benchmarks/bench_train.py --recipe $SMALL --device $DEV $COMPILE --steps 10 --warmup 3 \
         --json 2>"$WORK/bench.err"); then
  row "bare step $SMALL (bench_train.py)" "$(echo "$out" | tail -1 | "$PY" -c "import json,sys; d=json.load(sys.stdin)
mfu = format(d['mfu'], '.1%') if d['mfu'] else 'n/a'
print(f\"{d['tokens_per_second']:,.0f} tok/s, MFU {mfu} (mb {d['micro_batch']} x accum {d['accum']})\")")"
else row "bare step $SMALL (bench_train.py)" "FAILED ($(tail -1 "$WORK/bench.err" | cut -c1-80))"; fi

# ---- 3. peak memory vs the estimate (and bench_memory.py's trace when it exists) ----
SPECS="$SMALL:$MB_SMALL"; [ $DRY = 1 ] || SPECS="$SPECS $BIG:$MB_BIG"
for spec in $SPECS; do
  r=${spec%%:*}; mb=${spec##*:}
  measured=$(timeout $T_MEM "$PY" benchmarks/bench_train.py --recipe $r --micro-batch $mb --accum 2 --device $DEV \
             --steps 1 --warmup 1 --memory-cap-gb 80 --json 2>"$WORK/mem.err" | tail -1 | "$PY" -c \
             'import json,sys; d=json.load(sys.stdin); v=d["peak_memory_gib"]; print("n/a (CPU)" if v is None else f"{v:.2f} GiB")' 2>/dev/null) \
             || measured="FAILED ($(tail -1 "$WORK/mem.err" | cut -c1-60))"
  est=$("$PY" -c "from gpt2cloud.cost.recipes import load_recipe; from gpt2cloud.cost.estimate import memory_per_gpu
print(f'{memory_per_gpu(load_recipe(\"$r\").to_train_config().model, $mb).total_gib:.2f} GiB')" 2>/dev/null || echo n/a)
  traced=n/a
  if [ -f benchmarks/bench_memory.py ]; then
    traced=$(timeout $T_MEM "$PY" benchmarks/bench_memory.py --recipe $r --micro-batch $mb --json 2>/dev/null | tail -1 | \
             "$PY" -c 'import json,sys; print("%.2f GiB" % json.load(sys.stdin)["peak_gib"])' 2>/dev/null || echo n/a)
  fi
  row "peak memory $r mb $mb" "measured $measured | estimate $est | traced $traced"
done

# ---- 4. HellaSwag ms per example, 5. checkpoint seconds ----
timeout $T_SMALL "$PY" - "$SMALL" "$DEV" "$WORK" <<'PYEOF' >>"$RES" 2>"$WORK/small.err" || row "hellaswag / checkpoint" "FAILED ($(tail -1 "$WORK/small.err" | cut -c1-80))"
import sys, time, torch
from gpt2cloud.cost.recipes import load_recipe
from model import checkpoint as ckpt
from model.eval import hellaswag_scores
from model.gpt import GPT
recipe, dev, work = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_recipe(recipe).to_train_config()
model = GPT(cfg.model).to(dev).eval()
ex = [{"ctx": "A man is sitting on a roof. He" * (1 + i % 3), "label": i % 4,
       "endings": [f"is using wrap to wrap a pair of skis {i}.", "is ripping level tiles off.",
                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."]} for i in range(64 if dev == "cpu" else 512)]
hellaswag_scores(model, ex[:16], dev)  # warm-up, tokenizes those once
t0 = time.perf_counter(); hellaswag_scores(model, ex, dev)
if dev == "cuda": torch.cuda.synchronize()
print(f"HellaSwag ({recipe}, batched)\t{(time.perf_counter() - t0) / len(ex) * 1000:.2f} ms/example ({len(ex)} examples)")
opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, "cuda" if dev == "cuda" else "cpu")
model.train(); x = torch.randint(0, 50257, (1, 64), device=dev)
model(x, x)[1].backward(); opt.step()  # the optimizer state exists, as in a real checkpoint
t0 = time.perf_counter()
path = ckpt.write_checkpoint(work, 1, model, {"optimizer": opt.state_dict(), "scaler": None}, {"step": 1},
                             [ckpt.rng_state()], {"model": {}, "recipe_name": recipe}, 1)
size = sum(f.stat().st_size for f in path.iterdir()) / 2**30
print(f"checkpoint ({recipe}, weights + AdamW)\t{time.perf_counter() - t0:.2f} s for {size:.2f} GiB")
PYEOF

# ---- the table ----
echo
echo "gpt2cloud GPU check ($([ $DRY = 1 ] && echo 'dry run: CPU, gpt2-tiny' || "$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null))"
"$PY" -c '
import sys
rows = [l.rstrip("\n").split("\t", 1) for l in open(sys.argv[1]) if "\t" in l]
w = max(len(k) for k, _ in rows)
print("-" * (w + 50))
for k, v in rows: print(f"{k:<{w}}  {v}")
' "$RES"
