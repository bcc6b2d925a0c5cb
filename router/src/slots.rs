//! Connection slots: a bound on client connections in which idle connections give way.
//!
//! A plain semaphore lets whoever opens sockets first keep every slot: 10,000 sockets that
//! never finish a TLS handshake, or finish it and never send a request, would lock out
//! every client that comes after (each holds its slot until a timeout). Here, when all
//! [`Slots::max`] slots are taken, a new connection evicts the connection that has been
//! idle (no request in flight) the longest, so a real client always gets in while the
//! flood ages out; only when every connection has requests in flight is the new one
//! refused. Activity is tracked with two atomics per connection, so the request path takes
//! no lock; the scan for a victim runs only when the slots are full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

/// What one connection shares with the slot table.
#[derive(Debug)]
struct Conn {
    /// Requests in flight on the connection.
    active: AtomicUsize,
    /// Microseconds since the table's origin of the connection's last activity (accept,
    /// a request starting or ending).
    last_us: AtomicU64,
    /// Wakes the connection's task to close it.
    evict: Notify,
}

#[derive(Debug)]
pub struct Slots {
    max: usize,
    origin: Instant,
    conns: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    open: HashMap<u64, Arc<Conn>>,
}

/// A connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    conn: Arc<Conn>,
    slots: Arc<Slots>,
}

/// Why a connection got no slot.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max: max.max(1),
            origin: Instant::now(),
            conns: Mutex::default(),
        })
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    /// Connections holding a slot.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.lock().expect("lock").open.len()
    }

    /// A slot for a new connection, evicting the longest-idle connection if all are taken.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Full> {
        let now = self.now_us();
        let mut t = self.conns.lock().expect("lock");
        if t.open.len() >= self.max {
            let victim = t
                .open
                .iter()
                .filter(|(_, c)| c.active.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, c)| c.last_us.load(Ordering::Relaxed))
                .map(|(id, _)| *id)
                .ok_or(Full)?;
            // Out of the table at once (its task ends soon): the bound holds exactly.
            if let Some(c) = t.open.remove(&victim) {
                c.evict.notify_one();
            }
        }
        let id = t.next;
        t.next += 1;
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            last_us: AtomicU64::new(now),
            evict: Notify::new(),
        });
        t.open.insert(id, conn.clone());
        Ok(Slot {
            id,
            conn,
            slots: self.clone(),
        })
    }
}

impl Slot {
    /// Resolves when the connection was evicted to make room for a new one.
    pub async fn evicted(&self) {
        self.conn.evict.notified().await;
    }

    /// Marks a request in flight on this connection until the guard drops.
    pub fn request(&self) -> RequestGuard {
        self.conn.active.fetch_add(1, Ordering::Relaxed);
        self.touch();
        RequestGuard {
            conn: self.conn.clone(),
            slots: self.slots.clone(),
        }
    }

    fn touch(&self) {
        self.conn
            .last_us
            .store(self.slots.now_us(), Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.conns.lock().expect("lock").open.remove(&self.id);
    }
}

/// A request in flight on a connection.
pub struct RequestGuard {
    conn: Arc<Conn>,
    slots: Arc<Slots>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.conn
            .last_us
            .store(self.slots.now_us(), Ordering::Relaxed);
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_table_evicts_the_longest_idle_connection() {
        let s = Slots::new(3);
        let a = s.admit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = s.admit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let c = s.admit().unwrap();
        // `a` is busy, so `b` (idle longest among the idle) gives way.
        let _busy = a.request();
        let d = s.admit().unwrap();
        assert_eq!(s.len(), 3);
        tokio::time::timeout(std::time::Duration::from_secs(1), b.evicted())
            .await
            .expect("b is told to close");
        drop(b); // its task ends; the slot was already given to `d`
        assert_eq!(s.len(), 3);
        drop((c, d));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_table_of_busy_connections_refuses() {
        let s = Slots::new(2);
        let a = s.admit().unwrap();
        let b = s.admit().unwrap();
        let (_ga, _gb) = (a.request(), b.request());
        assert_eq!(s.admit().unwrap_err(), Full);
        drop(_ga);
        assert!(s.admit().is_ok(), "an idle connection gives way");
    }

    #[test]
    fn activity_protects_a_connection() {
        let s = Slots::new(2);
        let a = s.admit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = s.admit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        drop(a.request()); // `a` just finished a request: `b` is now the longest idle
        let _c = s.admit().unwrap();
        let open: Vec<u64> = s.conns.lock().unwrap().open.keys().copied().collect();
        assert!(open.contains(&a.id) && !open.contains(&b.id), "{open:?}");
    }
}
