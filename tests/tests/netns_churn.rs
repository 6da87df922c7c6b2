//! Namespace churn under one running `netdrop trace`: namespaces are made one after the other,
//! each drops UDP datagrams to a closed port on its loopback, and is deleted. netdrop's counts
//! must equal the kernel's (each namespace's `Udp NoPorts`, read just before it is deleted, summed
//! per inode as netdrop reports namespaces), and its `DROPS` map must return to its size before
//! the churn while netdrop still runs: the dead namespaces' keys were evicted and their counts
//! kept. Inode numbers are reused at once, so most namespaces share a few inodes; the keys tell
//! them apart by the namespace's cookie, which must be the one the kernel gives userspace
//! (`SO_NETNS_COOKIE`, Linux 5.14+).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use netdrop_tests::{NetNs, Tracer, map_entries, map_id_of_pid, parse_snmp, require_root, run, send_udp};
use serde_json::Value;

/// Nothing listens here; the trace counts only UDP to or from it.
const PORT: u16 = 47_913;

/// `SO_NETNS_COOKIE` of the calling thread's namespace; `None` before Linux 5.14.
fn own_cookie() -> Option<u64> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a pointer/length pair describing a local u64.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    (r == 0).then_some(cookie)
}

/// (netns inode, netns cookie) of every key in the `DROPS` map (`DropKey`: inode at bytes
/// 12..16, cookie at 24..32, little-endian).
fn key_namespaces(map: u64) -> Vec<(u32, u64)> {
    let d: Value = serde_json::from_str(&run("bpftool", &["-j", "map", "dump", "id", &map.to_string()])).expect("json");
    d.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .expect("key bytes")
                .iter()
                .map(|b| u8::from_str_radix(b.as_str().expect("hex").trim_start_matches("0x"), 16).expect("hex byte"))
                .collect();
            assert_eq!(bytes.len(), 32, "DropKey size");
            let inode = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
            let cookie = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
            (inode, cookie)
        })
        .collect()
}

fn churn(test: &str, namespaces: u32) {
    require_root!(test);
    let tracer = Tracer::start(&["--proto", "udp", "--port", &PORT.to_string()]);
    let drops_map = map_id_of_pid(tracer.pid(), "DROPS");
    let baseline = map_entries(drops_map);

    let t0 = Instant::now();
    // inode → Udp NoPorts summed over the namespaces that had it.
    let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
    let mut sent_total = 0;
    let mut most_keys = baseline;
    // (inode, cookie) of every namespace made, as userspace reads them.
    let mut made: BTreeSet<(u32, u64)> = BTreeSet::new();
    let mut sampled: BTreeSet<(u32, u64)> = BTreeSet::new();
    for i in 0..namespaces {
        let ns = NetNs::new("churn");
        let inode = ns.inode();
        // 1 to 3 datagrams, so that namespaces sharing an inode add up to distinct sums.
        let count = 1 + (i % 3) as usize;
        let (sent, noports, cookie) = ns.within(move || {
            let to: SocketAddr = format!("127.0.0.1:{PORT}").parse().expect("address");
            let sent = send_udp("127.0.0.1:0".parse().expect("address"), to, count);
            // The calling thread's namespace (/proc/self/net would be the process's).
            let snmp = fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
            (sent, parse_snmp(&snmp)["Udp"]["NoPorts"], own_cookie())
        });
        if let Some(c) = cookie {
            made.insert((inode, c));
        }
        assert_eq!(sent, count, "datagrams sent in namespace {i}");
        assert_eq!(
            noports, count as u64,
            "the kernel's NoPorts in namespace {i} (a fresh namespace)"
        );
        *expected.entry(inode).or_default() += noports;
        sent_total += sent as u64;
        drop(ns);
        if i % 50 == 49 {
            let keys = key_namespaces(drops_map);
            most_keys = most_keys.max(keys.len());
            sampled.extend(keys);
        }
    }
    let churn_s = t0.elapsed().as_secs_f64();

    // The keys go once netdrop's listing misses their namespaces and a harvest finds them idle.
    let t1 = Instant::now();
    let mut entries = map_entries(drops_map);
    while entries > baseline && t1.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(250));
        entries = map_entries(drops_map);
    }
    let evict_s = t1.elapsed().as_secs_f64();
    let out = tracer.stop();

    let rows = out.summary["drops"].as_array().expect("drops array");
    let mut counted: BTreeMap<u32, u64> = BTreeMap::new();
    for r in rows {
        let netns = r["netns"].as_u64().expect("every drop here has a namespace") as u32;
        *counted.entry(netns).or_default() += r["count"].as_u64().expect("count");
    }
    let inodes: BTreeSet<u32> = expected.keys().copied().collect();
    eprintln!(
        "{namespaces} namespaces ({} inodes) in {churn_s:.1} s, {sent_total} drops; DROPS map: {baseline} keys before, \
         at most {most_keys} sampled during the churn, {entries} {evict_s:.1} s after it",
        inodes.len()
    );
    let sampled_inodes: BTreeSet<u32> = sampled.iter().map(|(i, _)| *i).collect();
    eprintln!(
        "sampled keys: {} namespaces by cookie, {} by inode",
        sampled.len(),
        sampled_inodes.len()
    );
    if !made.is_empty() {
        let strange: Vec<_> = sampled.difference(&made).collect();
        assert!(
            strange.is_empty(),
            "keys carry the namespaces' cookies as userspace reads them: {strange:?} not among those made"
        );
    }
    assert_eq!(
        entries, baseline,
        "the dead namespaces' keys are evicted: DROPS map back to its size before the churn"
    );
    assert_eq!(
        counted, expected,
        "netdrop's counts per namespace inode = the kernel's NoPorts"
    );
    assert_eq!(
        out.summary["drops_total"].as_u64(),
        Some(sent_total),
        "total kept through the evictions"
    );
    assert_eq!(out.summary["uncounted_drops"].as_u64(), Some(0));
}

#[test]
fn netns_churn_500_counts_kept_keys_evicted() {
    churn("netns_churn_500_counts_kept_keys_evicted", 500);
}
