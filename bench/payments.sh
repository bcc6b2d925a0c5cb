#!/usr/bin/env bash
# Benchmark (not a test): durable payments/s of one LDC cell on the embedded store versus
# PostgreSQL (Debian package, default durable settings) running pgbench's built-in
# TPC-B-like transaction (a bank transfer), side by side on this machine, in one run.
#
#   bench/payments.sh            # 15 s each, 64 clients; also the same build --insecure
#                                # (the cost of mutual TLS on the cell)
#   SECONDS_EACH=30 CLIENTS=32 bench/payments.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-15}
CLIENTS=${CLIENTS:-64}
WORK=$(mktemp -d /tmp/ldc-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "${PGBIN:-}" ] && [ -d "$WORK/pg" ]; then runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true; fi
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building ldc (release)"
cargo build --release --quiet
LDC=${CARGO_TARGET_DIR:-target}/release/ldc

echo "== installing PostgreSQL and pgbench if missing"
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib) >/dev/null
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

# ldc_cell DIR FLAGS CREDENTIAL: `ldc up` with one cell in DIR, then the load straight at
# it; prints the load's JSON.
ldc_cell() {
  local dir=$1 flags=$2 cred=$3
  # shellcheck disable=SC2086
  "$LDC" --data-dir "$dir" $flags up --listen 127.0.0.1:0 --regions 1 --cells-per-region 1 > "$dir.up.log" 2> "$dir.up.err" &
  local pid=$!
  PIDS+=($pid)
  for _ in $(seq 1 100); do grep -q "LDC is up" "$dir.up.log" 2>/dev/null && break; sleep 0.2; done
  local cell
  # shellcheck disable=SC2086
  cell=$("$LDC" --data-dir "$dir" $flags cell status -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); print([c for c in d["cells"] if c["cell"]=="r1-a"][0]["endpoints"]["blue"][0])')
  # shellcheck disable=SC2086
  "$LDC" --data-dir "$dir" $flags $cred -o json load --target "$cell" --concurrency "$CLIENTS" --seconds "$SECONDS_EACH" --users 1000 2>/dev/null
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

echo "== LDC: one cell, embedded store (SQLite WAL, synchronous=FULL), group commit, mutual TLS"
# A cell takes payment calls only from a router certificate: the load generator plays the router.
LDC_JSON=$(ldc_cell "$WORK/ldc" "" "--credential router")
echo "$LDC_JSON"
echo "== the same build with --insecure (plaintext, no authentication): the cost of security"
PLAIN_JSON=$(ldc_cell "$WORK/ldc-plain" "--insecure" "")
echo "$PLAIN_JSON"

echo "== PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'): pgbench TPC-B-like, default durable settings (fsync=on, synchronous_commit=on)"
mkdir -p "$WORK/pg" && chown postgres "$WORK/pg" "$WORK"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" >/dev/null
PORT=$((20000 + RANDOM % 20000))
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/log" -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
runuser -u postgres -- "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -i -s 10 postgres >/dev/null 2>&1
PG_OUT=$(runuser -u postgres -- "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -c "$CLIENTS" -j 2 -T "$SECONDS_EACH" -M prepared -r postgres 2>/dev/null)
echo "$PG_OUT" | grep -E "tps|latency average|number of transactions actually"

python3 - "$LDC_JSON" "$PG_OUT" "$PLAIN_JSON" <<'PY'
import json, re, sys
ldc = json.loads(sys.argv[1]); pg = sys.argv[2]; plain = json.loads(sys.argv[3])
tps = float(re.search(r"tps = ([0-9.]+)", pg).group(1))
lat = float(re.search(r"latency average = ([0-9.]+) ms", pg).group(1))
r = ldc["payments_per_sec"]
print()
print(f"{'':28}{'payments/s':>12}{'p50 ms':>9}{'p99 ms':>9}")
print(f"{'LDC cell (embedded store)':28}{r:>12.0f}{ldc['p50_ms']:>9.2f}{ldc['p99_ms']:>9.2f}")
print(f"{'PostgreSQL pgbench tpcb':28}{tps:>12.0f}{'(avg ' + format(lat, '.2f') + ')':>18}")
print(f"{'LDC cell, --insecure':28}{plain['payments_per_sec']:>12.0f}{plain['p50_ms']:>9.2f}{plain['p99_ms']:>9.2f}")
print(f"ratio LDC / PostgreSQL: {r / tps:.2f}x  (target >= 5x)")
print(f"security cost: {100 * (1 - r / plain['payments_per_sec']):.1f}% throughput, p99 x{ldc['p99_ms'] / plain['p99_ms']:.2f}  (target within 10%)")
PY
