#!/usr/bin/env bash
# The demo: what will GPT-2 cost? (the lecture's example: GPT-2 1.5B on one 8xH100 node at $3/GPU-hour)
set -euo pipefail
echo "== gpt2cloud estimate gpt2-1558m --gpus H100:8 --price 3"
gpt2cloud estimate gpt2-1558m --gpus H100:8 --price 3
echo
echo "== gpt2cloud estimate gpt2-124m --compare"
gpt2cloud estimate gpt2-124m --compare
