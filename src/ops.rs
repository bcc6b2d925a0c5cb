//! `ldc cell <verb>`: the operating verbs of crate `ldc-ops` on the local platform (the
//! store `ldc up` runs on), and `ldc reconcile`.

use std::process::ExitCode;

use anyhow::Result;
use ldc_ops::cli::{OpsCmd, Verb};
use ldc_ops::local::LocalPlatform;
use ldc_ops::render::render;
use ldc_ops::{OpsError, Platform};
use serde_json::json;

use crate::cli::{Global, Output};
use crate::up::blocking;

/// Runs one verb; prints its report (stdout) or its refusal (stderr, exit 2).
pub async fn run(g: &Global, cmd: OpsCmd) -> Result<ExitCode> {
    let verb = match Verb::try_from(cmd) {
        Ok(v) => v,
        Err(e) => return Ok(fail(&e)),
    };
    let spec = g.store_spec();
    let store = blocking(move || Ok(ldc_store::open(&spec)?)).await?;
    let signer = if verb.writes() {
        crate::security::table_signer(g)?
    } else {
        None
    };
    let p = LocalPlatform::new(store, signer);
    if verb.writes() {
        eprintln!("acting on the local platform in {}", g.store_spec());
    }
    let out = if let Verb::Status {
        watch: true,
        until_settled,
    } = verb
    {
        ldc_ops::watch_status(&p, g.output, until_settled, |s| print!("{s}")).await
    } else {
        ldc_ops::run(&p, verb)
            .await
            .map(|r| print!("{}", render(&r, g.output, p.tool())))
    };
    Ok(match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    })
}

fn fail(e: &OpsError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(e.exit_code())
}

pub async fn reconcile(g: &Global) -> Result<ExitCode> {
    let spec = g.store_spec();
    let report = blocking(move || {
        let store = ldc_store::open(&spec)?;
        Ok(ldc_cell::reconcile::run(&*store)?)
    })
    .await?;
    let clean = report.is_clean();
    match g.output {
        Output::Json | Output::Yaml => {
            crate::cli::print_doc(g.output, &json!({"clean": clean, "report": report}))
        }
        Output::Text => {
            for (ccy, t) in &report.currencies {
                println!(
                    "{ccy}: {} accounts, balances {} + in flight {} = top-ups - withdrawals {}  (difference {}); outbox {} messages, {} unapplied",
                    t.accounts,
                    t.user_balances,
                    t.in_flight,
                    t.net_external,
                    t.difference,
                    t.outbox_messages,
                    t.outbox_unapplied
                );
            }
            println!("{} ledger entries checked", report.entries_checked);
            for p in &report.problems {
                println!("PROBLEM: {p}");
            }
            println!(
                "{}",
                if clean {
                    "reconcile: clean, money is conserved"
                } else {
                    "reconcile: DIFFERENCES FOUND"
                }
            );
        }
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
