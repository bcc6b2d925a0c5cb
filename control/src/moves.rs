//! Move records: what an applied move (failover, switchover, dr cutover, revert) did, so it
//! can be audited (`history`) and undone (`revert`). One format on both platforms; the local
//! platform keeps them under [`crate::keys::LOCAL_MOVES_PREFIX`], the operator under
//! [`crate::keys::operator_moves_prefix`] (its idempotence record: a move whose id is recorded is
//! never applied again).
//!
//! Every record is kept: nothing trims the store's move history. Readers page through it
//! ([`newest`] holds only the records it returns), so history past any one scan's bound is
//! neither lost nor cut. The Topology status on Kubernetes shows only the latest moves
//! (`HISTORY_MAX` of the operator's CRD) because a resource's size is bounded; the store
//! keeps them all.

use std::collections::{BTreeMap, BinaryHeap};

use ldc_core::planner::{Plan, parse_shard_ranges, shard_ranges};
use ldc_store::Kv;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[cfg(test)]
use crate::keys;
use crate::{ControlError, decode, get_json, put_json};

/// An applied move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// The move's id (what `revert` takes). Records of older operators kept it only in
    /// the key; [`get`] and [`newest`] fill it in.
    #[serde(default)]
    pub id: String,
    /// The command as typed: `failover r1-a` ([`ldc_core::planner::Command`]'s `Display`).
    #[serde(default)]
    pub command: String,
    /// The plan on one line (`r1-a -> r1-s: 0-5 (epoch 1 -> 2)`).
    #[serde(default)]
    pub summary: String,
    pub shards_moved: u32,
    /// The routing table that carried the move.
    pub routing_epoch: u64,
    /// The moved shards by the cell they left (what `revert` sends back). Stored as
    /// ranges (`"0-5"`); records of older builds kept lists, which read the same.
    #[serde(default, serialize_with = "ser_sets", deserialize_with = "de_sets")]
    pub moved_from: BTreeMap<String, Vec<u32>>,
    /// Who asked (`user@host` locally, the Kubernetes user, or the controller itself).
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub at_unix_ms: u64,
}

impl MoveRecord {
    /// Whether the move involves `cell`: shards moved from it, or its command or summary
    /// names it (a move to it).
    pub fn involves(&self, cell: &str) -> bool {
        let names = |text: &str| {
            text.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'))
                .any(|w| w == cell)
        };
        self.moved_from.contains_key(cell) || names(&self.command) || names(&self.summary)
    }

    /// The record of `plan`, applied as `id` and carried by routing epoch `routing_epoch`.
    pub fn of(id: &str, plan: &Plan, routing_epoch: u64, by: &str, at_unix_ms: u64) -> Self {
        MoveRecord {
            id: id.to_string(),
            command: plan.command.to_string(),
            summary: plan.describe().join("; "),
            shards_moved: plan.moves.len() as u32,
            routing_epoch,
            moved_from: plan.moved_from(),
            by: by.to_string(),
            at_unix_ms,
        }
    }
}

/// Shard sets by cell as ranges (`{"r1-a": "0-5"}`): how records store them and reports
/// show them.
pub fn ranges_by_cell(m: &BTreeMap<String, Vec<u32>>) -> BTreeMap<String, String> {
    m.iter()
        .map(|(c, v)| (c.clone(), shard_ranges(v)))
        .collect()
}

fn ser_sets<S: Serializer>(m: &BTreeMap<String, Vec<u32>>, s: S) -> Result<S::Ok, S::Error> {
    ranges_by_cell(m).serialize(s)
}

fn de_sets<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<u32>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Set {
        Ranges(String),
        List(Vec<u32>),
    }
    let raw: BTreeMap<String, Set> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(c, s)| {
            let v = match s {
                Set::Ranges(r) => parse_shard_ranges(&r).map_err(serde::de::Error::custom)?,
                Set::List(v) => v,
            };
            Ok((c, v))
        })
        .collect()
}

/// Stores `rec` under `prefix` (one of the two move prefixes).
pub fn put(kv: &mut dyn Kv, prefix: &str, rec: &MoveRecord) -> Result<(), ControlError> {
    put_json(kv, format!("{prefix}{}", rec.id).as_bytes(), rec)
}

/// The move `id` under `prefix`, if recorded. `for_update` registers the read so a
/// concurrent recorder of the same id conflicts (the operator's idempotence check).
pub fn get(
    kv: &mut dyn Kv,
    prefix: &str,
    id: &str,
    for_update: bool,
) -> Result<Option<MoveRecord>, ControlError> {
    let key = format!("{prefix}{id}");
    let rec: Option<MoveRecord> = if for_update {
        match kv.get_for_update(key.as_bytes())? {
            Some(b) => Some(decode(key.as_bytes(), &b)?),
            None => None,
        }
    } else {
        get_json(kv, key.as_bytes())?
    };
    Ok(rec.map(|mut r| {
        if r.id.is_empty() {
            r.id = id.to_string();
        }
        r
    }))
}

/// The `n` newest moves under `prefix` that `keep` accepts (by time, then id), oldest
/// first, and how many it accepts in all. Reads every record page by page and holds only
/// `n`.
pub fn newest(
    kv: &mut dyn Kv,
    prefix: &str,
    n: usize,
    keep: impl Fn(&MoveRecord) -> bool,
) -> Result<(Vec<MoveRecord>, usize), ControlError> {
    // A min-heap of the newest n by (time, id): the top is the oldest kept.
    let mut kept: BinaryHeap<std::cmp::Reverse<(u64, String, Keep)>> = BinaryHeap::new();
    let mut total = 0usize;
    let mut bad: Option<ControlError> = None;
    ldc_store::visit_prefix(kv, prefix.as_bytes(), |k, v| {
        if bad.is_some() {
            return;
        }
        let mut r: MoveRecord = match decode(&k, &v) {
            Ok(r) => r,
            Err(e) => {
                bad = Some(e);
                return;
            }
        };
        if r.id.is_empty() {
            r.id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        }
        if !keep(&r) {
            return;
        }
        total += 1;
        kept.push(std::cmp::Reverse((r.at_unix_ms, r.id.clone(), Keep(r))));
        if kept.len() > n {
            kept.pop();
        }
    })?;
    if let Some(e) = bad {
        return Err(e);
    }
    let mut v: Vec<(u64, String, Keep)> = kept.into_iter().map(|r| r.0).collect();
    v.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok((v.into_iter().map(|(_, _, k)| k.0).collect(), total))
}

/// A record carried in the heap, ordered by the (time, id) beside it only.
#[derive(Debug)]
struct Keep(MoveRecord);
impl PartialEq for Keep {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Keep {}
impl PartialOrd for Keep {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Keep {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_store::{Store, sqlite::SqliteStore};

    const LOCAL: &str = keys::LOCAL_MOVES_PREFIX;

    fn rec(id: &str, at: u64) -> MoveRecord {
        MoveRecord {
            id: id.into(),
            command: format!("failover {id}"),
            summary: String::new(),
            shards_moved: 2,
            routing_epoch: at,
            moved_from: BTreeMap::from([("a".to_string(), vec![0, 1, 2, 7])]),
            by: "me".into(),
            at_unix_ms: at,
        }
    }

    /// More moves than one scan returns: all are kept and counted, the newest are read.
    #[test]
    fn history_past_one_scan_is_kept_and_paged() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let n = ldc_store::SCAN_LIMIT_MAX + 2_345;
        let mut t = store.begin().unwrap();
        for i in 0..n {
            put(&mut *t, LOCAL, &rec(&format!("op-{i:06}"), i as u64)).unwrap();
        }
        t.commit().unwrap();
        let mut t = store.begin_read().unwrap();
        let (last, total) = newest(&mut *t, LOCAL, 3, |_| true).unwrap();
        assert_eq!(total, n);
        let ids: Vec<&str> = last.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["op-012342", "op-012343", "op-012344"]);
        // Filtered: the newest of those kept, and how many are kept in all.
        let even = |r: &MoveRecord| r.at_unix_ms.is_multiple_of(2);
        let (last_even, evens) = newest(&mut *t, LOCAL, 2, even).unwrap();
        assert_eq!(evens, n.div_ceil(2));
        let ids: Vec<&str> = last_even.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["op-012342", "op-012344"]);
        let (all, _) = newest(&mut *t, LOCAL, usize::MAX, |_| true).unwrap();
        assert_eq!(all.len(), n);
        assert_eq!(all[0].id, "op-000000");
        assert_eq!(
            get(&mut *t, LOCAL, "op-000000", false).unwrap(),
            Some(rec("op-000000", 0))
        );
        t.rollback().unwrap();
    }

    /// The two formats older builds wrote read as one.
    #[test]
    fn older_records_read_the_same() {
        let local = br#"{"id":"op-1","command":"failover a","moved_from":{"a":[0,1,2]},"shards_moved":3,"routing_epoch":4,"by":"me","at_unix_ms":9}"#;
        let r: MoveRecord = serde_json::from_slice(local).unwrap();
        assert_eq!(r.moved_from["a"], vec![0, 1, 2]);
        let operator =
            br#"{"shards_moved":3,"routing_epoch":4,"summary":"a -> s","moved_from":{"a":"0-2"}}"#;
        let o: MoveRecord = serde_json::from_slice(operator).unwrap();
        assert_eq!(o.moved_from, r.moved_from);
        let again: MoveRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
        assert!(serde_json::to_string(&r).unwrap().contains(r#""a":"0-2""#));
    }
}
