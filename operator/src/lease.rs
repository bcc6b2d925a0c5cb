//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! Only the leader reconciles, so two operator replicas never plan against the same map at
//! once (the store's compare-and-set would refuse the loser anyway; the lease keeps it from
//! trying). The decision is a pure function ([`can_take`]); the I/O is one get and one
//! create-or-replace carrying the read `resourceVersion`, so two candidates racing for an
//! expired lease cannot both win. A leader that fails to renew in time stops leading: the
//! binary exits and its Deployment restarts it as a candidate.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// Who we are and how long a lease lasts.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    /// Owner of a Lease this operator creates (the chart's operator ServiceAccount), so
    /// `helm uninstall` garbage-collects it with the release instead of leaving it behind.
    pub owner: Option<OwnerReference>,
}

/// Whether `me` may take (or keep) a lease in `spec` at `now`: it is free, ours, or expired.
pub fn can_take(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => {
            let Some(MicroTime(renewed)) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())
            else {
                return true;
            };
            let ttl =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            now.duration_since(*renewed) > ttl
        }
    }
}

fn spec_for(prev: Option<&LeaseSpec>, cfg: &LeaseConfig, now: Timestamp) -> LeaseSpec {
    let ours = prev.and_then(|p| p.holder_identity.as_deref()) == Some(cfg.identity.as_str());
    let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        acquire_time: if ours {
            prev.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || prev.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// One attempt to take or renew the lease. `Ok(true)`: we lead until `now + duration`.
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    owner_references: cfg.owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                spec: Some(spec_for(None, cfg, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !can_take(lease.spec.as_ref(), &cfg.identity, now) {
                return Ok(false);
            }
            lease.spec = Some(spec_for(lease.spec.as_ref(), cfg, now));
            // `lease.metadata.resourceVersion` is the one we read: a concurrent writer wins.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Gives the lease up if we hold it (a leader stepping down), so another candidate takes
/// it at once instead of after it expires. Best effort: a failure leaves it to expire.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let r = async {
        let Some(mut lease) = api.get_opt(&cfg.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        api.replace(&cfg.name, &PostParams::default(), &lease)
            .await
            .map(drop)
    };
    match tokio::time::timeout(cfg.duration / 3, r).await {
        Ok(Ok(())) => tracing::info!(lease = %cfg.name, "lease released"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release the lease; it expires on its own")
        }
        Err(_) => tracing::warn!("releasing the lease timed out; it expires on its own"),
    }
}

/// Waits until we lead.
pub async fn acquire(api: &Api<Lease>, cfg: &LeaseConfig) {
    let mut logged = false;
    loop {
        match try_acquire(api, cfg).await {
            Ok(true) => {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "leading");
                return;
            }
            Ok(false) if !logged => {
                tracing::info!(lease = %cfg.name, "another operator leads; waiting");
                logged = true;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "lease request failed; retrying"),
        }
        tokio::time::sleep(cfg.duration / 3).await;
    }
}

/// Renews the lease every third of its duration; returns when it could not be renewed
/// before it expired (leadership lost).
pub async fn hold(api: &Api<Lease>, cfg: &LeaseConfig) {
    let mut last_renew = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.duration / 3).await;
        match tokio::time::timeout(cfg.duration / 3, try_acquire(api, cfg)).await {
            Ok(Ok(true)) => last_renew = tokio::time::Instant::now(),
            Ok(Ok(false)) => {
                tracing::error!(lease = %cfg.name, "lease taken by another operator");
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
            Err(_) => tracing::warn!("lease renewal timed out"),
        }
        if last_renew.elapsed() >= cfg.duration {
            tracing::error!(lease = %cfg.name, "could not renew the lease in time");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(who: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn lease_rules() {
        let now: Timestamp = "2025-01-01T00:00:20Z".parse().unwrap();
        assert!(can_take(None, "me", now));
        assert!(can_take(
            Some(&held_by("me", "2025-01-01T00:00:19Z")),
            "me",
            now
        ));
        assert!(!can_take(
            Some(&held_by("other", "2025-01-01T00:00:10Z")),
            "me",
            now
        ));
        assert!(can_take(
            Some(&held_by("other", "2025-01-01T00:00:04Z")),
            "me",
            now
        ));
        let cfg = LeaseConfig {
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
            owner: None,
        };
        let taken = spec_for(Some(&held_by("other", "2025-01-01T00:00:04Z")), &cfg, now);
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
    }
}
