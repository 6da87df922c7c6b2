//! `trace --svc`: one Service's drops, per backend, with attempts, ratios, reasons and a
//! diagnosis in plain words.
//!
//! The Service's frontends (ClusterIPs, external IPs, NodePorts) and backends (endpoint IP and
//! targetPort) go into the kernel's `ADDR_FILTER` map, each with a tag, so only their packets are
//! counted and sent; drops are counted per tag in the kernel, exactly. Attempts come from the tc
//! counters on the workload interfaces: connection attempts (TCP SYN, new UDP flows) sent by pods
//! to the ClusterIP (the Service's attempts) and delivered to each backend pod. A backend's
//! attempts are those delivered plus those dropped on the way, so the two add up whatever the
//! drop point.
//!
//! Everything here is computed from snapshots (no syscalls), so it is unit-tested without root.

use std::{collections::HashMap, net::IpAddr};

use netdrop_common::{AddrKey, tag};
use serde::Serialize;

use crate::{
    aggregate::ReasonRow,
    classify::{self, Certainty},
    interfaces::{Destination, TcSnapshot},
    resolve::{Proto, ServiceInfo},
};

/// One backend (or pod) the trace watches: an address with its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `namespace/pod`, or the address when the endpoint has no pod.
    pub label: String,
    pub node: Option<String>,
    pub ip: IpAddr,
    /// (port, protocol) pairs; port 0 means any port of any protocol.
    pub ports: Vec<(u16, Proto)>,
    pub ready: bool,
    pub tag: u32,
}

/// A Service's addresses, as the kernel filter and the tc counters need them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcTargets {
    /// `namespace/name`.
    pub service: String,
    /// ClusterIPs and external IPs with their ports, and NodePorts on node addresses.
    pub frontends: Vec<(IpAddr, u16, Proto)>,
    pub backends: Vec<Target>,
}

fn ip_proto(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
    }
}

fn addr_key(ip: IpAddr, port: u16, proto: Proto) -> AddrKey {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => addr[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => addr = v6.octets(),
    }
    AddrKey { addr, port, proto: ip_proto(proto), _pad: 0 }
}

impl SvcTargets {
    /// From the resolver's view of the Service. `node_ips` gives a node's addresses (for
    /// NodePorts). Backends keep a stable order (by pod, then address) so tags stay put across
    /// refreshes when the endpoints do not change.
    pub fn from_service(info: &ServiceInfo, node_ips: &dyn Fn(&str) -> Vec<IpAddr>) -> Self {
        let mut frontends = Vec::new();
        for p in &info.ports {
            for ip in info.cluster_ips.iter().chain(&info.external_ips) {
                frontends.push((*ip, p.port, p.protocol));
            }
        }
        let mut nodes: Vec<&str> = info.backends.iter().filter_map(|b| b.node.as_deref()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for p in info.ports.iter().filter(|p| p.node_port.is_some()) {
            for n in &nodes {
                for ip in node_ips(n) {
                    frontends.push((ip, p.node_port.unwrap_or_default(), p.protocol));
                }
            }
        }
        // One row per endpoint address, whatever the number of ports (a Service with TCP and
        // UDP ports has one endpoint per port per pod).
        let mut by_ip: Vec<Target> = Vec::new();
        for b in &info.backends {
            if let Some(t) = by_ip.iter_mut().find(|t| t.ip == b.ip) {
                if !t.ports.contains(&(b.port, b.protocol)) {
                    t.ports.push((b.port, b.protocol));
                }
                t.ready &= b.ready;
                continue;
            }
            by_ip.push(Target {
                label: match (&b.namespace, &b.pod) {
                    (Some(ns), Some(p)) => format!("{ns}/{p}"),
                    _ => b.ip.to_string(),
                },
                node: b.node.as_deref().map(String::from),
                ip: b.ip,
                ports: vec![(b.port, b.protocol)],
                ready: b.ready,
                tag: 0,
            });
        }
        let mut backends = by_ip;
        for t in &mut backends {
            t.ports.sort_unstable_by_key(|(p, proto)| (*p, ip_proto(*proto)));
        }
        backends.sort_by(|a, b| (&a.label, a.ip).cmp(&(&b.label, b.ip)));
        for (i, b) in backends.iter_mut().enumerate() {
            b.tag = tag::FIRST_BACKEND + i as u32;
        }
        Self { service: format!("{}/{}", info.namespace, info.name), frontends, backends }
    }

    /// Pods as targets (`--pod`, `--namespace`, `--node`): every address of each, any port and
    /// protocol (port 0).
    pub fn from_pods(label: String, pods: &[(crate::resolve::Peer, Vec<IpAddr>)]) -> Self {
        let mut backends = Vec::new();
        for (peer, ips) in pods {
            let name = match (&peer.namespace, &peer.pod) {
                (Some(ns), Some(p)) => format!("{ns}/{p}"),
                _ => peer.node.as_deref().unwrap_or("?").to_string(),
            };
            for ip in ips {
                backends.push(Target {
                    label: name.clone(),
                    node: peer.node.as_deref().map(String::from),
                    ip: *ip,
                    ports: vec![(0, Proto::Tcp)],
                    ready: true,
                    tag: 0,
                });
            }
        }
        backends.sort_by(|a, b| (&a.label, a.ip).cmp(&(&b.label, b.ip)));
        for (i, b) in backends.iter_mut().enumerate() {
            b.tag = tag::FIRST_BACKEND + i as u32;
        }
        Self { service: label, frontends: Vec::new(), backends }
    }

    /// `ADDR_FILTER` entries. A target with port 0 matches any port, for every IP protocol.
    pub fn addr_entries(&self) -> Vec<(AddrKey, u32)> {
        let mut v: Vec<(AddrKey, u32)> =
            self.frontends.iter().map(|(ip, port, proto)| (addr_key(*ip, *port, *proto), tag::FRONTEND)).collect();
        for b in &self.backends {
            for (port, proto) in &b.ports {
                if *port == 0 {
                    for p in [1u8, 6, 17, 58, 132] {
                        let mut k = addr_key(b.ip, 0, *proto);
                        k.proto = p;
                        v.push((k, b.tag));
                    }
                } else {
                    v.push((addr_key(b.ip, *port, *proto), b.tag));
                }
            }
        }
        v
    }

    /// Destinations whose attempts the tc programs count: frontends and backends.
    pub fn destinations(&self) -> Vec<Destination> {
        let tcp_udp = |p: Proto| matches!(p, Proto::Tcp | Proto::Udp);
        self.frontends
            .iter()
            .filter(|(_, _, p)| tcp_udp(*p))
            .map(|(ip, port, proto)| Destination { ip: *ip, port: *port, proto: ip_proto(*proto) })
            .chain(self.backends.iter().flat_map(|b| {
                b.ports
                    .iter()
                    .filter(|(port, proto)| tcp_udp(*proto) && *port != 0)
                    .map(|(port, proto)| Destination { ip: b.ip, port: *port, proto: ip_proto(*proto) })
            }))
            .collect()
    }
}

/// One reason behind a backend's drops.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopReason {
    pub reason: String,
    pub classification: String,
    pub certainty: Certainty,
    pub location: String,
    /// Where the drops happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub count: u64,
}

/// One backend's row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub ip: IpAddr,
    /// Target ports, e.g. `["8080/tcp", "8081/udp"]`.
    pub ports: Vec<String>,
    pub ready: bool,
    /// Delivered to the backend plus dropped on the way; `None` without tc counters.
    pub attempts: Option<u64>,
    pub drops: u64,
    pub drop_ratio: Option<f64>,
    pub top_reasons: Vec<TopReason>,
}

/// Drops that matched the Service's frontends but no backend (before DNAT, or REJECTed for
/// lack of endpoints).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Unmatched {
    pub drops: u64,
    pub top_reasons: Vec<TopReason>,
}

/// The `--svc` summary: `{"type":"summary","service":...}`.
#[derive(Clone, Debug, Serialize)]
pub struct SvcSummary {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub service: String,
    pub time: String,
    pub duration_s: f64,
    /// Final summary (at exit) or periodic.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Connection attempts pods made to the Service's frontends; `None` without tc counters.
    pub attempts: Option<u64>,
    pub drops: u64,
    pub drop_ratio: Option<f64>,
    pub backends: Vec<BackendRow>,
    pub unmatched: Unmatched,
    pub lost_events: u64,
    /// Plain-words diagnosis, first line the headline.
    pub diagnosis: Vec<String>,
    /// The full drop summary (reasons × locations, conntrack), in the final line only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<crate::aggregate::Summary>,
}

fn ratio(drops: u64, attempts: Option<u64>) -> Option<f64> {
    attempts.filter(|a| *a > 0).map(|a| drops as f64 / a as f64)
}

fn top(rows: &[&ReasonRow], node_of: &dyn Fn(u32) -> Option<String>) -> Vec<TopReason> {
    let mut by: HashMap<(String, String, String, Option<String>), (Certainty, u64)> = HashMap::new();
    for r in rows {
        let e = by
            .entry((r.reason.clone(), r.classification.clone(), r.location.clone(), node_of(r.netns)))
            .or_insert((r.certainty, 0));
        e.1 += r.count;
    }
    let mut v: Vec<TopReason> = by
        .into_iter()
        .map(|((reason, classification, location, node), (certainty, count))| TopReason {
            reason,
            classification,
            certainty,
            location,
            node,
            count,
        })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.location.cmp(&b.location)));
    v.truncate(3);
    v
}

/// Inputs of [`build`] besides the targets.
pub struct Observed<'a> {
    /// The kernel's counter rows (shown ones; each carries its `tag`).
    pub rows: &'a [ReasonRow],
    /// tc counters, when the workload interfaces are watched.
    pub tc: Option<&'a TcSnapshot>,
    /// Node of a network namespace (a node's own, or a pod's on it).
    pub node_of: &'a dyn Fn(u32) -> Option<String>,
    pub lost_events: u64,
    pub duration_s: f64,
    pub time: String,
    pub is_final: bool,
}

/// The table and diagnosis for one moment.
pub fn build(t: &SvcTargets, o: &Observed<'_>) -> SvcSummary {
    let dest = |ip: IpAddr, port: u16, proto: Proto| Destination { ip, port, proto: ip_proto(proto) };
    let attempts = o.tc.map(|tc| {
        t.frontends.iter().map(|(ip, port, proto)| tc.attempts_to(&dest(*ip, *port, *proto)).0).sum::<u64>()
    });
    let mut backends = Vec::with_capacity(t.backends.len());
    for b in &t.backends {
        let rows: Vec<&ReasonRow> = o.rows.iter().filter(|r| r.tag == b.tag && !r.hidden).collect();
        let drops: u64 = rows.iter().map(|r| r.count).sum();
        let attempts = o.tc.map(|tc| {
            b.ports.iter().map(|(port, proto)| tc.attempts_to(&dest(b.ip, *port, *proto)).1).sum::<u64>() + drops
        });
        backends.push(BackendRow {
            pod: b.label.clone(),
            node: b.node.clone(),
            ip: b.ip,
            ports: b.ports.iter().map(|(p, proto)| format!("{p}/{}", proto.as_str().to_ascii_lowercase())).collect(),
            ready: b.ready,
            attempts,
            drops,
            drop_ratio: ratio(drops, attempts),
            top_reasons: top(&rows, o.node_of),
        });
    }
    let unmatched_rows: Vec<&ReasonRow> = o.rows.iter().filter(|r| r.tag == tag::FRONTEND && !r.hidden).collect();
    let unmatched = Unmatched { drops: unmatched_rows.iter().map(|r| r.count).sum(), top_reasons: top(&unmatched_rows, o.node_of) };
    let drops = backends.iter().map(|b| b.drops).sum::<u64>() + unmatched.drops;
    // Pods, namespaces and nodes have no frontends: their attempts are their own.
    let attempts = if t.frontends.is_empty() { o.tc.map(|_| backends.iter().filter_map(|b| b.attempts).sum()) } else { attempts };
    let mut s = SvcSummary {
        kind: "summary",
        service: t.service.clone(),
        time: o.time.clone(),
        duration_s: o.duration_s,
        is_final: o.is_final,
        attempts,
        drops,
        drop_ratio: ratio(drops, attempts),
        backends,
        unmatched,
        lost_events: o.lost_events,
        diagnosis: Vec::new(),
        detail: None,
    };
    s.diagnosis = diagnose(&s);
    s
}

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// The share of a Service's backend drops that "carries" it: 90%.
const MOST_DROPS: f64 = 0.9;

/// How many of `bad` (sorted by drops, most first) it takes to account for [`MOST_DROPS`] of
/// their drops.
fn carriers_of_most(bad: &[&BackendRow]) -> usize {
    let total: u64 = bad.iter().map(|b| b.drops).sum();
    let mut sum = 0;
    for (i, b) in bad.iter().enumerate() {
        sum += b.drops;
        if sum as f64 >= MOST_DROPS * total as f64 {
            return i + 1;
        }
    }
    bad.len()
}

fn at(b: &BackendRow) -> String {
    match &b.node {
        Some(n) => format!("{} on {n}", b.pod),
        None => b.pod.clone(),
    }
}

fn why(r: &TopReason) -> String {
    let inferred = if r.certainty == Certainty::Inferred { ", inferred" } else { "" };
    let place = r.node.as_ref().map(|n| format!(" on {n}")).unwrap_or_default();
    format!("{} ({} at {}{place}{inferred})", r.classification, r.reason, r.location)
}

/// Which backends and nodes carry the drops, the share of the Service's attempts they explain,
/// why, and what to check next.
pub fn diagnose(s: &SvcSummary) -> Vec<String> {
    let mut out = Vec::new();
    if s.backends.is_empty() {
        out.push(format!(
            "{} has no endpoints: kube-proxy rejects its packets (ICMP/RST); check the selector and the pods' readiness (`kubectl get endpointslices -l kubernetes.io/service-name=...`)",
            s.service
        ));
    }
    if s.drops == 0 {
        let tried = s.attempts.map_or_else(String::new, |a| format!(" of {a} attempts"));
        out.push(format!("{}: no drops{tried}.", s.service));
        return out;
    }
    out.push(format!(
        "{}: {} drops{} ({} of attempts).",
        s.service,
        s.drops,
        s.attempts.map_or_else(String::new, |a| format!(" for {a} attempts")),
        pct(s.drop_ratio)
    ));
    let mut bad: Vec<&BackendRow> = s.backends.iter().filter(|b| b.drops > 0).collect();
    bad.sort_by(|a, b| b.drops.cmp(&a.drops));
    let share_of_drops = |n: u64| n as f64 / s.drops as f64;
    // Drops concentrated on a few backends: name them; spread over all: say so. Judged by the
    // drops, not by how many backends have any: one bad backend with a stray drop or two on the
    // others (a late retransmission meeting a TIME_WAIT socket) is still one bad backend.
    let carriers = carriers_of_most(&bad);
    let concentrated = carriers > 0 && carriers * 2 <= s.backends.len().max(1);
    for b in bad.iter().take(5) {
        let explains = s.attempts.filter(|a| *a > 0).map(|a| b.drops as f64 / a as f64);
        let reason = b.top_reasons.first().map(why).unwrap_or_default();
        out.push(format!(
            "{}: {} drops ({:.0}% of the drops{}; {} of its own attempts): {reason}.",
            at(b),
            b.drops,
            share_of_drops(b.drops) * 100.0,
            explains.map_or_else(String::new, |e| format!(", {:.1}% of the Service's attempts", e * 100.0)),
            pct(b.drop_ratio),
        ));
    }
    if bad.len() > 5 {
        out.push(format!("... and {} more backends with drops.", bad.len() - 5));
    }
    if concentrated {
        let healthy: Vec<String> = s.backends.iter().filter(|b| b.drops == 0).map(at).collect();
        if !healthy.is_empty() {
            out.push(format!("Healthy: {}.", healthy.join(", ")));
        }
        let mut nodes: Vec<&str> = bad.iter().take(carriers).filter_map(|b| b.node.as_deref()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        if !nodes.is_empty() {
            out.push(format!("The drops are on {}: look there first.", nodes.join(", ")));
        }
    } else if !bad.is_empty() {
        out.push("The drops are spread over most backends: suspect something they share (the client's node, conntrack, DNS, a policy on every backend).".into());
    }
    if s.unmatched.drops > 0 {
        let reason = s.unmatched.top_reasons.first().map(why).unwrap_or_default();
        out.push(format!(
            "{} drops matched the Service's address but no backend (before DNAT, or rejected for lack of endpoints): {reason}.",
            s.unmatched.drops
        ));
    }
    let mut classes: Vec<&str> = bad
        .iter()
        .flat_map(|b| b.top_reasons.iter())
        .chain(&s.unmatched.top_reasons)
        .map(|r| r.classification.as_str())
        .collect();
    classes.dedup();
    let mut seen = Vec::new();
    for c in classes {
        if seen.contains(&c) {
            continue;
        }
        seen.push(c);
        if let Some(h) = classify::hint(c) {
            out.push(format!("Next ({c}): {h}."));
        }
    }
    out
}

/// The live table (text), redrawn about once a second in a terminal.
pub fn render(s: &SvcSummary) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} — attempts {}  drops {}  ({})  {:.0}s",
        s.service,
        s.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
        s.drops,
        pct(s.drop_ratio),
        s.duration_s
    );
    let label = |b: &BackendRow| if b.ready { b.pod.clone() } else { format!("{} (not ready)", b.pod) };
    // Long pod names widen the column rather than push the numbers out of line.
    let w = s.backends.iter().map(|b| label(b).chars().count()).max().unwrap_or(0).max(32);
    let _ = writeln!(o, "{:<w$} {:<12} {:>9} {:>7} {:>7}  TOP REASON", "BACKEND", "NODE", "ATTEMPTS", "DROPS", "DROP%");
    for b in &s.backends {
        let _ = writeln!(
            o,
            "{:<w$} {:<12} {:>9} {:>7} {:>7}  {}",
            label(b),
            b.node.as_deref().unwrap_or("-"),
            b.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
            b.drops,
            pct(b.drop_ratio),
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
    if s.lost_events > 0 {
        let _ = writeln!(o, "({} events lost; counts above are exact)", s.lost_events);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        interfaces::{DestinationSnapshot, WatchStats},
        resolve::{Backend, Name, ServicePort},
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
            ports: vec![ServicePort { name: None, port: 80, protocol: Proto::Tcp, target_port: "8080".into(), node_port: None }],
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
            tag,
        }
    }

    fn tc(targets: &SvcTargets, attempts: u64, delivered: &[(u32, u64)]) -> TcSnapshot {
        let mut destinations = vec![DestinationSnapshot {
            node: "node-a".into(),
            dest: Destination { ip: targets.frontends[0].0, port: 80, proto: 6 },
            from_pod: attempts,
            to_pod: 0,
        }];
        for (tag, n) in delivered {
            let b = targets.backends.iter().find(|b| b.tag == *tag).expect("backend");
            destinations.push(DestinationSnapshot {
                node: b.node.clone().unwrap_or_default(),
                dest: Destination { ip: b.ip, port: b.ports[0].0, proto: 6 },
                from_pod: 0,
                to_pod: *n,
            });
        }
        TcSnapshot { interfaces: vec![], destinations, stats: WatchStats::default() }
    }

    #[test]
    fn targets_are_tagged_in_a_stable_order() {
        let t = SvcTargets::from_service(&info(), &|_| vec![]);
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
        let t = SvcTargets::from_service(&info(), &|_| vec![]);
        let bad = t.backends[2].tag;
        let rows = vec![row(bad, 330, 99)];
        let snap = tc(&t, 1000, &[(1, 335), (2, 335), (bad, 0)]);
        let node_of = |n: u32| (n == 99).then(|| "node-b".to_string());
        let s = build(
            &t,
            &Observed { rows: &rows, tc: Some(&snap), node_of: &node_of, lost_events: 0, duration_s: 10.0, time: String::new(), is_final: true },
        );
        assert_eq!(s.attempts, Some(1000));
        assert_eq!(s.drops, 330);
        let b = &s.backends[2];
        assert_eq!((b.attempts, b.drops), (Some(330), 330));
        assert_eq!(b.drop_ratio, Some(1.0));
        assert_eq!(b.top_reasons[0].node.as_deref(), Some("node-b"));
        let text = s.diagnosis.join("\n");
        assert!(text.contains("default/web-2 on node-b: 330 drops (100% of the drops, 33.0% of the Service's attempts"), "{text}");
        assert!(text.contains("The drops are on node-b"), "{text}");
        assert!(text.contains("Next (netfilter_rule)"), "{text}");
        assert!(render(&s).contains("default/web-2"));
    }

    /// 164 drops on one backend and one stray drop on each of two others: still one bad backend.
    #[test]
    fn stray_drops_elsewhere_do_not_hide_the_bad_backend() {
        let t = SvcTargets::from_service(&info(), &|_| vec![]);
        let bad = t.backends[0].tag;
        let rows = vec![row(bad, 164, 98), row(t.backends[1].tag, 1, 98), row(t.backends[2].tag, 1, 99)];
        let snap = tc(&t, 500, &[(bad, 328), (t.backends[1].tag, 170), (t.backends[2].tag, 166)]);
        let node_of = |n: u32| Some(if n == 98 { "node-a" } else { "node-b" }.to_string());
        let s = build(
            &t,
            &Observed { rows: &rows, tc: Some(&snap), node_of: &node_of, lost_events: 0, duration_s: 5.0, time: String::new(), is_final: true },
        );
        let text = s.diagnosis.join("\n");
        assert!(text.contains("The drops are on node-a: look there first."), "{text}");
        assert!(!text.contains("spread over most backends"), "{text}");
        // Evenly spread drops are still called spread.
        let rows = vec![row(bad, 50, 98), row(t.backends[1].tag, 40, 98), row(t.backends[2].tag, 45, 99)];
        let s = build(
            &t,
            &Observed { rows: &rows, tc: Some(&snap), node_of: &node_of, lost_events: 0, duration_s: 5.0, time: String::new(), is_final: true },
        );
        assert!(s.diagnosis.join("\n").contains("spread over most backends"), "{:?}", s.diagnosis);
    }

    #[test]
    fn healthy_service_says_no_drops() {
        let t = SvcTargets::from_service(&info(), &|_| vec![]);
        let snap = tc(&t, 500, &[(1, 167), (2, 167), (3, 166)]);
        let s = build(
            &t,
            &Observed { rows: &[], tc: Some(&snap), node_of: &|_| None, lost_events: 0, duration_s: 1.0, time: String::new(), is_final: true },
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
        let pods = [(peer("web-3", "node-b"), vec!["10.244.2.5".parse().expect("ip")]), (peer("web-4", "node-b"), vec!["10.244.2.6".parse().expect("ip")])];
        let t = SvcTargets::from_pods("pod default/web-3".into(), &pods[..1]);
        let snap = TcSnapshot { interfaces: vec![], destinations: vec![], stats: WatchStats::default() };
        let rows = vec![row(t.backends[0].tag, 23, 99)];
        let node_of = |_: u32| Some("node-b".to_string());
        let obs = |rows| Observed { rows, tc: Some(&snap), node_of: &node_of, lost_events: 0, duration_s: 5.0, time: String::new(), is_final: true };
        let s = build(&t, &obs(&rows));
        assert_eq!(s.backends[0].attempts, Some(23));
        assert_eq!((s.attempts, s.drops), (Some(23), 23), "the pod's own attempts: {s:?}");
        assert_eq!(s.diagnosis[0], "pod default/web-3: 23 drops for 23 attempts (100.0% of attempts).");
        // Two pods of a node: the sum of their rows.
        let t = SvcTargets::from_pods("node node-b".into(), &pods);
        let rows = vec![row(t.backends[0].tag, 23, 99)];
        let s = build(&t, &obs(&rows));
        let sum: u64 = s.backends.iter().filter_map(|b| b.attempts).sum();
        assert_eq!(s.attempts, Some(sum));
        // Without tc counters nobody knows the attempts.
        let s = build(&t, &Observed { rows: &rows, tc: None, node_of: &node_of, lost_events: 0, duration_s: 5.0, time: String::new(), is_final: true });
        assert_eq!(s.attempts, None);
    }

    #[test]
    fn frontend_only_drops_are_unmatched() {
        let t = SvcTargets::from_service(&info(), &|_| vec![]);
        let rows = vec![row(tag::FRONTEND, 7, 1)];
        let s = build(
            &t,
            &Observed { rows: &rows, tc: None, node_of: &|_| None, lost_events: 0, duration_s: 1.0, time: String::new(), is_final: false },
        );
        assert_eq!((s.unmatched.drops, s.drops, s.attempts), (7, 7, None));
        assert!(s.diagnosis.iter().any(|l| l.contains("7 drops matched the Service's address but no backend")));
    }
}
