#!/usr/bin/env bash
# Real nodes for the e2e cluster: a kubelet (built by `e2e/cluster.sh install` from the same
# pinned k8s.io/kubernetes module as the control plane) on Debian's containerd and runc,
# with pod networking from Debian's CNI plugins (bridge + host-local + loopback), joined to a
# cluster of `e2e/cluster.sh up`. Images are imported into the node's containerd, never
# pulled; the pause image is built here.
#
#   e2e/node.sh up CLUSTER NODE REGION INDEX   start a node (INDEX 1..200: its ports, its pod subnet)
#   e2e/node.sh import NODE ARCHIVE...         import OCI/docker archives into the node's containerd
#   e2e/node.sh ctr NODE ARGS...               ctr on the node's containerd (namespace k8s.io)
#   e2e/node.sh down CLUSTER NODE              stop the node's processes, delete it and its state
#
# Everything a node has stays on this machine: its processes listen on 127.0.0.1, its pods
# live on a bridge `ldcbrINDEX` (10.244.INDEX.0/24) that the node's CNI creates.
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${LDC_CACHE:-$HOME/.cache/ldc}
K8S_VERSION=$(sed -n 's/^K8S_VERSION=//p' "$E2E_DIR/cluster.sh")
BIN_DIR=$CACHE_ROOT/k8s-$K8S_VERSION/bin
STATE_ROOT=${LDC_CLUSTER_STATE:-${TMPDIR:-/tmp}/ldc-clusters-$(id -u)}
PAUSE_IMAGE=localhost/ldc-pause:1

log() { printf '[node.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

node_dir() { echo "$STATE_ROOT/nodes/$1"; }
sock() { echo "$(node_dir "$1")/containerd.sock"; }
ctr_() { local n=$1; shift; ctr --address "$(sock "$n")" -n k8s.io "$@"; }

install_packages() {
    "$E2E_DIR/../scripts/apt-install" containerd runc containernetworking-plugins iptables \
        iproute2 buildah busybox-static
}

# The pause image: busybox's sleep as PID 1 of every pod sandbox (cached as an archive).
pause_archive() {
    local out=$CACHE_ROOT/pause/ldc-pause-1.tar
    if [[ ! -f $out ]]; then
        mkdir -p "${out%/*}"
        local b=(buildah --storage-driver vfs) c root
        root=$(mktemp -d)
        mkdir -p "$root/bin"
        cp /bin/busybox "$root/bin/busybox"
        c=$("${b[@]}" from scratch)
        "${b[@]}" copy "$c" "$root" / >/dev/null
        "${b[@]}" config --entrypoint '["/bin/busybox","sleep","2147483647"]' "$c"
        "${b[@]}" commit --quiet "$c" "$PAUSE_IMAGE" >/dev/null
        "${b[@]}" push --quiet "$PAUSE_IMAGE" "oci-archive:$out.tmp:$PAUSE_IMAGE"
        "${b[@]}" rm "$c" >/dev/null
        "${b[@]}" rmi -f "$PAUSE_IMAGE" >/dev/null 2>&1 || true
        rm -rf "$root"
        mv "$out.tmp" "$out"
    fi
    echo "$out"
}

write_containerd_config() {
    local node=$1 index=$2 dir
    dir=$(node_dir "$node")
    containerd config default >"$dir/containerd.default.toml"
    python3 - "$dir" "$index" "$PAUSE_IMAGE" <<'PY'
import re, sys
d, index, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = open(f"{d}/containerd.default.toml").read()
def sub(key, value, text):
    new, n = re.subn(rf'(?m)^(\s*){re.escape(key)} = .*$', lambda m: f'{m.group(1)}{key} = {value}', text)
    assert n >= 1, key
    return new
s = sub("root", f'"{d}/root"', s)
s = sub("state", f'"{d}/state"', s)
s = re.sub(r'(?ms)^\[grpc\]\n(.*?)^  address = .*?$', lambda m: f'[grpc]\n{m.group(1)}  address = "{d}/containerd.sock"', s)
s = re.sub(r'(?ms)^\[ttrpc\]\n(.*?)^  address = .*?$', lambda m: f'[ttrpc]\n{m.group(1)}  address = "{d}/containerd.ttrpc.sock"', s)
s = re.sub(r'(?ms)^\[debug\]\n(.*?)^  address = .*?$', lambda m: f'[debug]\n{m.group(1)}  address = "{d}/containerd.debug.sock"', s)
s = sub("sandbox_image", f'"{pause}"', s)
# Without it every sandbox fails: runc cannot write oom_score_adj in this sandbox.
s = sub("restrict_oom_score_adj", "true", s)
s = sub("bin_dir", '"/usr/lib/cni"', s)
s = sub("conf_dir", f'"{d}/cni"', s)
s = sub("stream_server_address", '"127.0.0.1"', s)
s = sub("stream_server_port", '"0"', s)
open(f"{d}/containerd.toml", "w").write(s)
PY
    mkdir -p "$dir/cni"
    cat >"$dir/cni/10-ldc.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ldc-$node",
  "plugins": [
    {"type": "bridge", "bridge": "ldcbr$index", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$index.0/24"}]],
              "dataDir": "$dir/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    cat >"$dir/cni/99-loopback.conf" <<EOF
{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
EOF
}

write_kubelet_config() {
    local node=$1 index=$2 ca=$3 dir
    dir=$(node_dir "$node")
    cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 10.244.$index.1
port: $((20250 + index))
healthzBindAddress: 127.0.0.1
healthzPort: $((21250 + index))
readOnlyPort: 0
containerRuntimeEndpoint: unix://$dir/containerd.sock
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $ca}
authorization: {mode: AlwaysAllow}
serializeImagePulls: false
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
podCIDR: 10.244.$index.0/24
maxPods: 50
podLogsDir: $dir/pod-logs
EOF
}

# Unmounts everything the kubelet and containerd mounted below DIR, deepest first.
unmount_below() {
    local m
    awk -v d="$1" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

cmd_up() {
    local cluster=$1 node=$2 region=$3 index=$4 dir kcfg
    ((index >= 1 && index <= 200)) || die "INDEX must be 1..200"
    [[ -x $BIN_DIR/kubelet ]] || die "no kubelet in $BIN_DIR: run e2e/cluster.sh install"
    kcfg=$("$E2E_DIR/cluster.sh" kubeconfig "$cluster")
    install_packages
    dir=$(node_dir "$node")
    [[ ! -e $dir ]] || die "node $node exists ($dir): e2e/node.sh down $cluster $node first"
    mkdir -p "$dir/logs" "$dir/kubelet" "$dir/certs"
    write_containerd_config "$node" "$index"
    write_kubelet_config "$node" "$index" "$(dirname "$kcfg")/pki/ca.crt"
    # The node's address: the gateway of its pod bridge (a node IP cannot be loopback).
    # The bridge plugin takes the bridge as it finds it.
    ip link delete "ldcbr$index" 2>/dev/null || true
    ip link add "ldcbr$index" type bridge
    ip addr add "10.244.$index.1/24" dev "ldcbr$index"
    ip link set "ldcbr$index" up
    log "starting containerd for node $node"
    setsid containerd --config "$dir/containerd.toml" >"$dir/logs/containerd.log" 2>&1 </dev/null &
    echo $! >"$dir/containerd.pid"
    for _ in $(seq 1 100); do
        ctr_ "$node" version >/dev/null 2>&1 && break
        sleep 0.1
    done
    ctr_ "$node" version >/dev/null 2>&1 || die "containerd of $node did not start: $(tail -5 "$dir/logs/containerd.log")"
    ctr_ "$node" images import "$(pause_archive)" >/dev/null
    log "starting the kubelet of node $node (region $region)"
    setsid "$BIN_DIR/kubelet" \
        --config "$dir/kubelet.yaml" \
        --kubeconfig "$kcfg" \
        --root-dir "$dir/kubelet" \
        --cert-dir "$dir/certs" \
        --hostname-override "$node" \
        --node-ip "10.244.$index.1" \
        --node-labels "topology.kubernetes.io/region=$region,ldc.dev/node=real" \
        >"$dir/logs/kubelet.log" 2>&1 </dev/null &
    echo $! >"$dir/kubelet.pid"
    for _ in $(seq 1 120); do
        if KUBECONFIG=$kcfg kubectl get node "$node" \
            -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True; then
            log "node $node is Ready"
            return 0
        fi
        sleep 1
    done
    tail -20 "$dir/logs/kubelet.log" >&2
    die "node $node did not become Ready"
}

cmd_import() {
    local node=$1
    shift
    local a
    for a in "$@"; do
        ctr_ "$node" images import "$a" >/dev/null
        log "imported $a into node $node"
    done
}

cmd_down() {
    local cluster=$1 node=$2 dir kcfg p
    dir=$(node_dir "$node")
    for p in kubelet containerd; do
        if [[ -f $dir/$p.pid ]]; then kill -9 "$(cat "$dir/$p.pid")" 2>/dev/null || true; fi
    done
    # The pods' processes (containerd-shims and what they run) outlive containerd.
    pkill -9 -f "containerd-shim.*$dir" 2>/dev/null || true
    if kcfg=$("$E2E_DIR/cluster.sh" kubeconfig "$cluster" 2>/dev/null); then
        KUBECONFIG=$kcfg kubectl delete node "$node" --ignore-not-found >/dev/null 2>&1 || true
    fi
    local br
    for br in $(grep -o 'ldcbr[0-9]*' "$dir/cni/10-ldc.conflist" 2>/dev/null || true); do
        ip link delete "$br" 2>/dev/null || true
    done
    unmount_below "$dir"
    rm -rf "$dir"
}

case ${1:-} in
up) shift; cmd_up "$@" ;;
import) shift; cmd_import "$@" ;;
ctr) shift; ctr_ "$@" ;;
down) shift; cmd_down "$@" ;;
*) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
