//! `netdrop capture` end to end: lab faults (a policy drop, a backend not listening, conntrack
//! insert failures) and an IPv6 namespace pair, each capture checked three ways:
//! - the packets in the file per reason = the JSON events per reason = netdrop's exact counters
//!   (the summary) = the kernel's own counter (the DROP rule's packets, the generator's refused
//!   requests, conntrack's `insert_failed`);
//! - tshark reads the file with no warning; `frame.comment` and the `netdrop.*` fields of
//!   contrib/wireshark/netdrop.lua filter exactly those packets; no packet's IP length exceeds
//!   its original length; each packet's timestamp is its JSON event's `time` to the nanosecond;
//! - `netdrop report` re-renders the summary the run printed, byte for byte, and refuses a
//!   truncated copy with one line.
//!
//! One lab at a time (they load the machine and share the lab's names).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, UNIX_EPOCH},
};

use netdrop_tests::{
    NetNs, TraceOutput, Tracer,
    lab::{
        Lab, LabOptions,
        faults::{FaultKind, FaultRequest},
        traffic::{TrafficOptions, TrafficReport},
    },
    require_root,
};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

const LUA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/wireshark/netdrop.lua");

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A capture file in a fresh temporary directory (removed on drop).
struct CaptureFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn capture_file() -> CaptureFile {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("incident.pcapng");
    CaptureFile { _dir: dir, path }
}

fn lab() -> Lab {
    Lab::up(&LabOptions::for_test()).unwrap_or_else(|e| panic!("lab up: {e}"))
}

/// `capture --svc default/web` over both lab nodes, `secs` of traffic, stopped a little after
/// it so the last drops are drained.
fn captured(lab: &Lab, file: &Path, secs: u64) -> (TrafficReport, TraceOutput) {
    let st = lab.status();
    let mut args: Vec<String> = vec![
        "--svc".into(),
        "default/web".into(),
        "--kubeconfig".into(),
        st.kubeconfig.display().to_string(),
    ];
    for n in &st.nodes {
        args.push("--node-netns".into());
        args.push(format!("{}={}", n.name, n.netns_path.display()));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let capture = Tracer::start_capture(file, &refs);
    let opts = TrafficOptions::one_syn_per_request(Duration::from_secs(secs));
    let report = lab
        .traffic("default/web", &opts)
        .unwrap_or_else(|e| panic!("traffic: {e}"));
    std::thread::sleep(Duration::from_millis(1200));
    (report, capture.stop())
}

/// One packet as tshark reads it.
#[derive(Debug)]
struct Packet {
    /// `frame.time_epoch`: seconds, 9 decimals.
    epoch: String,
    len: u64,
    cap_len: u64,
    /// IPv4 total length, or IPv6 40 + payload length.
    ip_len: u64,
    reason: String,
    dst_pod: String,
    comment: String,
}

/// tshark with netdrop.lua over `file`; panics on any warning (stderr holds only tshark's note
/// that it runs as root).
fn tshark(file: &Path, args: &[&str]) -> String {
    let out = netdrop_tools::tool("tshark")
        .arg("-r")
        .arg(file)
        .args(["-X", &format!("lua_script:{LUA}")])
        .args(args)
        .output()
        .expect("run tshark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("Running as user \"root\""))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(out.status.success(), "tshark {args:?} failed: {stderr}");
    assert!(warnings.is_empty(), "tshark warned: {warnings:#?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn packets(file: &Path) -> Vec<Packet> {
    let fields = [
        "frame.time_epoch",
        "frame.len",
        "frame.cap_len",
        "ip.len",
        "ipv6.plen",
        "netdrop.reason",
        "netdrop.dst_pod",
        "frame.comment",
    ];
    let mut args = vec!["-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"];
    for f in fields {
        args.extend(["-e", f]);
    }
    tshark(file, &args)
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            assert_eq!(c.len(), fields.len(), "{l}");
            let n = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("{s:?} in {l}"));
            let ip_len = if c[3].is_empty() { 40 + n(c[4]) } else { n(c[3]) };
            Packet {
                epoch: c[0].to_string(),
                len: n(c[1]),
                cap_len: n(c[2]),
                ip_len,
                reason: c[5].to_string(),
                dst_pod: c[6].to_string(),
                comment: c[7].to_string(),
            }
        })
        .collect()
}

/// Packets matching a display filter.
fn count(file: &Path, filter: &str) -> u64 {
    tshark(file, &["-Y", filter, "-T", "fields", "-e", "frame.number"])
        .lines()
        .count() as u64
}

/// `2026-11-26T10:21:33.123456789Z` → `1764152493.123456789`, as tshark prints `frame.time_epoch`.
fn epoch(rfc3339: &str) -> String {
    let t = humantime::parse_rfc3339(rfc3339).unwrap_or_else(|e| panic!("{rfc3339}: {e}"));
    let d = t.duration_since(UNIX_EPOCH).expect("after 1970");
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// The drop summary of a plain or a target run.
fn drop_summary(s: &Value) -> &Value {
    if s["detail"].is_object() { &s["detail"] } else { s }
}

/// Everything a capture must satisfy whatever the fault; returns packets per reason.
fn check_capture(file: &Path, out: &TraceOutput) -> BTreeMap<String, u64> {
    let summary = drop_summary(&out.summary);
    assert_eq!(
        (summary["lost_events"].as_u64(), summary["rate_limited_events"].as_u64()),
        (Some(0), Some(0)),
        "every event reached the capture: {summary}"
    );
    let mut events: BTreeMap<String, u64> = BTreeMap::new();
    for e in &out.drops {
        *events
            .entry(e["reason"].as_str().expect("reason").to_string())
            .or_default() += 1;
    }
    let counted: BTreeMap<String, u64> = summary["by_reason"]
        .as_object()
        .expect("by_reason")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("count")))
        .collect();
    assert_eq!(events, counted, "JSON events per reason = netdrop's exact counters");
    let kept = out
        .stderr
        .iter()
        .find(|l| l.contains("packets written"))
        .unwrap_or_else(|| panic!("no capture line: {:#?}", out.stderr));
    assert!(
        kept.ends_with(&format!("{} packets written; not kept: 0", out.drops.len())),
        "{kept}"
    );

    // netdrop report: the summary line the run printed, byte for byte, and the file's packets.
    let (ok, stdout, stderr) = netdrop_tests::netdrop(&["report", "-o", "json", file.to_str().expect("utf-8 path")]);
    assert!(ok, "report: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(
        serde_json::from_str::<Value>(lines[0]).expect("json"),
        out.summary,
        "report re-renders the run's summary"
    );
    let capture: Value = serde_json::from_str(lines[1]).expect("json");
    let in_file: BTreeMap<String, u64> = capture["by_reason"]
        .as_object()
        .expect("by_reason")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("count")))
        .collect();
    assert_eq!(in_file, counted, "packets in the file per reason = netdrop's counters");
    let (ok, text, _) = netdrop_tests::netdrop(&["report", file.to_str().expect("utf-8 path")]);
    assert!(ok && text.contains("--- netdrop summary:"), "{text}");

    // A truncated copy: one line, no panic.
    let cut = file.with_extension("cut.pcapng");
    let bytes = std::fs::read(file).expect("read capture");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).expect("write cut copy");
    let (ok, _, err) = netdrop_tests::netdrop(&["report", cut.to_str().expect("utf-8 path")]);
    assert!(!ok, "a truncated capture is an error");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("truncated or corrupted") && !err.contains("panicked"),
        "{err}"
    );

    if !netdrop_tests::have("tshark") {
        netdrop_tests::skip(
            "capture: the tshark checks",
            "tshark not installed (not copied into the kernel matrix guests)",
        );
        return in_file;
    }
    let pkts = packets(file);
    assert_eq!(pkts.len(), out.drops.len(), "one packet per event");
    for p in &pkts {
        assert!(p.cap_len <= p.len, "captured beyond the original length: {p:?}");
        assert_eq!(p.ip_len, p.len, "original length = the IP header's: {p:?}");
        assert!(p.cap_len <= 128, "at most what the kernel program copies: {p:?}");
        assert!(p.comment.starts_with("netdrop reason="), "{p:?}");
    }
    let mut theirs: Vec<String> = pkts.iter().map(|p| p.epoch.clone()).collect();
    let mut ours: Vec<String> = out
        .drops
        .iter()
        .map(|e| epoch(e["time"].as_str().expect("time")))
        .collect();
    theirs.sort();
    ours.sort();
    assert_eq!(theirs, ours, "timestamps = the events' times, to the nanosecond");
    let mut by_lua: BTreeMap<String, u64> = BTreeMap::new();
    for p in &pkts {
        *by_lua.entry(p.reason.clone()).or_default() += 1;
    }
    assert_eq!(by_lua, counted, "netdrop.reason per packet");
    for (reason, n) in &counted {
        assert_eq!(
            count(file, &format!("frame.comment contains \"reason={reason} \"")),
            *n,
            "frame.comment filter for {reason}"
        );
        assert_eq!(
            count(file, &format!("netdrop.reason == \"{reason}\"")),
            *n,
            "netdrop.reason filter for {reason}"
        );
    }
    in_file
}

/// Packets dropped on their way to this pod (`ns/name`), by the Lua fields.
fn to_pod(file: &Path, reason: &str, pod: &str) -> Option<u64> {
    netdrop_tests::have("tshark").then(|| {
        let name = pod.split('/').nth(1).expect("ns/name");
        let n = count(
            file,
            &format!("netdrop.reason == \"{reason}\" && netdrop.dst_pod contains \"{name}\""),
        );
        let by_field = packets(file)
            .iter()
            .filter(|p| p.reason == reason && p.dst_pod == pod)
            .count() as u64;
        assert_eq!(n, by_field, "the filter and the field agree");
        n
    })
}

#[test]
fn policy_drop_capture_matches_the_rule_counter() {
    require_root!("policy_drop_capture_matches_the_rule_counter");
    let _serial = serial();
    let lab = lab();
    let fault = lab.fault(&FaultRequest::new(FaultKind::PolicyDrop)).expect("fault");
    let bad = fault.backend.clone().expect("targets a backend");
    let file = capture_file();
    let (report, out) = captured(&lab, &file.path, 5);
    let rule = lab.fault_packets(&fault).expect("rule counter");
    println!("generator {report:?}; rule {rule}; summary {}", out.summary);
    assert!(rule > 0, "the fault dropped packets");
    let in_file = check_capture(&file.path, &out);
    let its = out
        .drops
        .iter()
        .filter(|e| e["reason"] == "NETFILTER_DROP" && e["dst"]["pod"] == bad.pod.split('/').nth(1).unwrap_or(""))
        .count() as u64;
    assert_eq!(
        its, rule,
        "the bad backend's NETFILTER_DROP events = the DROP rule's counter"
    );
    assert!(
        in_file.get("NETFILTER_DROP").copied().unwrap_or(0) >= rule,
        "{in_file:?}"
    );
    if let Some(n) = to_pod(&file.path, "NETFILTER_DROP", &bad.pod) {
        assert_eq!(n, rule, "netdrop.dst_pod filter = the DROP rule's counter");
    }
}

#[test]
fn not_listening_capture_matches_the_refused_requests() {
    require_root!("not_listening_capture_matches_the_refused_requests");
    let _serial = serial();
    let lab = lab();
    let fault = lab.fault(&FaultRequest::new(FaultKind::NotListening)).expect("fault");
    let bad = fault.backend.clone().expect("targets a backend");
    let file = capture_file();
    let (report, out) = captured(&lab, &file.path, 5);
    println!("generator {report:?}; summary {}", out.summary);
    assert!(report.failures > 0, "{report:?}");
    check_capture(&file.path, &out);
    if let Some(n) = to_pod(&file.path, "NO_SOCKET", &bad.pod) {
        // Each refused request is one SYN the backend's kernel found no socket for.
        assert_eq!(
            n, report.failures,
            "NO_SOCKET packets to the backend = refused requests"
        );
    }
}

#[test]
fn conntrack_insert_failure_capture_matches_insert_failed() {
    require_root!("conntrack_insert_failure_capture_matches_insert_failed");
    netdrop_tests::require_reasons!("conntrack_insert_failure_capture_matches_insert_failed");
    let _serial = serial();
    let lab = lab();
    let fault = lab
        .fault(&FaultRequest::new(FaultKind::ConntrackInsert))
        .expect("fault");
    let stat = |col: &str| lab.conntrack_stat(&fault.node, col).expect("conntrack stats");
    let before = stat("insert_failed");
    let file = capture_file();
    let (_, out) = captured(&lab, &file.path, 5);
    let kernel = stat("insert_failed") - before;
    assert!(kernel > 0, "the fault must cause insert failures");
    check_capture(&file.path, &out);
    let ours = out
        .drops
        .iter()
        .filter(|e| e["classification"] == "conntrack_insert_failed")
        .count() as u64;
    let counted: u64 = drop_summary(&out.summary)["by_classification"]["conntrack_insert_failed"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(ours, counted, "captured = counted");
    // The same bound as `trace --svc`'s test of this fault (tests/tests/svc.rs).
    assert!(
        ours.abs_diff(kernel) as f64 <= kernel as f64 * 0.02,
        "netdrop {ours} vs kernel insert_failed {kernel}"
    );
    if netdrop_tests::have("tshark") {
        assert_eq!(
            count(&file.path, "netdrop.classification == \"conntrack_insert_failed\""),
            ours
        );
    }
}

/// IPv6: a namespace pair, an ip6tables DROP rule for UDP to one port; every datagram is one
/// packet in the file, with its IPv6 header, and the rule's own counter says how many.
#[test]
fn ipv6_capture_matches_the_ip6tables_rule() {
    require_root!("ipv6_capture_matches_the_ip6tables_rule");
    let _serial = serial();
    let a = NetNs::new("cap6a");
    let b = NetNs::new("cap6b");
    let (ia, ib) = (netdrop_tests::ifname("c6a"), netdrop_tests::ifname("c6b"));
    netdrop_tests::run("ip", &["link", "add", &ia, "type", "veth", "peer", "name", &ib]);
    for (ns, i, addr) in [(&a, &ia, "fd00:cafe::1/64"), (&b, &ib, "fd00:cafe::2/64")] {
        netdrop_tests::run("ip", &["link", "set", i, "netns", &ns.name]);
        // No duplicate address detection: the addresses work at once.
        ns.ip(&["-6", "addr", "add", addr, "dev", i, "nodad"]);
        ns.ip(&["link", "set", i, "up"]);
    }
    b.exec(
        "ip6tables",
        &["-A", "INPUT", "-p", "udp", "--dport", "9753", "-j", "DROP"],
    );
    let file = capture_file();
    let inode = b.inode().to_string();
    let capture = Tracer::start_capture(&file.path, &["--netns", &inode, "--no-kube", "--port", "9753"]);
    let sent = a.within(|| {
        netdrop_tests::send_udp(
            "[fd00:cafe::1]:0".parse().expect("addr"),
            "[fd00:cafe::2]:9753".parse().expect("addr"),
            25,
        )
    });
    netdrop_tests::settle();
    let out = capture.stop();
    let rules = b.exec("ip6tables", &["-L", "INPUT", "-v", "-x", "-n"]);
    let rule: u64 = rules
        .lines()
        .find(|l| l.contains("DROP") && l.contains("dpt:9753"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rule counter in {rules}"));
    println!("sent {sent}, rule {rule}, summary {}", out.summary);
    assert_eq!(sent, 25);
    assert_eq!(rule, 25, "every datagram met the rule");
    let in_file = check_capture(&file.path, &out);
    assert_eq!(in_file.get("NETFILTER_DROP").copied(), Some(rule), "{in_file:?}");
    assert_eq!(in_file.values().sum::<u64>(), rule, "nothing else: {in_file:?}");
    // --count: the capture stops by itself; drops drained in the same batch are counted as not
    // kept, never silently missing.
    let counted = capture_file();
    let capture = Tracer::start_capture(
        &counted.path,
        &["--netns", &inode, "--no-kube", "--port", "9753", "--count", "5"],
    );
    a.within(|| {
        netdrop_tests::send_udp(
            "[fd00:cafe::1]:0".parse().expect("addr"),
            "[fd00:cafe::2]:9753".parse().expect("addr"),
            25,
        )
    });
    netdrop_tests::settle();
    let stopped = capture.stop();
    let (ok, report, err) = netdrop_tests::netdrop(&["report", "-o", "json", counted.path.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let line: Value = serde_json::from_str(report.lines().last().expect("capture line")).expect("json");
    assert_eq!(line["packets"], 5, "{line}");
    assert_eq!(
        line["packets"].as_u64().unwrap_or(0) + line["not_kept"]["count_reached"].as_u64().unwrap_or(0),
        stopped.drops.len() as u64,
        "every event is in the file or counted after --count: {line}"
    );
    if netdrop_tests::have("tshark") {
        assert_eq!(count(&file.path, "ipv6 && udp.dstport == 9753"), rule);
        assert_eq!(
            count(
                &file.path,
                &format!("frame.interface_description contains \"netns={inode} \"")
            ),
            rule,
            "the interface is described with its namespace"
        );
    }
}
