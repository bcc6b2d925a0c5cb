#!/usr/bin/env bash
# Benchmark (not a test): the LDC router versus nginx (Debian package) doing the same job,
# side by side on this machine, in one run, with the same load generator (h2load).
#
# With security on, as users run it: both terminate the clients' TLS and speak mutual TLS
# to the cells with the router's certificate (nginx: `grpc_pass grpcs://` with
# grpc_ssl_certificate, verifying the cells against the platform CA). The router also
# authenticates every call (an ES256 bearer token, as h2load cannot present a client
# certificate) and authorizes it; nginx does neither. There is no run straight to the
# cells: they take calls only from a router certificate, which h2load cannot present.
#
# Both proxies sit in front of the same cell processes of one `ldc up`. The job: read the
# user header (x-ldc-user), send the gRPC call to the owning cell's endpoint of the user's
# colour (the sticky blue/green split; r1-a runs at 50% green and r2-a at 10% during the
# run). The router does it from its routing table; nginx from a generated config: a
# `map $http_x_ldc_user $ldc_upstream` over the benchmark's user set, computed by
# `ldc route` from the same published table, and `grpc_pass` to one upstream per cell and
# colour (with upstream keepalive).
#
# The request is a prebuilt, length-prefixed protobuf GetBalanceRequest: read-only, so the
# cells are not bound by fsync. h2load cannot vary a header per request, so the load is
# LOAD_USERS h2load processes running at once, each pinned to one user (the users cover
# every serving cell and both colours); requests/s is their sum, percentiles come from
# their per-request logs. Also printed: how many answers were gRPC OK (counted by the
# cells), and each proxy's own CPU per request (utime+stime from /proc ÷ requests).
#
#   bench/router.sh                                  # 20 s each, 32 connections x 4 streams
#   SECONDS_EACH=30 CONNECTIONS=64 STREAMS=8 bench/router.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-20}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32}
STREAMS=${STREAMS:-4}
LOAD_USERS=${LOAD_USERS:-8}
MAP_USERS=${MAP_USERS:-1000}
WORK=$(mktemp -d /tmp/ldc-router-bench.XXXXXX)
PIDS=()
cleanup() {
  if [ -f "$WORK/nginx.pid" ]; then kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# LDC_BIN=path runs a given ldc binary (A/B comparisons) instead of building one.
if [ -n "${LDC_BIN:-}" ]; then
  LDC=$LDC_BIN
else
  echo "== building ldc (release)"
  cargo build --release --quiet --bin ldc
  # Honour CARGO_TARGET_DIR (a shared target directory) like cargo does.
  LDC=${CARGO_TARGET_DIR:-target}/release/ldc
fi

echo "== installing nginx and h2load if missing"
if ! command -v nginx >/dev/null || ! command -v h2load >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx nghttp2-client) >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "== ldc up (router, 6 cells x blue+green, embedded store) in $WORK"
"$LDC" --data-dir "$WORK/ldc" up --listen 127.0.0.1:0 > "$WORK/up.log" 2> "$WORK/up.err" &
PIDS+=($!)
for _ in $(seq 1 150); do grep -q "LDC is up" "$WORK/up.log" 2>/dev/null && break; sleep 0.2; done
grep -q "LDC is up" "$WORK/up.log" || { cat "$WORK/up.err"; echo "ldc up did not start" >&2; exit 1; }
ROUTER=$(sed -n 's/^LDC is up: router \([^ ]*\).*/\1/p' "$WORK/up.log")
ADMIN=$(sed -n 's|^  router admin http://\([^/]*\)/.*|\1|p' "$WORK/up.log")
L=("$LDC" --data-dir "$WORK/ldc")
PKI=$WORK/ldc/pki
# A read-only service credential for the load (GetBalance of any user).
TOKEN=$("${L[@]}" token bench --service --scope read --ttl 1h)
"${L[@]}" cell traffic-shift r1-a --green 50
"${L[@]}" cell traffic-shift r2-a --green 10
# The router picks the table up within its poll period; wait until it routes with it.
EPOCH=$("${L[@]}" cell status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["routing_epoch"])')
for _ in $(seq 1 100); do
  python3 - "$ADMIN" "$EPOCH" <<'PY' && break
import json, sys, urllib.request
t = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/table", timeout=2))
sys.exit(0 if t["epoch"] >= int(sys.argv[2]) else 1)
PY
  sleep 0.1
done
ROUTER_PID=$(pgrep -f -- "$WORK/ldc .*router serve" | head -1)

echo "== routing $MAP_USERS users with the published table (ldc route), generating the nginx config"
seq 0 $((MAP_USERS - 1)) | sed 's/^/bench-/' | "${L[@]}" -o json route --stdin > "$WORK/routes.json"
NGINX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/nginx-tmp"
python3 - "$WORK" "$NGINX_PORT" "$LOAD_USERS" "$PKI" <<'PY'
import json, sys
work, port, load_users, pki = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
routes = json.load(open(f"{work}/routes.json"))["routes"]
upstreams = {}
for r in routes:
    name = f'{r["cell"]}_{r["colour"]}'
    upstreams[name] = r["endpoints"]
lines = [
    "worker_processes 2;",
    f"pid {work}/nginx.pid;",
    f"error_log {work}/nginx-error.log warn;",
    "events { worker_connections 8192; }",
    "http {",
    "  access_log off;",
    f"  client_body_temp_path {work}/nginx-tmp/body;",
    f"  proxy_temp_path {work}/nginx-tmp/proxy;",
    f"  fastcgi_temp_path {work}/nginx-tmp/fastcgi;",
    f"  uwsgi_temp_path {work}/nginx-tmp/uwsgi;",
    f"  scgi_temp_path {work}/nginx-tmp/scgi;",
    "  keepalive_requests 100000000;",
    "  keepalive_timeout 300s;",
    "  http2_max_concurrent_streams 1024;",
    "  map $http_x_ldc_user $ldc_upstream {",
    "    default no_such_user;",
]
lines += [f'    {r["user"]} {r["cell"]}_{r["colour"]};' for r in routes]
lines += ["  }"]
for name, eps in sorted(upstreams.items()):
    lines += [f"  upstream {name} {{"]
    lines += [f"    server {e};" for e in eps]
    lines += ["    keepalive 256;", "    keepalive_requests 100000000;", "    keepalive_timeout 300s;", "  }"]
lines += [
    "  upstream no_such_user { server 127.0.0.1:9; }",
    "  server {",
    f"    listen 127.0.0.1:{port} ssl http2;",
    f"    ssl_certificate {pki}/router.pem;",
    f"    ssl_certificate_key {pki}/router.key;",
    "    ssl_session_cache shared:edge:10m;",
    "    location / {",
    "      grpc_pass grpcs://$ldc_upstream;",
    f"      grpc_ssl_certificate {pki}/router.pem;",
    f"      grpc_ssl_certificate_key {pki}/router.key;",
    f"      grpc_ssl_trusted_certificate {pki}/ca.pem;",
    "      grpc_ssl_verify on;",
    "      grpc_ssl_name localhost;",
    "      grpc_ssl_session_reuse on;",
    "    }",
    "  }",
    "}",
]
open(f"{work}/nginx.conf", "w").write("\n".join(lines) + "\n")

# Load users: round-robin over (cell, colour) groups so every serving cell and both colours
# carry load.
groups = {}
for r in routes:
    groups.setdefault((r["cell"], r["colour"]), []).append(r["user"])
keys = sorted(groups)
picked = []
i = 0
while len(picked) < load_users:
    g = groups[keys[i % len(keys)]]
    if g:
        picked.append(g.pop(0))
    i += 1
with open(f"{work}/load-users", "w") as f:
    for u in picked:
        f.write(u + "\n")
for u in picked:
    # gRPC message: compressed flag 0, 4-byte big-endian length, protobuf
    # GetBalanceRequest { user_id = 1 (string) }.
    pb = b"\x0a" + bytes([len(u)]) + u.encode()
    open(f"{work}/body-{u}", "wb").write(b"\x00" + len(pb).to_bytes(4, "big") + pb)
print("load users: " + ", ".join(f"{u} ({r['cell']}/{r['colour']})" for u in picked for r in routes if r["user"] == u))
PY
"$NGINX" -t -c "$WORK/nginx.conf" -p "$WORK" >/dev/null 2>&1 || { "$NGINX" -t -c "$WORK/nginx.conf" -p "$WORK"; exit 1; }
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK"   # daemonises; stopped by cleanup
for _ in $(seq 1 50); do [ -s "$WORK/nginx.pid" ] && break; sleep 0.1; done

echo "== opening the load users' accounts (through the router)"
while read -r u; do "${L[@]}" account open "$u" --currency EUR --key "open-$u" >/dev/null; done < "$WORK/load-users"

cpu_ticks() {  # utime+stime of the given pids, in clock ticks
  python3 - "$@" <<'PY'
import sys
t = 0
for p in sys.argv[1:]:
    try:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        t += int(f[11]) + int(f[12])
    except OSError:
        pass
print(t)
PY
}
grpc_ok() {  # GetBalance answers with gRPC OK, summed over every cell process
  "${L[@]}" cell status -o json | python3 -c '
import json, sys, urllib.request
total = 0
for c in json.load(sys.stdin)["cells"]:
    for m in c["metrics"]:
        if not m: continue
        for line in urllib.request.urlopen(f"http://{m}/metrics", timeout=5).read().decode().splitlines():
            if line.startswith("ldc_cell_requests_total{") and "method=\"GetBalance\"" in line and "code=\"OK\"" in line:
                total += float(line.rsplit(" ", 1)[1])
print(int(total))'
}

# run NAME ADDR PIDS...: h2load over TLS against ADDR, one process per load user, all at
# once; every request carries the bearer token.
run() {
  local name=$1 addr=$2; shift 2
  local per=$((CONNECTIONS / LOAD_USERS)); [ "$per" -ge 1 ] || per=1
  echo "== $name: $LOAD_USERS h2load x $per connections x $STREAMS streams, ${WARMUP}s warm-up + ${SECONDS_EACH}s"
  local ok0 cpu0 cpu1 ok1 hp=()
  ok0=$(grpc_ok)
  cpu0=$(cpu_ticks "$@")
  while read -r u; do
    h2load -D "$SECONDS_EACH" --warm-up-time "$WARMUP" -c "$per" -m "$STREAMS" -t 1 \
      -d "$WORK/body-$u" -H "content-type: application/grpc" -H "te: trailers" -H "x-ldc-user: $u" \
      -H "authorization: Bearer $TOKEN" \
      --log-file "$WORK/$name-$u.log" "https://$addr/ldc.v1.Payments/GetBalance" > "$WORK/$name-$u.out" 2>&1 &
    hp+=($!)
  done < "$WORK/load-users"
  wait "${hp[@]}"
  cpu1=$(cpu_ticks "$@")
  ok1=$(grpc_ok)
  echo "$name $((cpu1 - cpu0)) $((ok1 - ok0))" >> "$WORK/cpu"
}

NGINX_PIDS=("$(cat "$WORK/nginx.pid")")
NGINX_PIDS+=($(pgrep -P "${NGINX_PIDS[0]}"))
run router "$ROUTER" "$ROUTER_PID"
run nginx "127.0.0.1:$NGINX_PORT" "${NGINX_PIDS[@]}"

python3 - "$WORK" "$(getconf CLK_TCK)" "$SECONDS_EACH" "$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')" <<'PY'
import glob, re, sys
work, hz, secs, nginx_version = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cpu = {}
for line in open(f"{work}/cpu"):
    name, ticks, ok = line.split()
    cpu[name] = (int(ticks), int(ok))
res = {}
for name in [n for n in ("router", "nginx") if n in cpu]:
    rps = 0.0; done = 0; ok2xx = 0; errors = 0
    for out in glob.glob(f"{work}/{name}-*.out"):
        t = open(out).read()
        m = re.search(r"finished in [0-9.]+\w*, ([0-9.]+) req/s", t)
        rps += float(m.group(1)) if m else 0.0
        m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", t)
        if m:
            done += int(m.group(1)); ok2xx += int(m.group(2)); errors += int(m.group(3)) + int(m.group(4))
    lat = []
    for log in glob.glob(f"{work}/{name}-*.log"):
        for line in open(log):
            f = line.split("\t")
            if len(f) >= 3:
                lat.append(int(f[2]))
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0 if lat else float("nan")
    ticks, grpc_ok = cpu[name]
    cpu_us = ticks / hz * 1e6 / max(grpc_ok, 1)
    res[name] = dict(rps=rps, p50=pct(0.50), p99=pct(0.99), p999=pct(0.999), cpu=cpu_us, done=done, ok=grpc_ok, errors=errors)
r, n = res["router"], res["nginx"]
print()
print(f"{'':26}{'requests/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'CPU us/req':>12}{'gRPC OK':>10}{'h2load errors':>15}")
for label, x in ((f"ldc-router (TLS+authz)", r), (f"nginx {nginx_version} grpcs", n)):
    print(f"{label:26}{x['rps']:>12.0f}{x['p50']:>9.2f}{x['p99']:>9.2f}{x['p999']:>10.2f}{x['cpu']:>12.1f}{x['ok']:>10}{x['errors']:>15}")
print()
print(f"throughput router / nginx: {r['rps'] / n['rps']:.2f}x   (target >= 1.5x)")
print(f"p99        router / nginx: {r['p99'] / n['p99']:.2f}x   (target <= 0.5x)")
print(f"p99.9      router / nginx: {r['p999'] / n['p999']:.2f}x")
print(f"router CPU per request: {r['cpu']:.1f} us (nginx: {n['cpu']:.1f} us); gRPC OK counts the cells' answers, warm-up included")
PY
