//! What a node's agent exports at one moment: its drops by owner, reason and classification, the
//! observed Services' per-backend drops and attempts, conntrack, lost events, what is attached.
//!
//! `netdrop agent` builds one of these from the kernel counters at scrape time; the metrics sink
//! (`sink::metrics`) turns it into Prometheus series. Every count is a running total since the
//! agent started (the kernel maps' values, evicted keys folded in): the sink never adds them up.

use crate::{
    aggregate::attach::{AttachHook, Program},
    enrich::classify::Classification,
};

/// One node's counts at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeMetrics {
    /// The node the agent runs on (`--node-name`).
    pub node: String,
    /// Drops on this node, by what they belong to, reason and classification.
    pub drops: Vec<DropSeries>,
    /// Observed Services: per backend, the drops this node's kernel counted and the attempts
    /// this node's tc counters saw (see `ServiceSeries`).
    pub services: Vec<ServiceSeries>,
    /// The node's own conntrack table (its network namespace); `None` when conntrack is not
    /// loaded or not readable.
    pub conntrack: Option<ConntrackCounts>,
    /// Events that could not reach userspace, by why (their drops are still counted).
    pub lost_events: Vec<LostSeries>,
    /// Workload interfaces with tc counters attached now.
    pub interfaces_attached: u64,
    /// The hook each program runs on (from the attach report).
    pub hooks: Vec<HookInUse>,
    /// What `/readyz` says: programs attached and the Kubernetes caches synced.
    pub ready: bool,
}

/// What a drop belongs to on this node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropOwner {
    /// The node itself: its own network namespace, and namespaces no pod on it is known to hold
    /// (yet).
    Node,
    /// A pod on this node (its network namespace). `workload` is the owning controller as the
    /// resolver names it (`Deployment/web`), or the pod's name for a bare pod.
    Pod {
        namespace: String,
        workload: String,
        pod: String,
    },
}

/// A running total of drops.
#[derive(Clone, Debug, PartialEq)]
pub struct DropSeries {
    pub owner: DropOwner,
    /// The kernel's drop reason name (`NETFILTER_DROP`), or its number on kernels that have no
    /// name for it.
    pub reason: String,
    pub classification: Classification,
    pub count: u64,
}

/// One backend of an observed Service, as counted by this node's agent. A drop is counted by
/// the agent of the node whose kernel dropped it; an attempt by the agent of the node whose tc
/// counters saw it (the client's packet entering the Service, or delivery to the backend, as
/// `aggregate::target_summary::build_part` defines a node's part), so that summing over agents
/// gives the Service's numbers without double counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSeries {
    pub service_namespace: String,
    pub service: String,
    /// `namespace/pod` of the backend, or `""` for drops that matched the Service's frontends
    /// but no backend (no endpoints, or dropped before DNAT).
    pub backend_pod: String,
    /// The backend's node, `""` when unknown or for the no-backend row.
    pub backend_node: String,
    /// Drops that lost an attempt or data (not lossless discards).
    pub drops: u64,
    pub attempts: u64,
}

/// The node's conntrack table: gauges and running totals (`conntrack -S`, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackCounts {
    pub entries: u64,
    pub max: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub invalid: u64,
    pub clash_resolve: u64,
}

/// Why events did not reach userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LostSource {
    /// The drop ring buffer was full.
    Ring,
    /// `--event-rate` held them back.
    RateLimit,
    /// The counter map was full: these drops are not in the per-key counts (should stay 0).
    CounterMapFull,
}

impl LostSource {
    /// The `source` label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::RateLimit => "rate_limit",
            Self::CounterMapFull => "counter_map_full",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostSeries {
    pub source: LostSource,
    pub count: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookInUse {
    pub program: Program,
    pub hook: AttachHook,
}
