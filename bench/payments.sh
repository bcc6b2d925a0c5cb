#!/usr/bin/env bash
# Benchmark (not a test): durable payments/s of LDC on the embedded store versus PostgreSQL
# (Debian package, default durable settings) running pgbench's built-in TPC-B-like
# transaction (a bank transfer), side by side on this machine, in one run:
#  * the platform as users run it: `ldc up`'s default platform (2 regions x 2 serving cells
#    and a standby each), the load through the router, transfers between random users
#    (most of them cross-cell) and top-ups; with the store split into a file per cell
#    (`--store-layout cells`, the default) and, for comparison, in one file (`one-file`);
#  * one cell, the load straight at it (top-ups), with mutual TLS and with --insecure;
#  * pgbench with the same number of clients.
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
  cell=$("$LDC" --data-dir "$dir" $flags cell status -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); print([c for c in d["cells"] if c["cell"]=="r1-a"][0]["colours"]["blue"]["endpoints"][0])')
  # shellcheck disable=SC2086
  "$LDC" --data-dir "$dir" $flags $cred -o json load --target "$cell" --concurrency "$CLIENTS" --seconds "$SECONDS_EACH" --users 1000 2>/dev/null
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# ldc_platform DIR LAYOUT: `ldc up` (default platform) in DIR with --store-layout LAYOUT,
# then the load through the router with transfers and then top-ups; prints two JSON lines.
ldc_platform() {
  local dir=$1 layout=$2
  "$LDC" --data-dir "$dir" up --listen 127.0.0.1:0 --store-layout "$layout" > "$dir.up.log" 2> "$dir.up.err" &
  local pid=$!
  PIDS+=($pid)
  for _ in $(seq 1 150); do grep -q "LDC is up" "$dir.up.log" 2>/dev/null && break; sleep 0.2; done
  for mix in transfer topup; do
    # With the CPU each process spent per payment and the store syncs per payment.
    python3 bench/measure.py "$pid" "$LDC" "$dir" -- --mix "$mix" --concurrency "$CLIENTS" --seconds "$SECONDS_EACH" --users 1000
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

echo "== LDC platform: ldc up (4 serving cells), through the router, a store file per cell"
CELLS_OUT=$(ldc_platform "$WORK/platform-cells" cells)
echo "$CELLS_OUT"
echo "== LDC platform: the same with every shard in one store file (the layout before shard files)"
ONE_OUT=$(ldc_platform "$WORK/platform-one" one-file)
echo "$ONE_OUT"

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

python3 - "$LDC_JSON" "$PG_OUT" "$PLAIN_JSON" "$CELLS_OUT" "$ONE_OUT" <<'PY'
import json, re, sys
ldc = json.loads(sys.argv[1]); pg = sys.argv[2]; plain = json.loads(sys.argv[3])
cells = [json.loads(l) for l in sys.argv[4].splitlines() if l.startswith("{")]
one = [json.loads(l) for l in sys.argv[5].splitlines() if l.startswith("{")]
tps = float(re.search(r"tps = ([0-9.]+)", pg).group(1))
lat = float(re.search(r"latency average = ([0-9.]+) ms", pg).group(1))
def row(name, r):
    rate = r["payments_per_sec"]
    print(f"{name:44}{rate:>11.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['p999_ms']:>9.2f}{rate / tps:>9.2f}x"
          + (f"  ({r['errors']} errors)" if r.get("errors") else ""))
def bounds(name, r):
    c = r["cpu_us_per_payment"]
    total = sum(c.values())
    print(f"  {name}: CPU us/payment " + ", ".join(f"{k} {v:.0f}" for k, v in c.items())
          + f" = {total:.0f} ({total * r['payments_per_sec'] / 1e6:.2f} cores busy);"
          + f" {r['syncs_per_payment']:.3f} store syncs/payment, {r['commands_per_batch']:.1f} commands/batch")
print()
print(f"{'':44}{'payments/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'p99.9 ms':>9}{'/ pgbench':>10}")
for name, runs in (("platform, file per cell", cells), ("platform, one file", one)):
    for r in runs:
        row(f"{name}: {r['mix']}s", r)
row("one cell direct: topups", ldc)
row("one cell direct, --insecure: topups", plain)
print(f"{'PostgreSQL pgbench tpcb (a transfer)':44}{tps:>11.0f}{'(avg ' + format(lat, '.2f') + ' ms)':>25}")
t = {r["mix"]: r for r in cells}
print()
print("where the time goes (each process's CPU from /proc, syncs and batches from the cells' metrics):")
for name, runs in (("file per cell", cells), ("one file", one)):
    for r in runs:
        bounds(f"{name}, {r['mix']}s", r)
print()
print(f"platform transfers / pgbench: {t['transfer']['payments_per_sec'] / tps:.2f}x, p99 {t['transfer']['p99_ms']:.1f} ms  (target >= 5x, p99 <= 20 ms)")
print(f"platform top-ups / one cell: {t['topup']['payments_per_sec'] / ldc['payments_per_sec']:.2f}x  (target >= 1x)")
o = {r["mix"]: r for r in one}
print(f"file per cell / one file: transfers {t['transfer']['payments_per_sec'] / o['transfer']['payments_per_sec']:.2f}x, top-ups {t['topup']['payments_per_sec'] / o['topup']['payments_per_sec']:.2f}x")
print(f"security cost (one cell): {100 * (1 - ldc['payments_per_sec'] / plain['payments_per_sec']):.1f}% throughput, p99 x{ldc['p99_ms'] / plain['p99_ms']:.2f}  (target within 10%)")
PY
