//! # ldc-core: what the LDC parts truly share
//!
//! Every part of LDC (cells, routers, the local controller and the Kubernetes operator)
//! must agree on three things, so they live here and nowhere else:
//!
//! * [`shard`]: the frozen function from a user id to its shard. Changing it would move
//!   every user's money to the wrong owner, so it is pinned by test vectors.
//! * [`routing`]: the versioned routing table (shard → cell, cell → endpoints per colour,
//!   green weight) and the sticky, monotone blue/green split.
//! * [`planner`]: the pure decision of who owns which shard after a failover, switchover or
//!   disaster-recovery cutover. Both drivers (`ldc up`'s controller and the operator) call
//!   it, so a plan printed by `--dry-run` is exactly the plan executed.
//! * [`traffic`]: the blue/green release decision (shift, pause, promote, abort, undo),
//!   so `ldc cell traffic-shift` and `kubectl cell traffic-shift` behave the same.
//! * [`authz`]: who may call which payment method for which user (the router's rule).
//! * [`proto`]: the gRPC wire protocol (`proto/ldc/v1/payments.proto`).
//!
//! Nothing here does I/O but reading the clock ([`clock`]).
#![forbid(unsafe_code)]

pub mod authz;
pub mod clock;
pub mod codec;
pub mod planner;
pub mod routing;
pub mod shard;
pub mod traffic;

/// The gRPC wire protocol, generated from `proto/ldc/v1/payments.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ldc.v1");

    /// Encoded file descriptor set, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ldc_descriptor");
}

/// `text` in quotes, cut to at most `chars_max` characters (then marked with `…`): how an
/// error message names client input, which may be of any size and must never be echoed
/// whole (issue 13: an echoed 200 KB field broke a shared HTTP/2 connection).
pub fn quote_prefix(text: &str, chars_max: usize) -> String {
    let cut: String = text.chars().take(chars_max).collect();
    if cut.len() < text.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// Request header carrying the user id the router routes on.
pub const USER_HEADER: &str = "x-ldc-user";
/// Request header carrying a request id, propagated end to end for tracing.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Request header forcing a colour (`blue` or `green`) for testing, when the table allows it.
pub const COLOUR_HEADER: &str = "x-ldc-colour";
/// Response metadata on a "moved" answer: the shard's current owner.
pub const MOVED_OWNER: &str = "ldc-moved-owner";
/// Response metadata on a "moved" answer: the shard's current ownership epoch.
pub const MOVED_EPOCH: &str = "ldc-moved-epoch";
