#!/usr/bin/env bash
# Rerun: bash tools/enginebench/run.sh [ROUNDS]   (default 5 rounds, alternating engines, separate processes)
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}"
cargo build --release -q
B=$CARGO_TARGET_DIR/release/enginebench
R=${1:-5}
mkdir -p results
OUT=results/run-$(date +%Y%m%d-%H%M%S).txt
for i in $(seq 1 "$R"); do
  # scenario 1: 100k preload + 300k puts, alternating engines
  $B fjall puts --cache-mib 16 --memtable-mib 8 --persist buffer | grep RESULT | tee -a "$OUT"
  $B redb  puts --cache-mib 24                                   | grep RESULT | tee -a "$OUT"
  $B runs  puts                                                  | grep RESULT | tee -a "$OUT"
  # variants (fjall defaults: 32 MiB cache, 64 MiB memtables; and no per-batch write() to OS)
  $B fjall puts --cache-mib 32 --memtable-mib 64 --persist buffer | grep RESULT | sed 's/engine=fjall/engine=fjall-default/' | tee -a "$OUT"
  $B fjall puts --cache-mib 16 --memtable-mib 8 --persist none    | grep RESULT | sed 's/engine=fjall/engine=fjall-nobufflush/' | tee -a "$OUT"
  $B fjall puts --cache-mib 16 --memtable-mib 8 --persist buffer --workers 1 | grep RESULT | sed 's/engine=fjall/engine=fjall-w1/' | tee -a "$OUT"
  $B fjall puts --cache-mib 16 --memtable-mib 32 --persist buffer | grep RESULT | sed 's/engine=fjall/engine=fjall-mt32/' | tee -a "$OUT"
done
for i in $(seq 1 3); do
  # scenario 2: 1M sequential keys (256 B values + history), RSS after load, 100k random lookups
  $B fjall load1m --cache-mib 16 --memtable-mib 8 --persist buffer | grep RESULT | tee -a "$OUT"
  $B redb  load1m --cache-mib 24                                   | grep RESULT | tee -a "$OUT"
  $B runs  load1m                                                  | grep RESULT | tee -a "$OUT"
done
python3 summarize.py "$OUT"
