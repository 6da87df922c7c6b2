//! The target table as text: one row per backend (or pod), the Service's row without a
//! backend, and notes. The live view, the final view and the text sink all draw it.

use crate::aggregate::{
    diagnosis::{pct, why},
    target_summary::{BackendRow, TargetSummary},
};

/// A drop ratio in the table: a percentage up to 100%, else drops per attempt (`2.1x`). Every
/// retransmission of lost data is a drop of its own (a path-MTU black hole drops each
/// retransmitted too-big segment), so drops can exceed attempts; a share above 100% would read
/// as nonsense.
fn ratio_cell(r: Option<f64>) -> String {
    match r {
        Some(r) if r > 1.0 => format!("{r:.1}x"),
        _ => pct(r),
    }
}

/// The live table (text), redrawn about once a second in a terminal.
pub fn render(s: &TargetSummary) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} — attempts {}  drops {}  ({})  {:.0}s",
        s.service,
        s.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
        s.drops,
        ratio_cell(s.drop_ratio),
        s.duration_s
    );
    let label = |b: &BackendRow| {
        if b.ready {
            b.pod.clone()
        } else {
            format!("{} (not ready)", b.pod)
        }
    };
    // Long pod names widen the column rather than push the numbers out of line.
    let w = s
        .backends
        .iter()
        .map(|b| label(b).chars().count())
        .max()
        .unwrap_or(0)
        .max(32);
    let _ = writeln!(
        o,
        "{:<w$} {:<12} {:>9} {:>7} {:>7}  TOP REASON",
        "BACKEND", "NODE", "ATTEMPTS", "DROPS", "DROP%"
    );
    for b in &s.backends {
        let _ = writeln!(
            o,
            "{:<w$} {:<12} {:>9} {:>7} {:>7}  {}",
            label(b),
            b.node.as_deref().unwrap_or("-"),
            b.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
            b.drops,
            ratio_cell(b.drop_ratio),
            b.top_reasons.first().map(why).unwrap_or_default()
        );
    }
    let _ = writeln!(
        o,
        "{:<w$} {:<12} {:>9} {:>7} {:>7}  {}",
        "(service, no backend)",
        "-",
        "-",
        s.unmatched.drops,
        "",
        s.unmatched.top_reasons.first().map(why).unwrap_or_default()
    );
    if s.drop_ratio.is_some_and(|r| r > 1.0) || s.backends.iter().any(|b| b.drop_ratio.is_some_and(|r| r > 1.0)) {
        let _ = writeln!(
            o,
            "(Nx: more drops than attempts, N drops per attempt: lost data retransmitted and dropped again)"
        );
    }
    if s.lost_events > 0 {
        let _ = writeln!(o, "({} events lost; counts above are exact)", s.lost_events);
    }
    o
}
