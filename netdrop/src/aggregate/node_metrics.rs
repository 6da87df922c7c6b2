//! What a node's agent exports at one moment: its drops by owner, reason and classification, the
//! observed Services' per-backend drops and attempts, conntrack, lost events, what is attached.
//!
//! `netdrop agent` builds one of these from the kernel counters at scrape time; the metrics sink
//! (`sink::metrics`) turns it into Prometheus series. Every count is a running total since the
//! agent started (the kernel maps' values, evicted keys folded in): the sink never adds them up.

use std::collections::{BTreeMap, HashMap, HashSet};

use netdrop_common::stat;

use crate::{
    aggregate::{
        attach::{AttachHook, AttachReport, Program},
        target_summary::TargetSummary,
    },
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

/// `backend_pod` of endpoints that are no pod (an address the API names no pod for): one series
/// for all of them, never the address.
pub const NO_POD: &str = "(no pod)";

/// One drop counter row as the agent reads it: the namespace it happened in, its reason name,
/// its classification (the summaries' classifier) and its running total. Hidden (benign) rows
/// are left out by the caller, as summaries leave them out of their totals.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeDrop {
    pub netns: u32,
    pub reason: String,
    pub classification: Classification,
    pub count: u64,
}

/// A pod of this node, as the owner of its network namespace's drops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodOwner {
    pub namespace: String,
    /// `Kind/name` of its controller, or `None` for a bare pod.
    pub workload: Option<String>,
    pub pod: String,
}

/// Whose a network namespace is, from this node's point of view.
pub struct Scope<'a> {
    /// Network namespace → node, for the namespaces known to be a node's or its pods'
    /// (`cmd::targets::TargetMode::node_of`).
    pub node_of: &'a HashMap<u32, String>,
    /// Network namespace → the pod that holds it.
    pub pods: &'a HashMap<u32, PodOwner>,
    /// Network namespaces of this node's pods that are gone: their drops leave the drop series
    /// with the pod (not moved to the node's), and stay in the Services' counts (running totals
    /// that must not go down).
    pub gone: &'a HashSet<u32>,
    /// This node's name.
    pub node: &'a str,
    /// The nodes' namespaces were named (`--node-netns`): only this node's and its pods'
    /// namespaces are this node's. Otherwise everything on this kernel is.
    pub nodes_given: bool,
}

impl Scope<'_> {
    /// The owner of drops in `netns`; `None` when they are another node's or a gone pod's.
    pub fn owner(&self, netns: u32) -> Option<DropOwner> {
        if self.gone.contains(&netns) && !self.pods.contains_key(&netns) {
            return None;
        }
        let node = self.node_of.get(&netns);
        if self.nodes_given && node.map(String::as_str) != Some(self.node) {
            return None;
        }
        if node.is_some_and(|n| n != self.node) {
            return None;
        }
        Some(match self.pods.get(&netns) {
            Some(p) => DropOwner::Pod {
                namespace: p.namespace.clone(),
                workload: p.workload.clone().unwrap_or_else(|| p.pod.clone()),
                pod: p.pod.clone(),
            },
            None => DropOwner::Node,
        })
    }

    /// Whether drops in `netns` are this node's, gone pods' included (the rows a Service's
    /// part is built from).
    pub fn holds(&self, netns: u32) -> bool {
        self.gone.contains(&netns) || self.owner(netns).is_some()
    }
}

/// What [`build`] makes a node's snapshot of.
pub struct NodeInputs<'a> {
    pub scope: Scope<'a>,
    /// Every counted (non-hidden) drop row, running totals.
    pub drops: &'a [NodeDrop],
    /// Each observed Service (`namespace`, `name`) with this node's part of its table
    /// (`target_summary::build_part`).
    pub parts: &'a [((String, String), TargetSummary)],
    pub conntrack: Option<ConntrackCounts>,
    /// The kernel's statistics (`netdrop_common::stat`), running totals.
    pub stats: &'a [u64],
    pub interfaces_attached: u64,
    pub attach: &'a AttachReport,
    pub ready: bool,
}

/// The node's snapshot: drops summed by owner, reason and classification (other nodes' left
/// out), a series per observed Service backend and its no-backend row, the rest as given.
pub fn build(i: &NodeInputs<'_>) -> NodeMetrics {
    let mut drops: BTreeMap<(DropOwner, String, String), (Classification, u64)> = BTreeMap::new();
    for d in i.drops.iter().filter(|d| d.count > 0) {
        let Some(owner) = i.scope.owner(d.netns) else {
            continue;
        };
        let e = drops
            .entry((owner, d.reason.clone(), d.classification.to_string()))
            .or_insert_with(|| (d.classification.clone(), 0));
        e.1 += d.count;
    }
    let drops = drops
        .into_iter()
        .map(|((owner, reason, _), (classification, count))| DropSeries {
            owner,
            reason,
            classification,
            count,
        })
        .collect();
    let mut services: BTreeMap<(String, String, String, String), (u64, u64)> = BTreeMap::new();
    for ((ns, name), part) in i.parts {
        for b in &part.backends {
            let pod = if b.pod.contains('/') {
                b.pod.clone()
            } else {
                NO_POD.to_string()
            };
            let e = services
                .entry((ns.clone(), name.clone(), pod, b.node.clone().unwrap_or_default()))
                .or_default();
            e.0 += b.drops;
            e.1 += b.attempts.unwrap_or(0);
        }
        // Drops that matched a frontend but no backend; their attempts are in no backend's.
        let e = services
            .entry((ns.clone(), name.clone(), String::new(), String::new()))
            .or_default();
        e.0 += part.unmatched.drops;
    }
    let services = services
        .into_iter()
        .map(
            |((service_namespace, service, backend_pod, backend_node), (drops, attempts))| ServiceSeries {
                service_namespace,
                service,
                backend_pod,
                backend_node,
                drops,
                attempts,
            },
        )
        .collect();
    let stat_of = |s: u32| i.stats.get(s as usize).copied().unwrap_or(0);
    let lost_events = [
        (LostSource::Ring, stat::EVENTS_LOST),
        (LostSource::RateLimit, stat::EVENTS_RATE_LIMITED),
        (LostSource::CounterMapFull, stat::COUNTER_MAP_FULL),
    ]
    .into_iter()
    .map(|(source, s)| LostSeries {
        source,
        count: stat_of(s),
    })
    .collect();
    let hooks = [Program::KfreeSkb, Program::Conntrack, Program::Timewait, Program::Tc]
        .into_iter()
        .filter_map(|program| {
            i.attach.get(program).map(|_| HookInUse {
                program,
                hook: i.attach.hook(program),
            })
        })
        .collect();
    NodeMetrics {
        node: i.scope.node.to_string(),
        drops,
        services,
        conntrack: i.conntrack,
        lost_events,
        interfaces_attached: i.interfaces_attached,
        hooks,
        ready: i.ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::{
            ReasonRow,
            attach::Attached,
            target_set::{TargetMember, TargetSet},
            target_summary::{Observed, build_part},
        },
        enrich::classify::{Certainty, Effect},
        resolve::Proto,
    };

    const NODE_NS: u32 = 100;
    const POD_NS: u32 = 101;
    const OTHER_NODE_NS: u32 = 200;
    const OTHER_POD_NS: u32 = 201;
    const STRAY_NS: u32 = 300;
    const GONE_POD_NS: u32 = 102;

    fn node_of() -> HashMap<u32, String> {
        HashMap::from([
            (NODE_NS, "node-a".to_string()),
            (POD_NS, "node-a".to_string()),
            (OTHER_NODE_NS, "node-b".to_string()),
            (OTHER_POD_NS, "node-b".to_string()),
        ])
    }

    fn pods() -> HashMap<u32, PodOwner> {
        HashMap::from([
            (
                POD_NS,
                PodOwner {
                    namespace: "default".into(),
                    workload: Some("Deployment/client".into()),
                    pod: "client-1".into(),
                },
            ),
            (
                OTHER_POD_NS,
                PodOwner {
                    namespace: "default".into(),
                    workload: None,
                    pod: "web-2".into(),
                },
            ),
        ])
    }

    fn drop(netns: u32, reason: &str, classification: Classification, count: u64) -> NodeDrop {
        NodeDrop {
            netns,
            reason: reason.into(),
            classification,
            count,
        }
    }

    fn client() -> DropOwner {
        DropOwner::Pod {
            namespace: "default".into(),
            workload: "Deployment/client".into(),
            pod: "client-1".into(),
        }
    }

    #[test]
    fn with_nodes_named_only_this_nodes_namespaces_and_pods_count() {
        let (node_of, pods) = (node_of(), pods());
        let gone = HashSet::new();
        let scope = Scope {
            node_of: &node_of,
            pods: &pods,
            gone: &gone,
            node: "node-a",
            nodes_given: true,
        };
        assert_eq!(scope.owner(NODE_NS), Some(DropOwner::Node));
        assert_eq!(scope.owner(POD_NS), Some(client()));
        assert_eq!(scope.owner(OTHER_NODE_NS), None, "node-b's own namespace");
        assert_eq!(scope.owner(OTHER_POD_NS), None, "a pod on node-b");
        assert_eq!(scope.owner(STRAY_NS), None, "no node's namespace");
    }

    #[test]
    fn without_nodes_named_everything_on_the_kernel_is_the_nodes() {
        let node_of = HashMap::from([(NODE_NS, "node-a".to_string()), (POD_NS, "node-a".to_string())]);
        let pods = pods();
        let gone = HashSet::from([GONE_POD_NS]);
        let scope = Scope {
            node_of: &node_of,
            pods: &pods,
            gone: &gone,
            node: "node-a",
            nodes_given: false,
        };
        assert_eq!(scope.owner(STRAY_NS), Some(DropOwner::Node), "unknown: the node's");
        assert_eq!(scope.owner(POD_NS), Some(client()));
        assert_eq!(
            scope.owner(GONE_POD_NS),
            None,
            "a gone pod's drops are not moved to the node"
        );
        assert!(scope.holds(GONE_POD_NS), "but its Service counts stay");
    }

    fn target_set() -> TargetSet {
        let member = |label: &str, node: Option<&str>, ip: &str, tag| TargetMember {
            label: label.into(),
            node: node.map(String::from),
            ip: ip.parse().expect("ip"),
            ports: vec![(8080, Proto::Tcp)],
            ready: true,
            tag,
        };
        TargetSet {
            service: "default/web".into(),
            frontends: vec![("10.96.0.20".parse().expect("ip"), 80, Proto::Tcp)],
            backends: vec![
                member("default/web-0", Some("node-a"), "10.244.1.5", 1),
                member("default/web-2", Some("node-b"), "10.244.2.5", 2),
                member("10.0.0.9", None, "10.0.0.9", 3),
            ],
        }
    }

    fn row(tag: u32, count: u64, netns: u32) -> ReasonRow {
        ReasonRow {
            reason: "NETFILTER_DROP".into(),
            reason_code: 12,
            location: "nft_do_chain+0x3f1".into(),
            netns,
            ip: "ipv4",
            count,
            hidden: false,
            classification: "netfilter_rule".into(),
            certainty: Certainty::Exact,
            conntrack: "unconfirmed",
            effect: Effect::Attempt,
            tag,
        }
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "one snapshot's every part, checked in order")]
    fn builds_drops_by_owner_services_lost_events_and_hooks() {
        let (node_of, pods) = (node_of(), pods());
        let drops = [
            drop(NODE_NS, "NETFILTER_DROP", Classification::NetfilterRule, 7),
            drop(NODE_NS, "NETFILTER_DROP", Classification::NetfilterRule, 3),
            drop(NODE_NS, "NETFILTER_DROP", Classification::InsertFailed, 2),
            drop(POD_NS, "NO_SOCKET", Classification::NoSocket, 4),
            drop(OTHER_POD_NS, "NO_SOCKET", Classification::NoSocket, 99),
            drop(POD_NS, "NO_SOCKET", Classification::NoSocket, 0),
        ];
        let rows = [
            row(2, 5, NODE_NS),
            row(tag_frontend(), 1, NODE_NS),
            row(3, 2, NODE_NS),
            row(2, 50, OTHER_NODE_NS),
        ];
        let lookup = |n: u32| node_of.get(&n).cloned();
        let gone = HashSet::new();
        let scope = Scope {
            node_of: &node_of,
            pods: &pods,
            gone: &gone,
            node: "node-a",
            nodes_given: true,
        };
        // As the agent does: the Service's part from this node's rows only.
        let rows: Vec<ReasonRow> = rows.iter().filter(|r| scope.holds(r.netns)).cloned().collect();
        let part = build_part(
            &target_set(),
            &Observed {
                rows: &rows,
                tc: None,
                node_of: &lookup,
                nodes_given: true,
                lost_events: 0,
                conntrack: &[],
                duration_s: 1.0,
                time: String::new(),
                is_final: false,
            },
        );
        let mut attach = AttachReport::default();
        attach.attached(Attached::new(Program::KfreeSkb, AttachHook::TpBtf));
        attach.attached(Attached::new(Program::Tc, AttachHook::Tcx));
        let mut stats = vec![0u64; stat::COUNT as usize];
        stats[stat::EVENTS_LOST as usize] = 11;
        stats[stat::EVENTS_RATE_LIMITED as usize] = 22;
        let m = build(&NodeInputs {
            scope,
            drops: &drops,
            parts: &[(("default".into(), "web".into()), part)],
            conntrack: None,
            stats: &stats,
            interfaces_attached: 3,
            attach: &attach,
            ready: true,
        });
        assert_eq!(m.node, "node-a");
        let got: Vec<(DropOwner, &str, String, u64)> = m
            .drops
            .iter()
            .map(|d| {
                (
                    d.owner.clone(),
                    d.reason.as_str(),
                    d.classification.to_string(),
                    d.count,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (DropOwner::Node, "NETFILTER_DROP", "conntrack_insert_failed".into(), 2),
                (DropOwner::Node, "NETFILTER_DROP", "netfilter_rule".into(), 10),
                (client(), "NO_SOCKET", "no_socket".into(), 4),
            ],
            "summed per owner, reason and classification; node-b's pod and empty rows left out"
        );
        let svc: Vec<(&str, &str, u64, u64)> = m
            .services
            .iter()
            .map(|s| (s.backend_pod.as_str(), s.backend_node.as_str(), s.drops, s.attempts))
            .collect();
        assert_eq!(
            svc,
            vec![
                ("", "", 1, 0),
                ("(no pod)", "", 2, 0),
                ("default/web-0", "node-a", 0, 0),
                ("default/web-2", "node-b", 5, 0),
            ],
            "every backend (healthy ones at 0), the no-backend row, no address as a label; node-b's rows are node-b's agent's"
        );
        assert!(
            m.services
                .iter()
                .all(|s| s.service_namespace == "default" && s.service == "web")
        );
        assert_eq!(
            m.lost_events,
            vec![
                LostSeries {
                    source: LostSource::Ring,
                    count: 11
                },
                LostSeries {
                    source: LostSource::RateLimit,
                    count: 22
                },
                LostSeries {
                    source: LostSource::CounterMapFull,
                    count: 0
                },
            ]
        );
        assert_eq!(
            m.hooks,
            vec![
                HookInUse {
                    program: Program::KfreeSkb,
                    hook: AttachHook::TpBtf
                },
                HookInUse {
                    program: Program::Tc,
                    hook: AttachHook::Tcx
                },
            ]
        );
        assert_eq!(m.interfaces_attached, 3);
        assert!(m.ready);
    }

    fn tag_frontend() -> u32 {
        netdrop_common::tag::FRONTEND
    }
}
