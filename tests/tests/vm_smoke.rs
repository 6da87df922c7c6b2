//! Smoke tests for the kernel matrix (`cargo xtask vm-test`) that are worth running anywhere:
//! namespaces, a veth pair, traffic across it checked against the kernel's own counters, a
//! drop the kernel counts, and the netdrop binary itself. Each needs root (CAP_NET_ADMIN).
use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsFd as _,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

/// Reports a skip as the matrix expects: a `skipping: ` line, and a line in `$NETDROP_SKIP_FILE`.
fn skip(test: &str, reason: &str) {
    println!("skipping: {reason}");
    if let Some(path) = std::env::var_os("NETDROP_SKIP_FILE") {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open NETDROP_SKIP_FILE");
        writeln!(f, "{test}\t{reason}").expect("write NETDROP_SKIP_FILE");
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// iproute2 by path where it is (busybox's `ip` applet lacks `netns`).
fn ip() -> Command {
    // The table's lookup prefers PATH, then the sbin directories: the real iproute2, not a
    // busybox applet of the same name.
    netdrop_tools::tool("ip")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop so a failing test cleans up.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("nd-smoke-{tag}-{}", std::process::id());
        run(ip().args(["netns", "add", &name]));
        Self { name }
    }

    /// Runs `f` on a thread inside the namespace; the calling thread stays where it is.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
            f()
        })
        .join()
        .expect("thread in the test namespace panicked")
    }

    fn ip(&self) -> Command {
        let mut cmd = ip();
        cmd.args(["-n", &self.name]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip().args(["netns", "del", &self.name]).status();
    }
}

/// Packet counters of a link as the kernel keeps them (`ip -s -j link show`).
fn link_stats(ns: &Netns, dev: &str) -> (u64, u64) {
    let out = run(ns.ip().args(["-s", "-j", "link", "show", "dev", dev]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output is JSON");
    let s = &v[0]["stats64"];
    (
        s["rx"]["packets"].as_u64().expect("rx packets"),
        s["tx"]["packets"].as_u64().expect("tx packets"),
    )
}

/// `Udp: NoPorts` from /proc/net/snmp of the calling thread's namespace.
fn udp_no_ports() -> u64 {
    let snmp = fs::read_to_string("/proc/thread-self/net/snmp").expect("read /proc/thread-self/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().expect("Udp header"), udp.next().expect("Udp values"));
    let i = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .expect("NoPorts column");
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .expect("NoPorts value")
}

/// Two namespaces joined by a veth pair: UDP datagrams cross it and show up in both ends'
/// counters; datagrams to a closed port are dropped and counted as `Udp: NoPorts`.
#[test]
fn veth_pair_carries_and_drops() {
    const SENT: u64 = 5;
    const TO_CLOSED: u64 = 3;
    if !is_root() {
        skip("veth_pair_carries_and_drops", "needs root for network namespaces");
        return;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    println!("kernel {}", release.trim());

    let a = Netns::new("a");
    let b = Netns::new("b");
    run(a.ip().args([
        "link", "add", "nd-a", "type", "veth", "peer", "name", "nd-b", "netns", &b.name,
    ]));
    run(a.ip().args(["addr", "add", "10.213.0.1/30", "dev", "nd-a"]));
    run(b.ip().args(["addr", "add", "10.213.0.2/30", "dev", "nd-b"]));
    for (ns, dev) in [(&a, "nd-a"), (&b, "nd-b")] {
        run(ns.ip().args(["link", "set", "lo", "up"]));
        run(ns.ip().args(["link", "set", dev, "up"]));
    }
    let (a_rx0, a_tx0) = link_stats(&a, "nd-a");
    let (b_rx0, _) = link_stats(&b, "nd-b");

    // Receiver in b: bound before the sender starts, so no datagram races the bind.
    let receiver = b.run(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(10, 213, 0, 2), 0)).expect("bind in b"));
    let port = receiver.local_addr().expect("local addr").port();
    receiver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let no_ports_before = b.run(udp_no_ports);

    a.run(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(10, 213, 0, 1), 0)).expect("bind in a");
        for i in 0..SENT {
            s.send_to(
                format!("netdrop smoke {i}").as_bytes(),
                (Ipv4Addr::new(10, 213, 0, 2), port),
            )
            .expect("send");
        }
        // Port 9 (discard) has no listener in b: the kernel drops these and answers ICMP.
        for _ in 0..TO_CLOSED {
            s.send_to(b"to a closed port", (Ipv4Addr::new(10, 213, 0, 2), 9))
                .expect("send to closed port");
        }
    });
    let mut buf = [0u8; 64];
    for i in 0..SENT {
        let n = receiver
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} did not arrive: {e}"));
        assert!(
            buf[..n].starts_with(b"netdrop smoke"),
            "unexpected payload {:?}",
            &buf[..n]
        );
    }

    // The kernel's counters agree: a sent everything (plus ARP), b received it.
    let (a_rx1, a_tx1) = link_stats(&a, "nd-a");
    let (b_rx1, _) = link_stats(&b, "nd-b");
    assert!(
        a_tx1 - a_tx0 >= SENT + TO_CLOSED,
        "nd-a tx grew by {} (< {})",
        a_tx1 - a_tx0,
        SENT + TO_CLOSED
    );
    assert!(
        b_rx1 - b_rx0 >= SENT + TO_CLOSED,
        "nd-b rx grew by {} (< {})",
        b_rx1 - b_rx0,
        SENT + TO_CLOSED
    );
    assert!(
        a_rx1 > a_rx0,
        "nd-a received nothing (no ARP reply, no ICMP port unreachable)"
    );
    // The receive path may still be in softirq when the last send returns: give it a moment.
    let mut no_ports = 0;
    for _ in 0..50 {
        no_ports = b.run(udp_no_ports) - no_ports_before;
        if no_ports >= TO_CLOSED {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(no_ports, TO_CLOSED, "Udp NoPorts in b");
}

/// The netdrop binary named by `$NETDROP_BIN` (the matrix sets it) runs on this kernel and
/// lists the drop reasons it read from the kernel's BTF.
#[test]
fn netdrop_lists_reasons() {
    let Some(bin) = std::env::var_os("NETDROP_BIN") else {
        skip("netdrop_lists_reasons", "NETDROP_BIN is not set");
        return;
    };
    let out = netdrop_tools::project(&bin)
        .arg("reasons")
        .output()
        .unwrap_or_else(|e| panic!("running {bin:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    if stderr.contains("unrecognized subcommand")
        || (out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty())
    {
        skip("netdrop_lists_reasons", "this netdrop has no `reasons` subcommand yet");
        return;
    }
    assert!(out.status.success(), "netdrop reasons failed: {stderr}");
    let has_reasons = fs::read_to_string("/sys/kernel/tracing/events/skb/kfree_skb/format")
        .or_else(|_| fs::read_to_string("/sys/kernel/debug/tracing/events/skb/kfree_skb/format"))
        .is_ok_and(|f| f.contains("reason"));
    if has_reasons {
        // Every kernel with drop reasons has these two (include/net/dropreason-core.h).
        let upper = stdout.to_uppercase();
        assert!(upper.contains("NOT_SPECIFIED"), "no NOT_SPECIFIED in:\n{stdout}");
        assert!(upper.contains("NO_SOCKET"), "no NO_SOCKET in:\n{stdout}");
    }
}
