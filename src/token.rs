//! `ldc token`: a bearer token for a user or a service, signed with the platform's token
//! key, for clients that cannot hold a certificate.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ldc_core::authz::{Principal, Scope};
use ldc_security::token::TokenIssuer;
use serde_json::json;

use crate::cli::{Global, Output, TokenArgs};

/// Longest lifetime `ldc token` issues.
const TTL_MAX: Duration = Duration::from_secs(30 * 86_400);

pub fn run(g: &Global, a: TokenArgs) -> Result<ExitCode> {
    let scopes = a
        .scope
        .iter()
        .map(|s| {
            Scope::parse(&format!("payments:{s}"))
                .or_else(|| Scope::parse(s))
                .with_context(|| format!("unknown scope {s:?}; use read, transfer or funds"))
        })
        .collect::<Result<Vec<_>>>()?;
    let ttl = parse_ttl(&a.ttl)?;
    let p = if a.service {
        if !ldc_security::identity::valid_name(&a.subject) {
            bail!("service names are letters, digits, - and _ (up to 63)");
        }
        Principal::service(&a.subject, scopes)
    } else {
        ldc_core::shard::validate_user_id(&a.subject).map_err(|e| anyhow::anyhow!("{e}"))?;
        if scopes.contains(&Scope::Funds) {
            bail!(
                "a user token cannot have scope funds: top-ups and withdrawals are for a channel or treasury service (use --service)"
            );
        }
        Principal::user(&a.subject, scopes)
    };
    let key = g.pki().token_key_path();
    let issuer = TokenIssuer::from_pem_file(&key).with_context(|| {
        format!(
            "cannot read the token key {} (`ldc up` creates it)",
            key.display()
        )
    })?;
    let token = issuer.issue(&p, ttl)?;
    match g.output {
        Output::Json | Output::Yaml => crate::cli::print_doc(
            g.output,
            &json!({"token": token, "principal": p.label(), "ttl_seconds": ttl.as_secs()}),
        ),
        Output::Text => println!("{token}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_ttl(s: &str) -> Result<Duration> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = n
        .parse()
        .with_context(|| format!("--ttl {s:?}: use a number and a unit, e.g. 30m, 12h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => bail!("--ttl {s:?}: the unit is s, m, h or d"),
    };
    let ttl = Duration::from_secs(secs);
    if ttl.is_zero() || ttl > TTL_MAX {
        bail!("--ttl must be between 1s and 30d");
    }
    Ok(ttl)
}
