//! `ldc-operator`: runs the reconciler for one namespace once it holds the leader Lease,
//! prints the CRDs (`ldc-operator crd`, which is how the chart's YAML is generated), or
//! tears a release's resources down before `helm uninstall` (`ldc-operator teardown`).
//!
//! While it runs (leading or waiting), it serves Prometheus metrics on `--metrics-listen`
//! (`/metrics`, `/healthz`); see [`ldc_operator::metrics`].
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client, ResourceExt};
use ldc_operator::metrics::OperatorMetrics;
use ldc_operator::{controller, lease};

#[derive(Parser, Debug)]
#[command(name = "ldc-operator", version, about = "LDC Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Namespace to manage (default: the kubeconfig's or the pod's namespace).
    #[arg(long, env = "LDC_NAMESPACE")]
    namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "ldc-operator")]
    lease_name: String,
    /// Lease duration in seconds: a dead leader is replaced after at most this long.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Identity in the Lease (default: the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// ServiceAccount that owns the Lease (the chart passes the pod's own), so the Lease
    /// goes with the release on `helm uninstall`.
    #[arg(long, env = "LDC_SERVICE_ACCOUNT")]
    lease_owner: Option<String>,
    /// Where to serve Prometheus metrics (`/metrics`) and `/healthz`; port 0 picks one
    /// (the address is logged).
    #[arg(long, env = "LDC_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Delete the Topologies and Cells matching --selector and wait until the running
    /// operator has let them go (the chart's pre-delete hook on `helm uninstall`).
    Teardown {
        /// Label selector of the release's resources.
        #[arg(long)]
        selector: String,
        /// How long to wait for them to be gone.
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
    },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Crd) = cli.cmd {
        print!("{}", ldc_operator::crds_yaml());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LDC_LOG")
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    let namespace = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    if let Some(Cmd::Teardown {
        selector,
        timeout_seconds,
    }) = cli.cmd
    {
        let n = ldc_operator::teardown::run(
            &client,
            &namespace,
            &selector,
            Duration::from_secs(timeout_seconds),
        )
        .await?;
        eprintln!("teardown: {n} resources deleted in {namespace} ({selector}) and gone");
        return Ok(());
    }
    let owner = match &cli.lease_owner {
        Some(sa) => {
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
            let sa = sas
                .get(sa)
                .await
                .with_context(|| format!("cannot read ServiceAccount {sa} (the Lease's owner)"))?;
            Some(OwnerReference {
                api_version: "v1".into(),
                kind: "ServiceAccount".into(),
                name: sa.name_any(),
                uid: sa.uid().context("ServiceAccount without uid")?,
                ..Default::default()
            })
        }
        None => None,
    };
    // Metrics before the lease: a waiting replica reports ldc_operator_is_leader 0.
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(OperatorMetrics::new(&registry).context("metric definitions")?);
    let listener = tokio::net::TcpListener::bind(&cli.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--metrics-listen)", cli.metrics_listen))?;
    let metrics_addr = listener.local_addr()?;
    tracing::info!(addr = %metrics_addr, "serving metrics on /metrics");
    let admin = move |req: ldc_admin::Request<ldc_admin::Incoming>| {
        let registry = registry.clone();
        async move {
            let ready = || Ok(String::new());
            ldc_admin::standard(&registry, ready, &req)
                .unwrap_or_else(|| ldc_admin::not_found("/metrics, /healthz and /readyz"))
        }
    };
    tokio::spawn(ldc_admin::serve(
        listener,
        "operator-metrics",
        admin,
        std::future::pending(),
    ));
    let identity = cli.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let cfg = lease::LeaseConfig {
        name: cli.lease_name,
        identity: identity.clone(),
        duration: Duration::from_secs(cli.lease_seconds.max(3)),
        owner,
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    tracing::info!(%namespace, %identity, "waiting for the leader lease");
    tokio::select! {
        _ = lease::acquire(&leases, &cfg) => {}
        _ = ldc_admin::shutdown_signal() => return Ok(()),
    }
    metrics.is_leader.set(1);
    eprintln!("READY namespace={namespace} identity={identity} metrics={metrics_addr}");
    let reach = Arc::new(ldc_operator::reach::StoreReach::default());
    let run = controller::run(
        client,
        namespace,
        identity,
        metrics.clone(),
        reach.clone(),
        ldc_admin::shutdown_signal(),
    );
    // A leader that cannot reach the store for a whole lease steps down (see `reach`).
    let cut_off = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let gone = reach.unreachable_for(std::time::Instant::now());
            if ldc_operator::reach::must_step_down(gone, cfg.duration) {
                return gone.unwrap_or_default();
            }
        }
    };
    tokio::select! {
        _ = run => Ok(()),
        _ = lease::hold(&leases, &cfg) => {
            metrics.is_leader.set(0);
            anyhow::bail!("lost the leader lease; exiting so a fresh candidate takes over")
        }
        gone = cut_off => {
            metrics.is_leader.set(0);
            lease::release(&leases, &cfg).await;
            anyhow::bail!(
                "the store has been unreachable for {gone:?}, longer than the lease ({:?}); \
                 gave up the lease so a replica that reaches it can lead",
                cfg.duration
            )
        }
    }
}
