//! Aggregation: the run's summary, built from the kernel's exact counters (never from the
//! events that happened to reach userspace).

use std::collections::BTreeMap;

use netdrop_common::{ABSENT, stat};
use serde::Serialize;

use crate::{probe::KernelCounts, reasons::ReasonTable, symbols::KernelSymbols};

/// One (reason, location, netns) row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReasonRow {
    pub reason: String,
    pub reason_code: u32,
    pub location: String,
    pub netns: u32,
    /// `ipv4`, `ipv6`, or `none` for skbs without an IP header.
    pub ip: &'static str,
    pub count: u64,
    /// Benign or not selected: counted, not shown as events.
    pub hidden: bool,
}

/// The end-of-run (or periodic) summary. JSON: `{"type":"summary",...}`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub node: String,
    pub duration_s: f64,
    /// The hook that carried the drops.
    pub hook: &'static str,
    /// Drops matching the filters, hidden ones excluded.
    pub drops_total: u64,
    /// Shown drops per reason name.
    pub by_reason: BTreeMap<String, u64>,
    /// Hidden (benign or not selected) drops, counted all the same.
    pub hidden_drops: u64,
    pub hidden_by_reason: BTreeMap<String, u64>,
    /// Every row, most frequent first.
    pub drops: Vec<ReasonRow>,
    /// Events written to userspace and shown.
    pub events_shown: u64,
    /// Events lost because the ring buffer was full (their drops are still counted above).
    pub lost_events: u64,
    /// Events not sent because of `--event-rate` (their drops are still counted above).
    pub rate_limited_events: u64,
    /// Drops that could not be counted because the counter map was full (should be 0).
    pub uncounted_drops: u64,
}

/// Decides whether a drop is shown or hidden: the kernel's emit decision (reasons, non-IP
/// `NOT_SPECIFIED`), plus benign teardown locations, which only userspace can name.
pub struct Visibility {
    config: netdrop_common::Config,
    /// Hide drops at socket-teardown functions ([`crate::classify::BENIGN_LOCATIONS`]).
    pub hide_benign_locations: bool,
    symbols: std::sync::Arc<KernelSymbols>,
}

impl Visibility {
    pub fn new(config: &netdrop_common::Config, hide_benign_locations: bool, symbols: std::sync::Arc<KernelSymbols>) -> Self {
        Self { config: *config, hide_benign_locations, symbols }
    }

    pub fn is_hidden(&self, reason: u32, ip_version: u32, location: u64) -> bool {
        let quiet = self.config.quiet_reason_without_ip;
        !self.config.emits(reason)
            || (ip_version == 0 && reason == quiet && quiet != ABSENT)
            || (self.hide_benign_locations
                && self.symbols.function(location).is_some_and(crate::classify::is_benign_location))
    }
}

/// Context the summary needs to name things.
pub struct SummaryContext<'a> {
    pub reasons: &'a ReasonTable,
    pub symbols: &'a KernelSymbols,
    pub visibility: &'a Visibility,
    pub node: &'a str,
    pub hook: &'static str,
}

pub fn summarize(counts: &KernelCounts, ctx: &SummaryContext<'_>, duration_s: f64, events_shown: u64) -> Summary {
    let mut rows: Vec<ReasonRow> = counts
        .drops
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| ReasonRow {
            reason: ctx.reasons.display(k.reason).to_string(),
            reason_code: k.reason,
            location: ctx.symbols.symbolize(k.location),
            netns: k.netns,
            ip: match k.ip_version {
                4 => "ipv4",
                6 => "ipv6",
                _ => "none",
            },
            count: *n,
            hidden: ctx.visibility.is_hidden(k.reason, k.ip_version, k.location),
        })
        .collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    let mut s = Summary {
        kind: "summary",
        time: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
        node: ctx.node.to_string(),
        duration_s,
        hook: ctx.hook,
        drops_total: 0,
        by_reason: BTreeMap::new(),
        hidden_drops: 0,
        hidden_by_reason: BTreeMap::new(),
        drops: Vec::new(),
        events_shown,
        lost_events: counts.stats[stat::EVENTS_LOST as usize],
        rate_limited_events: counts.stats[stat::EVENTS_RATE_LIMITED as usize],
        uncounted_drops: counts.stats[stat::COUNTER_MAP_FULL as usize],
    };
    for r in &rows {
        if r.hidden {
            s.hidden_drops += r.count;
            *s.hidden_by_reason.entry(r.reason.clone()).or_default() += r.count;
        } else {
            s.drops_total += r.count;
            *s.by_reason.entry(r.reason.clone()).or_default() += r.count;
        }
    }
    s.drops = rows;
    s
}

#[cfg(test)]
mod tests {
    use netdrop_common::{Config, DropKey};

    use super::*;

    #[test]
    fn summary_splits_hidden_and_shown_exactly() {
        let reasons = ReasonTable::from_print_fmt(
            r#"__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 4, "SOCKET_CLOSE" })"#,
        )
        .expect("table");
        let mut cfg = Config::DEFAULT;
        crate::filter::FilterSpec::default().apply(&mut cfg, &reasons).expect("apply");
        let syms = std::sync::Arc::new(KernelSymbols::parse(
            "0000000000001000 t udp_rcv\n0000000000002000 t udp_destruct_common\n",
        ));
        let vis = Visibility::new(&cfg, true, syms.clone());
        let key = |reason, ip_version| DropKey { location: 0x1010, reason, netns: 7, ip_version, _pad: 0 };
        let teardown = DropKey { location: 0x20b9, ..key(2, 4) };
        let mut counts = KernelCounts::default();
        counts.drops =
            vec![(key(3, 4), 40), (key(4, 4), 5), (key(2, 0), 9), (key(2, 6), 2), (key(3, 6), 0), (teardown, 20)];
        counts.stats[stat::EVENTS_LOST as usize] = 3;
        let ctx = SummaryContext { reasons: &reasons, symbols: &syms, visibility: &vis, node: "n1", hook: "tp_btf/kfree_skb" };
        let s = summarize(&counts, &ctx, 1.0, 10);
        assert_eq!(s.drops_total, 42);
        assert_eq!(s.by_reason["NO_SOCKET"], 40);
        assert_eq!(s.by_reason["NOT_SPECIFIED"], 2);
        assert_eq!(s.hidden_drops, 34);
        assert_eq!(s.hidden_by_reason["SOCKET_CLOSE"], 5);
        assert_eq!(s.hidden_by_reason["NOT_SPECIFIED"], 29, "non-IP and teardown-location frees");
        assert_eq!(s.lost_events, 3);
        assert_eq!(s.drops.len(), 5, "zero rows are left out");
        assert_eq!(s.drops[0].count, 40);
    }
}
