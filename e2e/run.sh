#!/usr/bin/env bash
# The end-to-end suite: a real Kubernetes control plane (e2e/cluster.sh, KWOK nodes), the
# chart checked with `helm lint` and a server-side dry run (with its defaults, and with
# the optional ServiceMonitors and Grafana dashboard against the prometheus-operator's
# ServiceMonitor CRD), then the operator's e2e tests (operator/tests/e2e.rs). The cluster is always torn down; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$SECONDS
NAME=ldc-e2e-$$-$RANDOM
log() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Every process the tests start inherits LDC_E2E_RUN; teardown kills what is left.
kill_strays() {
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qx "LDC_E2E_RUN=$NAME"; then
            kill -9 "${p#/proc/}" 2>/dev/null || true
        fi
    done
}

REAL_NODE=""
cleanup() {
    local rc=$?
    if [[ -n $REAL_NODE ]]; then e2e/node.sh down "$NAME" "$REAL_NODE" >/dev/null 2>&1 || true; fi
    kill_strays
    e2e/cluster.sh down "$NAME" >/dev/null 2>&1 || log "WARNING: could not tear down cluster $NAME"
    if ((rc == 0)); then
        log "e2e PASSED in $((SECONDS - T0))s"
    else
        log "e2e FAILED (exit $rc) after $((SECONDS - T0))s"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "install the cluster tools (cached)"
e2e/cluster.sh install

# Build while the cluster starts: both take a while on 2 cores.
log "build the operator and its tests"
cargo test --workspace --test e2e --no-run >/dev/null 2>&1 &
BUILD=$!
KUBECONFIG=$(e2e/cluster.sh up "$NAME")
export KUBECONFIG
eval "$(e2e/cluster.sh env "$NAME")"
wait "$BUILD" || cargo test --workspace --test e2e --no-run # show the error
log "cluster $NAME up after $((SECONDS - T0))s"

HELM_HOME=$(mktemp -d)
export HELM_CONFIG_HOME=$HELM_HOME/config HELM_CACHE_HOME=$HELM_HOME/cache HELM_DATA_HOME=$HELM_HOME/data
log "chart: helm lint, CRDs applied, helm template | kubectl apply --dry-run=server"
MONITORING=(--set metrics.serviceMonitor.enabled=true --set metrics.grafanaDashboard.enabled=true)
helm lint --strict charts/ldc
helm lint --strict charts/ldc "${MONITORING[@]}"
kubectl apply --server-side -f charts/ldc/crds/ -f "$(e2e/cluster.sh monitoring-crd)"
kubectl wait --for=condition=Established crd/topologies.ldc.dev crd/cells.ldc.dev \
    crd/servicemonitors.monitoring.coreos.com --timeout=60s
kubectl create namespace ldc-chart-check
helm template ldc charts/ldc --namespace ldc-chart-check --no-hooks |
    kubectl apply --dry-run=server --namespace ldc-chart-check -f - >/dev/null
helm template ldc charts/ldc --namespace ldc-chart-check --no-hooks "${MONITORING[@]}" |
    kubectl apply --dry-run=server --namespace ldc-chart-check -f - |
    grep -E '^(servicemonitor|configmap)' >&2
# The uninstall hook's Pod needs its ServiceAccount to exist: create the hook for real.
helm template ldc charts/ldc --namespace ldc-chart-check --show-only templates/teardown.yaml |
    kubectl apply --namespace ldc-chart-check -f - >/dev/null
rm -rf "$HELM_HOME"

log "e2e tests: payments through the router (tests/e2e.rs) and the operator (operator/tests/e2e.rs)"
# --nocapture: the payments suite prints its timing table (also in target/e2e-report.txt).
LDC_E2E_RUN=$NAME cargo test --workspace --test e2e -- --ignored --test-threads=1 --nocapture

log "real node: the project's image on a kubelet (containerd, runc), payments in its pod"
IMAGE_TAR=$(scripts/image.sh | tail -1)
IMAGE=ghcr.io/ldc/ldc:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REAL_NODE=$NAME-r1
e2e/node.sh up "$NAME" "$REAL_NODE" r1 1
e2e/node.sh import "$REAL_NODE" "$IMAGE_TAR"
sed "s|IMAGE|$IMAGE|" e2e/real/platform-pod.yaml | kubectl apply -f -
kubectl wait --for=condition=Ready pod/ldc-platform --timeout=180s
node=$(kubectl get pod ldc-platform -o jsonpath='{.spec.nodeName}')
[[ $node == "$REAL_NODE" ]] || { log "ldc-platform ran on $node, not on the real node"; exit 1; }
in_pod() { kubectl exec ldc-platform -- ldc --data-dir /data "$@"; }
in_pod account open alice --currency EUR >/dev/null
in_pod account open bob --currency EUR >/dev/null
in_pod topup alice 1000 --currency EUR >/dev/null
in_pod transfer alice bob 250 --currency EUR >/dev/null
expect() {
    local got
    got=$(in_pod "${@:2}")
    grep -q -- "$1" <<<"$got" || { log "expected '$1' from ldc ${*:2}, got: $got"; exit 1; }
}
expect "balance 750 EUR" balance alice
# The credit reaches bob through the relay (cell to cell, mutual TLS) a moment later.
for _ in $(seq 1 50); do
    in_pod balance bob | grep -q "balance 250 EUR" && break
    sleep 0.2
done
expect "balance 250 EUR" balance bob
expect "clean, money is conserved" reconcile
kubectl logs ldc-platform | grep -q "routing table taken" ||
    { log "the pod's log (read through the kubelet) lacks the router's start"; exit 1; }
# The container killed under the kubelet (SIGKILL through containerd): the kubelet restarts
# it, the platform recovers from its data (the pod's emptyDir), and nothing acknowledged
# is lost.
cid=$(kubectl get pod ldc-platform -o jsonpath='{.status.containerStatuses[0].containerID}')
e2e/node.sh ctr "$REAL_NODE" tasks kill -s SIGKILL "${cid#containerd://}"
for _ in $(seq 1 120); do
    restarts=$(kubectl get pod ldc-platform -o jsonpath='{.status.containerStatuses[0].restartCount}')
    ((restarts >= 1)) && break
    sleep 0.5
done
((restarts >= 1)) || { log "the kubelet did not restart the killed container"; exit 1; }
kubectl wait --for=condition=Ready pod/ldc-platform --timeout=180s
for _ in $(seq 1 50); do
    in_pod balance alice | grep -q "balance 750 EUR" && break
    sleep 0.2
done
expect "balance 750 EUR" balance alice
expect "balance 250 EUR" balance bob
in_pod transfer bob alice 50 --currency EUR >/dev/null
expect "balance 200 EUR" balance bob
expect "clean, money is conserved" reconcile
kubectl delete pod ldc-platform --wait --timeout=60s >/dev/null
e2e/node.sh down "$NAME" "$REAL_NODE"
REAL_NODE=""
log "real node: the image ran the platform in a pod, Ready from the kubelet's probe; payments, a container kill (kubelet restart) and reconcile passed"
