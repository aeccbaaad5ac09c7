#!/usr/bin/env bash
# The side-by-side benchmark: installs the peers (etcd and Redis from Debian, protoc
# for the etcd gRPC client), builds Amphora and the harness in release mode, starts
# every system on loopback (fresh data each), runs every workload against each with
# the same load generator, and writes BENCHMARKS.md and bench-results.json.
#
# Extra arguments go to `amphora-bench suite` (see `amphora-bench suite --help`),
# for example: scripts/bench.sh --duration 5s --clients 32
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v redis-server >/dev/null || need+=(redis-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  # Debian starts the packaged services; only the harness's own instances should run.
  service redis-server stop >/dev/null 2>&1 || true
  service etcd stop >/dev/null 2>&1 || true
fi

cargo build --release --locked -p amphora-server -p amphora-bench --features amphora-bench/etcd
exec target/release/amphora-bench suite \
  --amphora-bin target/release/amphora \
  --etcd-bin "$(command -v etcd)" \
  --redis-bin "$(command -v redis-server)" \
  --json bench-results.json \
  --markdown BENCHMARKS.md \
  --command "scripts/bench.sh${*:+ $*}" \
  "$@"
