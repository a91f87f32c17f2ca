#!/usr/bin/env bash
# The demo: what will GPT-2 cost? (the lecture's example: GPT-2 1.5B on one 8xH100 node at $3/GPU-hour)
# Then the whole cloud flow on this machine, no cloud account: prepare a corpus, launch gpt2-tiny with
# `--infra local` (the same setup/run scripts SkyPilot would run on a node, 2 CPU ranks), watch it,
# fetch the checkpoint from the bucket and talk to it.
set -euo pipefail
echo "== gpt2cloud estimate gpt2-1558m --gpus H100:8 --price 3"
gpt2cloud estimate gpt2-1558m --gpus H100:8 --price 3
echo
echo "== gpt2cloud estimate gpt2-124m --compare"
gpt2cloud estimate gpt2-124m --compare

DEMO="$(pwd)/demo"
export GPT2CLOUD_HOME="$DEMO/gpt2cloud-home"   # the demo's own run registry (yours: ~/.gpt2cloud)
BUCKET="file://$DEMO/bucket"                   # s3://... works the same (set AWS_ENDPOINT_URL for R2/MinIO)
RUN=demo-tiny
gpt2cloud down "$RUN" >/dev/null 2>&1 || true  # a demo left running by an earlier, interrupted `make demo`
# the demo's own sandbox, written again from scratch: a rerun of `make demo` starts clean (its corpus is
# written anew, and `data prepare` refuses to mix shards of another source into the old ones)
rm -rf "$DEMO/bucket" "$GPT2CLOUD_HOME" "$DEMO/fetched" "$DEMO/shards" "$DEMO/hf"

echo
echo "== a small corpus, tokenized into llm.c shards, uploaded with its manifest"
python scripts/tiny_corpus.py "$DEMO/corpus.jsonl" --docs 400
gpt2cloud data prepare "$DEMO/corpus.jsonl" --out "$DEMO/shards" --shard-tokens 40000 --val-tokens 4096
gpt2cloud data upload "$DEMO/shards" "$BUCKET/data"

echo
echo "== gpt2cloud launch gpt2-tiny --infra local --gpus CPU:2 ... (2 CPU ranks, as SkyPilot would run one node)"
gpt2cloud launch gpt2-tiny --infra local --gpus CPU:2 --steps 30 --max-cost 1 \
  --data "$BUCKET/data" --bucket "$BUCKET/runs" --name "$RUN" --push-every 5 --yes
sleep 20
echo
echo "== gpt2cloud status $RUN   (while it trains: progress comes from the bucket's metrics.jsonl)"
gpt2cloud status "$RUN"
echo
echo "== gpt2cloud logs $RUN --follow"
gpt2cloud logs "$RUN" --follow | tail -n 25
echo
echo "== gpt2cloud status $RUN"
gpt2cloud status "$RUN"
echo
echo "== gpt2cloud fetch $RUN --logs   (every file sha256-verified against the checkpoint's manifest)"
CKPT="$(gpt2cloud fetch "$RUN" --dest "$DEMO/fetched" --logs --json | python -c 'import json,sys; print(json.load(sys.stdin)["checkpoint"])')"
echo "checkpoint: $CKPT"
echo
echo "== gpt2cloud sample $CKPT"
gpt2cloud sample "$CKPT" --max-new-tokens 24
echo
echo "== gpt2cloud runs"
gpt2cloud runs

echo
echo "== gpt2cloud eval $CKPT --val $DEMO/shards   (val loss on the val shard)"
gpt2cloud eval "$CKPT" --val "$DEMO/shards"
echo
echo "== gpt2cloud report $RUN   (estimate vs actual, losses, samples, and the plot)"
gpt2cloud report "$RUN" --out "$DEMO/report.md"
sed -n '1,40p' "$DEMO/report.md"
echo
echo "== gpt2cloud export $CKPT --hf $DEMO/hf   (a directory transformers' GPT2LMHeadModel loads)"
gpt2cloud export "$CKPT" --hf "$DEMO/hf"
echo
echo "Done. The plot: $DEMO/report.png; the report: $DEMO/report.md"
