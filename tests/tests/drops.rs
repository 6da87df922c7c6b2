//! `netdrop trace` against real drops in real network namespaces, checked against the kernel's
//! own counters (/proc/net/snmp, iptables rule counters) and the traffic we generated.

use std::{
    io::{ErrorKind, Read as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use netdrop_tests::{NetNs, Tracer, netdrop, require_root, send_udp, settle, skip};

const N: usize = 200;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn udp4_closed_port_counts_match_snmp_noports() {
    require_root!("udp4_closed_port_counts_match_snmp_noports");
    netdrop_tests::require_reasons!("udp4_closed_port_counts_match_snmp_noports");
    let ns = NetNs::new("udp4");
    let before = ns.snmp("Udp", "NoPorts");
    let tracer = Tracer::start(&["--netns", &ns.path().display().to_string()]);
    let sent = ns.within(|| send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9"), N));
    settle();
    let out = tracer.stop();
    let delta = ns.snmp("Udp", "NoPorts") - before;
    assert_eq!(sent, N);
    assert_eq!(delta, N as u64, "kernel NoPorts delta");
    assert_eq!(
        out.count("NO_SOCKET", ns.inode()),
        delta,
        "summary NO_SOCKET vs Udp NoPorts"
    );
    let ev = out.events("NO_SOCKET");
    assert_eq!(ev.len(), N, "one event per drop");
    for e in ev {
        assert_eq!(e["protocol"], "udp");
        assert_eq!(e["dst"]["ip"], "127.0.0.1");
        assert_eq!(e["dst"]["port"], 9);
        assert_eq!(e["src"]["ip"], "127.0.0.1");
        assert_eq!(e["netns"], ns.inode());
        assert_eq!(e["ifname"], "lo");
        // The UDP receive path; which function frees depends on inlining (6.18: __udp4_lib_rcv,
        // Debian 7.2: udp_rcv).
        let loc = e["location"].as_str().expect("location");
        assert!(
            loc.starts_with("__udp4_lib_rcv+0x") || loc.starts_with("udp_rcv+0x"),
            "{e}"
        );
        assert!(e["reason_code"].as_u64().is_some());
    }
    assert_eq!(out.summary["lost_events"], 0);
    // With BTF the preferred hook must load: the tracepoint fallback would hide a verifier
    // refusal of the tp_btf program (every kernel of the matrix accepts tp_btf/kfree_skb).
    if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        assert_eq!(
            out.summary["hook"], "tp_btf/kfree_skb",
            "the tp_btf program loads on this kernel (stderr: {:?})",
            out.stderr
        );
    }
}

#[test]
fn udp6_closed_port_counts_match_snmp6() {
    require_root!("udp6_closed_port_counts_match_snmp6");
    netdrop_tests::require_reasons!("udp6_closed_port_counts_match_snmp6");
    let ns = NetNs::new("udp6");
    let before = ns.snmp6("Udp6NoPorts");
    let tracer = Tracer::start(&["--netns", &ns.name]);
    let sent = ns.within(|| send_udp(addr("[::1]:0"), addr("[::1]:9"), N));
    settle();
    let out = tracer.stop();
    let delta = ns.snmp6("Udp6NoPorts") - before;
    assert_eq!((sent, delta), (N, N as u64));
    assert_eq!(out.count("NO_SOCKET", ns.inode()), delta);
    let ev = out.events("NO_SOCKET");
    assert_eq!(ev.len(), N);
    assert!(
        ev.iter()
            .all(|e| e["dst"]["ip"] == "::1" && e["dst"]["port"] == 9 && e["protocol"] == "udp")
    );
}

/// TCP SYNs to a closed port: the kernel answers RST and frees the SYN with NO_SOCKET.
fn tcp_closed(test: &str, target: &'static str, loc_prefix: &str) {
    require_root!(test);
    netdrop_tests::require_reasons!(test);
    let ns = NetNs::new("tcp");
    let tracer = Tracer::start(&["--netns", &ns.name, "--proto", "tcp"]);
    let refused = ns.within(move || {
        (0..20)
            .filter(|_| {
                TcpStream::connect_timeout(&addr(target), Duration::from_secs(2))
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
            })
            .count()
    });
    settle();
    let out = tracer.stop();
    assert_eq!(refused, 20, "every connect refused");
    let ev = out.events("NO_SOCKET");
    assert_eq!(ev.len(), 20, "{:?}", out.summary);
    for e in ev {
        assert_eq!(e["protocol"], "tcp");
        assert_eq!(e["tcp_flags"], "SYN");
        assert_eq!(e["dst"]["port"], 7);
        assert!(e["location"].as_str().expect("loc").starts_with(loc_prefix), "{e}");
    }
    assert_eq!(out.count("NO_SOCKET", ns.inode()), 20);
}

#[test]
fn tcp4_closed_port_is_no_socket_with_syn() {
    tcp_closed("tcp4_closed_port_is_no_socket_with_syn", "127.0.0.1:7", "tcp_v4_rcv");
}

#[test]
fn tcp6_closed_port_is_no_socket_with_syn() {
    tcp_closed("tcp6_closed_port_is_no_socket_with_syn", "[::1]:7", "tcp_v6_rcv");
}

/// An iptables DROP rule in INPUT; the rule's own packet counter is the reference.
fn iptables_drop(test: &str, iptables: &str, loc_prefix: &str) {
    require_root!(test);
    netdrop_tests::require_reasons!(test);
    let ns = NetNs::new("ipt");
    ns.exec(iptables, &["-A", "INPUT", "-p", "udp", "--dport", "5555", "-j", "DROP"]);
    let tracer = Tracer::start(&["--netns", &ns.name]);
    let sent = ns.within(|| send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:5555"), N));
    settle();
    let out = tracer.stop();
    let rules = ns.exec(iptables, &["-L", "INPUT", "-v", "-x", "-n"]);
    let rule_pkts: u64 = rules
        .lines()
        .find(|l| l.contains("dpt:5555"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rule counter in:\n{rules}"));
    assert_eq!((sent, rule_pkts), (N, N as u64));
    assert_eq!(
        out.count("NETFILTER_DROP", ns.inode()),
        rule_pkts,
        "summary vs the rule's counter"
    );
    let ev = out.events("NETFILTER_DROP");
    assert_eq!(ev.len(), N);
    for e in ev {
        assert!(e["location"].as_str().expect("loc").starts_with(loc_prefix), "{e}");
        assert_eq!(e["dst"]["port"], 5555);
    }
}

#[test]
fn iptables_nft_drop_is_netfilter_drop_at_nft_do_chain() {
    iptables_drop(
        "iptables_nft_drop_is_netfilter_drop_at_nft_do_chain",
        "iptables-nft",
        "nft_do_chain",
    );
}

#[test]
fn iptables_legacy_drop_is_netfilter_drop_at_nf_hook_slow() {
    iptables_drop(
        "iptables_legacy_drop_is_netfilter_drop_at_nf_hook_slow",
        "iptables-legacy",
        "nf_hook_slow",
    );
}

#[test]
fn port_filter_selects_exactly() {
    require_root!("port_filter_selects_exactly");
    netdrop_tests::require_reasons!("port_filter_selects_exactly");
    let ns = NetNs::new("port");
    let tracer = Tracer::start(&["--netns", &ns.name, "--port", "9001"]);
    ns.within(|| {
        send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9001"), 30);
        send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9002"), 50);
    });
    settle();
    let out = tracer.stop();
    assert_eq!(out.drops.len(), 30);
    assert!(out.drops.iter().all(|d| d["dst"]["port"] == 9001));
    assert_eq!(
        out.count("NO_SOCKET", ns.inode()),
        30,
        "kernel counters honour the filter too"
    );
}

#[test]
fn ip_filter_selects_exactly() {
    require_root!("ip_filter_selects_exactly");
    netdrop_tests::require_reasons!("ip_filter_selects_exactly");
    let ns = NetNs::new("ip");
    ns.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"]);
    ns.ip(&["addr", "add", "10.99.0.2/32", "dev", "lo"]);
    let tracer = Tracer::start(&["--netns", &ns.name, "--ip", "10.99.0.2/32"]);
    ns.within(|| {
        send_udp(addr("10.99.0.1:0"), addr("10.99.0.1:9"), 25);
        send_udp(addr("10.99.0.1:0"), addr("10.99.0.2:9"), 40);
        send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9"), 10);
    });
    settle();
    let out = tracer.stop();
    assert_eq!(out.drops.len(), 40);
    assert!(out.drops.iter().all(|d| d["dst"]["ip"] == "10.99.0.2"));
}

#[test]
fn reason_filter_selects_exactly() {
    require_root!("reason_filter_selects_exactly");
    netdrop_tests::require_reasons!("reason_filter_selects_exactly");
    let ns = NetNs::new("reason");
    ns.exec(
        "iptables",
        &["-A", "INPUT", "-p", "udp", "--dport", "5555", "-j", "DROP"],
    );
    let tracer = Tracer::start(&["--netns", &ns.name, "--reason", "NETFILTER_DROP"]);
    ns.within(|| {
        send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:5555"), 15);
        send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9"), 35);
    });
    settle();
    let out = tracer.stop();
    assert_eq!(out.drops.len(), 15);
    assert!(out.drops.iter().all(|d| d["reason"] == "NETFILTER_DROP"));
    assert_eq!(out.summary["by_reason"]["NETFILTER_DROP"], 15);
    assert_eq!(
        out.summary["hidden_by_reason"]["NO_SOCKET"], 35,
        "other reasons counted as hidden"
    );
}

#[test]
fn netns_filter_ignores_other_namespaces() {
    require_root!("netns_filter_ignores_other_namespaces");
    netdrop_tests::require_reasons!("netns_filter_ignores_other_namespaces");
    let a = NetNs::new("nsa");
    let b = NetNs::new("nsb");
    let tracer = Tracer::start(&["--netns", &a.name]);
    b.within(|| send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9"), 40));
    a.within(|| send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9"), 12));
    settle();
    let out = tracer.stop();
    assert_eq!(out.drops.len(), 12);
    assert!(out.drops.iter().all(|d| d["netns"] == a.inode()));
    assert_eq!(out.count("NO_SOCKET", b.inode()), 0);
}

#[test]
fn classic_tracepoint_fallback_counts_the_same() {
    require_root!("classic_tracepoint_fallback_counts_the_same");
    netdrop_tests::require_reasons!("classic_tracepoint_fallback_counts_the_same");
    let ns = NetNs::new("tp");
    let before = ns.snmp("Udp", "NoPorts");
    let tracer = Tracer::start(&["--netns", &ns.name, "--hook", "tracepoint"]);
    ns.within(|| send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9"), N));
    settle();
    let out = tracer.stop();
    assert_eq!(out.summary["hook"], "tracepoint/skb/kfree_skb");
    let delta = ns.snmp("Udp", "NoPorts") - before;
    assert_eq!(out.count("NO_SOCKET", ns.inode()), delta);
    assert_eq!(out.events("NO_SOCKET").len(), N);
}

#[test]
fn event_rate_limit_keeps_counts_exact() {
    require_root!("event_rate_limit_keeps_counts_exact");
    netdrop_tests::require_reasons!("event_rate_limit_keeps_counts_exact");
    let ns = NetNs::new("rate");
    let before = ns.snmp("Udp", "NoPorts");
    // 1 event/s per CPU at most: nearly all events are suppressed, counts must not be.
    let tracer = Tracer::start(&["--netns", &ns.name, "--event-rate", "1"]);
    ns.within(|| send_udp(addr("127.0.0.1:0"), addr("127.0.0.1:9"), 500));
    settle();
    let out = tracer.stop();
    let delta = ns.snmp("Udp", "NoPorts") - before;
    assert_eq!(out.count("NO_SOCKET", ns.inode()), delta);
    let shown = out.summary["events_shown"].as_u64().expect("shown");
    let limited = out.summary["rate_limited_events"].as_u64().expect("limited");
    assert_eq!(shown as usize, out.drops.len());
    assert_eq!(
        shown + limited,
        delta,
        "every drop is an event or a counted suppression"
    );
    assert!(limited > 0);
}

/// The reason table netdrop reads from BTF equals the tracepoint's own print_fmt list.
#[test]
fn reason_table_matches_tracefs_print_fmt() {
    require_root!("reason_table_matches_tracefs_print_fmt");
    netdrop_tests::require_reasons!("reason_table_matches_tracefs_print_fmt");
    // netdrop mounts tracefs when it is not mounted; run it first so the format file exists.
    let (ok, stdout, stderr) = netdrop(&["reasons", "-o", "json"]);
    assert!(ok, "{stderr}");
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|r| std::fs::read_to_string(format!("{r}/events/skb/kfree_skb/format")).ok())
        .expect("tracefs kfree_skb format");
    let Some(list) = format.split("__print_symbolic(REC->reason,").nth(1) else {
        skip(
            "reason_table_matches_tracefs_print_fmt",
            "this kernel's kfree_skb has no reason list (before 5.17)",
        );
        return;
    };
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let ours: std::collections::HashMap<u64, String> = doc["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| {
            (
                r["code"].as_u64().expect("code"),
                r["name"].as_str().expect("name").to_string(),
            )
        })
        .collect();
    let mut compared = 0;
    for entry in list.split('{').skip(1) {
        let Some((num, rest)) = entry.split_once(',') else {
            continue;
        };
        let Ok(num) = num.trim().parse::<u64>() else {
            continue;
        };
        let name = rest.split('"').nth(1).expect("quoted name");
        assert_eq!(ours.get(&num).map(String::as_str), Some(name), "reason {num}");
        compared += 1;
    }
    assert!(compared > 50, "compared only {compared} reasons");
}

#[test]
fn bad_flags_give_one_clear_line() {
    let (ok, _, err) = netdrop(&["trace", "--ip", "10.0.0.0/33"]);
    assert!(!ok);
    assert!(err.contains("prefix length 33 is longer than 32"), "{err}");
    let (ok, _, err) = netdrop(&["trace", "--proto", "bogus"]);
    assert!(!ok);
    assert!(err.contains("is not tcp, udp"), "{err}");
}

#[test]
fn unknown_reason_lists_close_matches() {
    require_root!("unknown_reason_lists_close_matches");
    netdrop_tests::require_reasons!("unknown_reason_lists_close_matches");
    let (ok, _, err) = netdrop(&["trace", "--reason", "NO_SOCKT", "--duration", "1s"]);
    assert!(!ok);
    assert_eq!(
        err.trim().lines().last().expect("a line"),
        "netdrop: --reason NO_SOCKT: this kernel has no such drop reason (did you mean NO_SOCKET?)"
    );
}

#[test]
fn unprivileged_user_gets_a_permission_message() {
    require_root!("unprivileged_user_gets_a_permission_message");
    netdrop_tests::require_reasons!("unprivileged_user_gets_a_permission_message");
    let bin = netdrop_tests::netdrop_bin();
    let mut child = netdrop_tools::tool("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&bin)
        .args(["trace", "--duration", "1s"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert!(
        err.contains("netdrop needs CAP_BPF and CAP_PERFMON to load its kernel programs"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A peer's FIN taken by an orphaned FIN_WAIT2 socket (the server closed first and its FIN was
/// acknowledged) is freed by `tcp_v4_rcv`/`tcp_v6_rcv` with `kfree_skb` and no reason: counted
/// exactly (one per connection closed that way), classified `tcp_teardown`, hidden by default.
#[test]
fn fin_to_a_closed_socket_is_tcp_teardown_and_hidden() {
    const CLOSES: usize = 20;
    require_root!("fin_to_a_closed_socket_is_tcp_teardown_and_hidden");
    netdrop_tests::require_reasons!("fin_to_a_closed_socket_is_tcp_teardown_and_hidden");
    let ns = NetNs::new("tcptw");
    let tracer = Tracer::start(&["--netns", &ns.path().display().to_string()]);
    let closed = ns.within(|| {
        let mut closed = [0usize; 2];
        for (i, ip) in ["127.0.0.1", "::1"].into_iter().enumerate() {
            let listener = std::net::TcpListener::bind((ip, 0)).expect("listen");
            let at = listener.local_addr().expect("addr");
            for _ in 0..CLOSES {
                let client = TcpStream::connect(at).expect("connect");
                let (server, _) = listener.accept().expect("accept");
                netdrop_tests::fin_and_wait_fin_wait2(&server); // the client's kernel ACKed it
                drop(server); // closed in FIN_WAIT2: a timewait socket
                drop(client); // FIN|ACK, taken by the timewait socket
                closed[i] += 1;
            }
        }
        closed
    });
    settle();
    let out = tracer.stop();
    for (ip, site, n) in [("ipv4", "tcp_v4_rcv+", closed[0]), ("ipv6", "tcp_v6_rcv+", closed[1])] {
        let rows: Vec<&serde_json::Value> = out.summary["drops"]
            .as_array()
            .expect("drops")
            .iter()
            .filter(|r| r["netns"] == ns.inode() && r["ip"] == ip && r["classification"] == "tcp_teardown")
            .collect();
        let count: u64 = rows.iter().map(|r| r["count"].as_u64().expect("count")).sum();
        assert_eq!(
            count, n as u64,
            "{ip}: one tcp_teardown per FIN to a closed socket: {}",
            out.summary
        );
        for r in rows {
            assert_eq!(r["reason"], "NOT_SPECIFIED");
            assert!(r["location"].as_str().is_some_and(|l| l.starts_with(site)), "{r}");
            assert_eq!(r["hidden"], true, "{r}");
        }
    }
    assert!(
        out.drops.iter().all(|e| e["classification"] != "tcp_teardown"),
        "hidden drops are not shown as events"
    );
    let visible: u64 = out.summary["drops"]
        .as_array()
        .expect("drops")
        .iter()
        .filter(|r| r["netns"] == ns.inode() && r["hidden"] == false)
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(visible, 0, "closing connections drops nothing visible: {}", out.summary);
}

/// Enables TCP keepalive on `s` with 1-second probes (`TCP_KEEPIDLE`/`TCP_KEEPINTVL`), or
/// disables it (which stops the timer).
fn keepalive(s: &TcpStream, on: bool) {
    use std::os::fd::AsRawFd as _;
    let set = |level: i32, opt: i32, v: i32| {
        // SAFETY: plain setsockopt on an open socket with a pointer to a local int.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                (&raw const v).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
    };
    if on {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    }
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, i32::from(on));
}

/// A bare ACK taken by a TIME_WAIT socket (here an orphaned FIN_WAIT2 one: the server closed, the
/// client did not) is answered and then freed by `tcp_v4_rcv`/`tcp_v6_rcv` as NOT_SPECIFIED. Its
/// flags look like any ACK — a listen-queue overflow frees the same — so only the socket tells:
/// the tracepoint's `rx_sk` (6.11+) or the timewait hooks. The client's keepalive probes are such
/// ACKs; every segment the server's namespace receives while they run (`Tcp: InSegs`) is one, and
/// each must be counted as a hidden `tcp_teardown`, none shown. The server closes only once its
/// FIN is acknowledged, so that the kernel makes it a timewait socket (checked in
/// `/proc/net/tcp`) rather than, now and then, a full FIN_WAIT2 one (see
/// `fin_and_wait_fin_wait2`).
#[expect(clippy::too_many_lines, reason = "one measurement, read top to bottom")]
fn bare_ack_to_timewait(test: &str, tw_hook: Option<&str>) {
    let client_ns = NetNs::new("twc");
    let server_ns = NetNs::new("tws");
    let (c_if, s_if) = (netdrop_tests::ifname("c"), netdrop_tests::ifname("s"));
    netdrop_tests::veth(&client_ns, &c_if, "10.97.0.1/24", &server_ns, &s_if, "10.97.0.2/24");
    client_ns.ip(&["addr", "add", "fd97::1/64", "dev", &c_if, "nodad"]);
    server_ns.ip(&["addr", "add", "fd97::2/64", "dev", &s_if, "nodad"]);
    let mut args = vec!["--netns".to_string(), server_ns.path().display().to_string()];
    if let Some(h) = tw_hook {
        args.extend(["--tw-hook".to_string(), h.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::start(&args);
    let mut probes = [0u64; 2];
    let mut clients = Vec::new();
    for (i, server_ip) in ["10.97.0.2", "fd97::2"].into_iter().enumerate() {
        let at: SocketAddr = SocketAddr::new(server_ip.parse().expect("ip"), 0);
        let listener = server_ns.within(move || std::net::TcpListener::bind(at).expect("listen"));
        let at = listener.local_addr().expect("addr");
        let client = client_ns.within(move || TcpStream::connect(at).expect("connect"));
        let (server, _) = listener.accept().expect("accept");
        netdrop_tests::fin_and_wait_fin_wait2(&server); // the client's kernel ACKed the FIN
        drop(server); // closed in FIN_WAIT2: a timewait socket
        drop(listener);
        let port = at.port();
        let tw: Vec<_> = server_ns
            .tcp_sockets(i == 1)
            .into_iter()
            .filter(|s| s.local_port == port)
            .collect();
        assert!(
            tw.len() == 1 && tw[0].is_timewait() && tw[0].state == netdrop_tests::TcpSocket::FIN_WAIT2,
            "the server's side is one timewait socket in FIN_WAIT2: {tw:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
        let before = server_ns.snmp("Tcp", "InSegs");
        keepalive(&client, true);
        std::thread::sleep(Duration::from_millis(3500));
        keepalive(&client, false);
        std::thread::sleep(Duration::from_millis(300));
        probes[i] = server_ns.snmp("Tcp", "InSegs") - before;
        clients.push(client); // closed after the trace: its FIN would be one more teardown
    }
    settle();
    let out = tracer.stop();
    drop(clients);
    let hook = out.summary["timewait_hook"].as_str().unwrap_or_default().to_string();
    if let Some(want) = tw_hook
        && hook != want.replace('-', "_")
    {
        skip(
            test,
            &format!(
                "--tw-hook {want} is not available here (got {hook}): {}",
                out.stderr.join(" | ")
            ),
        );
        return;
    }
    assert!(
        ["rx_sk", "fexit", "kprobe"].contains(&hook.as_str()),
        "the socket decides here, not flags: {hook}"
    );
    if tw_hook.is_none() && netdrop_tests::kernel_version() >= (6, 11) {
        assert_eq!(hook, "rx_sk", "kfree_skb passes the receiving socket from 6.11 on");
    }
    let rows = out.rows_in(server_ns.inode());
    for (i, (ip, site)) in [("ipv4", "tcp_v4_rcv+"), ("ipv6", "tcp_v6_rcv+")]
        .into_iter()
        .enumerate()
    {
        assert!(
            probes[i] >= 2,
            "{ip}: keepalive probes reached the server: {}",
            probes[i]
        );
        let teardown: Vec<&&serde_json::Value> = rows
            .iter()
            .filter(|r| r["ip"] == ip && r["classification"] == "tcp_teardown")
            .collect();
        let count: u64 = teardown.iter().map(|r| r["count"].as_u64().expect("count")).sum();
        assert_eq!(
            count, probes[i],
            "{ip}: one tcp_teardown per probe the server received (Tcp InSegs): {}",
            out.summary
        );
        for r in teardown {
            assert!(r["reason"] == "NOT_SPECIFIED" || r["reason"] == "0", "{r}");
            assert!(r["location"].as_str().is_some_and(|l| l.starts_with(site)), "{r}");
            assert_eq!(r["hidden"], true, "{r}");
        }
    }
    // Only TCP's: an IPv6 link also frees neighbour discovery and MLD packets now and then
    // (`icmpv6_rcv` on 6.1), which are not this test's business.
    let visible: Vec<&&serde_json::Value> = rows
        .iter()
        .filter(|r| r["hidden"] == false && r["location"].as_str().is_some_and(|l| l.starts_with("tcp_")))
        .collect();
    assert!(
        visible.is_empty(),
        "keepalive probes to a closed peer drop nothing visible: {visible:?}"
    );
    let tcp_events: Vec<&serde_json::Value> = out.drops.iter().filter(|e| e["protocol"] == "tcp").collect();
    assert!(
        tcp_events.is_empty(),
        "hidden drops are not shown as events: {tcp_events:?}"
    );
}

#[test]
fn bare_ack_to_a_timewait_socket_is_tcp_teardown_and_hidden() {
    const TEST: &str = "bare_ack_to_a_timewait_socket_is_tcp_teardown_and_hidden";
    require_root!(TEST);
    bare_ack_to_timewait(TEST, None);
}

#[test]
fn bare_ack_to_a_timewait_socket_via_fexit() {
    const TEST: &str = "bare_ack_to_a_timewait_socket_via_fexit";
    require_root!(TEST);
    bare_ack_to_timewait(TEST, Some("fexit"));
}

#[test]
fn bare_ack_to_a_timewait_socket_via_kprobe() {
    const TEST: &str = "bare_ack_to_a_timewait_socket_via_kprobe";
    require_root!(TEST);
    bare_ack_to_timewait(TEST, Some("kprobe"));
}

/// The other bare ACK `tcp_v4_rcv` frees: the handshake's last ACK when the listener's accept
/// queue is full (before 6.15 with no reason, `NOT_SPECIFIED`; since then `TCP_LISTEN_OVERFLOW`).
/// It has the same site and flags as a timewait socket's ACK, and it is a real drop (the
/// application does not accept fast enough): it must stay visible, one per `ListenOverflows`.
///
/// The lab: a listener that never accepts; the clients' handshake ACKs are held back by an
/// iptables rule in the client namespace while every client gets its request socket (backlog 16,
/// so no SYN cookies), then the backlog is cut to 1 and the ACKs let through (the server's
/// SYN-ACK retransmission draws them): two fill the accept queue, the others overflow. Each
/// retransmission round overflows again, so the ACKs are held back again before the listener
/// closes, and the kernel's counter is read once netdrop has stopped.
///
/// The listening socket is close-on-exec: without it netdrop (spawned after it) held it open,
/// `drop(listener)` did not close it, and a later round's overflows were counted by netdrop
/// after the test had read `ListenOverflows` (6.1 guest: 8 drops for 4).
#[test]
fn listen_overflow_ack_stays_visible() {
    const TEST: &str = "listen_overflow_ack_stays_visible";
    const CLIENTS: usize = 6;
    use nix::sys::socket::{Backlog, listen};
    require_root!(TEST);
    let client_ns = NetNs::new("loc");
    let server_ns = NetNs::new("los");
    netdrop_tests::no_ipv6(&client_ns);
    netdrop_tests::no_ipv6(&server_ns);
    let (c_if, s_if) = (netdrop_tests::ifname("c"), netdrop_tests::ifname("s"));
    netdrop_tests::veth(&client_ns, &c_if, "10.98.0.1/24", &server_ns, &s_if, "10.98.0.2/24");
    let listener = server_ns.within(|| {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(10, 98, 0, 2, 0)).expect("bind");
        listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
        std::net::TcpListener::from(fd)
    });
    let at = listener.local_addr().expect("addr");
    let tracer = Tracer::start(&["--netns", &server_ns.path().display().to_string()]);
    let before = server_ns.netstat("TcpExt", "ListenOverflows");
    let hold = ["OUTPUT", "-p", "tcp", "--tcp-flags", "ALL", "ACK", "-j", "DROP"];
    client_ns.exec("iptables", &[&["-A"][..], &hold[..]].concat());
    let clients = client_ns.within(move || {
        (0..CLIENTS)
            .map(|_| TcpStream::connect_timeout(&at, Duration::from_secs(10)).expect("connect"))
            .collect::<Vec<_>>()
    });
    listen(&listener, Backlog::new(1).expect("backlog")).expect("listen again");
    client_ns.exec("iptables", &[&["-D"][..], &hold[..]].concat());
    // The server retransmits its SYN-ACKs after 1 s; each client answers with an ACK.
    std::thread::sleep(Duration::from_millis(2500));
    // No ACK may meet the listener while it closes: `inet_csk_listen_stop` empties the accept
    // queue after the state went to CLOSE, so an ACK that saw it listening would get a child
    // that `inet_csk_reqsk_queue_add` then forgets, dropped without a ListenOverflows
    // (net/ipv4/inet_connection_sock.c). Held ACKs die in the client's namespace.
    client_ns.exec("iptables", &[&["-A"][..], &hold[..]].concat());
    drop(listener); // the last reference: no request socket retransmits after this
    let port = at.port();
    let left: Vec<_> = server_ns
        .tcp_sockets(false)
        .into_iter()
        .filter(|s| s.local_port == port)
        .collect();
    assert!(
        left.iter().all(|s| s.state != netdrop_tests::TcpSocket::LISTEN),
        "the listener is closed (no process holds it open): {left:?}"
    );
    settle();
    let out = tracer.stop();
    let overflows = server_ns.netstat("TcpExt", "ListenOverflows") - before;
    drop(clients);
    assert!(overflows >= 1, "the accept queue overflowed: {overflows}");
    let rows = out.rows_in(server_ns.inode());
    let at_rcv: Vec<&&serde_json::Value> = rows
        .iter()
        .filter(|r| r["location"].as_str().is_some_and(|l| l.starts_with("tcp_v4_rcv+")))
        .collect();
    let visible: u64 = at_rcv
        .iter()
        .filter(|r| {
            r["hidden"] == false
                && ["NOT_SPECIFIED", "TCP_LISTEN_OVERFLOW", "0"].contains(&r["reason"].as_str().unwrap_or_default())
        })
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(
        visible, overflows,
        "one visible drop per ListenOverflows: {}",
        out.summary
    );
    assert!(
        rows.iter().all(|r| r["classification"] != "tcp_teardown"),
        "nothing here is a teardown: {}",
        out.summary
    );
}

/// A keepalive probe (a bare ACK) that reaches a server whose connection is gone but whose
/// listener remains meets the LISTEN socket: `tcp_v4_do_rcv` answers it with a reset and frees
/// it (`TCP_FLAGS` from 6.10). `tcp_v4_rcv` cleared `skb->dev` first and stole `skb->sk`, so the
/// namespace comes from the receiving socket (`rx_sk`, 6.11+) or the route: it must be the
/// server namespace's inode, never 0. Each is counted with effect `reset`, one per reset the
/// server's kernel sent (`Tcp: OutRsts`); the client never sees them (an iptables rule in its
/// namespace drops incoming RSTs, so it keeps probing).
#[test]
fn ack_to_a_listener_is_a_reset_in_the_servers_namespace() {
    const TEST: &str = "ack_to_a_listener_is_a_reset_in_the_servers_namespace";
    require_root!(TEST);
    netdrop_tests::require_reasons!(TEST);
    let client_ns = NetNs::new("lrc");
    let server_ns = NetNs::new("lrs");
    netdrop_tests::no_ipv6(&client_ns);
    netdrop_tests::no_ipv6(&server_ns);
    let (c_if, s_if) = (netdrop_tests::ifname("c"), netdrop_tests::ifname("s"));
    netdrop_tests::veth(&client_ns, &c_if, "10.99.0.1/24", &server_ns, &s_if, "10.99.0.2/24");
    client_ns.exec(
        "iptables",
        &["-A", "INPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"],
    );
    let listener = server_ns.within(|| std::net::TcpListener::bind("10.99.0.2:0").expect("listen"));
    let at = listener.local_addr().expect("addr");
    // The protocol filter makes the kernel program parse every drop (and so decide its effect).
    let tracer = Tracer::start(&["--netns", &server_ns.path().display().to_string(), "--proto", "tcp"]);
    let client = client_ns.within(move || TcpStream::connect(at).expect("connect"));
    let (server, _) = listener.accept().expect("accept");
    // Abort the server's side (SO_LINGER 0: a RST, which the client drops): only the listener
    // is left for the client's segments.
    {
        use std::os::fd::AsRawFd as _;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on an open socket with a pointer to a local struct.
        let rc = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    }
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    let before = server_ns.snmp("Tcp", "OutRsts");
    keepalive(&client, true);
    std::thread::sleep(Duration::from_millis(3500));
    keepalive(&client, false);
    std::thread::sleep(Duration::from_millis(300));
    let resets_sent = server_ns.snmp("Tcp", "OutRsts") - before;
    settle();
    let out = tracer.stop();
    drop((client, listener));
    if out.stderr.iter().any(|l| l.starts_with("netdrop: drop effects off")) {
        // Without rx_sk (before 6.11) the namespace comes from the route, which that mode leaves out.
        skip(
            TEST,
            "drop effects and the route's namespace are off here: the verifier refused the full program",
        );
        return;
    }
    assert!(
        resets_sent >= 2,
        "the probes met the listener and were reset: {resets_sent}"
    );
    let at_do_rcv = |l: &serde_json::Value| l.as_str().is_some_and(|l| l.starts_with("tcp_v4_do_rcv+"));
    let events: Vec<&serde_json::Value> = out.drops.iter().filter(|e| at_do_rcv(&e["location"])).collect();
    assert!(!events.is_empty(), "the probes' drops were seen: {}", out.summary);
    for e in &events {
        assert_eq!(
            e["netns"],
            server_ns.inode(),
            "the server's namespace, from the socket or the route: {e}"
        );
        assert_eq!(e["tcp_flags"], "ACK", "{e}");
    }
    let rows: Vec<&serde_json::Value> = out.summary["drops"]
        .as_array()
        .expect("drops")
        .iter()
        .filter(|r| at_do_rcv(&r["location"]))
        .collect();
    assert!(
        rows.iter().all(|r| r["netns"] == server_ns.inode()),
        "no row without its namespace: {rows:?}"
    );
    let counted: u64 = rows.iter().map(|r| r["count"].as_u64().expect("count")).sum();
    assert_eq!(
        counted, resets_sent,
        "one drop per reset the server sent (Tcp: OutRsts): {}",
        out.summary
    );
    // The reason says "an ACK met a listener" from 6.10 on; before, the site frees it without one.
    if netdrop_tests::kernel_version() >= (6, 10) {
        for r in &rows {
            assert_eq!(r["reason"], "TCP_FLAGS", "{r}");
            assert_eq!(r["effect"], "reset", "answered with a reset, not a loss: {r}");
        }
    }
}
