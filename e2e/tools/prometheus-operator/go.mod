// Source of the monitoring.coreos.com CRDs (ServiceMonitor) the chart check applies: the
// prometheus-operator module zip carries them under example/prometheus-operator-crd/.
// Nothing is built from it; only the module is downloaded (and verified against go.sum).
module ldc.local/e2e/tools/prometheus-operator

go 1.24.0

require github.com/prometheus-operator/prometheus-operator v0.85.0
