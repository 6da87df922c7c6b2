//! The agent's Prometheus metrics: turns [`NodeMetrics`] snapshots into series and encodes them
//! as OpenMetrics 1.0 or the classic text format 0.0.4; [`serve`] is the HTTP side (`/metrics`,
//! `/healthz`, `/readyz`).
//!
//! Owns the cardinality policy (deploy/README.md, "The agent contract"):
//! - Values are the snapshot's running totals. A series fed by several sources (a workload's
//!   pods when pod names are off) exports the sum of its sources' totals; a source that stops
//!   appearing keeps its last value in the series, so the series never goes down when one pod of
//!   a workload goes.
//! - A series (or one of its sources) that stops appearing in snapshots is kept for
//!   `gone_after` — a last scrape shows its final value — and then removed.
//! - At most `max_series_per_family` label sets per family, first come first served; a label
//!   set beyond the cap is counted once in `netdrop_series_overflow_total{node,family}` and its
//!   value goes into the family's one overflow series, whose labels other than `node` are all
//!   [`OVERFLOW`]. It stays in the overflow series while it appears (moving it out would count
//!   its total twice); the overflow series keeps what its gone members had counted.
//! - Counters are monotonic for a series that stays: a total lower than the last one seen for
//!   the same source is taken as that source starting over (a StatefulSet pod recreated under
//!   its name): the old total stays in the series, the new one adds to it (as Prometheus
//!   handles a counter reset), and it is logged once per family.
//!
//! Never IPs, ports or interface names as labels, and no label named `namespace`, `pod`, `job`
//! or `instance` (scrape configs and PodMonitors rewrite those): the opt-in pod label is
//! `pod_name`.

pub mod serve;

use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt,
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder, prometheus_text, text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

pub use self::serve::{DumpRequest, Exporter, Health, RECORDER_PATH, SnapshotRequest};
use crate::aggregate::node_metrics::{DropOwner, NodeMetrics};

/// The value of every label but `node` in a family's overflow series.
pub const OVERFLOW: &str = "_overflow";

/// How the agent's series are labelled and bounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Add the `pod_name` label to `netdrop_drops_total` (one series per pod instead of per
    /// workload).
    pub pod_names: bool,
    /// Label sets per family before new ones go to the overflow series.
    pub max_series_per_family: usize,
    /// How long a series that no longer appears in snapshots is still exported.
    pub gone_after: Duration,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            pod_names: false,
            max_series_per_family: 2000,
            gone_after: Duration::from_mins(1),
        }
    }
}

/// The text formats `/metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// Prometheus text format 0.0.4: Debian 12's promtool and older scrapers read only this.
    Classic,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Exposition {
    pub const OPENMETRICS_CONTENT_TYPE: &'static str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Classic => prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => Self::OPENMETRICS_CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of the classic format
    /// (`text/plain`, or `*/*`), else the classic format. Prometheus sends e.g.
    /// `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
    pub fn from_accept(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut classic) = (0.0_f64, 0.0_f64);
        for item in accept.unwrap_or_default().split(',') {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1.0;
            for p in parts {
                if let Some((k, v)) = p.split_once('=')
                    && k.trim().eq_ignore_ascii_case("q")
                {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "*/*" | "text/*" => classic = classic.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= classic {
            Self::OpenMetrics
        } else {
            Self::Classic
        }
    }
}

/// `node` alone: the node-wide families.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

/// `netdrop_drops_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct DropLabels {
    node: String,
    pod_namespace: String,
    workload: String,
    #[prometheus(flatten)]
    pod_name: PodName,
    reason: String,
    classification: String,
}

/// The opt-in `pod_name` label: absent (not empty) when pod names are off.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PodName(Option<String>);

impl EncodeLabelSet for PodName {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        match &self.0 {
            Some(pod) => [("pod_name", pod.as_str())].encode(encoder),
            None => Ok(()),
        }
    }
}

/// `netdrop_service_drops_total` and `netdrop_service_attempts_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ServiceLabels {
    service_namespace: String,
    service: String,
    backend_pod: String,
    backend_node: String,
    node: String,
}

/// `netdrop_lost_events_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct LostLabels {
    node: String,
    source: String,
}

/// `netdrop_hook_info`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct HookLabels {
    node: String,
    program: String,
    hook: String,
}

/// `netdrop_build_info`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// `netdrop_series_overflow_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct OverflowLabels {
    node: String,
    family: String,
}

/// A label set's overflow series: `node` kept, every other label [`OVERFLOW`].
trait Overflow: Sized {
    fn overflow(node: &str) -> Self;
}

impl Overflow for NodeLabels {
    fn overflow(node: &str) -> Self {
        Self { node: node.into() }
    }
}

impl Overflow for DropLabels {
    fn overflow(node: &str) -> Self {
        Self {
            node: node.into(),
            pod_namespace: OVERFLOW.into(),
            workload: OVERFLOW.into(),
            pod_name: PodName(None),
            reason: OVERFLOW.into(),
            classification: OVERFLOW.into(),
        }
    }
}

impl Overflow for ServiceLabels {
    fn overflow(node: &str) -> Self {
        Self {
            service_namespace: OVERFLOW.into(),
            service: OVERFLOW.into(),
            backend_pod: OVERFLOW.into(),
            backend_node: OVERFLOW.into(),
            node: node.into(),
        }
    }
}

impl Overflow for LostLabels {
    fn overflow(node: &str) -> Self {
        Self {
            node: node.into(),
            source: OVERFLOW.into(),
        }
    }
}

/// One source's running total (a pod's, for a workload series) and when it was last in a
/// snapshot.
#[derive(Clone, Copy, Debug)]
struct Source {
    total: u64,
    seen: Instant,
}

/// An exported series: the totals of its sources, plus what sources gone for `gone_after`
/// had counted.
#[derive(Clone, Debug, Default)]
struct Series {
    retired: u64,
    sources: BTreeMap<String, Source>,
}

impl Series {
    fn value(&self) -> u64 {
        self.sources
            .values()
            .fold(self.retired, |sum, s| sum.saturating_add(s.total))
    }
}

/// One counter family under the cardinality policy.
#[derive(Debug)]
struct Family<L> {
    /// The exported name (`netdrop_drops_total`): the `family` label of the overflow counter.
    name: &'static str,
    admitted: BTreeMap<L, Series>,
    /// Label sets beyond the cap, exported as one series.
    overflowed: BTreeMap<L, Series>,
    /// What overflowed label sets counted before they were removed.
    overflow_retired: u64,
    /// Label sets ever sent to the overflow series.
    overflowed_sets: u64,
    warned_decrease: bool,
}

impl<L: Ord + Clone + fmt::Debug> Family<L> {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            admitted: BTreeMap::new(),
            overflowed: BTreeMap::new(),
            overflow_retired: 0,
            overflowed_sets: 0,
            warned_decrease: false,
        }
    }

    /// `source`'s running total for the series `labels`, seen `now`.
    fn observe(&mut self, labels: L, source: &str, total: u64, now: Instant, cap: usize) {
        let series = if self.admitted.contains_key(&labels)
            || (self.admitted.len() < cap && !self.overflowed.contains_key(&labels))
        {
            self.admitted.entry(labels).or_default()
        } else {
            match self.overflowed.entry(labels) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    self.overflowed_sets += 1;
                    e.insert(Series::default())
                }
            }
        };
        match series.sources.entry(source.to_owned()) {
            Entry::Vacant(e) => {
                e.insert(Source { total, seen: now });
            }
            Entry::Occupied(mut e) => {
                let s = e.get_mut();
                s.seen = now;
                if total < s.total {
                    // A running total went down: its source started over (a StatefulSet pod
                    // recreated under the same name, a new network namespace). Its old total
                    // stays in the series, which keeps counting from there: monotonic, and the
                    // new source's drops are not hidden behind the old ones.
                    series.retired = series.retired.saturating_add(s.total);
                    if !self.warned_decrease {
                        self.warned_decrease = true;
                        tracing::warn!(
                            "metrics: {} of {source:?} went down from {} to {total}: counted as a new source (logged once per family)",
                            self.name,
                            s.total
                        );
                    }
                }
                s.total = total;
            }
        }
    }

    /// Removes sources not seen for `gone_after`, and series left without sources.
    fn expire(&mut self, now: Instant, gone_after: Duration) {
        retire(&mut self.admitted, now, gone_after);
        self.overflow_retired = self
            .overflow_retired
            .saturating_add(retire(&mut self.overflowed, now, gone_after));
    }

    /// The series to export, the overflow series last (if any label set ever overflowed).
    fn export(&self, node: &str) -> Vec<(L, u64)>
    where
        L: Overflow,
    {
        let mut out: Vec<(L, u64)> = self.admitted.iter().map(|(l, s)| (l.clone(), s.value())).collect();
        if self.overflowed_sets > 0 {
            let value = self
                .overflowed
                .values()
                .fold(self.overflow_retired, |sum, s| sum.saturating_add(s.value()));
            out.push((L::overflow(node), value));
        }
        out
    }
}

/// Folds sources not seen for `gone_after` into their series and removes series left without
/// sources; returns what the removed series had counted.
fn retire<L: Ord>(map: &mut BTreeMap<L, Series>, now: Instant, gone_after: Duration) -> u64 {
    let mut removed = 0_u64;
    map.retain(|_, series| {
        let Series { retired, sources } = series;
        sources.retain(|_, s| {
            let gone = now.saturating_duration_since(s.seen) >= gone_after;
            if gone {
                *retired = retired.saturating_add(s.total);
            }
            !gone
        });
        if sources.is_empty() {
            removed = removed.saturating_add(*retired);
        }
        !sources.is_empty()
    });
    removed
}

/// The conntrack gauges of the last snapshot that had them.
#[derive(Clone, Copy, Debug)]
struct ConntrackGauges {
    entries: u64,
    max: u64,
}

/// The agent's series, updated from each snapshot.
#[derive(Debug)]
pub struct MetricsState {
    opts: MetricsOptions,
    version: String,
    /// The node of the last snapshot; `None` before the first (node-labelled families are not
    /// exported until then).
    node: Option<String>,
    drops: Family<DropLabels>,
    service_drops: Family<ServiceLabels>,
    service_attempts: Family<ServiceLabels>,
    ct_insert_failed: Family<NodeLabels>,
    ct_drop: Family<NodeLabels>,
    ct_early_drop: Family<NodeLabels>,
    ct_invalid: Family<NodeLabels>,
    ct_clash_resolve: Family<NodeLabels>,
    lost_events: Family<LostLabels>,
    conntrack: Option<ConntrackGauges>,
    interfaces_attached: u64,
    hooks: Vec<HookLabels>,
    ready: bool,
    stale_scrapes: u64,
}

impl MetricsState {
    pub fn new(opts: MetricsOptions, version: &str) -> Self {
        Self {
            opts,
            version: version.to_owned(),
            node: None,
            drops: Family::new("netdrop_drops_total"),
            service_drops: Family::new("netdrop_service_drops_total"),
            service_attempts: Family::new("netdrop_service_attempts_total"),
            ct_insert_failed: Family::new("netdrop_conntrack_insert_failed_total"),
            ct_drop: Family::new("netdrop_conntrack_drop_total"),
            ct_early_drop: Family::new("netdrop_conntrack_early_drop_total"),
            ct_invalid: Family::new("netdrop_conntrack_invalid_total"),
            ct_clash_resolve: Family::new("netdrop_conntrack_clash_resolve_total"),
            lost_events: Family::new("netdrop_lost_events_total"),
            conntrack: None,
            interfaces_attached: 0,
            hooks: Vec::new(),
            ready: false,
            stale_scrapes: 0,
        }
    }

    /// Applies a snapshot taken at `now`.
    pub fn update(&mut self, m: &NodeMetrics, now: Instant) {
        let cap = self.opts.max_series_per_family;
        let node = m.node.as_str();
        for d in &m.drops {
            let (pod_namespace, workload, pod) = match &d.owner {
                DropOwner::Node => ("", "", ""),
                DropOwner::Pod {
                    namespace,
                    workload,
                    pod,
                } => (namespace.as_str(), workload.as_str(), pod.as_str()),
            };
            let labels = DropLabels {
                node: node.into(),
                pod_namespace: pod_namespace.into(),
                workload: workload.into(),
                pod_name: PodName(self.opts.pod_names.then(|| pod.to_owned())),
                reason: d.reason.clone(),
                // The JSON sink's word for it (`Classification`'s Display, which its Serialize
                // uses).
                classification: d.classification.to_string(),
            };
            self.drops.observe(labels, pod, d.count, now, cap);
        }
        for s in &m.services {
            let labels = ServiceLabels {
                service_namespace: s.service_namespace.clone(),
                service: s.service.clone(),
                backend_pod: s.backend_pod.clone(),
                backend_node: s.backend_node.clone(),
                node: node.into(),
            };
            self.service_drops.observe(labels.clone(), "", s.drops, now, cap);
            self.service_attempts.observe(labels, "", s.attempts, now, cap);
        }
        if let Some(ct) = m.conntrack {
            let labels = || NodeLabels { node: node.into() };
            self.ct_insert_failed.observe(labels(), "", ct.insert_failed, now, cap);
            self.ct_drop.observe(labels(), "", ct.drop, now, cap);
            self.ct_early_drop.observe(labels(), "", ct.early_drop, now, cap);
            self.ct_invalid.observe(labels(), "", ct.invalid, now, cap);
            self.ct_clash_resolve.observe(labels(), "", ct.clash_resolve, now, cap);
        }
        self.conntrack = m.conntrack.map(|ct| ConntrackGauges {
            entries: ct.entries,
            max: ct.max,
        });
        for l in &m.lost_events {
            let labels = LostLabels {
                node: node.into(),
                source: l.source.name().into(),
            };
            self.lost_events.observe(labels, "", l.count, now, cap);
        }
        self.interfaces_attached = m.interfaces_attached;
        self.hooks = m
            .hooks
            .iter()
            .map(|h| HookLabels {
                node: node.into(),
                program: h.program.name().into(),
                hook: h.hook.name().into(),
            })
            .collect();
        self.ready = m.ready;
        self.node = Some(m.node.clone());
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        let gone_after = self.opts.gone_after;
        self.drops.expire(now, gone_after);
        self.service_drops.expire(now, gone_after);
        self.service_attempts.expire(now, gone_after);
        self.ct_insert_failed.expire(now, gone_after);
        self.ct_drop.expire(now, gone_after);
        self.ct_early_drop.expire(now, gone_after);
        self.ct_invalid.expire(now, gone_after);
        self.ct_clash_resolve.expire(now, gone_after);
        self.lost_events.expire(now, gone_after);
    }

    /// A scrape got no fresh snapshot in time and serves the last one
    /// (`netdrop_stale_scrapes_total`).
    pub fn stale_scrape(&mut self) {
        self.stale_scrapes += 1;
    }

    /// The exposition of the current series.
    pub fn encode(&self, f: Exposition) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.scrape()));
        let mut out = String::new();
        // Writing to a String does not fail, and our collector returns only the writer's
        // errors.
        let written = match f {
            Exposition::Classic => prometheus_text::encode(&mut out, &registry),
            Exposition::OpenMetrics => text::encode(&mut out, &registry),
        };
        debug_assert!(written.is_ok(), "encoding into a String failed");
        out
    }

    /// The families to encode, in exposition order, values fixed at this moment.
    fn scrape(&self) -> Scrape {
        let mut families: Vec<Box<dyn EncodeFamily>> = vec![Box::new(ConstFamily {
            name: "netdrop_build",
            help: "The running netdrop version (value 1).",
            kind: MetricType::Info,
            series: vec![(
                VersionLabels {
                    version: self.version.clone(),
                },
                1,
            )],
        })];
        let Some(node) = self.node.as_deref() else {
            return Scrape { families };
        };
        families.push(counter(
            "netdrop_drops",
            "Drops on this node by the pod they belong to (empty pod_namespace and workload: the node itself), the kernel's reason and netdrop's classification.",
            self.drops.export(node),
        ));
        families.push(counter(
            "netdrop_service_drops",
            "Drops of packets sent to an observed Service's backend, counted by the agent of the node where the drop happened.",
            self.service_drops.export(node),
        ));
        families.push(counter(
            "netdrop_service_attempts",
            "Packets (connection attempts) to an observed Service's backend, counted by the agent of the node where they were seen.",
            self.service_attempts.export(node),
        ));
        self.node_families(node, &mut families);
        Scrape { families }
    }

    /// The node-wide families: conntrack, lost events, what is attached, readiness, the
    /// cardinality policy's and the exporter's own counts.
    fn node_families(&self, node: &str, families: &mut Vec<Box<dyn EncodeFamily>>) {
        let node_labels = || NodeLabels { node: node.into() };
        let ct = self.conntrack;
        families.push(gauge(
            "netdrop_conntrack_entries",
            "Entries in the node's conntrack table (nf_conntrack_count).",
            ct.map(|c| (node_labels(), c.entries)).into_iter().collect(),
        ));
        families.push(gauge(
            "netdrop_conntrack_max",
            "Size of the node's conntrack table (nf_conntrack_max).",
            ct.map(|c| (node_labels(), c.max)).into_iter().collect(),
        ));
        for (family, name, help) in [
            (
                &self.ct_insert_failed,
                "netdrop_conntrack_insert_failed",
                "Conntrack insert_failed (conntrack -S).",
            ),
            (
                &self.ct_drop,
                "netdrop_conntrack_drop",
                "Conntrack drop: new flows dropped because the table was full (conntrack -S).",
            ),
            (
                &self.ct_early_drop,
                "netdrop_conntrack_early_drop",
                "Conntrack early_drop: entries evicted to make room (conntrack -S).",
            ),
            (
                &self.ct_invalid,
                "netdrop_conntrack_invalid",
                "Conntrack invalid: packets conntrack could not track (conntrack -S).",
            ),
            (
                &self.ct_clash_resolve,
                "netdrop_conntrack_clash_resolve",
                "Conntrack clash_resolve: insert races resolved without a drop (conntrack -S).",
            ),
        ] {
            families.push(counter(name, help, family.export(node)));
        }
        families.push(counter(
            "netdrop_lost_events",
            "Drop events that could not reach userspace, by why (the drops are still counted).",
            self.lost_events.export(node),
        ));
        families.push(gauge(
            "netdrop_interfaces_attached",
            "Workload interfaces with tc counters attached.",
            vec![(node_labels(), self.interfaces_attached)],
        ));
        families.push(Box::new(ConstFamily {
            name: "netdrop_hook",
            help: "The hook each kernel program runs on (value 1).",
            kind: MetricType::Info,
            series: self.hooks.iter().map(|h| (h.clone(), 1)).collect(),
        }));
        families.push(gauge(
            "netdrop_ready",
            "1 when the programs are attached and the Kubernetes caches synced (what /readyz says).",
            vec![(node_labels(), u64::from(self.ready))],
        ));
        let overflow = |f: &str, sets: u64| {
            (
                OverflowLabels {
                    node: node.into(),
                    family: f.into(),
                },
                sets,
            )
        };
        families.push(counter(
            "netdrop_series_overflow",
            // Always there (0 until a family overflows), so that `increase()` sees the first one.
            "Label sets beyond the per-family cap, whose values went into the family's overflow series (labels _overflow).",
            [
                overflow(self.drops.name, self.drops.overflowed_sets),
                overflow(self.service_drops.name, self.service_drops.overflowed_sets),
                overflow(self.service_attempts.name, self.service_attempts.overflowed_sets),
                overflow(self.lost_events.name, self.lost_events.overflowed_sets),
            ]
            .into(),
        ));
        families.push(counter(
            "netdrop_stale_scrapes",
            "Scrapes served from the previous snapshot because the agent did not answer in time.",
            vec![(node_labels(), self.stale_scrapes)],
        ));
    }
}

fn counter<L: EncodeLabelSet + fmt::Debug + Send + Sync + 'static>(
    name: &'static str,
    help: &'static str,
    series: Vec<(L, u64)>,
) -> Box<dyn EncodeFamily> {
    Box::new(ConstFamily {
        name,
        help,
        kind: MetricType::Counter,
        series,
    })
}

fn gauge<L: EncodeLabelSet + fmt::Debug + Send + Sync + 'static>(
    name: &'static str,
    help: &'static str,
    series: Vec<(L, u64)>,
) -> Box<dyn EncodeFamily> {
    Box::new(ConstFamily {
        name,
        help,
        kind: MetricType::Gauge,
        series,
    })
}

/// One family with its label type erased, so families of different label sets share a list.
trait EncodeFamily: fmt::Debug + Send + Sync {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result;
}

/// A family's series as constants: the values are the snapshot's totals, nothing is counted
/// here. `name` is without the `_total` (counters) or `_info` (info) suffix the encoders add.
#[derive(Debug)]
struct ConstFamily<L> {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: Vec<(L, u64)>,
}

impl<L: EncodeLabelSet + fmt::Debug + Send + Sync> EncodeFamily for ConstFamily<L> {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        if self.series.is_empty() {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, value) in &self.series {
            match self.kind {
                MetricType::Info => metric.encode_info(labels)?,
                MetricType::Counter => ConstCounter::new(*value).encode(metric.encode_family(labels)?)?,
                _ => ConstGauge::new(*value).encode(metric.encode_family(labels)?)?,
            }
        }
        Ok(())
    }
}

/// What one scrape encodes: the crate's [`Collector`] over constant families.
#[derive(Debug)]
struct Scrape {
    families: Vec<Box<dyn EncodeFamily>>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for f in &self.families {
            f.encode(&mut encoder)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
