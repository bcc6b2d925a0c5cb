//! A bound on each client's requests in flight through this router.
//!
//! A cell's write queue is shared by everyone its router sends there; one client with
//! thousands of concurrent requests (a runaway batch job, a retry storm) would fill it, and
//! every other client would be shed with it. So the router, which knows who the client is
//! (the authenticated principal), admits at most [`RouterConfig::client_in_flight_max`]
//! requests per client at once; the next is refused at the edge with RESOURCE_EXHAUSTED
//! and a hint to back off, before it costs a cell anything. The count of a request ends
//! with its response body.
//!
//! [`RouterConfig::client_in_flight_max`]: crate::RouterConfig::client_in_flight_max

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct InFlightByClient {
    max: usize,
    /// Requests in flight per client label; a client with none has no entry, so the map
    /// holds at most the clients with requests in flight.
    counts: Mutex<HashMap<String, usize>>,
}

/// One admitted request of a client; dropping it ends the request.
#[derive(Debug)]
pub struct ClientGuard {
    client: String,
    table: Arc<InFlightByClient>,
}

impl InFlightByClient {
    pub fn new(max: usize) -> Arc<InFlightByClient> {
        Arc::new(InFlightByClient {
            max: max.max(1),
            counts: Mutex::default(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Admits one more request of `client`, or `None` when it has `max` in flight. Takes
    /// the label by value: the guard keeps it, and the map copies it only for a client
    /// that had nothing in flight.
    pub fn enter(self: &Arc<Self>, client: String) -> Option<ClientGuard> {
        let mut m = self.counts.lock().expect("lock");
        match m.get_mut(&client) {
            Some(n) if *n >= self.max => return None,
            Some(n) => *n += 1,
            None => {
                m.insert(client.clone(), 1);
            }
        }
        drop(m);
        Some(ClientGuard {
            client,
            table: self.clone(),
        })
    }

    #[cfg(test)]
    fn in_flight(&self, client: &str) -> usize {
        self.counts
            .lock()
            .unwrap()
            .get(client)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut m = self.table.counts.lock().expect("lock");
        if let Some(n) = m.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_its_own_bound() {
        let t = InFlightByClient::new(2);
        let a1 = t.enter("user:alice".into()).unwrap();
        let _a2 = t.enter("user:alice".into()).unwrap();
        assert!(
            t.enter("user:alice".into()).is_none(),
            "alice is at her bound"
        );
        let _b = t
            .enter("user:bob".into())
            .expect("bob is not held back by alice");
        drop(a1);
        assert!(
            t.enter("user:alice".into()).is_some(),
            "an answer frees a place"
        );
        assert_eq!(t.in_flight("user:bob"), 1);
    }

    #[test]
    fn clients_without_requests_leave_no_entry() {
        let t = InFlightByClient::new(4);
        drop(t.enter("service:batch".into()).unwrap());
        assert!(t.counts.lock().unwrap().is_empty());
    }
}
