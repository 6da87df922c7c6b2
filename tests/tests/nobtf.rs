//! The named degraded mode "counts only": on a kernel without BTF netdrop falls back to the
//! classic tracepoint and counts drops by reason and location, exactly, with no per-packet
//! events. netdrop runs in a mount namespace where /sys/kernel/btf is empty.
//!
//! Its own test binary: without BTF there is no per-namespace key, so the count is compared
//! with the sum of `Udp: NoPorts` over every network namespace on the machine, and no other
//! test may make UDP drops meanwhile (test binaries run one after another).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
};

use netdrop_tests::{NetNs, Tracer, netns_snmp, parse_snmp, require_root, send_udp, settle};

const N: usize = 300;

/// `Udp: NoPorts` of every network namespace: those of processes (/proc/PID/net/snmp) and the
/// named ones without a process (/run/netns, read through `ip netns exec`), once per inode.
fn noports_everywhere() -> BTreeMap<u64, u64> {
    let noports = |snmp: &HashMap<String, HashMap<String, u64>>| {
        snmp.get("Udp").and_then(|t| t.get("NoPorts")).copied().unwrap_or(0)
    };
    let mut seen = BTreeMap::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = entry.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let (Ok(ns), Ok(text)) = (
            fs::metadata(entry.path().join("ns/net")),
            fs::read_to_string(entry.path().join("net/snmp")),
        ) else {
            continue; // the process exited meanwhile
        };
        seen.entry(ns.ino()).or_insert_with(|| noports(&parse_snmp(&text)));
    }
    for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let Ok(ns) = fs::metadata(entry.path()) else { continue };
        if seen.contains_key(&ns.ino()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        seen.insert(ns.ino(), noports(&netns_snmp(&name)));
    }
    seen
}

#[test]
fn counts_only_without_btf_matches_noports() {
    require_root!("counts_only_without_btf_matches_noports");
    netdrop_tests::require_reasons!("counts_only_without_btf_matches_noports");
    let ns = NetNs::new("nobtf");
    let tracer = Tracer::start_without_btf(&["--no-kube"]);
    let before = noports_everywhere();
    let sent = ns.within(|| {
        send_udp(
            "127.0.0.1:0".parse().expect("addr"),
            SocketAddr::from(([127, 0, 0, 1], 9)),
            N,
        )
    });
    settle();
    let after = noports_everywhere();
    let out = tracer.stop();
    assert_eq!(sent, N);
    let delta: u64 = after
        .iter()
        .map(|(ino, n)| n - before.get(ino).copied().unwrap_or(0))
        .sum();
    assert!(delta >= N as u64, "kernel NoPorts deltas {delta} < {N} sent");

    assert!(
        out.stderr
            .iter()
            .any(|l| l.starts_with("netdrop: degraded mode \"counts only\"")),
        "{:?}",
        out.stderr
    );
    assert_eq!(
        out.summary["hook"], "tracepoint/skb/kfree_skb",
        "tp_btf needs BTF; the classic tracepoint is the fallback"
    );
    assert!(out.drops.is_empty(), "no per-packet events without BTF");
    let udp_no_socket: u64 = out.summary["drops"]
        .as_array()
        .expect("drops")
        .iter()
        .filter(|r| r["reason"] == "NO_SOCKET")
        .filter(|r| {
            r["location"]
                .as_str()
                .is_some_and(|l| l.starts_with("__udp4_lib_rcv+0x") || l.starts_with("udp_rcv+0x"))
        })
        .map(|r| {
            assert!(r["netns"].is_null(), "no namespace without BTF (null: unknown): {r}");
            r["count"].as_u64().expect("count")
        })
        .sum();
    assert_eq!(
        udp_no_socket, delta,
        "NO_SOCKET at the UDP receive path vs Udp NoPorts of every namespace"
    );
    assert_eq!(out.summary["uncounted_drops"], 0);
}

/// Filters that need the packet (here `--port`) are refused with one line without BTF.
#[test]
fn packet_filters_refused_without_btf() {
    require_root!("packet_filters_refused_without_btf");
    let mut cmd = netdrop_tools::project(netdrop_tests::netdrop_bin());
    cmd.args(["trace", "--no-kube", "--port", "53", "--duration", "1s"]);
    netdrop_tests::hide_btf(&mut cmd);
    let out = cmd.output().expect("netdrop");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--port without BTF must fail: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("BTF"), "{stderr}");
}
