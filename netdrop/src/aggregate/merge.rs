//! Merging target summaries: each node's netdrop sees only its own kernel's drops and tc
//! counters; their parts ([`super::target_summary::build_part`]) add up to the table one
//! process watching every node computes.

use std::net::IpAddr;

use super::target_summary::{
    BackendRow, Basis, Clash, NodeCount, TargetSummary, TopReason, Unmatched, rank, sum_nodes,
};

/// Why parts cannot be merged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("no parts to merge")]
    Empty,
    /// A summary whose reason lists were cut to the top few: merged, its reasons would rank
    /// wrong.
    #[error(
        "summary {index} of {target} is not a node's part (its reasons are only the top ones): build it with build_part"
    )]
    NotAPart { index: usize, target: String },
    #[error("summary {index} is of {found}, not {target}: parts of one target trace only")]
    OtherTarget {
        index: usize,
        target: String,
        found: String,
    },
}

fn ratio(drops: u64, attempts: Option<u64>) -> Option<f64> {
    attempts.filter(|a| *a > 0).map(|a| drops as f64 / a as f64)
}

fn merge_reasons<'a>(lists: impl Iterator<Item = &'a [TopReason]>) -> Vec<TopReason> {
    rank(lists.flatten().cloned())
}

fn merge_nodes<'a>(lists: impl Iterator<Item = &'a [NodeCount]>) -> Vec<NodeCount> {
    sum_nodes(lists.flatten().cloned())
}

impl TargetSummary {
    /// Adds up several nodes' parts of one target trace into the table one process watching
    /// every node computes: backend rows joined by node + backend IP, attempts, drops,
    /// lossless discards, resets and per-node drop counts summed, reasons re-ranked from the
    /// summed counts, and ratios and the diagnosis computed again from the sums (never
    /// averaged). A backend's name, ports and readiness come from the first part that has its
    /// row; attempts are known only when every part knew its own (each node had tc counters).
    /// `detail` is left out: the full drop summary is one kernel's (its namespaces and
    /// locations), so a cluster-wide trace shows each node's apart.
    pub fn merge(parts: &[TargetSummary]) -> Result<TargetSummary, MergeError> {
        let mut s = merged(parts)?;
        s.keep_top_reasons();
        s.diagnose();
        Ok(s)
    }
}

/// The sum of the parts, still a part (every reason kept), without a diagnosis.
fn merged(parts: &[TargetSummary]) -> Result<TargetSummary, MergeError> {
    let first = parts.first().ok_or(MergeError::Empty)?;
    for (index, p) in parts.iter().enumerate() {
        if !p.basis.part {
            return Err(MergeError::NotAPart {
                index,
                target: p.service.clone(),
            });
        }
        if p.service != first.service || p.basis.pods != first.basis.pods {
            return Err(MergeError::OtherTarget {
                index,
                target: first.service.clone(),
                found: p.service.clone(),
            });
        }
    }
    let tc_everywhere = parts.iter().all(|p| p.attempts.is_some());

    // Rows joined by (node, IP), in the order a target set gives them (by name, then address).
    let mut keys: Vec<(&str, IpAddr, Option<&str>)> = parts
        .iter()
        .flat_map(|p| &p.backends)
        .map(|b| (b.pod.as_str(), b.ip, b.node.as_deref()))
        .collect();
    keys.sort_unstable();
    let mut seen = std::collections::HashSet::new();
    keys.retain(|(_, ip, node)| seen.insert((*ip, *node)));
    let backends: Vec<BackendRow> = keys
        .into_iter()
        .map(|(_, ip, node)| {
            let rows: Vec<&BackendRow> = parts
                .iter()
                .flat_map(|p| &p.backends)
                .filter(|b| b.ip == ip && b.node.as_deref() == node)
                .collect();
            let like = rows[0];
            let attempts = tc_everywhere.then(|| rows.iter().filter_map(|b| b.attempts).sum());
            let drops = rows.iter().map(|b| b.drops).sum();
            BackendRow {
                pod: like.pod.clone(),
                node: like.node.clone(),
                ip,
                ports: like.ports.clone(),
                ready: like.ready,
                attempts,
                drops,
                drop_ratio: ratio(drops, attempts),
                top_reasons: merge_reasons(rows.iter().map(|b| b.top_reasons.as_slice())),
                drops_by_node: merge_nodes(rows.iter().map(|b| b.drops_by_node.as_slice())),
                lossless: rows.iter().map(|b| b.lossless).sum(),
                resets: rows.iter().map(|b| b.resets).sum(),
                discard_reasons: merge_reasons(rows.iter().map(|b| b.discard_reasons.as_slice())),
            }
        })
        .collect();

    let un = parts.iter().map(|p| &p.unmatched);
    let unmatched = Unmatched {
        drops: un.clone().map(|u| u.drops).sum(),
        top_reasons: merge_reasons(un.clone().map(|u| u.top_reasons.as_slice())),
        drops_by_node: merge_nodes(un.clone().map(|u| u.drops_by_node.as_slice())),
        lossless: un.clone().map(|u| u.lossless).sum(),
        resets: un.clone().map(|u| u.resets).sum(),
        discard_reasons: merge_reasons(un.map(|u| u.discard_reasons.as_slice())),
    };
    let drops = backends.iter().map(|b| b.drops).sum::<u64>() + unmatched.drops;
    // A Service's attempts are those its clients sent to its frontends, counted on each
    // client's node; pods, namespaces and nodes have no frontends: their attempts are the rows'.
    let attempts = if first.basis.pods {
        tc_everywhere.then(|| backends.iter().filter_map(|b| b.attempts).sum())
    } else {
        // `None` unless every part knows its own (its node had tc counters).
        parts.iter().map(|p| p.attempts).sum()
    };
    let mut clashes: Vec<Clash> = parts.iter().flat_map(|p| p.basis.clashes.iter().cloned()).collect();
    clashes.sort_by(|a, b| (&a.place, a.netns).cmp(&(&b.place, b.netns)));
    Ok(TargetSummary {
        kind: first.kind,
        service: first.service.clone(),
        time: parts
            .iter()
            .map(|p| p.time.as_str())
            .max()
            .unwrap_or_default()
            .to_string(),
        duration_s: parts.iter().map(|p| p.duration_s).fold(0.0, f64::max),
        is_final: parts.iter().all(|p| p.is_final),
        attempts,
        drops,
        drop_ratio: ratio(drops, attempts),
        lossless: backends.iter().map(|b| b.lossless).sum::<u64>() + unmatched.lossless,
        resets: backends.iter().map(|b| b.resets).sum::<u64>() + unmatched.resets,
        backends,
        unmatched,
        other_namespaces: parts.iter().map(|p| p.other_namespaces).sum(),
        lost_events: parts.iter().map(|p| p.lost_events).sum(),
        diagnosis: Vec::new(),
        detail: None,
        basis: Basis {
            part: true,
            pods: first.basis.pods,
            clashes,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use netdrop_common::{Config, DropKey, class, ct, effect, stat, tag};

    use super::*;
    use crate::{
        aggregate::{
            self, SummaryContext,
            attach::AttachReport,
            target_set::TargetSet,
            target_summary::{Observed, build, build_part},
        },
        enrich::{
            classify::{Certainty, Classifier, Facts},
            visibility::Visibility,
        },
        kernel::{reasons::ReasonTable, symbols::KernelSymbols},
        probe::{KernelCounts, tc::TcMode},
        source::{
            conntrack::{CtSampler, CtStats},
            interfaces::{Counters, Destination, DestinationSnapshot, InterfaceSnapshot, TcSnapshot, WatchStats},
        },
    };

    const REASONS: &str = r#"print fmt: "reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 5, "TCP_FLAGS" }, { 12, "NETFILTER_DROP" }, { 30, "TCP_RFC7323_PAWS" }, { 60, "PKT_TOO_BIG" }, { 104, "QUEUE_PURGE" })"#;
    const KALLSYMS: &str = "ffffffff81a00000 T tcp_v4_rcv\nffffffff81a10000 T tcp_v4_do_rcv\nffffffff81b00000 t nft_do_chain\nffffffff81c00000 T nf_hook_slow\nffffffff81d00000 T ip_forward\nffffffff81e00000 T skb_rbtree_purge\nffffffff81f00000 T sk_stream_kill_queues\n";
    const TCP_RCV: u64 = 0xffff_ffff_81a0_0080;
    const DO_RCV: u64 = 0xffff_ffff_81a1_01c0;
    const NFT: u64 = 0xffff_ffff_81b0_03e8;
    const HOOK_SLOW: u64 = 0xffff_ffff_81c0_007d;
    const FORWARD: u64 = 0xffff_ffff_81d0_02c0;
    const PURGE: u64 = 0xffff_ffff_81e0_004d;
    const KILL_QUEUES: u64 = 0xffff_ffff_81f0_0057;

    // Network namespaces of the lab: the two nodes, their pods, and two of no watched node
    // (the upstream router, another cluster's node).
    const NODE_A: u32 = 4_026_532_100;
    const WEB0: u32 = 4_026_532_101;
    const WEB1: u32 = 4_026_532_102;
    const CLIENT_A: u32 = 4_026_532_103;
    const NODE_B: u32 = 4_026_532_200;
    const WEB2: u32 = 4_026_532_201;
    const CLIENT_B: u32 = 4_026_532_202;
    const ROUTER: u32 = 4_026_532_300;
    const STRANGER: u32 = 4_026_532_301;

    fn node_of(netns: u32) -> Option<String> {
        match netns {
            NODE_A | WEB0 | WEB1 | CLIENT_A => Some("node-a".into()),
            NODE_B | WEB2 | CLIENT_B => Some("node-b".into()),
            _ => None,
        }
    }

    /// Which node's netdrop counts a namespace: its own node's; the two namespaces of no
    /// watched node are each on one kernel, so their drops are in both parts under one name.
    fn counted_by(netns: u32) -> &'static str {
        match (node_of(netns).as_deref(), netns) {
            (Some("node-a"), _) | (None, ROUTER) => "node-a",
            _ => "node-b",
        }
    }

    // The lab's Service, the same one the golden JSON lines are made from.
    use crate::golden::service;

    fn key(tag: u32, reason: u32, location: u64, netns: u32, eff: u8) -> DropKey {
        DropKey {
            location,
            reason,
            netns,
            ip_version: 4,
            ct_state: ct::NONE,
            exact_class: 0,
            effect: eff,
            tag,
            netns_cookie: u64::from(netns),
        }
    }

    /// The kernel's counters at the end of a lab run of the headline (web-2's node drops its
    /// SYNs), with what else a real run has: an insert failure race on the client's node, a
    /// backend refusing some SYNs inside its own namespace, stale ACKs and resets, drops before
    /// DNAT on both nodes, the client's purged out-of-order tails, and drops in namespaces of
    /// no watched node. Those last are web-2's fourth reason in node-b's view and its second in
    /// the sum: parts cut to the top three would lose it.
    fn lab_counts(t: &TargetSet) -> KernelCounts {
        let (web0, web1, web2) = (t.backends[0].tag, t.backends[1].tag, t.backends[2].tag);
        let fe = tag::FRONTEND;
        let (att, data, stale, reset, unknown) = (
            effect::ATTEMPT,
            effect::DATA,
            effect::LOSSLESS,
            effect::RESET,
            effect::UNKNOWN,
        );
        // The kernel program saw the insert fail (exact), or the entry was left unconfirmed
        // after SNAT (inferred).
        let insert_failed = |k| DropKey {
            ct_state: ct::UNCONFIRMED,
            exact_class: class::INSERT_FAILED,
            ..k
        };
        let snat_done = |k| DropKey {
            ct_state: ct::UNCONFIRMED | ct::SRC_NAT_DONE,
            ..k
        };
        let mut stats = [0u64; stat::COUNT as usize];
        stats[stat::EVENTS_LOST as usize] = 5;
        KernelCounts {
            drops: vec![
                (key(web2, 12, NFT, NODE_B, att), 152),
                (key(web2, 3, TCP_RCV, WEB2, att), 10),
                (key(web2, 60, FORWARD, NODE_B, data), 9),
                (insert_failed(key(web2, 12, HOOK_SLOW, NODE_A, att)), 6),
                (snat_done(key(web2, 12, HOOK_SLOW, NODE_A, att)), 2),
                (insert_failed(key(web2, 12, HOOK_SLOW, ROUTER, att)), 7),
                (snat_done(key(web2, 12, HOOK_SLOW, STRANGER, att)), 7),
                (key(web0, 30, TCP_RCV, WEB0, stale), 3),
                (key(web0, 5, DO_RCV, NODE_A, reset), 2),
                (key(web0, 5, DO_RCV, NODE_B, reset), 2),
                (key(web1, 3, TCP_RCV, WEB1, att), 1),
                (key(fe, 12, NFT, NODE_A, att), 5),
                (key(fe, 12, NFT, NODE_B, att), 6),
                (key(fe, 2, PURGE, CLIENT_A, data), 4),
                (key(fe, 2, PURGE, CLIENT_B, data), 3),
                (key(fe, 104, KILL_QUEUES, CLIENT_A, unknown), 40),
                (key(0, 3, TCP_RCV, NODE_A, att), 11),
                (key(web1, 3, TCP_RCV, WEB1, att), 0),
            ],
            stats,
        }
    }

    /// The tc counters of that run: the clients on both nodes sent to the ClusterIP; web-0 and
    /// web-1 had theirs delivered, web-2 none (all dropped on node-b before delivery).
    fn lab_tc(t: &TargetSet) -> TcSnapshot {
        let iface = |node: &str, ifindex: u32, peer: u32| InterfaceSnapshot {
            node: node.into(),
            netns: if node == "node-a" { NODE_A } else { NODE_B },
            ifindex,
            name: format!("cali{ifindex}"),
            peer_ifindex: Some(2),
            peer_netnsid: Some(0),
            peer_netns: Some(peer),
            mode: TcMode::Tcx,
            attached_unix_ms: 0,
            from_pod: Counters::default(),
            to_pod: Counters::default(),
        };
        let dest = |node: &str, ip, port, from_pod, to_pod| DestinationSnapshot {
            node: node.into(),
            dest: Destination { ip, port, proto: 6 },
            from_pod,
            to_pod,
        };
        let fe = t.frontends[0].0;
        TcSnapshot {
            interfaces: vec![
                iface("node-a", 10, WEB0),
                iface("node-a", 11, WEB1),
                iface("node-a", 12, CLIENT_A),
                iface("node-b", 20, WEB2),
                iface("node-b", 21, CLIENT_B),
            ],
            destinations: vec![
                dest("node-a", fe, 80, 300, 0),
                dest("node-b", fe, 80, 200, 0),
                dest("node-a", t.backends[0].ip, 8080, 0, 166),
                dest("node-a", t.backends[1].ip, 8080, 0, 163),
                dest("node-b", t.backends[2].ip, 8080, 0, 10),
            ],
            stats: WatchStats::default(),
        }
    }

    /// Resolved clashes on both nodes (DNS pairs), none dropped.
    fn lab_conntrack() -> Vec<(u32, CtStats)> {
        let clashes = |n| CtStats {
            count: 40,
            max: 262_144,
            clash_resolve: n,
            ..CtStats::default()
        };
        vec![(NODE_A, clashes(4)), (NODE_B, clashes(2))]
    }

    /// The counters summed the way the trace's summarizer does (the same classifier, the same
    /// visibility), then the target table built from the summary's rows.
    fn summarize(counts: &KernelCounts, conntrack: Vec<(u32, CtStats)>) -> aggregate::Summary {
        let reasons = ReasonTable::from_print_fmt(REASONS).expect("reasons");
        let symbols = Arc::new(KernelSymbols::parse(KALLSYMS));
        let mut cfg = Config::DEFAULT;
        for r in [2, 3, 5, 12, 30, 60] {
            cfg.set_emit(r, true);
        }
        let visibility = Visibility::new(&cfg, true);
        let classifier = Classifier::new(false, CtSampler::idle());
        let classify_row = |k: &DropKey, function: Option<&str>| {
            let reason = reasons.reason(k.reason);
            let facts = Facts {
                reason: &reason,
                function,
                ct_state: k.ct_state,
                kernel_class: k.exact_class,
            };
            classifier.row(&facts, k)
        };
        let ctx = SummaryContext {
            reasons: &reasons,
            symbols: &symbols,
            visibility: &visibility,
            node: "lab",
            attach: &AttachReport::default(),
            classify: &classify_row,
            conntrack,
        };
        let mut s = aggregate::summarize(counts, &ctx, 7.0, 0);
        s.time = "2026-11-26T09:52:04Z".into();
        s
    }

    fn observed<'a>(summary: &'a aggregate::Summary, tc: &'a TcSnapshot, nodes_given: bool) -> Observed<'a> {
        Observed {
            rows: &summary.drops,
            tc: Some(tc),
            node_of: &node_of,
            nodes_given,
            lost_events: summary.lost_events,
            conntrack: &summary.conntrack,
            duration_s: 7.0,
            time: summary.time.clone(),
            is_final: true,
        }
    }

    /// Each node's share of the run: the counters of its namespaces (and of the namespace of
    /// no watched node its kernel has), its interfaces and destinations, its conntrack, its
    /// lost events.
    fn split(counts: &KernelCounts, tc: &TcSnapshot, node: &str) -> (KernelCounts, TcSnapshot, Vec<(u32, CtStats)>) {
        let mut stats = counts.stats;
        stats[stat::EVENTS_LOST as usize] = if node == "node-a" { 2 } else { 3 };
        let part = KernelCounts {
            drops: counts
                .drops
                .iter()
                .filter(|(k, _)| counted_by(k.netns) == node)
                .copied()
                .collect(),
            stats,
        };
        let tc = TcSnapshot {
            interfaces: tc.interfaces.iter().filter(|i| i.node == node).cloned().collect(),
            destinations: tc.destinations.iter().filter(|d| d.node == node).cloned().collect(),
            stats: tc.stats,
        };
        let ct = lab_conntrack()
            .into_iter()
            .filter(|(netns, _)| counted_by(*netns) == node)
            .collect();
        (part, tc, ct)
    }

    /// One process watching both nodes, and each node's netdrop seeing only its own kernel,
    /// merged: the same table, the same diagnosis. The parts cross the wire as JSON.
    #[test]
    fn parts_of_each_node_add_up_to_the_table_of_one_process() {
        let t = TargetSet::from_service(&service(), &|_| vec![]);
        let counts = lab_counts(&t);
        let tc = lab_tc(&t);
        for nodes_given in [false, true] {
            let whole_summary = summarize(&counts, lab_conntrack());
            let whole = build(&t, &observed(&whole_summary, &tc, nodes_given));

            let parts: Vec<TargetSummary> = ["node-a", "node-b"]
                .into_iter()
                .map(|node| {
                    let (c, tc, ct) = split(&counts, &tc, node);
                    let summary = summarize(&c, ct);
                    let part = build_part(&t, &observed(&summary, &tc, nodes_given));
                    let json = serde_json::to_string(&part).expect("part to JSON");
                    let back: TargetSummary = serde_json::from_str(&json).expect("part from JSON");
                    assert_eq!(back, part, "a part survives the wire: {json}");
                    back
                })
                .collect();
            let merged = TargetSummary::merge(&parts).expect("merge");
            assert_eq!(merged, whole, "nodes_given {nodes_given}");
            assert_eq!(merged.diagnosis, whole.diagnosis);

            // What makes this a test of more than addition: the whole's numbers, and a second
            // reason that node-b's top three leave out.
            let web2 = &whole.backends[2];
            // web-2: 152 + 10 + 9 + 8 on the nodes, 14 elsewhere; web-1: 1; before a backend:
            // 11 rule drops and 7 purged tails.
            let elsewhere = if nodes_given { 0 } else { 14 };
            assert_eq!((whole.attempts, whole.drops), (Some(500), 179 + 1 + 18 + elsewhere));
            // Delivered, plus SYNs dropped before delivery (not the 10 refused inside web-2).
            assert_eq!(web2.attempts, Some(10 + 152 + 8 + elsewhere));
            if nodes_given {
                assert_eq!(whole.other_namespaces, 14);
            } else {
                let second = &web2.top_reasons[1];
                assert_eq!(
                    (second.node.as_deref(), second.count),
                    (None, 14),
                    "{:?}",
                    web2.top_reasons
                );
                assert_eq!(
                    second.certainty,
                    Certainty::Inferred,
                    "exact on one kernel, inferred on the other"
                );
                let on_b = &parts[1].backends[2].top_reasons;
                assert!(on_b.len() > 3 && on_b[..3].iter().all(|r| r.node.is_some()), "{on_b:?}");
                let cut: Vec<TargetSummary> = parts
                    .iter()
                    .map(|p| {
                        let mut p = p.clone();
                        p.keep_top_reasons();
                        p.basis.part = true;
                        p
                    })
                    .collect();
                let wrong = TargetSummary::merge(&cut).expect("merge");
                assert_ne!(
                    wrong.backends[2].top_reasons, web2.top_reasons,
                    "top threes do not add up"
                );
            }
            assert_eq!(
                web2.drops_by_node,
                [
                    NodeCount {
                        node: Some("node-b".into()),
                        count: 171
                    },
                    NodeCount {
                        node: Some("node-a".into()),
                        count: 8
                    }
                ]
                .into_iter()
                .chain((!nodes_given).then_some(NodeCount { node: None, count: 14 }))
                .collect::<Vec<_>>()
            );
            assert_eq!((whole.backends[0].lossless, whole.backends[0].resets), (3, 4));
            assert_eq!(whole.lost_events, 5);
            let text = whole.diagnosis.join("\n");
            assert!(text.contains("default/web-2 on node-b: "), "{text}");
            assert!(text.contains("node-a: 4 conntrack clashes resolved"), "{text}");
            assert!(text.contains("node-b: 2 conntrack clashes resolved"), "{text}");
        }
    }

    /// Only parts merge, and only parts of one target.
    #[test]
    fn lines_and_other_targets_are_refused() {
        let t = TargetSet::from_service(&service(), &|_| vec![]);
        let counts = lab_counts(&t);
        let tc = lab_tc(&t);
        let summary = summarize(&counts, vec![]);
        let line = build(&t, &observed(&summary, &tc, false));
        assert!(matches!(
            TargetSummary::merge(&[line]),
            Err(MergeError::NotAPart { index: 0, .. })
        ));
        let part = build_part(&t, &observed(&summary, &tc, false));
        let other = TargetSummary {
            service: "default/db".into(),
            ..part.clone()
        };
        assert!(matches!(
            TargetSummary::merge(&[part.clone(), other]),
            Err(MergeError::OtherTarget { index: 1, .. })
        ));
        assert_eq!(TargetSummary::merge(&[]), Err(MergeError::Empty));
        // One part is its own table; its line form leaves the basis out.
        let one = TargetSummary::merge(std::slice::from_ref(&part)).expect("merge");
        assert_eq!(one, build(&t, &observed(&summary, &tc, false)));
        let json = serde_json::to_string(&one).expect("json");
        assert!(!json.contains("basis"), "{json}");
        // A node without tc counters: nobody knows the cluster's attempts.
        let blind = TargetSummary {
            attempts: None,
            backends: part
                .backends
                .iter()
                .map(|b| BackendRow {
                    attempts: None,
                    drop_ratio: None,
                    ..b.clone()
                })
                .collect(),
            ..part.clone()
        };
        let m = TargetSummary::merge(&[part, blind]).expect("merge");
        assert_eq!((m.attempts, m.backends[2].attempts, m.drop_ratio), (None, None, None));
    }
}
