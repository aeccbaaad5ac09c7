#!/usr/bin/env bash
# Rerun the `runs` engine comparison: bash tools/enginebench/run_runs.sh [ROUNDS]
# (default 5 rounds of scenario 1 and 3 of scenario 2, alternating runs / redb / runs with a 16 MiB block cache,
#  separate processes; a correctness check (`verify`) first). About 2 min on 2 cores.
# EXT=1 bash run_runs.sh  adds 1M-key puts and 2M-put runs (~4 more minutes).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}"
cargo build --release -q
B=$CARGO_TARGET_DIR/release/enginebench
R=${1:-5}
mkdir -p results
OUT=results/runs-$(date +%Y%m%d-%H%M%S).txt
$B runs verify --preload 20000 --puts 400000 | grep -E '^verify|RESULT' | tee -a "$OUT"
for i in $(seq 1 "$R"); do
  $B runs puts                 | grep RESULT | tee -a "$OUT"
  $B redb puts --cache-mib 24  | grep RESULT | tee -a "$OUT"
  $B runs puts --cache-mib 16  | grep RESULT | sed 's/engine=runs/engine=runs-c16/' | tee -a "$OUT"
done
for i in $(seq 1 3); do
  $B runs load1m               | grep RESULT | tee -a "$OUT"
  $B redb load1m --cache-mib 24 | grep RESULT | tee -a "$OUT"
done
if [ "${EXT:-0}" = 1 ]; then
  # optional, ~4 min: the put pattern on 1M keys (1M preload + 1M random puts) and 2M puts on 100k keys
  for i in $(seq 1 3); do
    $B runs puts --preload 1000000 --puts 1000000 | grep RESULT | sed 's/scenario=puts/scenario=puts1m/' | tee -a "$OUT"
    $B redb puts --preload 1000000 --puts 1000000 | grep RESULT | sed 's/scenario=puts/scenario=puts1m/' | tee -a "$OUT"
  done
  for i in $(seq 1 2); do
    $B runs puts --puts 2000000 | grep RESULT | sed 's/scenario=puts/scenario=puts2m/' | tee -a "$OUT"
    $B redb puts --puts 2000000 | grep RESULT | sed 's/scenario=puts/scenario=puts2m/' | tee -a "$OUT"
  done
fi
python3 summarize.py "$OUT" | tee "${OUT/runs-/summary-runs-}"
