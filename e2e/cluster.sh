#!/usr/bin/env bash
# LDC end-to-end test cluster tooling (issue 5, part 1).
#
#   e2e/cluster.sh install          build the pinned control-plane tools (cached by version)
#   e2e/cluster.sh up [NAME]        start a local control plane + KWOK fake nodes on 127.0.0.1
#   e2e/cluster.sh kubeconfig [NAME] print the kubeconfig path of a running cluster
#   e2e/cluster.sh env [NAME]       print `export KUBECONFIG=... PATH=...` lines for eval
#   e2e/cluster.sh status [NAME]    show whether the cluster's processes are alive
#   e2e/cluster.sh down [NAME]      stop every process of the cluster and delete its state
#   e2e/cluster.sh smoke            up, deploy 2 replicas, check versions and helm, down
#   e2e/cluster.sh monitoring-crd   print the path of the ServiceMonitor CRD (fetched by install)
#
# Everything is built from Go modules (see e2e/tools/*/go.mod); nothing is downloaded
# from release pages. See e2e/README.md.
set -euo pipefail

# ---------------------------------------------------------------------------------------
# Pinned versions. The wrapper modules under e2e/tools pin the same versions; `install`
# checks that they agree.
K8S_VERSION=v1.33.13
ETCD_VERSION=v3.5.21
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.19.5
# Only its ServiceMonitor CRD is used (the chart's optional ServiceMonitors are validated
# against it); it comes out of the module zip, nothing is built.
PROMETHEUS_OPERATOR_VERSION=v0.85.0

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS_DIR=$E2E_DIR/tools
CACHE_ROOT=${LDC_CACHE:-$HOME/.cache/ldc}
BIN_DIR=$CACHE_ROOT/k8s-$K8S_VERSION/bin
CRD_DIR=$CACHE_ROOT/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/crds
SERVICEMONITOR_CRD=$CRD_DIR/monitoring.coreos.com_servicemonitors.yaml
# Per-cluster runtime state (kubeconfig, certs, etcd data, logs, pids). Removed by `down`.
STATE_ROOT=${LDC_CLUSTER_STATE:-${TMPDIR:-/tmp}/ldc-clusters-$(id -u)}
DEFAULT_NAME=ldc-e2e

export GOTOOLCHAIN=local
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

log() { printf '[cluster.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------
# install

# recipe_stamp DIR VERSION: what a built binary must match to be reused (version plus a
# hash of the wrapper module's go.mod/go.sum, so a changed recipe rebuilds).
recipe_stamp() {
    local dir=$1 version=$2
    printf '%s %s %s\n' "$version" "$(go env GOVERSION)" \
        "$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -c1-16)"
}

# is_current STAMP BIN...: true when every binary exists and was built from STAMP.
is_current() {
    local stamp=$1 b
    shift
    for b in "$@"; do
        [[ -x $BIN_DIR/$b && -f $BIN_DIR/.$b.stamp ]] || return 1
        [[ $(cat "$BIN_DIR/.$b.stamp") == "$stamp" ]] || return 1
    done
}

# check_pin DIR MODULE VERSION: the wrapper module must require MODULE at VERSION.
check_pin() {
    local dir=$1 mod=$2 want=$3 got
    got=$(cd "$dir" && go list -m -f '{{.Version}}' "$mod")
    [[ $got == "$want" ]] || die "$dir/go.mod pins $mod $got but cluster.sh expects $want"
}

# go_download DIR [MODULE...]: fetch the module graph (or just MODULEs); fall back to
# GOSUMDB=off when the checksum database cannot be reached (go.sum is committed, so hashes
# are still verified).
go_download() {
    local dir=$1
    shift
    if ! (cd "$dir" && go mod download "$@") >"$CACHE_ROOT/download.log" 2>&1; then
        log "go mod download failed in $dir (see below); retrying with GOSUMDB=off"
        tail -5 "$CACHE_ROOT/download.log" >&2 || true
        (cd "$dir" && GOSUMDB=off GONOSUMDB='*' go mod download "$@")
    fi
}

# fetch_monitoring_crds: copy the ServiceMonitor CRD out of the pinned prometheus-operator
# module (Go module proxy, verified against the wrapper's go.sum) into the cache.
fetch_monitoring_crds() {
    local dir=$TOOLS_DIR/prometheus-operator mod=github.com/prometheus-operator/prometheus-operator
    local src file=monitoring.coreos.com_servicemonitors.yaml
    if [[ -s $SERVICEMONITOR_CRD ]]; then
        log "cached: ServiceMonitor CRD ($PROMETHEUS_OPERATOR_VERSION)"
        return 0
    fi
    go_download "$dir" "$mod"
    src=$(cd "$dir" && go list -m -f '{{.Dir}}' "$mod")/example/prometheus-operator-crd/$file
    [[ -f $src ]] || die "no $file in $mod $PROMETHEUS_OPERATOR_VERSION"
    mkdir -p "$CRD_DIR"
    cp "$src" "$SERVICEMONITOR_CRD.tmp"
    mv -f "$SERVICEMONITOR_CRD.tmp" "$SERVICEMONITOR_CRD"
    log "fetched the ServiceMonitor CRD ($PROMETHEUS_OPERATOR_VERSION) into $CRD_DIR"
}

# build_tools DIR VERSION LDFLAGS PKG...: one `go build` of all PKGs into BIN_DIR.
build_tools() {
    local dir=$1 version=$2 ldflags=$3
    shift 3
    local stamp names=() p out t0
    stamp=$(recipe_stamp "$dir" "$version")
    for p in "$@"; do names+=("${p##*/}"); done
    # etcd's main package is the module root: name the binary ourselves.
    [[ ${names[0]} == v3 ]] && names=(etcd)
    if is_current "$stamp" "${names[@]}"; then
        log "cached: ${names[*]} ($version)"
        return 0
    fi
    log "building ${names[*]} $version (nice -n 10; this can take many minutes) ..."
    go_download "$dir"
    out=$(mktemp -d "$BIN_DIR/.build.XXXXXX")
    t0=$SECONDS
    if [[ $# -eq 1 ]]; then
        (cd "$dir" && nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$out/${names[0]}" "$1")
    else
        (cd "$dir" && nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$out/" "$@")
    fi
    for p in "${names[@]}"; do
        mv -f "$out/$p" "$BIN_DIR/$p"
        echo "$stamp" >"$BIN_DIR/.$p.stamp"
    done
    rmdir "$out"
    log "built ${names[*]} in $((SECONDS - t0))s"
}

cmd_install() {
    command -v go >/dev/null || die "go is not installed"
    mkdir -p "$BIN_DIR"
    rm -rf "$BIN_DIR"/.build.* # leftovers of an interrupted build
    local t0=$SECONDS

    check_pin "$TOOLS_DIR/k8s" k8s.io/kubernetes "$K8S_VERSION"
    check_pin "$TOOLS_DIR/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
    check_pin "$TOOLS_DIR/kwok" sigs.k8s.io/kwok "$KWOK_VERSION"
    check_pin "$TOOLS_DIR/helm" helm.sh/helm/v3 "$HELM_VERSION"
    check_pin "$TOOLS_DIR/prometheus-operator" github.com/prometheus-operator/prometheus-operator \
        "$PROMETHEUS_OPERATOR_VERSION"

    # Kubernetes: stamp versions the way hack/lib/version.sh does.
    local kv=${K8S_VERSION#v} major minor bdate k8s_ld="-s -w" pkg
    major=${kv%%.*}
    minor=${kv#*.}
    minor=${minor%%.*}
    bdate=$(cd "$TOOLS_DIR/k8s" && go list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        k8s_ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        k8s_ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=${bdate:-1970-01-01T00:00:00Z}"
    done
    build_tools "$TOOLS_DIR/k8s" "$K8S_VERSION" "$k8s_ld" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kubelet

    build_tools "$TOOLS_DIR/etcd" "$ETCD_VERSION" \
        "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
        go.etcd.io/etcd/server/v3

    build_tools "$TOOLS_DIR/kwok" "$KWOK_VERSION" \
        "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
        sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl

    # Helm: as its Makefile does, also stamp the Kubernetes version of its client-go.
    local hk hmaj hmin helm_ld
    hk=$(cd "$TOOLS_DIR/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)
    hk=${hk#v}
    hmaj=$((${hk%%.*} + 1))
    hmin=${hk#*.}
    hmin=${hmin%%.*}
    helm_ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    helm_ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        helm_ld+=" -X $pkg.k8sVersionMajor=$hmaj -X $pkg.k8sVersionMinor=$hmin"
    done
    build_tools "$TOOLS_DIR/helm" "$HELM_VERSION" "$helm_ld" helm.sh/helm/v3/cmd/helm

    fetch_monitoring_crds

    log "tools ready in $BIN_DIR ($((SECONDS - t0))s)"
}

# ---------------------------------------------------------------------------------------
# cluster lifecycle (kwokctl, binary runtime)

# One fake node: the platform's pods share an embedded store only on one node (the
# operator refuses to move anything otherwise); `e2e/node.sh` adds real nodes.
NODE_COUNT=${LDC_NODES:-1}
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}

cluster_name() {
    local name=${1:-$DEFAULT_NAME}
    [[ $name =~ ^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$ ]] || die "bad cluster name '$name' (use [a-z0-9-])"
    echo "$name"
}

cluster_dir() { echo "$STATE_ROOT/clusters/$1"; }
kubeconfig_path() { echo "$(cluster_dir "$1")/kubeconfig.yaml"; }

# kwokctl keeps all of its state under KWOK_WORKDIR; never touch ~/.kube/config.
kwokctl_run() {
    KWOK_WORKDIR=$STATE_ROOT PATH="$BIN_DIR:$PATH" "$BIN_DIR/kwokctl" "$@"
}

kc() { "$KUBECTL" --kubeconfig "$KCFG" "$@"; }

# close every fd but 0, 1 and 2 in the current (sub)shell
close_extra_fds() {
    local fd
    for fd in "/proc/$BASHPID/fd"/*; do
        fd=${fd##*/}
        ((fd > 2)) && eval "exec $fd>&-" 2>/dev/null || true
    done
}

# pids of this cluster's processes: kwokctl runs them as <state>/bin/<name> (symlinks to
# our binaries); also catch anything running one of our binaries on its state directory.
cluster_pids() {
    local dir pid
    dir=$(cluster_dir "$1")/
    ps -eo pid=,args= | awk -v d="$dir" '
        index($2, d "bin/") == 1 { print $1; next }
        index($0, d) { print "?" $1 }' |
        while read -r pid; do
            if [[ $pid == \?* ]]; then
                pid=${pid#?}
                # skip our own helpers (awk, ps, this shell) that merely mention the path
                case $(readlink "/proc/$pid/exe" 2>/dev/null) in
                "$BIN_DIR"/*) ;;
                *) continue ;;
                esac
            fi
            echo "$pid"
        done
}

api_healthy() { kc get --raw /readyz >/dev/null 2>&1; }

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every second
wait_for() {
    local limit=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < limit)) || { log "timed out after ${limit}s waiting for $what"; return 1; }
        sleep 1
    done
}

nodes_ready() {
    local n
    n=$(kc get nodes -o jsonpath='{range .items[*]}{range .status.conditions[?(@.type=="Ready")]}{.status}{"\n"}{end}{end}' | grep -c '^True$' || true)
    ((n >= NODE_COUNT))
}

# shellcheck disable=SC2329 # called through wait_for
default_sa_exists() { kc -n default get serviceaccount default; }

write_kwokctl_config() {
    local file=$1 pki
    pki="$(cluster_dir "$2")/pki"
    cat >"$file" <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  # every component listens on loopback only
  bindAddress: 127.0.0.1
  kubeVersion: $K8S_VERSION
  etcdVersion: ${ETCD_VERSION#v}
  securePort: true
  kubeAuthorization: true
  kubeAdmission: true
  etcdBinary: $BIN_DIR/etcd
  kubeApiserverBinary: $BIN_DIR/kube-apiserver
  kubeControllerManagerBinary: $BIN_DIR/kube-controller-manager
  kubeSchedulerBinary: $BIN_DIR/kube-scheduler
  kwokControllerBinary: $BIN_DIR/kwok
  kubectlBinary: $KUBECTL
  quietPull: true
# KWOK fakes only its own nodes: a real node (e2e/node.sh) runs its pods for real, and a
# KWOK that "managed" it would report made-up pod statuses over the kubelet's.
componentsPatches:
- name: kwok-controller
  extraArgs:
  - key: manage-all-nodes
    value: "false"
  - key: manage-nodes-with-annotation-selector
    value: kwok.x-k8s.io/node=fake
# Logs and exec of a real node's pods: the API server reaches its kubelet by address, with
# a client certificate the kubelet's x509 authentication takes.
- name: kube-apiserver
  extraArgs:
  - key: kubelet-preferred-address-types
    value: InternalIP
  - key: kubelet-client-certificate
    value: $pki/admin.crt
  - key: kubelet-client-key
    value: $pki/admin.key
EOF
}

cmd_up() {
    local name t0=$SECONDS cfg
    name=$(cluster_name "${1:-}")
    [[ -n $KUBECTL ]] || die "kubectl must be on PATH"
    cmd_install # no-op (a few seconds) when the tools are cached
    KCFG=$(kubeconfig_path "$name")
    mkdir -p "$STATE_ROOT/configs"

    if [[ -d $(cluster_dir "$name") ]]; then
        if [[ -f $KCFG ]] && api_healthy && nodes_ready; then
            log "cluster $name is already up"
            echo "$KCFG"
            return 0
        fi
        log "cluster $name exists but is not healthy: recreating it"
        cmd_down "$name" >/dev/null
    fi

    cfg=$STATE_ROOT/configs/$name.yaml
    write_kwokctl_config "$cfg" "$name"
    log "creating cluster $name (kwokctl binary runtime, state in $(cluster_dir "$name"))"
    # kwokctl picks free ports itself (skipping those of its other clusters); serialise
    # creation so two concurrent `up`s cannot choose the same ports.
    # The lock fd (and any other inherited fd) is closed for kwokctl: the daemons it
    # starts would otherwise hold the lock, or a caller's pipe, for as long as they run.
    if ! (
        flock 9
        (
            close_extra_fds
            kwokctl_run --name "$name" --config "$cfg" create cluster \
                --kubeconfig "" --wait 2m --timeout 5m
        )
    ) 9>"$STATE_ROOT/.create.lock" </dev/null >"$STATE_ROOT/configs/$name.create.log" 2>&1; then
        cat "$STATE_ROOT/configs/$name.create.log" >&2
        cmd_down "$name" >/dev/null 2>&1 || true
        die "kwokctl create cluster $name failed"
    fi
    [[ -f $KCFG ]] || die "kwokctl did not write $KCFG"
    wait_for 120 "kube-apiserver /readyz" api_healthy || { cmd_down "$name"; die "API server not healthy"; }

    kwokctl_run --name "$name" scale node --replicas "$NODE_COUNT" </dev/null \
        >"$STATE_ROOT/configs/$name.scale.log" 2>&1 ||
        { cat "$STATE_ROOT/configs/$name.scale.log" >&2; cmd_down "$name"; die "kwokctl scale node failed"; }
    wait_for 120 "$NODE_COUNT Ready nodes" nodes_ready || { cmd_down "$name"; die "nodes not Ready"; }
    # the token controller must have made the default ServiceAccount before pods can be created
    wait_for 120 "default ServiceAccount" default_sa_exists || { cmd_down "$name"; die "no default ServiceAccount"; }

    log "cluster $name is up in $((SECONDS - t0))s: $(kc get --raw /version | tr -d ' \n' | sed 's/.*"gitVersion":"\([^"]*\)".*/\1/'), $NODE_COUNT nodes, server $(kc config view -o jsonpath='{.clusters[0].cluster.server}')"
    echo "$KCFG"
}

cmd_down() {
    local name dir pids left
    name=$(cluster_name "${1:-}")
    dir=$(cluster_dir "$name")
    mkdir -p "$STATE_ROOT/configs"
    if [[ -d $dir && -x $BIN_DIR/kwokctl ]]; then
        # (kwokctl delete rejects an empty --kubeconfig; this file is never a real one)
        kwokctl_run --name "$name" delete cluster --kubeconfig "$STATE_ROOT/.no-contexts.yaml" \
            </dev/null >"$STATE_ROOT/configs/$name.delete.log" 2>&1 ||
            log "kwokctl delete cluster $name failed (see $STATE_ROOT/configs/$name.delete.log); killing its processes"
    fi
    # whatever kwokctl missed: processes running our binaries on this cluster's state dir
    pids=$(cluster_pids "$name" | tr '\n' ' ')
    if [[ -n ${pids// /} ]]; then
        log "stopping stray processes: $pids"
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        for _ in $(seq 1 20); do
            left=$(cluster_pids "$name" | tr '\n' ' ')
            [[ -z ${left// /} ]] && break
            sleep 0.5
        done
        left=$(cluster_pids "$name" | tr '\n' ' ')
        # shellcheck disable=SC2086
        [[ -z ${left// /} ]] || kill -9 $left 2>/dev/null || true
    fi
    sleep 0.2
    left=$(cluster_pids "$name" | tr '\n' ' ')
    [[ -z ${left// /} ]] || die "processes of cluster $name still running: $left"
    rm -rf "$dir" "$STATE_ROOT/configs/$name".*
    log "cluster $name is down (no processes left, state removed)"
}

cmd_kubeconfig() {
    local name
    name=$(cluster_name "${1:-}")
    KCFG=$(kubeconfig_path "$name")
    [[ -f $KCFG ]] || die "cluster $name is not up (no $KCFG)"
    echo "$KCFG"
}

cmd_env() {
    local k
    k=$(cmd_kubeconfig "$@")
    # shellcheck disable=SC2016 # $PATH is for the caller's shell to expand
    printf 'export KUBECONFIG=%q\nexport PATH=%q:"$PATH"\n' "$k" "$BIN_DIR"
}

cmd_status() {
    local name pids
    name=$(cluster_name "${1:-}")
    KCFG=$(kubeconfig_path "$name")
    pids=$(cluster_pids "$name" | tr '\n' ' ')
    echo "cluster:    $name"
    echo "state:      $(cluster_dir "$name")"
    echo "kubeconfig: $KCFG"
    echo "processes:  ${pids:-none}"
    if [[ -f $KCFG ]] && api_healthy; then
        echo "api:        healthy ($(kc config view -o jsonpath='{.clusters[0].cluster.server}'))"
        kc get nodes
    else
        echo "api:        not reachable"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------
# smoke test

smoke_manifest() {
    cat <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: smoke
  namespace: default
  labels: {app: smoke}
spec:
  replicas: 2
  selector:
    matchLabels: {app: smoke}
  template:
    metadata:
      labels: {app: smoke}
    spec:
      containers:
      - name: app
        image: registry.k8s.io/pause:3.10
        resources:
          requests: {cpu: 10m, memory: 16Mi}
EOF
}

cmd_smoke() {
    local name=ldc-smoke-$$ t0=$SECONDS out sv hv ready
    log "smoke: cluster $name"
    # shellcheck disable=SC2064
    trap "cmd_down $name >/dev/null 2>&1 || true" EXIT
    KCFG=$(cmd_up "$name")

    smoke_manifest | kc apply -f -
    kc rollout status deployment/smoke --timeout=120s
    kc wait --for=condition=Ready pod -l app=smoke --timeout=60s
    ready=$(kc get pods -l app=smoke -o jsonpath='{range .items[?(@.status.phase=="Running")]}{.metadata.name}{"\n"}{end}' | grep -c . || true)
    kc get pods -l app=smoke -o wide
    ((ready == 2)) || die "expected 2 Running pods, got $ready"

    out=$(kc version 2>&1) || true
    echo "$out"
    grep -qx "Server Version: $K8S_VERSION" <<<"$out" || die "kubectl version does not report server $K8S_VERSION"
    sv=$(kc get --raw /version | tr -d ' \n' | sed -n 's/.*"gitVersion":"\([^"]*\)".*/\1/p')
    [[ $sv == "$K8S_VERSION" ]] || die "/version reports '$sv', expected $K8S_VERSION"

    # helm with its state kept out of \$HOME
    local hh
    hh=$(cluster_dir "$name")/helm
    mkdir -p "$hh"
    export HELM_CONFIG_HOME=$hh/config HELM_CACHE_HOME=$hh/cache HELM_DATA_HOME=$hh/data
    hv=$("$BIN_DIR/helm" version --short)
    echo "helm version: $hv"
    [[ $hv == "$HELM_VERSION"* ]] || die "helm reports '$hv', expected $HELM_VERSION"
    # a minimal chart, installed and uninstalled against the cluster
    mkdir -p "$hh/chart/templates"
    printf 'apiVersion: v2\nname: smoke\nversion: 0.1.0\n' >"$hh/chart/Chart.yaml"
    printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\ndata:\n  ok: "yes"\n' \
        >"$hh/chart/templates/cm.yaml"
    "$BIN_DIR/helm" --kubeconfig "$KCFG" install smoke-chart "$hh/chart" --wait --timeout 60s
    [[ $(kc get configmap smoke-chart -o jsonpath='{.data.ok}') == yes ]] || die "helm release did not create its ConfigMap"
    "$BIN_DIR/helm" --kubeconfig "$KCFG" list -A
    "$BIN_DIR/helm" --kubeconfig "$KCFG" uninstall smoke-chart --wait

    cmd_down "$name"
    trap - EXIT
    [[ -z $(cluster_pids "$name") ]] || die "stray processes after down"
    log "smoke: PASSED in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------------------
usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
    install) cmd_install "$@" ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    kubeconfig) cmd_kubeconfig "$@" ;;
    env) cmd_env "$@" ;;
    status) cmd_status "$@" ;;
    smoke) cmd_smoke "$@" ;;
    monitoring-crd)
        [[ -s $SERVICEMONITOR_CRD ]] || fetch_monitoring_crds
        echo "$SERVICEMONITOR_CRD"
        ;;
    -h | --help | help | "") usage ;;
    *) usage >&2; exit 2 ;;
    esac
}

main "$@"; exit # on one line: bash must not read past it if the file is edited meanwhile
