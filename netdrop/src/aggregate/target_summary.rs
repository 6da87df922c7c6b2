//! A target summary (`trace --svc`, `--pod`, `-n`, `--node`): one Service's drops, per backend, with attempts, ratios, reasons and a
//! diagnosis in plain words.
//!
//! The Service's frontends (ClusterIPs, external IPs, NodePorts) and backends (endpoint IP and
//! targetPort) go into the kernel's `ADDR_FILTER` map, each with a tag, so only their packets are
//! counted and sent; drops are counted per tag in the kernel, exactly, and split there by what
//! they cost ([`Effect`]): only drops that lose an attempt or data count as drops; discards that
//! lose nothing (stale bare ACKs, data already received) and those the kernel answered with a
//! reset are reported apart. Attempts come from the tc counters on the workload interfaces:
//! attempts (TCP SYNs, UDP datagrams) sent by pods to the ClusterIP (the Service's attempts) and
//! delivered to each backend pod. A backend's attempts are those delivered plus the attempts
//! dropped before delivery — not those dropped inside the backend's own namespace, which tc
//! already counted as delivered — so each attempt counts once wherever it ends.
//!
//! Everything here is computed from snapshots (no syscalls), so it is unit-tested without root.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use netdrop_common::tag;
use serde::{Deserialize, Serialize};

use super::{
    ConntrackReport, FixedName, ReasonRow,
    diagnosis::diagnose,
    target_set::{TargetSet, ip_proto},
    wire,
};
use crate::{
    enrich::classify::{Certainty, Effect},
    resolve::Proto,
    source::interfaces::{Destination, TcSnapshot},
};

/// How many reasons a table names per backend (`top_reasons`, `discard_reasons`).
pub const TOP_REASONS: usize = 3;

/// One reason behind a backend's drops.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopReason {
    pub reason: String,
    pub classification: String,
    pub certainty: Certainty,
    pub location: String,
    /// Where the drops happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub count: u64,
    /// What they cost (`attempt`, `data`, `lossless`, `reset`, `unknown`).
    pub effect: Effect,
}

/// A node's share of some drops; `node` is `null` for namespaces no watched node holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCount {
    pub node: Option<String>,
    pub count: u64,
}

/// One backend's row of the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendRow {
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub ip: IpAddr,
    /// Target ports, e.g. `["8080/tcp", "8081/udp"]`.
    pub ports: Vec<String>,
    pub ready: bool,
    /// Attempts (TCP SYNs, UDP datagrams) delivered to the backend plus those dropped before
    /// delivery; `None` without tc counters.
    pub attempts: Option<u64>,
    /// Drops that lost an attempt or data.
    pub drops: u64,
    pub drop_ratio: Option<f64>,
    pub top_reasons: Vec<TopReason>,
    /// Where the drops happened (the node whose kernel dropped them), most first.
    pub drops_by_node: Vec<NodeCount>,
    /// Discards that lost nothing: stale or duplicate bare ACKs, data already received.
    pub lossless: u64,
    /// Discards the kernel answered with a reset (an ACK that met a listening socket or none).
    pub resets: u64,
    /// Reasons of the discards in `lossless` and `resets`.
    pub discard_reasons: Vec<TopReason>,
}

/// Drops that matched the Service's frontends but no backend (before DNAT, or REJECTed for
/// lack of endpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmatched {
    pub drops: u64,
    pub top_reasons: Vec<TopReason>,
    pub drops_by_node: Vec<NodeCount>,
    pub lossless: u64,
    pub resets: u64,
    pub discard_reasons: Vec<TopReason>,
}

/// The `--svc` summary: `{"type":"summary","service":...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetSummary {
    #[serde(rename = "type", deserialize_with = "wire::summary_kind")]
    pub kind: FixedName,
    pub service: String,
    pub time: String,
    pub duration_s: f64,
    /// Final summary (at exit) or periodic.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Attempts pods made to the Service's frontends (TCP SYNs, UDP datagrams); `None`
    /// without tc counters.
    pub attempts: Option<u64>,
    /// Drops that lost an attempt or data (backends and unmatched).
    pub drops: u64,
    pub drop_ratio: Option<f64>,
    /// Discards that lost nothing, and those answered with a reset (backends and unmatched).
    pub lossless: u64,
    pub resets: u64,
    pub backends: Vec<BackendRow>,
    pub unmatched: Unmatched,
    /// Drops, lossless discards and resets matching the Service's addresses in network
    /// namespaces of none of the nodes given with `--node-netns` (nor their pods): another
    /// cluster on this host with the same address plan (two kind clusters on a laptop). Left
    /// out of everything above; 0 when no node namespaces were given.
    pub other_namespaces: u64,
    pub lost_events: u64,
    /// Plain-words diagnosis, first line the headline.
    pub diagnosis: Vec<String>,
    /// The full drop summary (reasons × locations, conntrack), in the final line only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<crate::aggregate::Summary>,
    /// What the table was computed from beyond the line's fields: written only in a node's
    /// part of a cluster-wide trace ([`build_part`], [`TargetSummary::merge`]).
    #[serde(default, skip_serializing_if = "Basis::is_line")]
    pub basis: Basis,
}

/// What a target summary was computed from beyond the fields of its JSON line. netdrop's own
/// lines leave it out; a node's part carries it, so parts add up exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Basis {
    /// A part: the reason lists (`top_reasons`, `discard_reasons`) hold every reason, not the
    /// top [`TOP_REASONS`], so merged parts rank them as one process would.
    pub part: bool,
    /// Pods, a namespace or a node (no Service addresses): the rows are not replicas of one
    /// another, and the headline's attempts are the rows' own.
    pub pods: bool,
    /// Conntrack clashes the kernel resolved (nothing dropped: the diagnosis says so), per
    /// namespace, in order of place.
    pub clashes: Vec<Clash>,
}

impl Basis {
    fn is_line(&self) -> bool {
        !self.part
    }
}

/// Conntrack clashes resolved in one namespace (Linux 5.6+ keeps the packet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clash {
    /// The namespace's node, else `netns <inode>`.
    pub place: String,
    pub netns: u32,
    pub count: u64,
}

fn ratio(drops: u64, attempts: Option<u64>) -> Option<f64> {
    attempts.filter(|a| *a > 0).map(|a| drops as f64 / a as f64)
}

type ReasonKey = (String, String, String, Option<String>, Effect);

/// Every reason behind `rows`, most drops first (see [`rank`]).
fn top(rows: &[&ReasonRow], node_of: &dyn Fn(u32) -> Option<String>) -> Vec<TopReason> {
    rank(rows.iter().map(|r| TopReason {
        reason: r.reason.clone(),
        classification: r.classification.clone(),
        certainty: r.certainty,
        location: r.location.clone(),
        node: node_of(r.netns),
        count: r.count,
        effect: r.effect,
    }))
}

/// Sums reasons with the same reason, classification, location, node and effect, and sorts
/// them, most drops first, in a total order (so that one process and merged parts rank ties
/// alike). A reason is exact only if all its drops were.
pub(super) fn rank(reasons: impl Iterator<Item = TopReason>) -> Vec<TopReason> {
    let mut by: HashMap<ReasonKey, (Certainty, u64)> = HashMap::new();
    for r in reasons {
        let e = by
            .entry((r.reason, r.classification, r.location, r.node, r.effect))
            .or_insert((r.certainty, 0));
        e.1 += r.count;
        if r.certainty == Certainty::Inferred {
            e.0 = Certainty::Inferred;
        }
    }
    let mut v: Vec<TopReason> = by
        .into_iter()
        .map(
            |((reason, classification, location, node, effect), (certainty, count))| TopReason {
                reason,
                classification,
                certainty,
                location,
                node,
                count,
                effect,
            },
        )
        .collect();
    v.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.location.cmp(&b.location))
            .then_with(|| a.reason.cmp(&b.reason))
            .then_with(|| a.classification.cmp(&b.classification))
            .then_with(|| a.node.cmp(&b.node))
            .then_with(|| a.effect.cmp(&b.effect))
    });
    v
}

/// Drops per node they happened on, most first (unknown namespaces last).
fn by_node(rows: &[&ReasonRow], node_of: &dyn Fn(u32) -> Option<String>) -> Vec<NodeCount> {
    sum_nodes(rows.iter().map(|r| NodeCount {
        node: node_of(r.netns),
        count: r.count,
    }))
}

/// Sums counts per node, most first, namespaces of no watched node last.
pub(crate) fn sum_nodes(counts: impl Iterator<Item = NodeCount>) -> Vec<NodeCount> {
    let mut m: BTreeMap<Option<String>, u64> = BTreeMap::new();
    for n in counts {
        *m.entry(n.node).or_default() += n.count;
    }
    let mut v: Vec<NodeCount> = m.into_iter().map(|(node, count)| NodeCount { node, count }).collect();
    v.sort_by(|a, b| (a.node.is_none(), b.count).cmp(&(b.node.is_none(), a.count)));
    v
}

/// One tag's counter rows, split by what they cost.
struct Split<'a> {
    loss: Vec<&'a ReasonRow>,
    discards: Vec<&'a ReasonRow>,
    drops: u64,
    lossless: u64,
    resets: u64,
}

fn split(rows: &[ReasonRow], tag: u32) -> Split<'_> {
    let (loss, discards): (Vec<&ReasonRow>, Vec<&ReasonRow>) = rows
        .iter()
        .filter(|r| r.tag == tag && !r.hidden)
        .partition(|r| r.effect.loses());
    let sum = |e: Effect| discards.iter().filter(|r| r.effect == e).map(|r| r.count).sum();
    Split {
        drops: loss.iter().map(|r| r.count).sum(),
        lossless: sum(Effect::Lossless),
        resets: sum(Effect::Reset),
        loss,
        discards,
    }
}

/// Inputs of [`build`] besides the targets.
pub struct Observed<'a> {
    /// The kernel's counter rows (shown ones; each carries its `tag`).
    pub rows: &'a [ReasonRow],
    /// tc counters, when the workload interfaces are watched.
    pub tc: Option<&'a TcSnapshot>,
    /// Node of a network namespace (a node's own, or a pod's on it).
    pub node_of: &'a dyn Fn(u32) -> Option<String>,
    /// The nodes were named (`--node-netns`): rows in namespaces [`Observed::node_of`] does not
    /// place belong to something else on this host and are left out.
    pub nodes_given: bool,
    pub lost_events: u64,
    /// Conntrack statistics of the run (resolved clashes are named in the diagnosis).
    pub conntrack: &'a [ConntrackReport],
    pub duration_s: f64,
    pub time: String,
    pub is_final: bool,
}

/// The table and diagnosis for one moment.
pub fn build(t: &TargetSet, o: &Observed<'_>) -> TargetSummary {
    let mut s = build_complete(t, o);
    s.keep_top_reasons();
    s.diagnosis = diagnose(&s);
    s
}

/// A node's part of a cluster-wide trace: the table of what this node's kernel counted, with
/// every reason and the [`Basis`], for [`TargetSummary::merge`]. Its diagnosis is the node's
/// own.
pub fn build_part(t: &TargetSet, o: &Observed<'_>) -> TargetSummary {
    let mut s = build_complete(t, o);
    s.basis.part = true;
    s.diagnose();
    s
}

/// The table with every reason, without a diagnosis.
fn build_complete(t: &TargetSet, o: &Observed<'_>) -> TargetSummary {
    let (rows, others): (Vec<ReasonRow>, Vec<ReasonRow>) = o
        .rows
        .iter()
        .cloned()
        .partition(|r| !o.nodes_given || (o.node_of)(r.netns).is_some());
    let other_namespaces = others.iter().filter(|r| !r.hidden && r.tag != 0).map(|r| r.count).sum();
    let o = &Observed {
        rows: &rows,
        time: o.time.clone(),
        ..*o
    };
    let dest = |ip: IpAddr, port: u16, proto: Proto| Destination {
        ip,
        port,
        proto: ip_proto(proto),
    };
    let attempts = o.tc.map(|tc| {
        t.frontends
            .iter()
            .map(|(ip, port, proto)| tc.attempts_to(&dest(*ip, *port, *proto)).0)
            .sum::<u64>()
    });
    // Pod namespaces behind watched interfaces: an attempt dropped in one of them had already
    // been counted as delivered by tc (a SYN nobody listens for, a datagram to a closed port).
    let delivered_ns: HashSet<u32> =
        o.tc.map(|tc| tc.interfaces.iter().filter_map(|i| i.peer_netns).collect())
            .unwrap_or_default();
    let mut backends = Vec::with_capacity(t.backends.len());
    for b in &t.backends {
        let sp = split(o.rows, b.tag);
        let dropped_attempts: u64 = sp
            .loss
            .iter()
            .filter(|r| r.effect == Effect::Attempt && !delivered_ns.contains(&r.netns))
            .map(|r| r.count)
            .sum();
        let attempts =
            o.tc.map(|tc| b.destinations().iter().map(|d| tc.attempts_to(d).1).sum::<u64>() + dropped_attempts);
        backends.push(BackendRow {
            pod: b.label.clone(),
            node: b.node.clone(),
            ip: b.ip,
            ports: b
                .ports
                .iter()
                .map(|(p, proto)| format!("{p}/{}", proto.as_str().to_ascii_lowercase()))
                .collect(),
            ready: b.ready,
            attempts,
            drops: sp.drops,
            drop_ratio: ratio(sp.drops, attempts),
            top_reasons: top(&sp.loss, o.node_of),
            drops_by_node: by_node(&sp.loss, o.node_of),
            lossless: sp.lossless,
            resets: sp.resets,
            discard_reasons: top(&sp.discards, o.node_of),
        });
    }
    let sp = split(o.rows, tag::FRONTEND);
    let unmatched = Unmatched {
        drops: sp.drops,
        top_reasons: top(&sp.loss, o.node_of),
        drops_by_node: by_node(&sp.loss, o.node_of),
        lossless: sp.lossless,
        resets: sp.resets,
        discard_reasons: top(&sp.discards, o.node_of),
    };
    let drops = backends.iter().map(|b| b.drops).sum::<u64>() + unmatched.drops;
    // Pods, namespaces and nodes have no frontends: their attempts are their own.
    let attempts = if t.frontends.is_empty() {
        o.tc.map(|_| backends.iter().filter_map(|b| b.attempts).sum())
    } else {
        attempts
    };
    let lossless = backends.iter().map(|b| b.lossless).sum::<u64>() + unmatched.lossless;
    let resets = backends.iter().map(|b| b.resets).sum::<u64>() + unmatched.resets;
    TargetSummary {
        kind: "summary",
        service: t.service.clone(),
        time: o.time.clone(),
        duration_s: o.duration_s,
        is_final: o.is_final,
        attempts,
        drops,
        drop_ratio: ratio(drops, attempts),
        lossless,
        resets,
        backends,
        unmatched,
        other_namespaces,
        lost_events: o.lost_events,
        diagnosis: Vec::new(),
        detail: None,
        basis: Basis {
            part: false,
            pods: t.frontends.is_empty(),
            clashes: clashes(o),
        },
    }
}

/// Conntrack findings that are not drops: a resolved clash (Linux 5.6+) dropped nothing, which
/// is the answer to "is it the DNS insert race?". In order of place.
fn clashes(o: &Observed<'_>) -> Vec<Clash> {
    let mut v: Vec<Clash> = o
        .conntrack
        .iter()
        .filter(|c| c.clash_resolve > 0)
        .map(|c| Clash {
            place: (o.node_of)(c.netns).unwrap_or_else(|| format!("netns {}", c.netns)),
            netns: c.netns,
            count: c.clash_resolve,
        })
        .collect();
    v.sort_by(|a, b| (&a.place, a.netns).cmp(&(&b.place, b.netns)));
    v
}

impl TargetSummary {
    /// Cuts the reason lists to the top [`TOP_REASONS`] (the table's); no longer a part.
    pub(super) fn keep_top_reasons(&mut self) {
        for b in &mut self.backends {
            b.top_reasons.truncate(TOP_REASONS);
            b.discard_reasons.truncate(TOP_REASONS);
        }
        self.unmatched.top_reasons.truncate(TOP_REASONS);
        self.unmatched.discard_reasons.truncate(TOP_REASONS);
        self.basis.part = false;
    }

    /// The diagnosis, from the table as shown (the top reasons).
    pub(super) fn diagnose(&mut self) {
        self.diagnosis = if self.basis.part {
            let mut shown = self.clone();
            shown.keep_top_reasons();
            diagnose(&shown)
        } else {
            diagnose(self)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{enrich::classify, resolve::ServiceInfo, sink::table::render};
    use crate::{
        resolve::{Backend, Name, ServicePort},
        source::interfaces::{DestinationSnapshot, WatchStats},
    };

    fn info() -> ServiceInfo {
        let backend = |pod: &str, node: &str, ip: &str| Backend {
            pod: Some(Name::new(pod)),
            namespace: Some(Name::new("default")),
            node: Some(Name::new(node)),
            ip: ip.parse().expect("ip"),
            port: 8080,
            port_name: None,
            protocol: Proto::Tcp,
            ready: true,
            serving: true,
            terminating: false,
        };
        ServiceInfo {
            namespace: Name::new("default"),
            name: Name::new("web"),
            type_: None,
            cluster_ips: vec!["10.96.0.20".parse().expect("ip")],
            external_ips: vec![],
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: Proto::Tcp,
                target_port: "8080".into(),
                node_port: None,
            }],
            backends: vec![
                backend("web-2", "node-b", "10.244.2.5"),
                backend("web-0", "node-a", "10.244.1.5"),
                backend("web-1", "node-a", "10.244.1.6"),
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

    fn observed<'a>(
        rows: &'a [ReasonRow],
        tc: Option<&'a TcSnapshot>,
        node_of: &'a dyn Fn(u32) -> Option<String>,
    ) -> Observed<'a> {
        Observed {
            rows,
            tc,
            node_of,
            nodes_given: false,
            lost_events: 0,
            conntrack: &[],
            duration_s: 5.0,
            time: String::new(),
            is_final: true,
        }
    }

    /// The pod namespaces behind watched interfaces, as the tc snapshot reports them.
    fn with_pod_netns(mut snap: TcSnapshot, pods: &[(u32, &str)]) -> TcSnapshot {
        for (netns, node) in pods {
            snap.interfaces.push(crate::source::interfaces::InterfaceSnapshot {
                node: (*node).into(),
                netns: 1,
                ifindex: *netns,
                name: format!("cali{netns}"),
                peer_ifindex: Some(2),
                peer_netnsid: Some(0),
                peer_netns: Some(*netns),
                mode: crate::probe::tc::TcMode::Tcx,
                attached_unix_ms: 0,
                from_pod: crate::source::interfaces::Counters::default(),
                to_pod: crate::source::interfaces::Counters::default(),
            });
        }
        snap
    }

    fn tc(targets: &TargetSet, attempts: u64, delivered: &[(u32, u64)]) -> TcSnapshot {
        let mut destinations = vec![DestinationSnapshot {
            node: "node-a".into(),
            dest: Destination {
                ip: targets.frontends[0].0,
                port: 80,
                proto: 6,
            },
            from_pod: attempts,
            to_pod: 0,
        }];
        for (tag, n) in delivered {
            let b = targets.backends.iter().find(|b| b.tag == *tag).expect("backend");
            destinations.push(DestinationSnapshot {
                node: b.node.clone().unwrap_or_default(),
                dest: Destination {
                    ip: b.ip,
                    port: b.ports[0].0,
                    proto: 6,
                },
                from_pod: 0,
                to_pod: *n,
            });
        }
        TcSnapshot {
            interfaces: vec![],
            destinations,
            stats: WatchStats::default(),
        }
    }

    #[test]
    fn targets_are_tagged_in_a_stable_order() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let labels: Vec<&str> = t.backends.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, ["default/web-0", "default/web-1", "default/web-2"]);
        assert_eq!(t.backends[2].tag, tag::FIRST_BACKEND + 2);
        let e = t.addr_entries();
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].1, tag::FRONTEND);
        assert_eq!(&e[0].0.addr[..4], &[10, 96, 0, 20]);
        assert_eq!((e[0].0.port, e[0].0.proto), (80, 6));
        assert_eq!(t.destinations().len(), 4);
    }

    #[test]
    fn one_bad_backend_is_named_with_its_share() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let bad = t.backends[2].tag;
        let rows = vec![row(bad, 330, 99)];
        let snap = tc(&t, 1000, &[(1, 335), (2, 335), (bad, 0)]);
        let node_of = |n: u32| (n == 99).then(|| "node-b".to_string());
        let s = build(
            &t,
            &Observed {
                rows: &rows,
                tc: Some(&snap),
                node_of: &node_of,
                nodes_given: false,
                lost_events: 0,
                conntrack: &[],
                duration_s: 10.0,
                time: String::new(),
                is_final: true,
            },
        );
        assert_eq!(s.attempts, Some(1000));
        assert_eq!(s.drops, 330);
        let b = &s.backends[2];
        assert_eq!((b.attempts, b.drops), (Some(330), 330));
        assert_eq!(b.drop_ratio, Some(1.0));
        assert_eq!(b.top_reasons[0].node.as_deref(), Some("node-b"));
        let text = s.diagnosis.join("\n");
        assert!(
            text.contains("default/web-2 on node-b: 330 drops (100% of the drops, 33.0% of the Service's attempts"),
            "{text}"
        );
        assert!(text.contains("The drops are on node-b"), "{text}");
        assert!(text.contains("Next (netfilter_rule)"), "{text}");
        assert!(render(&s).contains("default/web-2"));
    }

    /// 164 drops on one backend and one stray drop on each of two others: still one bad backend.
    #[test]
    fn stray_drops_elsewhere_do_not_hide_the_bad_backend() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let bad = t.backends[0].tag;
        let rows = vec![
            row(bad, 164, 98),
            row(t.backends[1].tag, 1, 98),
            row(t.backends[2].tag, 1, 99),
        ];
        let snap = tc(
            &t,
            500,
            &[(bad, 328), (t.backends[1].tag, 170), (t.backends[2].tag, 166)],
        );
        let node_of = |n: u32| Some(if n == 98 { "node-a" } else { "node-b" }.to_string());
        let s = build(
            &t,
            &Observed {
                rows: &rows,
                tc: Some(&snap),
                node_of: &node_of,
                nodes_given: false,
                lost_events: 0,
                conntrack: &[],
                duration_s: 5.0,
                time: String::new(),
                is_final: true,
            },
        );
        let text = s.diagnosis.join("\n");
        assert!(text.contains("The drops are on node-a: look there first."), "{text}");
        assert!(!text.contains("spread over most backends"), "{text}");
        // Evenly spread drops are still called spread.
        let rows = vec![
            row(bad, 50, 98),
            row(t.backends[1].tag, 40, 98),
            row(t.backends[2].tag, 45, 99),
        ];
        let s = build(
            &t,
            &Observed {
                rows: &rows,
                tc: Some(&snap),
                node_of: &node_of,
                nodes_given: false,
                lost_events: 0,
                conntrack: &[],
                duration_s: 5.0,
                time: String::new(),
                is_final: true,
            },
        );
        assert!(
            s.diagnosis.join("\n").contains("spread over most backends"),
            "{:?}",
            s.diagnosis
        );
    }

    #[test]
    fn healthy_service_says_no_drops() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let snap = tc(&t, 500, &[(1, 167), (2, 167), (3, 166)]);
        let s = build(
            &t,
            &Observed {
                rows: &[],
                tc: Some(&snap),
                node_of: &|_| None,
                nodes_given: false,
                lost_events: 0,
                conntrack: &[],
                duration_s: 1.0,
                time: String::new(),
                is_final: true,
            },
        );
        assert_eq!(s.drops, 0);
        assert_eq!(s.diagnosis, vec!["default/web: no drops of 500 attempts.".to_string()]);
    }

    /// `--pod`/`--node`/`-n`: no frontends, so the headline counts the targets' own attempts.
    #[test]
    fn pod_targets_headline_their_own_attempts() {
        let peer = |pod: &str, node: &str| crate::resolve::Peer {
            kind: crate::resolve::PeerKind::Pod,
            namespace: Some(Name::new("default")),
            pod: Some(Name::new(pod)),
            node: Some(Name::new(node)),
            ..crate::resolve::Peer::default()
        };
        let pods = [
            (peer("web-3", "node-b"), vec!["10.244.2.5".parse().expect("ip")]),
            (peer("web-4", "node-b"), vec!["10.244.2.6".parse().expect("ip")]),
        ];
        let t = TargetSet::from_pods("pod default/web-3".into(), &pods[..1]);
        let snap = TcSnapshot {
            interfaces: vec![],
            destinations: vec![],
            stats: WatchStats::default(),
        };
        let rows = vec![row(t.backends[0].tag, 23, 99)];
        let node_of = |_: u32| Some("node-b".to_string());
        let obs = |rows| Observed {
            rows,
            tc: Some(&snap),
            node_of: &node_of,
            nodes_given: false,
            lost_events: 0,
            conntrack: &[],
            duration_s: 5.0,
            time: String::new(),
            is_final: true,
        };
        let s = build(&t, &obs(&rows));
        assert_eq!(s.backends[0].attempts, Some(23));
        assert_eq!((s.attempts, s.drops), (Some(23), 23), "the pod's own attempts: {s:?}");
        assert_eq!(
            s.diagnosis[0],
            "pod default/web-3: 23 drops for 23 attempts (100.0% of attempts)."
        );
        // Two pods of a node: the sum of their rows.
        let t = TargetSet::from_pods("node node-b".into(), &pods);
        let rows = vec![row(t.backends[0].tag, 23, 99)];
        let s = build(&t, &obs(&rows));
        let sum: u64 = s.backends.iter().filter_map(|b| b.attempts).sum();
        assert_eq!(s.attempts, Some(sum));
        // Without tc counters nobody knows the attempts.
        let s = build(
            &t,
            &Observed {
                rows: &rows,
                tc: None,
                node_of: &node_of,
                nodes_given: false,
                lost_events: 0,
                conntrack: &[],
                duration_s: 5.0,
                time: String::new(),
                is_final: true,
            },
        );
        assert_eq!(s.attempts, None);
    }

    /// A pod's attempts are the SYNs and datagrams delivered to it on any port (the tc
    /// programs' port-0 entries, TCP and UDP) plus those dropped on the way; one refused inside
    /// the pod (already counted as delivered) counts once.
    #[test]
    fn pod_targets_count_attempts_on_any_port() {
        let peer = crate::resolve::Peer {
            kind: crate::resolve::PeerKind::Pod,
            namespace: Some(Name::new("default")),
            pod: Some(Name::new("web-2")),
            node: Some(Name::new("node-b")),
            ..crate::resolve::Peer::default()
        };
        let ip: IpAddr = "10.244.2.5".parse().expect("ip");
        let t = TargetSet::from_pods("pod default/web-2".into(), &[(peer, vec![ip])]);
        let any = |proto: u8| Destination { ip, port: 0, proto };
        assert_eq!(t.destinations(), vec![any(6), any(17)]);
        let delivered = |proto: u8, n: u64| DestinationSnapshot {
            node: "node-b".into(),
            dest: any(proto),
            from_pod: 0,
            to_pod: n,
        };
        let pod_ns = 4_026_532_600;
        let snap = with_pod_netns(
            TcSnapshot {
                interfaces: vec![],
                destinations: vec![delivered(6, 300), delivered(17, 40)],
                stats: WatchStats::default(),
            },
            &[(pod_ns, "node-b")],
        );
        let node_of = |n: u32| Some(if n == 98 { "node-a" } else { "node-b" }.to_string());
        // Healthy: no drops of 340 attempts.
        let s = build(&t, &observed(&[], Some(&snap), &node_of));
        assert_eq!((s.backends[0].attempts, s.drops, s.attempts), (Some(340), 0, Some(340)));
        assert_eq!(s.diagnosis[0], "pod default/web-2: no drops of 340 attempts.");
        // 160 SYNs dropped on node-b before delivery, 20 refused inside the pod (delivered).
        let refused = ReasonRow {
            reason: "NO_SOCKET".into(),
            classification: "no_socket".into(),
            ..row(t.backends[0].tag, 20, pod_ns)
        };
        let rows = [row(t.backends[0].tag, 160, 99), refused];
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        assert_eq!((s.backends[0].attempts, s.backends[0].drops), (Some(500), 180));
        assert_eq!(s.attempts, Some(500));
        // One pod is not "spread over most backends" of a Service: its node is named.
        let text = s.diagnosis.join("\n");
        assert!(text.contains("default/web-2 on node-b: 180 drops (100% of the drops, 36.0% of all attempts; 36.0% of its own attempts)"), "{text}");
        assert!(text.contains("The drops are on node-b: look there first."), "{text}");
        assert!(!text.contains("spread over") && !text.contains("Service"), "{text}");
    }

    #[test]
    fn frontend_only_drops_are_unmatched() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let rows = vec![row(tag::FRONTEND, 7, 1)];
        let s = build(
            &t,
            &Observed {
                rows: &rows,
                tc: None,
                node_of: &|_| None,
                nodes_given: false,
                lost_events: 0,
                conntrack: &[],
                duration_s: 1.0,
                time: String::new(),
                is_final: false,
            },
        );
        assert_eq!((s.unmatched.drops, s.drops, s.attempts), (7, 7, None));
        assert!(
            s.diagnosis
                .iter()
                .any(|l| l.contains("7 drops matched the Service's address but no backend"))
        );
    }
    /// The conntrack insert failures of the field notes: the backend lives on node-b, its
    /// packets fail on node-a (the client's node). The advice names node-a.
    #[test]
    fn where_to_look_is_where_the_drops_happened() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let bad = t.backends[2].tag; // web-2 on node-b
        let rows = vec![ReasonRow {
            classification: "conntrack_insert_failed".into(),
            ..row(bad, 320, 98)
        }];
        let snap = tc(&t, 1000, &[(1, 340), (2, 340), (bad, 0)]);
        let node_of = |n: u32| Some(if n == 98 { "node-a" } else { "node-b" }.to_string());
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        let text = s.diagnosis.join("\n");
        assert!(text.contains("The drops are on node-a: look there first."), "{text}");
        assert!(!text.contains("The drops are on node-b"), "{text}");
        assert_eq!(
            s.backends[2].drops_by_node,
            vec![NodeCount {
                node: Some("node-a".into()),
                count: 320
            }]
        );
        // Spread over two nodes: both named, with counts, the larger first.
        let rows = vec![row(bad, 300, 98), row(bad, 26, 99)];
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        let text = s.diagnosis.join("\n");
        assert!(text.contains("Dropped on node-a (300), node-b (26)."), "{text}");
        assert!(
            text.contains("The drops are on node-a (300), node-b (26): look at node-a first."),
            "{text}"
        );
        // A namespace on no watched node is not passed off as one.
        let s = build(&t, &observed(&rows[..1], Some(&snap), &|_| None));
        assert!(s.diagnosis.join("\n").contains("no watched node"), "{:?}", s.diagnosis);
    }

    /// Discards that lose nothing and those answered with a reset are counted apart, per
    /// backend, and neither makes a healthy Service look broken.
    #[test]
    fn lossless_and_reset_discards_are_not_drops() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let web2 = t.backends[2].tag;
        let stale = ReasonRow {
            reason: "TCP_RFC7323_PAWS".into(),
            classification: "tcp_rfc7323_paws".into(),
            effect: Effect::Lossless,
            ..row(web2, 2, 98)
        };
        let reset = ReasonRow {
            reason: "TCP_FLAGS".into(),
            location: "tcp_v4_do_rcv+0x1c0".into(),
            classification: "tcp_flags".into(),
            effect: Effect::Reset,
            ..row(web2, 2, 99)
        };
        let snap = tc(&t, 150, &[(1, 50), (2, 50), (web2, 50)]);
        let node_of = |n: u32| Some(if n == 98 { "node-a" } else { "node-b" }.to_string());
        let rows = vec![stale.clone(), reset.clone()];
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        assert_eq!((s.drops, s.lossless, s.resets), (0, 2, 2));
        let b = &s.backends[2];
        assert_eq!((b.drops, b.lossless, b.resets, b.drop_ratio), (0, 2, 2, Some(0.0)));
        assert_eq!(b.discard_reasons.len(), 2);
        assert!(
            s.diagnosis[0].starts_with("default/web: no drops of 150 attempts."),
            "{:?}",
            s.diagnosis
        );
        // 2 resets in 50 attempts (4%) matter: named, with where the kernel sent them.
        assert!(
            s.diagnosis.iter().any(|l| l.contains("2 segments met no connection")
                && l.contains("TCP_FLAGS at tcp_v4_do_rcv+0x1c0 on node-b")),
            "{:?}",
            s.diagnosis
        );
        assert!(
            !s.diagnosis.join("\n").contains("look there first"),
            "{:?}",
            s.diagnosis
        );
        // Two in 500 do not, nor does a single one in 50 (the field notes' healthy lab).
        let snap = tc(&t, 1500, &[(1, 500), (2, 500), (web2, 500)]);
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        assert_eq!(s.diagnosis.len(), 1, "{:?}", s.diagnosis);
        let one = [ReasonRow { count: 1, ..reset }];
        let snap = tc(&t, 150, &[(1, 50), (2, 50), (web2, 50)]);
        let s = build(&t, &observed(&one, Some(&snap), &node_of));
        assert_eq!(s.diagnosis.len(), 1, "{:?}", s.diagnosis);
        assert!(
            s.diagnosis[0].ends_with("Not counted as drops: 1 segments answered with a reset."),
            "{:?}",
            s.diagnosis
        );
    }

    /// Retransmitted data dropped again (a path-MTU black hole: every too-big retransmission is
    /// a drop): drops exceed attempts. The counts stay exact; the text says drops per attempt
    /// instead of a share above 100%.
    #[test]
    fn more_drops_than_attempts_read_as_drops_per_attempt() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let bad = t.backends[2].tag;
        let rows = vec![ReasonRow {
            reason: "PKT_TOO_BIG".into(),
            classification: "pkt_too_big".into(),
            location: "ip_forward+0x2c0".into(),
            effect: Effect::Data,
            ..row(bad, 660, 99)
        }];
        let snap = tc(&t, 400, &[(1, 135), (2, 135), (bad, 130)]);
        let node_of = |n: u32| (n == 99).then(|| "node-b".to_string());
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        assert_eq!((s.drops, s.drop_ratio), (660, Some(1.65)));
        assert_eq!(s.backends[2].drop_ratio, Some(660.0 / 130.0));
        let text = s.diagnosis.join("\n");
        assert!(
            text.contains("default/web: 660 drops for 400 attempts (more drops than attempts: each lost 1.6 packets on average, the same data retransmitted and dropped again)."),
            "{text}"
        );
        assert!(
            text.contains(
                "1.6 per attempt (the Service's attempts); more drops than its own attempts: each lost 5.1 packets"
            ),
            "{text}"
        );
        assert!(!text.contains("165.0%") && !text.contains("507.7%"), "{text}");
        assert!(!text.contains("no backend"), "{text}");
        // The client's socket purging the replies' out-of-order tails on abort: a consequence,
        // on the client's side, not a drop before any backend.
        let mut rows = rows;
        rows.push(ReasonRow {
            reason: "NOT_SPECIFIED".into(),
            classification: classify::OFO_PURGED.into(),
            location: "skb_rbtree_purge+0x4d".into(),
            effect: Effect::Data,
            ..row(tag::FRONTEND, 130, 98)
        });
        let node_of = |n: u32| match n {
            99 => Some("node-b".to_string()),
            98 => Some("node-a".to_string()),
            _ => None,
        };
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        let text = s.diagnosis.join("\n");
        assert!(!text.contains("no backend (before DNAT"), "{text}");
        assert!(
            text.contains("130 drops on the client's side: tcp_ofo_purged"),
            "{text}"
        );
        assert!(text.contains("The drops are on node-b"), "{text}");
        let table = render(&s);
        assert!(
            table.contains(" 1.6x ") || table.contains("(1.6x)") || table.contains("(2.0x)"),
            "{table}"
        );
        assert!(table.contains("5.1x"), "{table}");
        assert!(table.contains("Nx: more drops than attempts"), "{table}");
    }

    /// A SYN delivered to the backend's namespace and refused there (NO_SOCKET) is one attempt,
    /// not two: 326 attempts, 326 drops, 100%.
    #[test]
    fn attempts_dropped_after_delivery_count_once() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let web0 = t.backends[0].tag;
        let pod_ns = 4_026_532_500;
        let refused = ReasonRow {
            reason: "NO_SOCKET".into(),
            classification: "no_socket".into(),
            location: "tcp_v4_rcv+0x80".into(),
            ..row(web0, 326, pod_ns)
        };
        let snap = with_pod_netns(tc(&t, 1000, &[(web0, 326), (2, 337), (3, 337)]), &[(pod_ns, "node-a")]);
        let node_of = |n: u32| (n == pod_ns).then(|| "node-a".to_string());
        let rows = [refused.clone()];
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        let b = &s.backends[0];
        assert_eq!((b.attempts, b.drops, b.drop_ratio), (Some(326), 326, Some(1.0)));
        assert!(
            s.diagnosis.join("\n").contains("100.0% of its own attempts"),
            "{:?}",
            s.diagnosis
        );
        // Dropped before delivery (on the node): added to what was delivered.
        let on_node = ReasonRow { netns: 7, ..refused };
        let snap = tc(&t, 1000, &[(web0, 0), (2, 337), (3, 337)]);
        let rows = [on_node];
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        assert_eq!(s.backends[0].attempts, Some(326));
        // Data lost on the way is a drop, not an attempt.
        let data = ReasonRow {
            effect: Effect::Data,
            ..row(web0, 5, 7)
        };
        let rows = [data];
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        assert_eq!((s.backends[0].attempts, s.backends[0].drops), (Some(0), 5));
    }
    /// Two clusters on one host with the same address plan: with the nodes named, the other
    /// one's drops are left out (and counted as such), not blamed on this one's backends.
    #[test]
    fn drops_in_namespaces_of_no_given_node_are_left_out() {
        let t = TargetSet::from_service(&info(), &|_| vec![]);
        let web2 = t.backends[2].tag;
        let rows = vec![row(web2, 10, 98), row(web2, 80, 12345)];
        let snap = tc(&t, 100, &[(1, 33), (2, 33), (web2, 24)]);
        let node_of = |n: u32| (n == 98).then(|| "node-b".to_string());
        let o = Observed {
            nodes_given: true,
            ..observed(&rows, Some(&snap), &node_of)
        };
        let s = build(&t, &o);
        assert_eq!((s.backends[2].drops, s.other_namespaces, s.drops), (10, 80, 10));
        assert!(
            s.diagnosis.iter().any(|l| l.starts_with("80 more matched")),
            "{:?}",
            s.diagnosis
        );
        // Without named nodes nothing is left out: the namespace is merely unplaced.
        let s = build(&t, &observed(&rows, Some(&snap), &node_of));
        assert_eq!((s.backends[2].drops, s.other_namespaces), (90, 0));
    }
}
