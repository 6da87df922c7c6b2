//! tc accounting is exact: a known number of packets, bytes, SYNs and UDP flows from (and to) a
//! pod namespace appear exactly in the counters, compared with what the test sent and with the
//! host-side veth's own /sys/class/net statistics. Both attach modes and `auto`, through the
//! library API the trace loop uses (`TcAccounting`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use netdrop::{
    probe::tc::{TcMode, TcModeChoice},
    source::interfaces::{Destination, NodeNetns, TcAccounting, WatchOptions},
};
use netdrop_tests::{TcNode, has_tcx, require_root, require_tcx};

const UDP_ONE_FLOW: usize = 300;
const CLOSED_CONNECTS: usize = 40;
const OPEN_CONNECTS: usize = 25;
const UDP_FLOWS: usize = 30;
const INBOUND_CONNECTS: usize = 10;

#[expect(clippy::too_many_lines, reason = "one measurement, read top to bottom")]
fn exact_counts(mode: TcModeChoice, test: &str, subnet: u8) {
    require_root!(test);
    if mode == TcModeChoice::Tcx {
        require_tcx!(test);
    }
    let node = TcNode::new("tcnode");
    let pod = node.add_pod(subnet, 1);
    let other = node.add_pod(subnet, 2); // attached too, must stay silent
    let opts = WatchOptions {
        mode,
        ..WatchOptions::default()
    };
    let acct = TcAccounting::start(
        &[NodeNetns {
            node: "n1".into(),
            path: Some(node.ns.path()),
        }],
        "unused",
        &opts,
        None,
    )
    .expect("start tc accounting");
    // `auto`: TCX where the kernel has it (6.6+), clsact below.
    let expected = if mode == TcModeChoice::Tcx || (mode == TcModeChoice::Auto && has_tcx()) {
        TcMode::Tcx
    } else {
        TcMode::Clsact
    };
    assert_eq!(acct.mode(), expected, "attach mode ({})", acct.mode_note());
    let (node_ip, pod_ip) = (pod.node_ip, pod.pod_ip);
    let listening = Destination {
        ip: node_ip.into(),
        port: 9002,
        proto: 6,
    };
    let udp_dest = Destination {
        ip: node_ip.into(),
        port: 9003,
        proto: 17,
    };
    let inbound = Destination {
        ip: pod_ip.into(),
        port: 9100,
        proto: 6,
    };
    acct.set_destinations(&[listening, udp_dest, inbound])
        .expect("destinations");

    let rx0 = (
        node.if_stat(&pod.host_if, "rx_packets"),
        node.if_stat(&pod.host_if, "rx_bytes"),
    );
    let tx0 = (
        node.if_stat(&pod.host_if, "tx_packets"),
        node.if_stat(&pod.host_if, "tx_bytes"),
    );

    // Listeners: node side (9002) and pod side (9100).
    let node_listener = node
        .ns
        .within(move || TcpListener::bind((node_ip, 9002)).expect("listen 9002"));
    let pod_listener = pod
        .ns
        .within(move || TcpListener::bind((pod_ip, 9100)).expect("listen 9100"));
    let accept_all = |l: TcpListener, n: usize| {
        std::thread::spawn(move || {
            for _ in 0..n {
                let (mut s, _) = l.accept().expect("accept");
                let mut b = [0u8; 5];
                s.read_exact(&mut b).expect("read");
            }
        })
    };
    let node_acceptor = accept_all(node_listener, OPEN_CONNECTS);
    let pod_acceptor = accept_all(pod_listener, INBOUND_CONNECTS);

    pod.ns.within(move || {
        // One UDP flow of UDP_ONE_FLOW datagrams to a closed port.
        let s = UdpSocket::bind((pod_ip, 0)).expect("bind");
        for _ in 0..UDP_ONE_FLOW {
            s.send_to(&[7u8; 100], (node_ip, 9000)).expect("send");
        }
        // SYNs answered by RST: exactly one SYN each.
        for _ in 0..CLOSED_CONNECTS {
            assert!(TcpStream::connect_timeout(&SocketAddr::from((node_ip, 9001)), Duration::from_secs(2)).is_err());
        }
        // Full connections: one SYN each.
        for _ in 0..OPEN_CONNECTS {
            let mut c = TcpStream::connect((node_ip, 9002)).expect("connect");
            c.write_all(b"hello").expect("write");
        }
        // UDP_FLOWS flows of three datagrams each: three sockets' worth of packets, one new flow each.
        // All sockets stay open so that their ports (and so their 5-tuples) differ: a port
        // reused within 30 s would rightly be the same flow.
        let mut sockets = Vec::new();
        for _ in 0..UDP_FLOWS {
            let s = UdpSocket::bind((pod_ip, 0)).expect("bind");
            for _ in 0..3 {
                s.send_to(b"flow", (node_ip, 9003)).expect("send");
            }
            sockets.push(s);
        }
        drop(s);
    });
    node.ns.within(move || {
        for _ in 0..INBOUND_CONNECTS {
            let mut c = TcpStream::connect((pod_ip, 9100)).expect("connect to pod");
            c.write_all(b"hello").expect("write");
        }
    });
    node_acceptor.join().expect("node acceptor");
    pod_acceptor.join().expect("pod acceptor");
    // FINs and last ACKs of the closed connections.
    std::thread::sleep(Duration::from_millis(500));

    let snap = acct.snapshot();
    let rx = (
        node.if_stat(&pod.host_if, "rx_packets") - rx0.0,
        node.if_stat(&pod.host_if, "rx_bytes") - rx0.1,
    );
    let tx = (
        node.if_stat(&pod.host_if, "tx_packets") - tx0.0,
        node.if_stat(&pod.host_if, "tx_bytes") - tx0.1,
    );
    let i = snap.interface("n1", &pod.host_if).expect("pod interface watched");
    eprintln!(
        "{test}: from pod {:?} (veth rx {rx:?}); to pod {:?} (veth tx {tx:?})",
        i.from_pod, i.to_pod
    );
    assert_eq!(
        (i.from_pod.packets, i.from_pod.bytes),
        rx,
        "from-pod packets/bytes = host veth rx statistics"
    );
    assert_eq!(
        (i.to_pod.packets, i.to_pod.bytes),
        tx,
        "to-pod packets/bytes = host veth tx statistics"
    );
    assert_eq!(
        i.from_pod.tcp_syn,
        (CLOSED_CONNECTS + OPEN_CONNECTS) as u64,
        "SYNs the pod sent"
    );
    assert_eq!(i.from_pod.udp_new, (1 + UDP_FLOWS) as u64, "UDP flows the pod opened");
    assert_eq!(
        i.to_pod.tcp_syn, INBOUND_CONNECTS as u64,
        "SYNs to the pod (SYN-ACKs are not attempts)"
    );
    assert_eq!(i.to_pod.udp_new, 0, "no UDP flow towards the pod");
    assert!(i.from_pod.packets >= (UDP_ONE_FLOW + CLOSED_CONNECTS + 3 * UDP_FLOWS) as u64);
    assert_eq!(snap.attempts_to(&listening), (OPEN_CONNECTS as u64, 0));
    // Per destination, every datagram is an attempt (drops count datagrams too); per interface,
    // `udp_new` still counts flows.
    assert_eq!(
        snap.attempts_to(&udp_dest),
        (3 * UDP_FLOWS as u64, 0),
        "datagrams sent to the destination"
    );
    assert_eq!(snap.attempts_to(&inbound), (0, INBOUND_CONNECTS as u64));
    assert_eq!(i.peer_netns, Some(pod.ns.inode()), "peer (pod) namespace found");
    assert_eq!(i.netns, node.ns.inode());
    let quiet = snap.interface("n1", &other.host_if).expect("second pod watched");
    assert_eq!((quiet.from_pod.packets, quiet.to_pod.packets), (0, 0));
    assert_eq!(snap.stats.unregistered_packets, 0);
    assert_eq!(snap.stats.attach_errors, 0);

    // Nothing stays attached after shutdown.
    let detached = acct.shutdown();
    assert_eq!(detached, 2);
    let progs = node.tcx_programs(&[pod.host_if.clone(), other.host_if.clone()]);
    assert!(
        progs.values().all(|(i, e)| i.is_empty() && e.is_empty()),
        "TCX programs left: {progs:?}"
    );
    assert!(
        node.bpftool_tc().is_empty(),
        "tc programs left: {:?}",
        node.bpftool_tc()
    );
}

#[test]
fn tc_counts_are_exact_tcx() {
    exact_counts(TcModeChoice::Tcx, "tc_counts_are_exact_tcx", 91);
}

#[test]
fn tc_counts_are_exact_clsact() {
    exact_counts(TcModeChoice::Clsact, "tc_counts_are_exact_clsact", 92);
}

/// `--tc-mode auto` (the default) picks TCX on 6.6+ and clsact below, and counts as exactly.
#[test]
fn tc_counts_are_exact_auto() {
    exact_counts(TcModeChoice::Auto, "tc_counts_are_exact_auto", 90);
}

/// `trace`'s configuration (no UDP flow table) counts attempts per destination as exactly, while
/// the destinations change kind: the programs look up only the kinds of entries that exist
/// (port 0 = any port of the address, a port), so each change must reach them before the next
/// packet. `udp_new` stays 0 (nothing is tracked), SYNs still count per interface.
#[test]
fn tc_counts_follow_destination_kinds_without_flow_table() {
    let test = "tc_counts_follow_destination_kinds_without_flow_table";
    require_root!(test);
    let node = TcNode::new("tcnode");
    let pod = node.add_pod(88, 1);
    let mut opts = WatchOptions::default();
    opts.load.udp_flows = false;
    let acct = TcAccounting::start(
        &[NodeNetns {
            node: "n1".into(),
            path: Some(node.ns.path()),
        }],
        "unused",
        &opts,
        None,
    )
    .expect("start tc accounting");
    let (node_ip, pod_ip) = (pod.node_ip, pod.pod_ip);
    let dest = |port, proto| Destination {
        ip: node_ip.into(),
        port,
        proto,
    };
    let (any_udp, any_tcp, udp_9000) = (dest(0, 17), dest(0, 6), dest(9000, 17));
    // Datagrams to two closed ports and SYNs answered by RST, from the pod.
    let send = |to_9000: usize, to_9001: usize, syns: usize| {
        pod.ns.within(move || {
            let s = UdpSocket::bind((pod_ip, 0)).expect("bind");
            for _ in 0..to_9000 {
                s.send_to(b"d", (node_ip, 9000)).expect("send");
            }
            for _ in 0..to_9001 {
                s.send_to(b"d", (node_ip, 9001)).expect("send");
            }
            for _ in 0..syns {
                assert!(
                    TcpStream::connect_timeout(&SocketAddr::from((node_ip, 9001)), Duration::from_secs(2)).is_err()
                );
            }
        });
    };

    // 1. Only any-port entries (pods as targets).
    acct.set_destinations(&[any_udp, any_tcp]).expect("destinations");
    send(10, 5, 4);
    let snap = acct.snapshot();
    assert_eq!(snap.attempts_to(&any_udp), (15, 0), "datagrams to any port");
    assert_eq!(snap.attempts_to(&any_tcp), (4, 0), "SYNs to any port");

    // 2. Only a port entry: the any-port entries are gone, the port entry starts at 0.
    acct.set_destinations(&[udp_9000]).expect("destinations");
    send(7, 3, 0);
    let snap = acct.snapshot();
    assert_eq!(snap.attempts_to(&udp_9000), (7, 0), "datagrams to port 9000");
    assert_eq!(snap.attempts_to(&any_udp), (0, 0), "entry removed");

    // 3. Both kinds: the kept entry goes on, the re-added one starts at 0.
    acct.set_destinations(&[udp_9000, any_udp]).expect("destinations");
    send(2, 1, 0);
    let snap = acct.snapshot();
    assert_eq!(
        snap.attempts_to(&udp_9000),
        (9, 0),
        "datagrams to port 9000 since phase 2"
    );
    assert_eq!(
        snap.attempts_to(&any_udp),
        (3, 0),
        "datagrams to any port since phase 3"
    );

    // 4. None: nothing is looked up, the interface still counts.
    acct.set_destinations(&[]).expect("destinations");
    send(1, 1, 1);
    let snap = acct.snapshot();
    assert!(snap.destinations.is_empty(), "{:?}", snap.destinations);
    let i = snap.interface("n1", &pod.host_if).expect("pod interface watched");
    assert_eq!(i.from_pod.tcp_syn, 5, "SYNs the pod sent");
    assert_eq!(i.from_pod.udp_new, 0, "no flow table: no UDP flows counted");
    assert_eq!(snap.stats.flow_insert_failed, 0);
    assert_eq!(snap.stats.unregistered_packets, 0);
    assert_eq!(acct.shutdown(), 1);
}
