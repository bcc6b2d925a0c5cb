//! `ldc`: runs the LDC platform on one machine and is its command-line client.
//!
//! * `ldc up` starts regions of cell processes, a router and the local controller.
//! * `ldc cell serve` / `ldc router serve` are the processes `up` starts (also usable alone).
//! * `ldc cell status|failover|switchover|dr` inspect and move shard ownership;
//!   `ldc cell traffic-shift|history` run a cell's blue/green release.
//! * `ldc account|topup|withdraw|transfer|refund|balance|payment|entries` talk to the router.
//! * `ldc reconcile` proves money is conserved; `ldc load` is the benchmark load generator.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod load;
mod ops;
mod security;
mod token;
mod up;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LDC_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,ldc=info,ldc_cell=info,ldc_router=info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let rt = if args.is_router_serve() && args.worker_threads() == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.worker_threads());
        b
    }
    .enable_all()
    .build()
    .expect("tokio runtime");
    match rt.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
