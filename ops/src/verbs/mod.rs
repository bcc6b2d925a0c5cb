//! The verbs, one file each: pure functions from a [`crate::Snapshot`] and the parsed
//! arguments to a report or a refusal. [`crate::run`] drives them over a platform.

pub mod history;
pub mod moves;
pub mod route;
pub mod status;
pub mod traffic;

use serde::Serialize;

/// What a verb answers; [`crate::render`] prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Report {
    Status(status::StatusReport),
    Move(moves::MoveReport),
    Traffic(traffic::TrafficReport),
    History(history::HistoryReport),
    Route(route::RouteReport),
}
