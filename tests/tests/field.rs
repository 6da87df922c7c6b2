//! The rest of the on-call field notes on the lab, each with netdrop's diagnosis checked against
//! the kernel's own counters and the traffic generator:
//! - cross-node only: a path-MTU black hole on the VXLAN overlay (`Ip FragFails`, the ICMP filter's
//!   rule counter) and a node that lost the route to the other node's pod block (the upstream
//!   router's `IpExt InNoRoutes`);
//! - egress to an "external" host (TEST-NET-3, routed only inside the lab) through the node's
//!   SNAT: a policy deny (the rule's counter) and SNAT port exhaustion (`insert_failed`);
//! - DNS over UDP to `kube-system/kube-dns` with a replica per node: one replica's node dropping
//!   UDP/53 (the rule's counter), a full conntrack table (`drop`), and parallel A/AAAA queries
//!   whose conntrack clash the kernel resolves (`clash_resolve`: nothing dropped).
//!
//! One lab at a time (they load the machine and one fault changes a global sysctl).

use std::{sync::Mutex, time::Duration};

use netdrop_tests::{
    Tracer,
    lab::{
        Lab, LabOptions,
        faults::{FaultKind, FaultRecord, FaultRequest},
        net as lab_net,
        topology::Proto,
        traffic::{TrafficOptions, TrafficReport, TrafficShape},
    },
    require_root,
};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn lab() -> Lab {
    Lab::up(&LabOptions::for_test()).unwrap_or_else(|e| panic!("lab up: {e}"))
}

/// Conntrack's own drops (`drop`: a full table, failed inserts) summed over the lab's nodes.
/// `nf_conntrack_max` is global: a test elsewhere lowering it fills these nodes' tables too, and
/// the faults below must not be judged by what that does.
struct CtGuard {
    before: u64,
    max: String,
}

fn ct_drops(lab: &Lab) -> u64 {
    lab.status()
        .nodes
        .iter()
        .map(|n| lab.conntrack_stat(&n.name, "drop").expect("ct stat"))
        .sum()
}

fn ct_max() -> String {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .unwrap_or_default()
        .trim()
        .to_string()
}

impl CtGuard {
    fn new(lab: &Lab) -> Self {
        Self {
            before: ct_drops(lab),
            max: ct_max(),
        }
    }

    /// Panics, saying why, when conntrack dropped packets the fault did not cause.
    fn check(&self, lab: &Lab, expected: u64) {
        let (drops, max) = (ct_drops(lab) - self.before, ct_max());
        assert!(
            drops == expected,
            "conntrack dropped {drops} packets on the lab's nodes ({expected} expected); nf_conntrack_max {} -> {max}: another test changing the global table size interferes, run again",
            self.max
        );
    }
}

/// `netdrop trace` over both lab nodes with these target/filter arguments.
fn trace(lab: &Lab, target: &[&str]) -> Tracer {
    trace_with(lab, target, &[])
}

/// [`trace`], watching more namespaces as "nodes" (`NAME=PATH`).
fn trace_with(lab: &Lab, target: &[&str], more_nodes: &[String]) -> Tracer {
    let st = lab.status();
    let mut args: Vec<String> = target.iter().map(|s| (*s).to_string()).collect();
    args.extend([
        "--kubeconfig".into(),
        st.kubeconfig.display().to_string(),
        "--interval".into(),
        "1s".into(),
    ]);
    for n in &st.nodes {
        args.push("--node-netns".into());
        args.push(format!("{}={}", n.name, n.netns_path.display()));
    }
    for n in more_nodes {
        args.push("--node-netns".into());
        args.push(n.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::start(&refs)
}

fn opts(rate: u32, secs: u64, proto: Proto) -> TrafficOptions {
    TrafficOptions {
        rate,
        duration: Duration::from_secs(secs),
        proto,
        // Below TCP's first SYN retransmission (1 s): one dropped SYN per failed connect.
        timeout: Duration::from_millis(700),
        ..TrafficOptions::default()
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn backend<'a>(summary: &'a Value, pod: &str) -> &'a Value {
    summary["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["pod"] == pod)
        .unwrap_or_else(|| panic!("no backend {pod} in {summary}"))
}

/// A backend's drops of one classification (every node).
fn class_drops(b: &Value, classification: &str) -> u64 {
    b["top_reasons"]
        .as_array()
        .expect("top_reasons")
        .iter()
        .filter(|r| r["classification"] == classification)
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum()
}

/// The lab's own network namespaces (nodes, pods, router), by inode.
fn lab_inodes(lab: &Lab) -> Vec<u64> {
    let st = lab.status();
    let router = std::fs::metadata(format!("/run/netns/{}", st.router_netns))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("router netns");
    st.nodes
        .iter()
        .map(|n| n.netns_inode)
        .chain(st.pods.iter().map(|p| p.netns_inode))
        .chain(std::iter::once(router))
        .collect()
}

/// netdrop's counted (not hidden, not lossless) drops in these namespaces, of one classification or (`None`)
/// all: from the kernel-side counter rows, which carry the namespace. Other tests' labs use the
/// same addresses and run at the same time; their drops match the same Service backends but
/// happen in their own namespaces, so counts are taken by namespace.
fn drops_in(summary: &Value, inodes: &[u64], classification: Option<&str>) -> u64 {
    let rows = if summary["detail"].is_object() {
        &summary["detail"]["drops"]
    } else {
        &summary["drops"]
    };
    rows.as_array()
        .expect("drop rows")
        .iter()
        .filter(|r| r["hidden"] == false)
        // Discards that lose nothing (a stale ACK, e.g. PAWS on the client while a failed
        // request is torn down) are counted apart from drops.
        .filter(|r| r["effect"] != "lossless")
        .filter(|r| r["netns"].as_u64().is_some_and(|n| inodes.contains(&n)))
        .filter(|r| classification.is_none_or(|c| r["classification"] == c))
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum()
}

/// The backend's top reason with this drop reason.
fn top_with<'a>(b: &'a Value, reason: &str) -> &'a Value {
    b["top_reasons"]
        .as_array()
        .expect("top_reasons")
        .iter()
        .find(|r| r["reason"] == reason)
        .unwrap_or_else(|| panic!("no {reason} among {b}"))
}

fn diagnosis(s: &Value) -> String {
    s["diagnosis"]
        .as_array()
        .expect("diagnosis")
        .iter()
        .map(|l| l.as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A counter of a namespace's /proc/net/snmp (`Ip`, `Tcp`, ...) or /proc/net/netstat (`IpExt`,
/// `TcpExt`): `nstat`'s names split into table and field.
fn snmp(netns: &str, table: &str, field: &str) -> u64 {
    let file = if table.ends_with("Ext") {
        "/proc/net/netstat"
    } else {
        "/proc/net/snmp"
    };
    let text = netdrop_tests::run("ip", &["netns", "exec", netns, "cat", file]);
    netdrop_tests::parse_snmp(&text)
        .get(table)
        .and_then(|t| t.get(field))
        .copied()
        .unwrap_or_else(|| panic!("no {table} {field} in {netns}'s {file}"))
}

fn netns_inode(lab: &Lab, node: &str) -> u64 {
    lab.status()
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.netns_inode)
        .expect("node")
}

/// VXLAN overlay (MTU 1450), pods at 1500, ICMP "fragmentation needed" filtered on the
/// backend's node: small responses pass, responses larger than the overlay's MTU from the
/// backend on the other node are dropped on its node. netdrop's `pkt_too_big` on that backend
/// = the node's `Ip FragFails` = the ICMP filter's rule counter.
#[test]
#[ignore = "open gap, not a long variant: on 6.18 the kfree_skb tracepoint fires Ip FragFails times (perf) but in about 1 run of 3 the tp_btf program is entered 1-4 fewer times in ~600, with no recursion miss counted, so netdrop cannot see those hits; kernel cause not found yet (docs/kernels.md)"]
#[expect(clippy::too_many_lines, reason = "one fault, checked from every side")]
fn mtu_black_hole_drops_large_responses_across_nodes() {
    require_root!("mtu_black_hole_drops_large_responses_across_nodes");
    netdrop_tests::require_reasons!("mtu_black_hole_drops_large_responses_across_nodes");
    let _serial = serial();
    let lab = lab();
    let fault = lab.fault(&FaultRequest::new(FaultKind::MtuBlackhole)).expect("fault");
    let bad = fault.backend.clone().expect("a backend");
    // Small responses cross the overlay.
    let small = lab.traffic("default/web", &opts(100, 2, Proto::Tcp)).expect("traffic");
    assert_eq!(small.failures, 0, "small responses pass: {small:?}");
    assert!(small.successes_by_backend.contains_key(&bad.pod), "{small:?}");
    // The backend's segments too big for the overlay, counted as they enter its node (raw
    // PREROUTING: before routing, where ip_forward drops them).
    let too_big = "ndlab-test: too big for the overlay";
    netdrop_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &fault.node_netns,
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-s",
            &format!("{}/32", bad.ip),
            "-m",
            "length",
            "--length",
            "1451:65535",
            "-m",
            "comment",
            "--comment",
            too_big,
            "-j",
            "ACCEPT",
        ],
    );
    let frag_before = snmp(&fault.node_netns, "Ip", "FragFails");
    let ct = CtGuard::new(&lab);
    let tracer = trace(&lab, &["--svc", "default/web"]);
    let large = TrafficShape {
        reply_bytes: 4000,
        ..TrafficShape::default()
    };
    let report = lab
        .traffic_shaped("default/web", &opts(100, 4, Proto::Tcp), large)
        .expect("traffic");
    // The timed-out requests are reset, so the backend's retransmissions stop: wait until the
    // counter stands still (a retransmission timer may still fire once), then stop netdrop.
    let frag_now = || snmp(&fault.node_netns, "Ip", "FragFails");
    let mut last = frag_now();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let now = frag_now();
        if now == last {
            break;
        }
        last = now;
    }
    let out = tracer.stop();
    let frag = frag_now() - frag_before;
    assert_eq!(frag, last - frag_before, "no too-big segment while netdrop stopped");
    ct.check(&lab, 0);
    let icmp_filtered = lab.fault_packets(&fault).expect("rule counter");
    let entering = lab_net::rule_packets(&fault.node_netns, "raw", "PREROUTING", too_big).expect("raw rule counter");
    println!(
        "{entering} segments of {} larger than the overlay's MTU entered {}",
        bad.pod, fault.node
    );
    let s = &out.summary;
    let b = backend(s, &bad.pod);
    let node_ns = netns_inode(&lab, &fault.node);
    let ours = drops_in(s, &[node_ns], Some("pkt_too_big"));
    println!(
        "generator {} of {} failed ({:?}); {} FragFails +{frag}, ICMP frag-needed filtered {icmp_filtered}; netdrop pkt_too_big {ours}: {}",
        report.failures, report.attempts, report.failures_by_kind, fault.node, b["top_reasons"]
    );
    assert!(report.failures > 0, "large responses from {} must fail", bad.pod);
    assert!(
        !report.successes_by_backend.contains_key(&bad.pod),
        "every large response of {} is lost: {report:?}",
        bad.pod
    );
    assert!(
        report.successes_by_backend.keys().all(|p| p != &bad.pod) && report.successes_by_backend.len() == 2,
        "the same-node backends answer: {report:?}"
    );
    assert!(
        frag >= report.failures,
        "at least one too-big segment per failed request"
    );
    assert_eq!(
        icmp_filtered, frag,
        "one ICMP 'fragmentation needed' per FragFails, all filtered"
    );
    assert_eq!(
        ours,
        entering,
        "netdrop's pkt_too_big on {} = its segments too big for the overlay (raw PREROUTING counter); {} PKT_TOO_BIG events; rows {}",
        bad.pod,
        out.events("PKT_TOO_BIG").len(),
        s["detail"]["drops"]
    );
    // Ip FragFails counts every too-big packet the node forwards, from any source: here the
    // backend's only, the same number (printed above when it is not).
    assert_eq!(
        frag, entering,
        "{}'s Ip FragFails vs {}'s too-big segments",
        fault.node, bad.pod
    );
    assert_eq!(s["lost_events"], 0);
    let top = top_with(b, "PKT_TOO_BIG");
    assert_eq!(top["node"], fault.node, "dropped on the backend's node: {b}");
    assert!(
        top["location"].as_str().is_some_and(|l| l.starts_with("ip_forward")),
        "{b}"
    );
    for other in s["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter(|o| o["pod"] != bad.pod)
    {
        assert_eq!(class_drops(other, "pkt_too_big"), 0, "same-node backends: {other}");
    }
    // The client's side: each failed request's tail (the last, small data segment, and the FIN
    // when it travels alone) arrived after the hole the dropped segments left; the client's
    // socket held it out of order until the reset freed it. Named as such, at most two per
    // failed request, and never blamed on a backend.
    let client_ns = lab.status().client().expect("client").netns_inode;
    let ofo = drops_in(s, &[client_ns], Some("tcp_ofo_purged"));
    println!(
        "client-side out-of-order tails purged: {ofo}; unmatched {}",
        s["unmatched"]
    );
    assert_eq!(
        drops_in(s, &lab_inodes(&lab), None),
        frag + ofo,
        "nothing else dropped in the lab: {}",
        s["detail"]["drops"]
    );
    assert!(
        ofo <= 2 * report.failures,
        "{ofo} purged tails for {} failed requests",
        report.failures
    );
    let d = diagnosis(s);
    println!("{d}");
    assert!(d.contains(&format!("{} on {}", bad.pod, bad.node)), "{d}");
    assert!(d.contains("pkt_too_big"), "{d}");
    assert!(
        d.contains(&format!("The drops are on {}", fault.node)),
        "where to look: {d}"
    );
    assert!(d.contains("path-MTU black hole"), "the hint names it: {d}");
}

/// The name the upstream router is traced under in [`node_route_missing_loses_the_other_nodes_pod_block`].
const UPSTREAM: &str = "upstream-router";

/// node-a lost its route to node-b's pod block: its pods' packets to node-b's pods follow the
/// default route to the upstream router, which drops them. netdrop's `ip_innoroutes` on the
/// backend = the router's `IpExt InNoRoutes` = the generator's failures (one SYN each).
#[test]
fn node_route_missing_loses_the_other_nodes_pod_block() {
    require_root!("node_route_missing_loses_the_other_nodes_pod_block");
    netdrop_tests::require_reasons!("node_route_missing_loses_the_other_nodes_pod_block");
    let _serial = serial();
    let lab = lab();
    let fault = lab
        .fault(&FaultRequest::new(FaultKind::NodeRouteMissing))
        .expect("fault");
    let bad = fault.backend.clone().expect("a backend");
    let router = lab.status().router_netns;
    let before = snmp(&router, "IpExt", "InNoRoutes");
    let ct = CtGuard::new(&lab);
    // The packets are lost off the nodes, at the upstream router: netdrop on the nodes alone
    // sees no drop there (a real cluster's router is not traced either) and leaves drops in
    // other namespaces out. Watched like a node here, so that its drops are counted and placed.
    let tracer = trace_with(
        &lab,
        &["--svc", "default/web"],
        &[format!("{UPSTREAM}=/run/netns/{router}")],
    );
    let report = lab.traffic("default/web", &opts(100, 4, Proto::Tcp)).expect("traffic");
    std::thread::sleep(Duration::from_millis(1200));
    let out = tracer.stop();
    let kernel = snmp(&router, "IpExt", "InNoRoutes") - before;
    ct.check(&lab, 0);
    // The whole block, not one pod: the other node's backend of another Service is lost too.
    let healthy = lab
        .traffic("default/healthy", &opts(100, 1, Proto::Tcp))
        .expect("traffic");
    let s = &out.summary;
    let b = backend(s, &bad.pod);
    let router_ns = std::fs::metadata(format!("/run/netns/{router}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("router netns");
    let ours = drops_in(s, &[router_ns], Some("ip_innoroutes"));
    println!(
        "generator {} of {} failed; router InNoRoutes +{kernel}; netdrop ip_innoroutes {ours}: {}; default/healthy {:?}",
        report.failures, report.attempts, b["top_reasons"], healthy.successes_by_backend
    );
    assert!(report.failures > 0);
    assert_eq!(
        kernel, report.failures,
        "the router's InNoRoutes vs the generator's failures"
    );
    assert_eq!(
        ours, kernel,
        "netdrop's ip_innoroutes on {} = the router's InNoRoutes",
        bad.pod
    );
    assert!(!report.successes_by_backend.contains_key(&bad.pod));
    assert!(
        healthy.failures > 0 && !healthy.successes_by_backend.contains_key("default/healthy-1"),
        "{healthy:?}"
    );
    assert_eq!(
        drops_in(s, &lab_inodes(&lab), None),
        ours,
        "nothing else dropped in the lab: {}",
        s["detail"]["drops"]
    );
    let top = top_with(b, "IP_INNOROUTES");
    assert!(
        top["location"].as_str().is_some_and(|l| l.starts_with("ip_error")),
        "{b}"
    );
    // Placed where it happened: the router, not the backend's node.
    assert_eq!(top["node"], UPSTREAM, "not dropped on {}: {b}", bad.node);
    let d = diagnosis(s);
    println!("{d}");
    assert!(d.contains(&bad.pod) && d.contains("ip_innoroutes"), "{d}");
    assert!(
        d.contains(&format!("The drops are on {UPSTREAM}")),
        "where to look: {d}"
    );
    assert!(
        d.contains("lost its route to that pod's block"),
        "the hint says what to check: {d}"
    );
}

/// The egress faults are traced by the external address (`--ip`): the client's packets before
/// the node's SNAT and the node's after it. Returns the record, the generator's report and
/// netdrop's output.
fn egress(kind: FaultKind, name: &str) -> (Lab, FaultRecord, TrafficReport, netdrop_tests::TraceOutput, u64) {
    let lab = lab();
    let fault = lab.fault(&FaultRequest::new(kind)).expect("fault");
    let before = lab.conntrack_stat(&fault.node, "insert_failed").expect("ct stat");
    let ct = CtGuard::new(&lab);
    let tracer = trace(&lab, &["--ip", "203.0.113.10/32"]);
    let report = lab
        .traffic_to(lab.external(), &opts(50, 3, Proto::Tcp), TrafficShape::default())
        .expect("traffic");
    std::thread::sleep(Duration::from_millis(1200));
    let out = tracer.stop();
    let insert_failed = lab.conntrack_stat(&fault.node, "insert_failed").expect("ct stat") - before;
    // Failed inserts count in `drop` too; nothing else may.
    ct.check(&lab, insert_failed);
    println!("{name}: generator {report:?}\nnetdrop {}", out.summary);
    (lab, fault, report, out, insert_failed)
}

/// Drop events per classification, all in one namespace.
fn events_in<'a>(out: &'a netdrop_tests::TraceOutput, classification: &str) -> Vec<&'a Value> {
    out.drops
        .iter()
        .filter(|e| e["classification"] == classification)
        .collect()
}

#[test]
fn egress_policy_deny_is_a_rule_on_the_clients_node() {
    require_root!("egress_policy_deny_is_a_rule_on_the_clients_node");
    netdrop_tests::require_reasons!("egress_policy_deny_is_a_rule_on_the_clients_node");
    let _serial = serial();
    let (lab, fault, report, out, _) = egress(FaultKind::EgressDeny, "egress-deny");
    let rule = lab.fault_packets(&fault).expect("rule counter");
    let s = &out.summary;
    assert_eq!(report.successes, 0, "every connection to the external host is denied");
    assert_eq!(
        rule, report.failures,
        "the rule's counter vs the generator's failures (one SYN each)"
    );
    assert_eq!(s["by_classification"]["netfilter_rule"].as_u64(), Some(rule), "{s}");
    assert_eq!(
        s["drops_total"].as_u64(),
        Some(rule),
        "nothing else dropped on the way: {s}"
    );
    let node_ns = netns_inode(&lab, &fault.node);
    let events = events_in(&out, "netfilter_rule");
    assert_eq!(events.len() as u64, rule, "one event per drop");
    for e in events {
        assert_eq!(
            e["netns"].as_u64(),
            Some(node_ns),
            "dropped in {}'s namespace: {e}",
            fault.node
        );
        assert_eq!(e["src"]["pod"], "client", "the denied pod is named: {e}");
        assert_eq!(e["dst"]["ip"], "203.0.113.10", "{e}");
    }
    let hints = s["hints"].to_string();
    assert!(
        hints.contains("netfilter_rule") && hints.contains("NetworkPolicy"),
        "{hints}"
    );
}

#[test]
fn snat_port_exhaustion_is_an_insert_failure_on_the_clients_node() {
    require_root!("snat_port_exhaustion_is_an_insert_failure_on_the_clients_node");
    netdrop_tests::require_reasons!("snat_port_exhaustion_is_an_insert_failure_on_the_clients_node");
    let _serial = serial();
    let (lab, fault, report, out, insert_failed) = egress(FaultKind::SnatExhaustion, "snat-exhaustion");
    let s = &out.summary;
    assert_eq!(report.successes, 0, "no free source port for any new connection");
    assert_eq!(
        insert_failed, report.failures,
        "the kernel's insert_failed vs the generator's failures"
    );
    assert_eq!(
        s["by_classification"]["conntrack_insert_failed"].as_u64(),
        Some(insert_failed),
        "{s}"
    );
    let node_ns = netns_inode(&lab, &fault.node);
    let events = events_in(&out, "conntrack_insert_failed");
    assert_eq!(events.len() as u64, insert_failed, "one event per drop");
    for e in events {
        assert_eq!(
            e["netns"].as_u64(),
            Some(node_ns),
            "dropped in {}'s namespace: {e}",
            fault.node
        );
        // After SNAT: the packet carries the node's address; conntrack still names the pod.
        assert_eq!(e["orig_src"]["pod"], "client", "the pod behind the SNAT is named: {e}");
    }
    let hints = s["hints"].to_string();
    assert!(
        hints.contains(&format!("netns {node_ns}: {insert_failed} conntrack insert failures")),
        "{hints}"
    );
    assert!(hints.contains("SNAT port exhaustion"), "{hints}");
}

fn dns_udp(rate: u32, secs: u64) -> TrafficOptions {
    TrafficOptions {
        timeout: Duration::from_millis(500),
        ..opts(rate, secs, Proto::Udp)
    }
}

/// One DNS replica's node drops the UDP/53 it forwards: netdrop names that replica and node, and
/// its drops are the rule's counter and the generator's failures (one datagram each).
#[test]
fn dns_replica_node_dropping_udp53_is_named() {
    require_root!("dns_replica_node_dropping_udp53_is_named");
    let _serial = serial();
    let lab = lab();
    let fault = lab.fault(&FaultRequest::new(FaultKind::DnsUdpDrop)).expect("fault");
    let bad = fault.backend.clone().expect("a replica");
    let ct = CtGuard::new(&lab);
    let tracer = trace(&lab, &["--svc", "kube-system/kube-dns"]);
    let report = lab.traffic("kube-system/kube-dns", &dns_udp(100, 4)).expect("traffic");
    ct.check(&lab, 0);
    std::thread::sleep(Duration::from_millis(1200));
    let out = tracer.stop();
    let rule = lab.fault_packets(&fault).expect("rule counter");
    let s = &out.summary;
    let b = backend(s, &bad.pod);
    println!(
        "generator {} of {} failed; rule {rule}; netdrop {}",
        report.failures, report.attempts, b
    );
    assert!(rule > 0);
    assert_eq!(rule, report.failures, "the rule's counter vs the generator's failures");
    assert_eq!(
        b["drops"].as_u64(),
        Some(rule),
        "netdrop's drops on {} = the rule's counter",
        bad.pod
    );
    let node_ns = netns_inode(&lab, &fault.node);
    assert_eq!(
        drops_in(s, &[node_ns], Some("netfilter_rule")),
        rule,
        "in {}'s namespace",
        fault.node
    );
    assert_eq!(
        drops_in(s, &lab_inodes(&lab), None),
        rule,
        "nothing else dropped in the lab"
    );
    assert_eq!(b["top_reasons"][0]["classification"], "netfilter_rule", "{b}");
    assert_eq!(b["top_reasons"][0]["node"], fault.node, "{b}");
    let other = s["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|o| o["pod"] != bad.pod)
        .expect("other replica");
    assert_eq!(other["drops"], 0, "{other}");
    let d = diagnosis(s);
    println!("{d}");
    assert!(d.contains(&format!("{} on {}", bad.pod, bad.node)), "{d}");
    assert!(d.contains("netfilter_rule"), "{d}");
    assert!(
        d.contains(&format!("The drops are on {}", fault.node)),
        "where to look: {d}"
    );
}

/// `nf_conntrack_max` lowered under DNS load: the queries that fail are the ones conntrack could
/// not track (the kernel's `drop`, summed over the nodes), and netdrop calls them a full table.
#[test]
#[ignore = "full: svc's conntrack_table_full covers the full table in CI; this is its DNS (UDP) variant"]
fn dns_conntrack_table_full_is_classified_as_such() {
    require_root!("dns_conntrack_table_full_is_classified_as_such");
    netdrop_tests::require_reasons!("dns_conntrack_table_full_is_classified_as_such");
    let _serial = serial();
    let lab = lab();
    let nodes: Vec<String> = lab.status().nodes.iter().map(|n| n.name.clone()).collect();
    let drops = |lab: &Lab| -> u64 {
        nodes
            .iter()
            .map(|n| lab.conntrack_stat(n, "drop").expect("ct stat"))
            .sum()
    };
    let tracer = trace(&lab, &["--svc", "kube-system/kube-dns"]);
    let before = drops(&lab);
    let fault = lab
        .fault(&FaultRequest::new(FaultKind::DnsConntrackFull))
        .expect("fault");
    let report = lab.traffic("kube-system/kube-dns", &dns_udp(100, 5)).expect("traffic");
    let kernel = drops(&lab) - before;
    lab.clear(Some(fault.fault)).expect("clear");
    std::thread::sleep(Duration::from_millis(1200));
    let out = tracer.stop();
    let s = &out.summary;
    let full: u64 = s["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .chain(std::iter::once(&s["unmatched"]))
        .map(|b| class_drops(b, "conntrack_table_full"))
        .sum();
    println!(
        "generator {} of {} failed; nodes' conntrack drop +{kernel}; netdrop conntrack_table_full {full}",
        report.failures, report.attempts
    );
    assert!(report.failures > 0, "the full table must break queries");
    assert_eq!(
        kernel, report.failures,
        "one untracked (dropped) datagram per failed query"
    );
    assert_eq!(
        full, kernel,
        "netdrop's conntrack_table_full = the kernel's conntrack drop"
    );
    assert_eq!(s["drops"].as_u64(), Some(full), "nothing else: {s}");
    let d = diagnosis(s);
    println!("{d}");
    assert!(d.contains("conntrack_table_full"), "{d}");
}

/// A/AAAA-style pairs sent at once from one socket: the two new packets race to create one
/// conntrack entry on the client's node. Linux 5.6+ resolves the clash (`clash_resolve`) and
/// drops nothing; netdrop reports the count the kernel reports, no drop, and says so.
#[test]
fn dns_parallel_queries_clash_is_resolved_not_dropped() {
    require_root!("dns_parallel_queries_clash_is_resolved_not_dropped");
    let _serial = serial();
    let lab = lab();
    let fault = lab.fault(&FaultRequest::new(FaultKind::DnsRace)).expect("fault");
    let stat = |c: &str| lab.conntrack_stat(&fault.node, c).expect("ct stat");
    let (clash0, failed0) = (stat("clashres"), stat("insert_failed"));
    let ct = CtGuard::new(&lab);
    let tracer = trace(&lab, &["--svc", "kube-system/kube-dns"]);
    let pairs = TrafficShape {
        pairs: true,
        ..TrafficShape::default()
    };
    let report = lab
        .traffic_shaped("kube-system/kube-dns", &dns_udp(100, 3), pairs)
        .expect("traffic");
    std::thread::sleep(Duration::from_millis(1200));
    let out = tracer.stop();
    let (clash, failed) = (stat("clashres") - clash0, stat("insert_failed") - failed0);
    ct.check(&lab, 0);
    let s = &out.summary;
    let node_ns = netns_inode(&lab, &fault.node);
    let ours = s["detail"]["conntrack"]
        .as_array()
        .expect("conntrack report")
        .iter()
        .find(|c| c["netns"].as_u64() == Some(node_ns))
        .map(|c| c["clash_resolve"].as_u64().unwrap_or(0));
    println!(
        "{} pairs, {} failed; kernel clash_resolve +{clash}, insert_failed +{failed}; netdrop {ours:?}",
        report.attempts, report.failures
    );
    assert_eq!(report.failures, 0, "every query of every pair is answered: {report:?}");
    assert_eq!(failed, 0, "no insert failed");
    assert_eq!(s["drops"], 0, "{s}");
    assert_eq!(
        ours,
        Some(clash),
        "netdrop's clash_resolve on {} = the kernel's",
        fault.node
    );
    let d = diagnosis(s);
    println!("{d}");
    if clash > 0 {
        assert!(
            d.contains(&format!("{}: {clash} conntrack clashes resolved", fault.node)),
            "{d}"
        );
        assert!(d.contains("nothing was lost"), "{d}");
    } else {
        netdrop_tests::skip(
            "dns_parallel_queries_clash_is_resolved_not_dropped (hint part)",
            "no pair raced on this machine (one CPU?)",
        );
    }
}
