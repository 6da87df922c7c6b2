//! Aggregation: the run's summary, built from the kernel's exact counters (never from the
//! events that happened to reach userspace).

pub mod attach;
pub mod diagnosis;
mod merge;
pub mod node_metrics;
pub mod target_set;
pub mod target_summary;

use std::collections::BTreeMap;

use netdrop_common::{DropKey, stat};
use serde::{Deserialize, Serialize};

use self::attach::{AttachHook, AttachReport, Program};
use crate::{
    enrich::classify::{self, Certainty},
    enrich::visibility::Visibility,
    kernel::reasons::ReasonTable,
    kernel::symbols::KernelSymbols,
    probe::KernelCounts,
    source::conntrack::CtStats,
};

/// A name from a closed set (`"summary"`, `"ipv4"`, `"unconfirmed"`): written as is and read
/// back through `wire`. An alias, so that serde reads it as a name of the set instead of
/// borrowing it from the input (which would tie a parsed summary to the input's lifetime).
pub type FixedName = &'static str;

/// One (reason, location, netns) row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReasonRow {
    pub reason: String,
    pub reason_code: u32,
    pub location: String,
    /// `null` when the kernel left no way to tell.
    #[serde(serialize_with = "classify::netns_or_null", deserialize_with = "wire::netns_or_null")]
    pub netns: u32,
    /// `ipv4`, `ipv6`, or `none` for skbs without an IP header.
    #[serde(deserialize_with = "wire::ip_version")]
    pub ip: FixedName,
    pub count: u64,
    /// Benign or not selected: counted, not shown as events.
    pub hidden: bool,
    /// As for events: `no_socket`, `netfilter_rule`, `conntrack_insert_failed`, ...
    pub classification: String,
    pub certainty: Certainty,
    /// The packets' conntrack state (`none`, `unconfirmed`, ...).
    #[serde(deserialize_with = "wire::ct_state")]
    pub conntrack: FixedName,
    /// What the drops cost (`attempt`, `data`, `lossless`, `reset`, `unknown`), decided per
    /// packet in the kernel.
    pub effect: classify::Effect,
    /// The watched address the packets matched (`--svc`: a backend, or the frontend), else 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tag: u32,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// One namespace's conntrack statistics over the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConntrackReport {
    pub netns: u32,
    /// Entries at the end, and the limit.
    pub count: u64,
    pub max: u64,
    /// Rises over the run.
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub invalid: u64,
    pub clash_resolve: u64,
    /// The same, per second of the run.
    pub insert_failed_per_s: f64,
    pub drop_per_s: f64,
}

/// The end-of-run (or periodic) summary. JSON: `{"type":"summary",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    #[serde(rename = "type", deserialize_with = "wire::summary_kind")]
    pub kind: FixedName,
    pub time: String,
    pub node: String,
    pub duration_s: f64,
    /// The hook that carried the drops, as `attach` says (`tp_btf/kfree_skb`,
    /// `tracepoint/skb/kfree_skb`), kept for the readers of this field.
    #[serde(serialize_with = "wire::drop_hook_name", deserialize_with = "wire::drop_hook")]
    pub hook: AttachHook,
    /// Drops matching the filters, hidden ones excluded.
    pub drops_total: u64,
    /// Shown drops per reason name.
    pub by_reason: BTreeMap<String, u64>,
    /// Shown drops per classification.
    pub by_classification: BTreeMap<String, u64>,
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
    /// How conntrack verdicts were observed: `fexit`, `kprobe`, `inferred`, or `off` (as
    /// `attach` says).
    pub conntrack_hook: AttachHook,
    /// How segments answered and freed by TIME_WAIT sockets are told: `rx_sk`, `fexit`,
    /// `kprobe`, or `flags` (FIN/RST only; a bare ACK stays visible) (as `attach` says).
    pub timewait_hook: AttachHook,
    /// Conntrack statistics of the namespaces drops were seen in.
    pub conntrack: Vec<ConntrackReport>,
    /// What to check next, one line per finding.
    pub hints: Vec<String>,
    /// What was attached, the fallbacks taken and the degraded modes.
    #[serde(default)]
    pub attach: AttachReport,
}

/// Classifies a counter row, given the function its location lies in.
pub type ClassifyRow<'a> = dyn Fn(&DropKey, Option<&str>) -> (classify::Classification, Certainty) + 'a;

/// Context the summary needs to name things.
pub struct SummaryContext<'a> {
    pub reasons: &'a ReasonTable,
    pub symbols: &'a KernelSymbols,
    pub visibility: &'a Visibility,
    pub node: &'a str,
    pub attach: &'a AttachReport,
    /// Classification of a counter row (its key carries the conntrack state and marks), by the
    /// classifier that classifies events ([`crate::enrich::classify::Classifier::row`]), given
    /// the row's function.
    pub classify: &'a ClassifyRow<'a>,
    pub conntrack: Vec<(u32, CtStats)>,
}

#[expect(
    clippy::too_many_lines,
    reason = "one pass over the counter rows; splitting it would pass the same partial sums around"
)]
pub fn summarize(counts: &KernelCounts, ctx: &SummaryContext<'_>, duration_s: f64, events_shown: u64) -> Summary {
    let mut rows: Vec<ReasonRow> = counts
        .drops
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| {
            let location = ctx.symbols.locate(k.location);
            let class = (ctx.classify)(k, location.function());
            (k, n, location, class)
        })
        .map(|(k, n, location, (classification, certainty))| ReasonRow {
            reason: ctx.reasons.display(k.reason).to_string(),
            reason_code: k.reason,
            hidden: ctx
                .visibility
                .is_hidden(k.reason, k.ip_version, location.function(), k.exact_class),
            location: location.to_string(),
            netns: k.netns,
            ip: match k.ip_version {
                4 => "ipv4",
                6 => "ipv6",
                _ => "none",
            },
            count: *n,
            classification: classification.to_string(),
            certainty,
            conntrack: classify::ct_state_name(k.ct_state),
            effect: classify::Effect::from_raw(k.effect),
            tag: k.tag,
        })
        .collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    let mut s = Summary {
        kind: "summary",
        time: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
        node: ctx.node.to_string(),
        duration_s,
        hook: ctx.attach.hook(Program::KfreeSkb),
        drops_total: 0,
        by_reason: BTreeMap::new(),
        by_classification: BTreeMap::new(),
        hidden_drops: 0,
        hidden_by_reason: BTreeMap::new(),
        drops: Vec::new(),
        events_shown,
        lost_events: counts.stats[stat::EVENTS_LOST as usize],
        rate_limited_events: counts.stats[stat::EVENTS_RATE_LIMITED as usize],
        uncounted_drops: counts.stats[stat::COUNTER_MAP_FULL as usize],
        conntrack_hook: ctx.attach.hook(Program::Conntrack),
        timewait_hook: ctx.attach.hook(Program::Timewait),
        conntrack: Vec::new(),
        hints: Vec::new(),
        attach: ctx.attach.clone(),
    };
    for r in &rows {
        if r.hidden {
            s.hidden_drops += r.count;
            *s.hidden_by_reason.entry(r.reason.clone()).or_default() += r.count;
        } else {
            s.drops_total += r.count;
            *s.by_reason.entry(r.reason.clone()).or_default() += r.count;
            *s.by_classification.entry(r.classification.clone()).or_default() += r.count;
        }
    }
    s.drops = rows;
    let secs = duration_s.max(0.001);
    for (netns, d) in &ctx.conntrack {
        s.conntrack.push(ConntrackReport {
            netns: *netns,
            count: d.count,
            max: d.max,
            insert_failed: d.insert_failed,
            drop: d.drop,
            early_drop: d.early_drop,
            invalid: d.invalid,
            clash_resolve: d.clash_resolve,
            insert_failed_per_s: d.insert_failed as f64 / secs,
            drop_per_s: d.drop as f64 / secs,
        });
        if d.near_full() {
            s.hints.push(format!(
                "netns {netns}: conntrack table {}/{} ({}%): {}",
                d.count,
                d.max,
                d.count * 100 / d.max.max(1),
                classify::hint(classify::TABLE_FULL).unwrap_or_default()
            ));
        }
        if d.clash_resolve > 0 {
            s.hints.push(format!(
                "netns {netns}: {} conntrack clashes resolved: {}",
                d.clash_resolve,
                classify::CLASH_RESOLVED
            ));
        }
        if d.insert_failed > 0 {
            s.hints.push(format!(
                "netns {netns}: {} conntrack insert failures ({:.0}/s): {}",
                d.insert_failed,
                d.insert_failed as f64 / secs,
                classify::hint(classify::INSERT_FAILED).unwrap_or_default()
            ));
        }
    }
    let mut by_class: Vec<(&String, &u64)> = s.by_classification.iter().collect();
    by_class.sort_by(|a, b| b.1.cmp(a.1));
    for (c, n) in by_class.into_iter().take(3) {
        if let Some(h) = classify::hint(c)
            && !s.hints.iter().any(|x| x.ends_with(h))
        {
            s.hints.push(format!("{n} {c}: {h}"));
        }
    }
    s
}

/// Fields written in a fixed form, and read back (a node's part of a cluster-wide trace).
mod wire {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use super::attach::AttachHook;

    /// A fixed name of a closed set, back to its `'static` self.
    fn one_of<'de, D: Deserializer<'de>>(d: D, names: &[&'static str]) -> Result<&'static str, D::Error> {
        let s = String::deserialize(d)?;
        names
            .iter()
            .find(|n| **n == s)
            .copied()
            .ok_or_else(|| D::Error::custom(format!("unexpected {s:?}, expected one of {names:?}")))
    }

    pub(super) fn summary_kind<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        one_of(d, &["summary"])
    }

    pub(super) fn ip_version<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        one_of(d, &["ipv4", "ipv6", "none"])
    }

    pub(super) fn ct_state<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        one_of(d, &["none", "unconfirmed", "confirmed", "untracked"])
    }

    pub(super) fn netns_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        Ok(Option::<u32>::deserialize(d)?.unwrap_or(0))
    }

    /// The drop hook as the summary has always named it.
    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "the signature serde's serialize_with calls"
    )]
    pub(super) fn drop_hook_name<S: Serializer>(h: &AttachHook, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.drop_hook_name())
    }

    pub(super) fn drop_hook<'de, D: Deserializer<'de>>(d: D) -> Result<AttachHook, D::Error> {
        match one_of(d, &["tp_btf/kfree_skb", "tracepoint/skb/kfree_skb", "off"])? {
            "tp_btf/kfree_skb" => Ok(AttachHook::TpBtf),
            "tracepoint/skb/kfree_skb" => Ok(AttachHook::Tracepoint),
            _ => Ok(AttachHook::Off),
        }
    }
}

#[cfg(test)]
mod tests {
    use netdrop_common::Config;

    use super::*;

    #[test]
    fn summary_splits_hidden_and_shown_exactly() {
        let reasons = ReasonTable::from_print_fmt(
            r#"__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 4, "SOCKET_CLOSE" })"#,
        )
        .expect("table");
        let mut cfg = Config::DEFAULT;
        crate::probe::filter::FilterSpec::default()
            .apply(&mut cfg, &reasons)
            .expect("apply");
        let syms = std::sync::Arc::new(KernelSymbols::parse(
            "0000000000001000 t udp_rcv\n0000000000002000 t udp_destruct_common\n",
        ));
        let vis = Visibility::new(&cfg, true);
        let key = |reason, ip_version| DropKey {
            location: 0x1010,
            reason,
            netns: 7,
            ip_version,
            ct_state: 0,
            exact_class: 0,
            effect: 0,
            tag: 0,
            netns_cookie: 0,
        };
        let teardown = DropKey {
            location: 0x20b9,
            ..key(2, 4)
        };
        let counts = KernelCounts {
            drops: vec![
                (key(3, 4), 40),
                (key(4, 4), 5),
                (key(2, 0), 9),
                (key(2, 6), 2),
                (key(3, 6), 0),
                (teardown, 20),
            ],
            stats: {
                let mut stats = KernelCounts::default().stats;
                stats[stat::EVENTS_LOST as usize] = 3;
                stats
            },
        };
        let classify = |k: &DropKey, _: Option<&str>| {
            (
                classify::Classification::Reason(crate::kernel::reasons::Reason::Unnamed(k.reason)),
                Certainty::Exact,
            )
        };
        let ctx = SummaryContext {
            reasons: &reasons,
            symbols: &syms,
            visibility: &vis,
            node: "n1",
            attach: &AttachReport::default(),
            classify: &classify,
            conntrack: vec![],
        };
        let s = summarize(&counts, &ctx, 1.0, 10);
        assert_eq!(s.drops_total, 42);
        assert_eq!(s.by_reason["NO_SOCKET"], 40);
        assert_eq!(s.by_reason["NOT_SPECIFIED"], 2);
        assert_eq!(s.hidden_drops, 34);
        assert_eq!(s.hidden_by_reason["SOCKET_CLOSE"], 5);
        assert_eq!(
            s.hidden_by_reason["NOT_SPECIFIED"], 29,
            "non-IP and teardown-location frees"
        );
        assert_eq!(s.lost_events, 3);
        assert_eq!(s.drops.len(), 5, "zero rows are left out");
        assert_eq!(s.drops[0].count, 40);
    }

    #[test]
    fn resolved_clashes_are_said_to_have_dropped_nothing() {
        let reasons =
            ReasonTable::from_print_fmt(r#"__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" })"#).expect("table");
        let cfg = Config::DEFAULT;
        let syms = std::sync::Arc::new(KernelSymbols::parse("0000000000001000 t udp_rcv\n"));
        let vis = Visibility::new(&cfg, true);
        let classify = |k: &DropKey, _: Option<&str>| {
            (
                classify::Classification::Reason(crate::kernel::reasons::Reason::Unnamed(k.reason)),
                Certainty::Exact,
            )
        };
        let ct = CtStats {
            count: 10,
            max: 1000,
            clash_resolve: 3,
            ..CtStats::default()
        };
        let ctx = SummaryContext {
            reasons: &reasons,
            symbols: &syms,
            visibility: &vis,
            node: "n1",
            attach: &AttachReport::default(),
            classify: &classify,
            conntrack: vec![(9, ct)],
        };
        let s = summarize(&KernelCounts::default(), &ctx, 1.0, 0);
        assert_eq!(s.drops_total, 0);
        assert_eq!(s.conntrack[0].clash_resolve, 3);
        assert_eq!(s.hints.len(), 1, "{:?}", s.hints);
        assert!(
            s.hints[0].starts_with("netns 9: 3 conntrack clashes resolved"),
            "{:?}",
            s.hints
        );
        assert!(s.hints[0].contains("nothing was lost"), "{:?}", s.hints);
    }
}
