//! What every reconcile shares: the client, the event recorder, the metrics, the stores
//! (opened once per spec), and the one way a store call is made from async code
//! ([`blocking`]: off the runtime, bounded by a timeout, counted as reaching the store or
//! not).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use ldc_store::Store;
use thiserror::Error;

use crate::fence::{self, FenceError};
use crate::metrics::OperatorMetrics;
use crate::specs::MANAGER;

#[derive(Debug, Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("store task failed: {0}")]
    Join(String),
    #[error("the store did not answer within {0:?}")]
    StoreTimeout(std::time::Duration),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("certificates: {0}")]
    Pki(#[from] crate::pki::PkiError),
}

impl Error {
    /// Whether this is an optimistic-lock conflict (HTTP 409), which a re-run resolves.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(e)) => e.code == 409,
            Error::Finalizer(f) => match &**f {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_conflict(),
                _ => false,
            },
            _ => false,
        }
    }

    /// A stable label for metrics and logs: the cause's, through the finalizer wrapper
    /// every reconcile error comes in; `conflict` for an optimistic-lock conflict.
    pub fn label(&self) -> &'static str {
        if self.is_conflict() {
            return "conflict";
        }
        match self {
            Error::Kube(_) => "kube",
            Error::Fence(e) => e.label(),
            Error::Finalizer(f) => match &**f {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.label(),
                _ => "finalizer",
            },
            Error::Join(_) => "join",
            Error::StoreTimeout(_) => "store_timeout",
            Error::NoNamespace => "no_namespace",
            Error::Pki(_) => "pki",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<OperatorMetrics>,
    stores: Mutex<HashMap<String, Arc<dyn Store>>>,
    /// Whether store calls reach the store (see [`crate::reach`]).
    pub reach: Arc<crate::reach::StoreReach>,
}

impl Context {
    pub fn new(client: Client, identity: &str, metrics: Arc<OperatorMetrics>) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        );
        Context {
            client,
            recorder,
            metrics,
            stores: Mutex::new(HashMap::new()),
            reach: Arc::default(),
        }
    }

    /// The store for `spec`, opened once and shared.
    pub(super) async fn store(&self, spec: &str) -> Result<Arc<dyn Store>, Error> {
        if let Some(s) = self.stores.lock().expect("lock").get(spec) {
            return Ok(s.clone());
        }
        let owned = spec.to_string();
        let s = blocking(&self.reach, move || fence::open(&owned)).await?;
        self.stores
            .lock()
            .expect("lock")
            .insert(spec.to_string(), s.clone());
        Ok(s)
    }

    /// Publishes `note` as an event on `obj` (a failure to publish is logged, not fatal).
    pub(super) async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, note: Note) {
        let ev = KEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message),
            action: note.reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason = note.reason, "cannot publish event");
        }
    }
}

/// An event the pure phases ask for; [`Context::event`] publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: String) -> Note {
        Note {
            warning: false,
            reason,
            message,
        }
    }

    pub fn warning(reason: &'static str, message: String) -> Note {
        Note {
            warning: true,
            reason,
            message,
        }
    }
}

/// Runs a store call off the async runtime, bounded by [`crate::reach::STORE_CALL_TIMEOUT`]
/// (a timed-out call's thread finishes on its own; its result is dropped), and records
/// whether it reached the store.
pub(super) async fn blocking<T: Send + 'static>(
    reach: &crate::reach::StoreReach,
    f: impl FnOnce() -> Result<T, FenceError> + Send + 'static,
) -> Result<T, Error> {
    let timeout = crate::reach::STORE_CALL_TIMEOUT;
    let r = match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(Error::StoreTimeout(timeout)),
        Ok(joined) => joined
            .map_err(|e| Error::Join(e.to_string()))?
            .map_err(Error::from),
    };
    reach.record(reached(&r), std::time::Instant::now());
    r
}

/// Whether a store call's outcome came from the store (a refusal is an answer).
fn reached<T>(r: &Result<T, Error>) -> bool {
    use ldc_store::StoreError;
    !matches!(
        r,
        Err(Error::StoreTimeout(_))
            | Err(Error::Fence(FenceError::Store(
                StoreError::Backend(_)
                    | StoreError::Undetermined(_)
                    | StoreError::Io(_)
                    | StoreError::Config(_)
                    | StoreError::Busy(_)
            )))
    )
}

/// Sets a cell's finalizers under the resourceVersion it was read at (a concurrent change
/// is a conflict, and a fresh reconcile).
pub(super) async fn set_finalizers(
    api: &kube::Api<crate::crd::Cell>,
    c: &crate::crd::Cell,
    finalizers: &[&str],
) -> Result<(), Error> {
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": c.resource_version()}
    });
    let pp = PatchParams::default();
    api.patch(&c.name_any(), &pp, &Patch::Merge(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_store::StoreError;

    #[test]
    fn only_silence_or_a_broken_backend_counts_as_not_reaching_the_store() {
        let store = |e: StoreError| Err::<(), _>(Error::Fence(FenceError::Store(e)));
        assert!(reached(&Ok(())));
        // The store answered, even if it said no.
        assert!(reached(&store(StoreError::Conflict)));
        assert!(reached(&Err::<(), _>(Error::Fence(
            FenceError::NoServingCell
        ))));
        // Silence, or a backend that cannot answer.
        assert!(!reached(&Err::<(), _>(Error::StoreTimeout(
            std::time::Duration::from_secs(10)
        ))));
        for e in [
            StoreError::Backend("pd unreachable".into()),
            StoreError::Undetermined("x".into()),
            StoreError::Io("x".into()),
            StoreError::Config("cannot reach TiKV PD".into()),
            StoreError::Busy("x".into()),
        ] {
            assert!(!reached(&store(e)));
        }
    }
}
