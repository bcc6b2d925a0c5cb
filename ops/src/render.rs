//! One rendering of every report: text for people (tables sized to their content), and
//! `-o json` / `-o yaml` (the report itself, camelCase keys) for programs.

use ldc_core::clock::fmt_utc;
use ldc_core::traffic::fmt_pct;

pub use crate::cli::Format;
use crate::verbs::Report;
use crate::verbs::history::HistoryReport;
use crate::verbs::moves::MoveReport;
use crate::verbs::route::RouteReport;
use crate::verbs::status::StatusReport;
use crate::verbs::traffic::TrafficReport;

/// `report` in `format`; `tool` (`ldc cell`, `kubectl cell`) is the prefix of the commands
/// the text suggests. Always ends with a newline.
pub fn render(report: &Report, format: Format, tool: &str) -> String {
    match format {
        Format::Json => {
            let mut s = serde_json::to_string(report).expect("reports encode");
            s.push('\n');
            s
        }
        Format::Yaml => serde_yaml::to_string(report).expect("reports encode"),
        Format::Text => match report {
            Report::Status(r) => status(r),
            Report::Move(r) => moves(r, tool),
            Report::Traffic(r) => traffic(r),
            Report::History(r) => history(r),
            Report::Route(r) => route(r),
        },
    }
}

/// A table as kubectl prints one: a header, columns as wide as their content, no borders.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 3));
    }
    let mut out: String = t
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

fn route(r: &RouteReport) -> String {
    let mut out = String::new();
    for u in &r.routes {
        out.push_str(&format!(
            "{} shard {} cell {} colour {} (green {}) endpoints {}\n",
            u.user,
            u.shard,
            u.cell,
            u.colour,
            fmt_pct(u.green_weight_bp),
            u.endpoints.join(",")
        ));
    }
    out
}

fn status(r: &StatusReport) -> String {
    let mut out = format!(
        "routing epoch {}, {} shards, regions {}\n",
        r.routing_epoch,
        r.shard_count,
        r.regions.join(",")
    );
    let rows = r
        .cells
        .iter()
        .map(|c| {
            let mut green = fmt_pct(c.green_weight_bp);
            if let Some(s) = &c.step {
                green.push_str(&format!(" ({s})"));
            }
            if c.paused {
                green.push_str(" paused");
            }
            vec![
                c.cell.clone(),
                c.region.clone(),
                c.role.to_string(),
                if c.healthy { "healthy" } else { "down" }.to_string(),
                c.shards.len().to_string(),
                c.ranges.clone(),
                c.epoch_span.clone(),
                green,
                format!("{}/{}", c.colours.blue.live, c.colours.green.live),
                c.busy.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "CELL",
            "REGION",
            "ROLE",
            "HEALTH",
            "SHARDS",
            "RANGES",
            "EPOCHS",
            "GREEN",
            "LIVE (B/G)",
            "BUSY",
        ],
        rows,
    ));
    if let Some(p) = &r.pending {
        out.push_str(&format!("pending: {} ({})\n", p.id, p.command));
    }
    out
}

fn moves(r: &MoveReport, tool: &str) -> String {
    let mut out = format!(
        "{}plan for {} (move {}, from routing epoch {}):\n",
        if r.dry_run { "dry run: " } else { "" },
        r.command,
        r.id,
        r.routing_epoch_before
    );
    for line in &r.summary {
        out.push_str(&format!("  {line}\n"));
    }
    let rev = &r.reverse;
    match &rev.command {
        _ if !rev.possible => out.push_str(&format!(
            "  reverse: NOT possible: {}\n",
            rev.why.as_deref().unwrap_or("")
        )),
        None => out.push_str(&format!(
            "  reverse: none: {} is being deleted, so this move is final\n",
            rev.final_for.join(", ")
        )),
        Some(cmd) => {
            out.push_str(&format!("  reverse: `{tool} {cmd}`"));
            if rev.waits_for.is_empty() {
                out.push_str(" (possible now)");
            } else {
                out.push_str(&format!(
                    " (possible once {} is healthy again)",
                    rev.waits_for.join(", ")
                ));
            }
            if !rev.final_for.is_empty() {
                out.push_str(&format!(
                    "; final for {} (being deleted)",
                    rev.final_for.join(", ")
                ));
            }
            out.push('\n');
        }
    }
    if r.would_refuse.is_some() {
        out.push_str("  (without --force this move would be refused)\n");
    }
    if let Some(res) = &r.result {
        out.push_str(&format!(
            "applied: {} shards moved; routing epoch {} -> {}\n",
            res.shards_moved, r.routing_epoch_before, res.routing_epoch
        ));
    }
    out
}

fn traffic(r: &TrafficReport) -> String {
    let d = &r.decision;
    let mut out = String::new();
    for w in &d.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    let paused = |p: bool| if p { ", paused" } else { "" };
    let change = format!(
        "{}: green {}{} -> {}{}",
        r.cell,
        fmt_pct(d.before_bp),
        paused(d.paused_before),
        fmt_pct(d.after_bp),
        paused(d.paused_after)
    );
    let dry = if r.dry_run { "dry run: " } else { "" };
    out.push_str(&if d.noop {
        format!(
            "{}: nothing to change (green {}{})",
            r.cell,
            fmt_pct(d.after_bp),
            paused(d.paused_after)
        )
    } else if r.action == "pause" {
        format!(
            "{dry}{}: paused at green {}; weight changes are refused until --resume (--abort still works)",
            r.cell,
            fmt_pct(d.after_bp)
        )
    } else if r.action == "resume" {
        format!("{dry}{}: resumed at green {}", r.cell, fmt_pct(d.after_bp))
    } else if r.dry_run {
        format!("dry run: {change}; nothing changed")
    } else if r.routing_epoch_after != r.routing_epoch_before {
        format!(
            "{change} (routing epoch {} -> {})",
            r.routing_epoch_before, r.routing_epoch_after
        )
    } else {
        change
    });
    out.push('\n');
    out
}

fn history(r: &HistoryReport) -> String {
    let mut out = String::new();
    if r.moves.is_empty() {
        out.push_str("no moves recorded\n");
    } else {
        let rows = r
            .moves
            .iter()
            .map(|m| {
                vec![
                    fmt_utc(m.at_unix_ms),
                    m.id.clone(),
                    m.command.clone(),
                    m.result.clone(),
                    m.shards_moved.to_string(),
                    m.routing_epoch.to_string(),
                    m.by.clone(),
                    m.message.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "WHEN (UTC)",
                "MOVE",
                "COMMAND",
                "RESULT",
                "MOVED",
                "EPOCH",
                "BY",
                "MESSAGE",
            ],
            rows,
        ));
        if r.moves_total > r.moves.len() {
            out.push_str(&format!(
                "(the newest {} of {} moves; --limit 0 shows them all)\n",
                r.moves.len(),
                r.moves_total
            ));
        }
    }
    out.push('\n');
    if r.traffic.is_empty() {
        out.push_str("no traffic changes recorded\n");
        return out;
    }
    let p = |bp: u16, paused: bool| format!("{}{}", fmt_pct(bp), if paused { " (p)" } else { "" });
    let rows = r
        .traffic
        .iter()
        .map(|t| {
            vec![
                fmt_utc(t.change.at_unix_ms),
                t.cell.clone(),
                t.change.action.clone(),
                t.change.by.clone(),
                p(t.change.before_bp, t.change.paused_before),
                p(t.change.after_bp, t.change.paused_after),
                t.change.routing_epoch.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "WHEN (UTC)",
            "CELL",
            "ACTION",
            "BY",
            "BEFORE",
            "AFTER",
            "EPOCH",
        ],
        rows,
    ));
    out
}
