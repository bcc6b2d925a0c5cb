//! Who may call what: the router's authorization rule, as one pure function.
//!
//! The router authenticates a caller (a client certificate or a bearer token, see the
//! `ldc-security` crate) into a [`Principal`], then asks [`authorize`] whether that
//! principal may call this gRPC method for the user named in `x-ldc-user`. Everything
//! is explicit and least-privilege:
//!
//! * only the methods of `ldc.v1.Payments` are public; `ldc.v1.CellRelay` (cell to cell)
//!   and anything else is refused at the edge, whoever asks;
//! * a **user** principal acts only for itself: its subject must equal `x-ldc-user`;
//! * a **service** principal may act for any user, but only within its scopes;
//! * scopes separate reading ([`Scope::Read`]), moving money between users
//!   ([`Scope::Transfer`]: transfer, refund, opening an account) and money entering or
//!   leaving the platform ([`Scope::Funds`]: top-up, withdraw), which only a service
//!   (a channel or treasury identity) may hold.
//!
//! Nothing here does I/O, so every case is a unit test.

use std::collections::BTreeSet;
use std::fmt;

/// The gRPC path prefix of the public payment API.
pub const PAYMENTS_PREFIX: &str = "/ldc.v1.Payments/";
/// The gRPC path prefix of the private cell-to-cell relay.
pub const RELAY_PREFIX: &str = "/ldc.v1.CellRelay/";

/// What a scope allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Balances, payments, entries.
    Read,
    /// Transfers, refunds, opening an account.
    Transfer,
    /// Top-ups and withdrawals: money entering or leaving the platform.
    Funds,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Transfer, Scope::Funds];

    /// The scope's name in tokens and policies (`payments:read`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "payments:read",
            Scope::Transfer => "payments:transfer",
            Scope::Funds => "payments:funds",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a principal is one user or a service acting for users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    User,
    Service,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: Kind,
    /// The user id (users) or the service's name (services).
    pub subject: String,
    pub scopes: BTreeSet<Scope>,
}

impl Principal {
    pub fn user(subject: impl Into<String>, scopes: impl IntoIterator<Item = Scope>) -> Self {
        Principal {
            kind: Kind::User,
            subject: subject.into(),
            scopes: scopes.into_iter().collect(),
        }
    }

    pub fn service(subject: impl Into<String>, scopes: impl IntoIterator<Item = Scope>) -> Self {
        Principal {
            kind: Kind::Service,
            subject: subject.into(),
            scopes: scopes.into_iter().collect(),
        }
    }

    /// How logs and metrics name it: `user:alice`, `service:treasury`.
    pub fn label(&self) -> String {
        match self.kind {
            Kind::User => format!("user:{}", self.subject),
            Kind::Service => format!("service:{}", self.subject),
        }
    }
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "{0} is the private cell-to-cell relay; it is not served to clients (only cells call it, over mutual TLS)"
    )]
    RelayNotPublic(&'static str),
    #[error("method {0} is not part of the public API (ldc.v1.Payments)")]
    UnknownMethod(String),
    #[error(
        "user credential for {subject:?} cannot act for user {user:?}; use that user's own credential"
    )]
    OtherUser { subject: String, user: String },
    #[error("credential {principal} lacks scope {needed}, which {method} needs")]
    MissingScope {
        principal: String,
        needed: Scope,
        method: &'static str,
    },
    #[error(
        "{method} moves money into or out of the platform; only a service (channel or treasury) credential with scope {} may call it, not user credential {principal}",
        Scope::Funds
    )]
    FundsNeedService {
        principal: String,
        method: &'static str,
    },
}

impl Denied {
    /// A stable label for `…_denied_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Denied::RelayNotPublic(_) => "relay_not_public",
            Denied::UnknownMethod(_) => "unknown_method",
            Denied::OtherUser { .. } => "other_user",
            Denied::MissingScope { .. } => "missing_scope",
            Denied::FundsNeedService { .. } => "funds_need_service",
        }
    }
}

/// Most characters of an unknown method path quoted in an error.
const METHOD_QUOTE_CHARS_MAX: usize = 64;

/// The scope a public method needs, with the method's name; a refusal for anything else.
pub fn method_scope(path: &str) -> Result<(&'static str, Scope), Denied> {
    if path.starts_with(RELAY_PREFIX) {
        return Err(Denied::RelayNotPublic("ldc.v1.CellRelay"));
    }
    let method = path.strip_prefix(PAYMENTS_PREFIX).unwrap_or("");
    let found = match method {
        "GetBalance" => ("GetBalance", Scope::Read),
        "GetPayment" => ("GetPayment", Scope::Read),
        "ListEntries" => ("ListEntries", Scope::Read),
        "OpenAccount" => ("OpenAccount", Scope::Transfer),
        "Transfer" => ("Transfer", Scope::Transfer),
        "Refund" => ("Refund", Scope::Transfer),
        "TopUp" => ("TopUp", Scope::Funds),
        "Withdraw" => ("Withdraw", Scope::Funds),
        _ => {
            return Err(Denied::UnknownMethod(crate::quote_prefix(
                path,
                METHOD_QUOTE_CHARS_MAX,
            )));
        }
    };
    Ok(found)
}

/// May `who` call `path` for `user` (the `x-ldc-user` header, already validated)?
pub fn authorize(who: &Principal, path: &str, user: &str) -> Result<(), Denied> {
    let (method, needed) = method_scope(path)?;
    if who.kind == Kind::User {
        if who.subject != user {
            return Err(Denied::OtherUser {
                subject: who.subject.clone(),
                user: user.to_string(),
            });
        }
        if needed == Scope::Funds {
            return Err(Denied::FundsNeedService {
                principal: who.label(),
                method,
            });
        }
    }
    if !who.scopes.contains(&needed) {
        return Err(Denied::MissingScope {
            principal: who.label(),
            needed,
            method,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(m: &str) -> String {
        format!("{PAYMENTS_PREFIX}{m}")
    }

    const METHODS: [(&str, Scope); 8] = [
        ("GetBalance", Scope::Read),
        ("GetPayment", Scope::Read),
        ("ListEntries", Scope::Read),
        ("OpenAccount", Scope::Transfer),
        ("Transfer", Scope::Transfer),
        ("Refund", Scope::Transfer),
        ("TopUp", Scope::Funds),
        ("Withdraw", Scope::Funds),
    ];

    /// Every public method against every kind of principal and every scope set.
    #[test]
    fn every_method_every_principal_every_scope_set() {
        for (method, needed) in METHODS {
            for mask in 0u8..8 {
                let scopes: Vec<Scope> = Scope::ALL
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, s)| s)
                    .collect();
                let has = scopes.contains(&needed);
                let svc = Principal::service("treasury", scopes.clone());
                assert_eq!(
                    authorize(&svc, &p(method), "alice").is_ok(),
                    has,
                    "service {scopes:?} {method}"
                );
                let user = Principal::user("alice", scopes.clone());
                let own = authorize(&user, &p(method), "alice");
                assert_eq!(
                    own.is_ok(),
                    has && needed != Scope::Funds,
                    "user {scopes:?} {method}: {own:?}"
                );
                let other = authorize(&user, &p(method), "bob").unwrap_err();
                assert_eq!(other.label(), "other_user", "{method}");
            }
        }
    }

    #[test]
    fn refusals_say_what_was_wrong() {
        let reader = Principal::service("reports", [Scope::Read]);
        let e = authorize(&reader, &p("Transfer"), "alice").unwrap_err();
        assert_eq!(
            e.to_string(),
            "credential service:reports lacks scope payments:transfer, which Transfer needs"
        );
        let alice = Principal::user("alice", Scope::ALL);
        let e = authorize(&alice, &p("Withdraw"), "alice").unwrap_err();
        assert_eq!(e.label(), "funds_need_service");
        assert!(e.to_string().contains("user:alice"), "{e}");
        let e = authorize(&alice, &p("GetBalance"), "bob").unwrap_err();
        assert!(e.to_string().contains("\"bob\""), "{e}");
    }

    #[test]
    fn only_the_payments_service_is_public() {
        let root = Principal::service("treasury", Scope::ALL);
        let e = authorize(&root, "/ldc.v1.CellRelay/Deliver", "alice").unwrap_err();
        assert_eq!(e.label(), "relay_not_public");
        for path in [
            "/ldc.v1.Payments/Nope",
            "/ldc.v1.Payments/",
            "/grpc.health.v1.Health/Check",
            "/",
            "",
        ] {
            let e = authorize(&root, path, "alice").unwrap_err();
            assert_eq!(e.label(), "unknown_method", "{path}");
        }
        let long = format!("/{}", "x".repeat(100_000));
        let e = authorize(&root, &long, "alice").unwrap_err();
        assert!(e.to_string().len() < 200, "echoes a bounded prefix");
    }

    #[test]
    fn scope_names_round_trip() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("payments:all"), None);
    }
}
