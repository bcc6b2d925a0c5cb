//! `history`: the moves (newest last) and every cell's traffic changes.

use std::collections::BTreeMap;

use ldc_core::traffic::Change;
use serde::Serialize;

use crate::HistoryData;
use ldc_control::moves::ranges_by_cell;

/// How many moves `history` shows unless asked (`--limit`; 0 shows them all).
pub const MOVES_SHOWN_DEFAULT: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryReport {
    pub moves: Vec<MoveEntry>,
    /// Moves recorded in all (more than shown when `--limit` cut the list).
    pub moves_total: usize,
    pub traffic: Vec<TrafficEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MoveEntry {
    pub id: String,
    pub command: String,
    /// `Succeeded` or `Failed`.
    pub result: String,
    pub message: String,
    pub shards_moved: u32,
    pub routing_epoch: u64,
    pub moved_from: BTreeMap<String, String>,
    pub by: String,
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficEntry {
    pub cell: String,
    #[serde(flatten)]
    pub change: Change,
}

/// The history report, only of `cell` if named (the moves that involve it: it lost
/// shards, gained them, or the command names it), at most the newest `shown` moves.
pub fn history(h: &HistoryData, cell: Option<&str>, shown: usize) -> HistoryReport {
    // The platform read only the moves that involve `cell` (it pages through the rest);
    // filtered again here, so the verb's answer does not depend on that.
    let involves = |m: &crate::MoveView| cell.is_none_or(|c| m.record.involves(c));
    let matching: Vec<&crate::MoveView> = h.moves.iter().filter(|m| involves(m)).collect();
    let total = h.moves_total;
    let moves: Vec<MoveEntry> = matching
        .iter()
        .skip(matching.len().saturating_sub(shown))
        .map(|m| MoveEntry {
            id: m.record.id.clone(),
            command: m.record.command.clone(),
            result: m.result.clone(),
            message: m.message.clone(),
            shards_moved: m.record.shards_moved,
            routing_epoch: m.record.routing_epoch,
            moved_from: ranges_by_cell(&m.record.moved_from),
            by: m.record.by.clone(),
            at_unix_ms: m.record.at_unix_ms,
        })
        .collect();
    let mut traffic: Vec<TrafficEntry> = h
        .traffic
        .iter()
        .filter(|(c, _)| cell.is_none_or(|want| want == c))
        .map(|(c, ch)| TrafficEntry {
            cell: c.clone(),
            change: ch.clone(),
        })
        .collect();
    traffic.sort_by(|a, b| (a.change.at_unix_ms, &a.cell).cmp(&(b.change.at_unix_ms, &b.cell)));
    HistoryReport {
        moves_total: total,
        moves,
        traffic,
    }
}
