//! The agent's flight recorder end to end: known drops (UDP datagrams to a closed port in a
//! test namespace, each from its own source port so the dump says which ones it kept; the
//! kernel counts them in `Udp: NoPorts`), dumped over HTTP, by SIGUSR1 and by the drop-rate
//! trigger, and read back with tshark (packets and verdict comments) and `netdrop report`
//! (the trailer's overwritten count, the agent's summary).

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netdrop_tests::{NetNs, Tracer, have, netdrop, require_root, settle, skip};
use serde_json::Value;

/// The recorder's size for the test.
const KEEP: u64 = 50;
/// Datagrams per burst: more than the recorder keeps.
const BURST: u16 = 200;
/// The first source port: datagram `i` comes from `PORT0 + i`.
const PORT0: u16 = 20_000;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// `GET path` over HTTP/1.0: status and the body's bytes.
fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    assert!(
        status != 200 || head.to_ascii_lowercase().contains("content-type: application/x-pcapng"),
        "{head}"
    );
    (status, raw[end + 4..].to_vec())
}

/// Datagrams `from..to` to 127.0.0.1:9 (nothing listens), datagram `i` from port `PORT0 + i`.
fn burst(ns: &NetNs, from: u16, to: u16) {
    ns.within(move || {
        for i in from..to {
            let s = UdpSocket::bind(("127.0.0.1", PORT0 + i)).expect("bind");
            s.send_to(b"netdrop-recorder", "127.0.0.1:9").expect("send");
        }
    });
}

/// One packet of a dump as tshark reads it: its source port and verdict comment.
struct Packet {
    sport: u16,
    comment: String,
}

fn tshark(file: &Path) -> Vec<Packet> {
    let out = netdrop_tools::tool("tshark")
        .arg("-r")
        .arg(file)
        .args([
            "-T",
            "fields",
            "-E",
            "separator=\t",
            "-e",
            "udp.srcport",
            "-e",
            "frame.comment",
        ])
        .output()
        .expect("run tshark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("Running as user \"root\"") && !l.trim().is_empty())
        .collect();
    assert!(out.status.success(), "tshark failed: {stderr}");
    assert!(warnings.is_empty(), "tshark warned: {warnings:#?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (port, comment) = l.split_once('\t').expect("two fields");
            Packet {
                sport: port.parse().unwrap_or_else(|_| panic!("a UDP source port: {l}")),
                comment: comment.to_string(),
            }
        })
        .collect()
}

/// `netdrop report -o json FILE`: the carried summary line and the capture line.
fn report(file: &Path) -> (Value, Value) {
    let (ok, out, err) = netdrop(&["report", "-o", "json", &file.display().to_string()]);
    assert!(ok, "netdrop report: {err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |t: &str| {
        lines
            .iter()
            .find(|v| v["type"] == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t} line: {out}"))
    };
    (find("summary"), find("capture"))
}

/// Checks a dump made after `drops` datagrams: the newest `min(KEEP, drops)` with their
/// verdicts, `drops − KEEP` overwritten, the summary's count the kernel's.
fn check_dump(file: &Path, what: &str, drops: u64, ns: &NetNs, no_ports: u64) {
    let packets = tshark(file);
    let kept: Vec<u16> = packets.iter().map(|p| p.sport - PORT0).collect();
    let want: Vec<u16> = (drops.saturating_sub(KEEP)..drops).map(|i| i as u16).collect();
    println!(
        "{what}: {} packets, datagrams {:?}..={:?}",
        packets.len(),
        kept.first(),
        kept.last()
    );
    assert_eq!(kept, want, "{what}: the newest min(N, drops), oldest first");
    for p in &packets {
        for kv in [
            "reason=NO_SOCKET".to_string(),
            "proto=udp".into(),
            "node=rec-node".into(),
            format!("netns={}", ns.inode()),
            format!("src=127.0.0.1:{}", p.sport),
            "dst=127.0.0.1:9".into(),
            "ifname=lo".into(),
        ] {
            assert!(
                p.comment.split_whitespace().any(|w| w == kv),
                "{what}: {kv} in {}",
                p.comment
            );
        }
    }
    let (summary, capture) = report(file);
    println!("{what}: netdrop report: {capture}");
    assert_eq!(capture["packets"], kept.len());
    assert_eq!(
        capture["not_kept"]["overwritten"],
        drops.saturating_sub(KEEP),
        "{what}: overwritten = drops − N"
    );
    let counted: u64 = summary["drops"]
        .as_array()
        .expect("drops")
        .iter()
        .filter(|r| r["reason"] == "NO_SOCKET" && r["netns"] == ns.inode())
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(counted, no_ports, "{what}: the agent's summary = Udp NoPorts");
}

/// Files in `dir` whose name ends with `suffix`.
fn dumps(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.display().to_string().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(dir: &Path, suffix: &str, n: usize) -> Vec<PathBuf> {
    let start = Instant::now();
    loop {
        let found = dumps(dir, suffix);
        if found.len() >= n {
            // Written: the file is complete once the agent says so; give it a moment.
            std::thread::sleep(Duration::from_millis(300));
            return found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {suffix} dump in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_recorder_keeps_the_newest_drops_and_counts_the_overwritten() {
    require_root!("the_recorder_keeps_the_newest_drops_and_counts_the_overwritten");
    netdrop_tests::require_reasons!("the_recorder_keeps_the_newest_drops_and_counts_the_overwritten");
    if !have("tshark") {
        skip(
            "the_recorder_keeps_the_newest_drops_and_counts_the_overwritten",
            "tshark is not installed",
        );
        return;
    }
    let ns = NetNs::new("rec");
    let dir = std::env::temp_dir().join(format!("netdrop-recorder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let addr = free_addr();
    let before = ns.snmp("Udp", "NoPorts");
    // Scoped to the test namespace (a node of its own): nothing else on the host is recorded.
    let agent = Tracer::start_agent(&[
        "--no-kube",
        "--node-name",
        "rec-node",
        "--node-netns",
        &format!("rec-node={}", ns.path().display()),
        "--listen",
        &addr.to_string(),
        "--recorder-events",
        &KEEP.to_string(),
        "--recorder-dir",
        &dir.display().to_string(),
        "--recorder-trigger",
        "100/s",
    ]);

    // Fewer drops than the recorder holds: all kept, none overwritten.
    burst(&ns, 0, 30);
    settle();
    let no_ports = ns.snmp("Udp", "NoPorts") - before;
    assert_eq!(no_ports, 30, "the kernel counted each datagram");
    let (status, body) = get(addr, "/debug/recorder.pcapng");
    assert_eq!(status, 200);
    let small = dir.with_extension("small.pcapng");
    std::fs::write(&small, &body).expect("write");
    check_dump(&small, "30 drops, over HTTP", no_ports, &ns, no_ports);

    // A burst over the trigger's rate: one dump of the time before it, written by the agent.
    burst(&ns, 30, BURST);
    let triggered = wait_for(&dir, "-trigger.pcapng", 1);
    settle();
    let no_ports = ns.snmp("Udp", "NoPorts") - before;
    assert_eq!(no_ports, u64::from(BURST));
    let packets = tshark(&triggered[0]);
    let (_, capture) = report(&triggered[0]);
    let overwritten = capture["not_kept"]["overwritten"].as_u64().expect("overwritten");
    let last = packets.last().map(|p| u64::from(p.sport - PORT0)).expect("packets");
    println!(
        "trigger: {} packets up to datagram {last}, {overwritten} overwritten",
        packets.len()
    );
    // Whatever second the trigger fired in: the newest drops up to then, the rest overwritten.
    assert_eq!(
        packets.len() as u64 + overwritten,
        last + 1,
        "kept + overwritten = drops then"
    );
    assert!(last + 1 > 100, "the trigger fired at 100/s or more: {last}");
    let seq: Vec<u64> = packets.iter().map(|p| u64::from(p.sport - PORT0)).collect();
    assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "contiguous: {seq:?}");

    // Over HTTP and by SIGUSR1: the same newest 50 of 200, 150 overwritten.
    let (status, body) = get(addr, "/debug/recorder.pcapng");
    assert_eq!(status, 200);
    let http = dir.with_extension("http.pcapng");
    std::fs::write(&http, &body).expect("write");
    check_dump(&http, "200 drops, over HTTP", no_ports, &ns, no_ports);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
    let signalled = wait_for(&dir, "-sigusr1.pcapng", 1);
    let mode = std::fs::metadata(&signalled[0]).expect("dump").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the dump is the owner's only");
    check_dump(&signalled[0], "200 drops, SIGUSR1", no_ports, &ns, no_ports);

    // A second burst within the minute: no second triggered dump.
    burst(&ns, BURST, 2 * BURST);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        dumps(&dir, "-trigger.pcapng").len(),
        1,
        "at most one triggered dump a minute"
    );
    let (ok, stderr) = agent.terminate();
    let said: BTreeSet<&str> = stderr
        .iter()
        .filter(|l| l.contains("flight recorder"))
        .map(String::as_str)
        .collect();
    println!("agent: {said:#?}");
    for f in [&small, &http] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "exit 0 after SIGTERM:\n{}", stderr.join("\n"));
    assert_eq!(said.len(), 2, "the agent said where it wrote each dump: {said:#?}");
}
