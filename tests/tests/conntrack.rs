//! Conntrack classification against the kernel's own conntrack statistics, in a small
//! pod → node → remote lab of network namespaces with real iptables NAT.
//!
//! These tests change the global `net.netfilter.nf_conntrack_max` or load the conntrack table
//! heavily, so they run one at a time (a lock), and restore what they change.

use std::{net::TcpStream, sync::Mutex, time::Duration};

use netdrop_tests::{NatLab as Lab, NetNs, Sysctl, Tracer, require_root, send_flows, settle};

static SERIAL: Mutex<()> = Mutex::new(());

/// Two threads open new UDP flows through MASQUERADE squeezed into 4 source ports: NAT runs
/// out of unique tuples and the confirm step fails to insert (the SNAT race of the field notes).
#[test]
fn snat_port_exhaustion_is_conntrack_insert_failed() {
    require_root!("snat_port_exhaustion_is_conntrack_insert_failed");
    netdrop_tests::require_reasons!("snat_port_exhaustion_is_conntrack_insert_failed");
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new("iptables");
    lab.node.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &lab.uplink,
            "-p",
            "udp",
            "-j",
            "MASQUERADE",
            "--to-ports",
            "20000-20003",
        ],
    );
    let before = lab.node.ct_stat("insert_failed");
    let tracer = Tracer::start(&["--netns", &lab.node.name, "--event-rate", "100"]);
    let sent = send_flows(&lab.pod, 2, 10_000, "10.20.0.2:9999");
    settle();
    let out = tracer.stop();
    let kernel = lab.node.ct_stat("insert_failed") - before;
    let ours = out.class_count("conntrack_insert_failed", lab.node.inode());
    println!(
        "sent {sent}, kernel insert_failed +{kernel}, netdrop conntrack_insert_failed {ours}, hook {}",
        out.summary["conntrack_hook"]
    );
    assert!(
        kernel > 1000,
        "the scenario must produce insert failures (got {kernel})"
    );
    let diff = ours.abs_diff(kernel) as f64 / kernel as f64;
    assert!(
        diff <= 0.02,
        "netdrop {ours} vs kernel insert_failed {kernel}: {:.2}% apart",
        diff * 100.0
    );
    assert_eq!(out.class_count("conntrack_table_full", lab.node.inode()), 0);
    assert_eq!(out.class_count("netfilter_rule", lab.node.inode()), 0);
    let ev: Vec<_> = out
        .drops
        .iter()
        .filter(|d| d["classification"] == "conntrack_insert_failed")
        .collect();
    assert!(!ev.is_empty());
    for e in ev {
        assert_eq!(e["reason"], "NETFILTER_DROP");
        assert_eq!(e["conntrack"], "unconfirmed");
        // SNAT rewrote the source: the pod's own address is the pre-NAT source.
        assert_eq!(e["orig_src"]["ip"], "10.10.0.2", "{e}");
    }
    assert!(
        out.summary["hints"]
            .as_array()
            .expect("hints")
            .iter()
            .any(|h| h.as_str().is_some_and(|h| h.contains("insert failures")))
    );
    assert_precise_is_exact(&out, "conntrack_insert_failed");
}

/// Where a precise hook (fexit/kprobe) is attached, the classification must come from it.
fn assert_precise_is_exact(out: &netdrop_tests::TraceOutput, class: &str) {
    let hook = out.summary["conntrack_hook"].as_str().unwrap_or_default().to_string();
    println!("conntrack hook: {hook}");
    if hook == "fexit" || hook == "kprobe" {
        for r in out.summary["drops"]
            .as_array()
            .expect("drops")
            .iter()
            .filter(|r| r["classification"] == class)
        {
            assert_eq!(r["certainty"], "exact", "{hook} attached, yet {r}");
        }
    }
}

/// More established TCP connections than `nf_conntrack_max` allows: new SYNs find the table
/// full (assured entries cannot be evicted early).
#[test]
fn table_full_is_conntrack_table_full_not_insert_failed() {
    require_root!("table_full_is_conntrack_table_full_not_insert_failed");
    netdrop_tests::require_reasons!("table_full_is_conntrack_table_full_not_insert_failed");
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = NetNs::new("full");
    // Any conntrack-using rule turns conntrack on in the namespace.
    ns.exec(
        "iptables",
        &["-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
    );
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", "120");
    let before_drop = ns.ct_stat("drop");
    let before_failed = ns.ct_stat("insert_failed");
    let tracer = Tracer::start(&["--netns", &ns.name]);
    let (opened, failed) = ns.within(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = l.local_addr().expect("addr");
        let mut keep = Vec::new();
        let mut failed = 0;
        for _ in 0..200 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => keep.push((s, l.accept().expect("accept"))),
                Err(_) => failed += 1,
            }
        }
        (keep.len(), failed)
    });
    settle();
    let out = tracer.stop();
    let drops = ns.ct_stat("drop") - before_drop;
    let insert_failed = ns.ct_stat("insert_failed") - before_failed;
    let full = out.class_count("conntrack_table_full", ns.inode());
    println!(
        "opened {opened}, failed {failed}, kernel drop +{drops}, insert_failed +{insert_failed}, netdrop table_full {full}"
    );
    assert!(failed > 0 && drops > 0, "the table must overflow");
    assert_eq!(insert_failed, 0);
    assert_eq!(full, drops, "every allocation drop classified as table full");
    assert_eq!(
        out.class_count("conntrack_insert_failed", ns.inode()),
        0,
        "none mislabelled as insert failures"
    );
    assert!(
        out.drops
            .iter()
            .filter(|d| d["reason"] == "NETFILTER_DROP")
            .all(|d| d["classification"] == "conntrack_table_full")
    );
    assert_precise_is_exact(&out, "conntrack_table_full");
}

/// A DROP rule on new flows, with NAT active: a rule, never a conntrack class, for both
/// iptables backends (nft frees in nft_do_chain, legacy in nf_hook_slow with an unconfirmed
/// entry).
fn rule_drop(test: &str, iptables: &str) {
    require_root!(test);
    netdrop_tests::require_reasons!(test);
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new(iptables);
    lab.node.exec(
        iptables,
        &[
            "-A",
            "FORWARD",
            "-d",
            "10.20.0.2",
            "-p",
            "udp",
            "--dport",
            "7777",
            "-j",
            "DROP",
        ],
    );
    let tracer = Tracer::start(&["--netns", &lab.node.name]);
    let sent = send_flows(&lab.pod, 1, 300, "10.20.0.2:7777");
    settle();
    let out = tracer.stop();
    let rules = lab.node.exec(iptables, &["-L", "FORWARD", "-v", "-x", "-n"]);
    let counted: u64 = rules
        .lines()
        .find(|l| l.contains("dpt:7777"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("rule counter");
    assert_eq!((sent, counted), (300, 300));
    assert_eq!(out.class_count("netfilter_rule", lab.node.inode()), counted);
    for c in ["conntrack_insert_failed", "conntrack_table_full", "conntrack_invalid"] {
        assert_eq!(out.class_count(c, lab.node.inode()), 0, "{c}");
    }
    drop(lab.remote);
}

#[test]
fn nft_rule_drop_is_netfilter_rule() {
    rule_drop("nft_rule_drop_is_netfilter_rule", "iptables-nft");
}

#[test]
fn legacy_rule_drop_is_netfilter_rule() {
    rule_drop("legacy_rule_drop_is_netfilter_rule", "iptables-legacy");
}

/// kube-proxy style DNAT of a ClusterIP to a backend, then a drop after DNAT: the event names
/// the backend as destination and the ClusterIP:port as `orig_dst`.
#[test]
fn drop_after_dnat_carries_the_cluster_ip_as_orig_dst() {
    require_root!("drop_after_dnat_carries_the_cluster_ip_as_orig_dst");
    netdrop_tests::require_reasons!("drop_after_dnat_carries_the_cluster_ip_as_orig_dst");
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new("iptables");
    lab.node.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.96.0.10",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "10.20.0.2:8080",
        ],
    );
    lab.node.exec(
        "iptables",
        &[
            "-A",
            "FORWARD",
            "-d",
            "10.20.0.2",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "DROP",
        ],
    );
    let tracer = Tracer::start(&["--netns", &lab.node.name, "--reason", "NETFILTER_DROP"]);
    lab.pod.within(|| {
        let _ = TcpStream::connect_timeout(&"10.96.0.10:80".parse().expect("addr"), Duration::from_millis(1500));
    });
    settle();
    let out = tracer.stop();
    assert!(!out.drops.is_empty(), "the SYN (and its retransmits) are dropped");
    for e in &out.drops {
        assert_eq!(e["dst"]["ip"], "10.20.0.2");
        assert_eq!(e["dst"]["port"], 8080);
        assert_eq!(e["orig_dst"]["ip"], "10.96.0.10", "{e}");
        assert_eq!(e["orig_dst"]["port"], 80);
        assert_eq!(e["classification"], "netfilter_rule");
        assert!(e.get("orig_src").is_none(), "no SNAT here: {e}");
    }
}
