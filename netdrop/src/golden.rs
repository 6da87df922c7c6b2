//! Golden test of the JSON lines: every line type netdrop prints (`drop` events, the plain
//! `summary`, the `--svc` summary periodic and final), built from kernel-shaped inputs through
//! the stages that make them, byte for byte against `netdrop/tests/golden/lines.jsonl`.
//!
//! The JSON schema is a promise to users: a refactor must leave these bytes alone. A change that
//! adds a field on purpose regenerates the file with `NETDROP_BLESS=1 cargo test -p netdrop
//! --lib golden` and shows the difference in review.

use std::{net::IpAddr, sync::Arc};

use etherparse::PacketBuilder;
use netdrop_common::{ConntrackTuple, DropEvent, DropKey, HEADER_BYTES, IFNAMSIZ, ct, effect, stat};

use crate::{
    aggregate::attach::{AttachHook, AttachReport, Attached, Fallback, Program},
    aggregate::{self, SummaryContext},
    aggregate::{
        target_set::TargetSet,
        target_summary::{self, Observed},
    },
    enrich::classify::{self, Facts},
    enrich::decode::Decoder,
    enrich::record::DropRecord,
    enrich::visibility::Visibility,
    kernel::reasons::ReasonTable,
    kernel::symbols::KernelSymbols,
    probe::{Hook, KernelCounts, PreciseHook, tc::TcMode},
    resolve::{Backend, Name, Peer, PeerKind, Proto, ServiceInfo, ServicePort},
    sink::{JsonSink, Sink as _},
    source::conntrack::{CtStats, Evidence},
    source::interfaces::{Destination, DestinationSnapshot, TcSnapshot, WatchStats},
};

const FORMAT: &str = r#"print fmt: "skbaddr=%p location=%pS reason: %s", REC->skbaddr, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 12, "NETFILTER_DROP" }, { 104, "QUEUE_PURGE" }, { 128, "MAX" })"#;
const KALLSYMS: &str = "ffffffff81a00000 T __udp4_lib_rcv\nffffffff81b00000 t nft_do_chain\t[nf_tables]\nffffffff81c00000 T sk_stream_kill_queues\nffffffff81d00000 T tcp_v4_rcv\n";
const UDP_RCV: u64 = 0xffff_ffff_81a0_04bc;
const NFT: u64 = 0xffff_ffff_81b0_03e8;
const PURGE: u64 = 0xffff_ffff_81c0_0057;

fn tables() -> (Arc<ReasonTable>, Arc<KernelSymbols>) {
    (
        Arc::new(ReasonTable::from_print_fmt(FORMAT).expect("reasons")),
        Arc::new(KernelSymbols::parse(KALLSYMS)),
    )
}

fn event(reason: u32, location: u64, packet: &[u8], l3_proto: u16) -> DropEvent {
    let mut headers = [0u8; HEADER_BYTES];
    let n = packet.len().min(HEADER_BYTES);
    headers[..n].copy_from_slice(&packet[..n]);
    let mut ifname = [0u8; IFNAMSIZ];
    ifname[..15].copy_from_slice(b"cali1b2c3d4e5f6");
    DropEvent {
        ts_ns: 1_000_000_123,
        location,
        skb_addr: 0xffff_8880_0000_1000,
        reason,
        netns: 4_026_532_177,
        ifindex: 7,
        skb_len: packet.len() as u32,
        l3_proto,
        header_len: n as u16,
        cpu: 1,
        ifname,
        ct_status: 0,
        ct_state: ct::NONE,
        ct_info: 0,
        exact_class: 0,
        effect: effect::ATTEMPT,
        ct_orig: ConntrackTuple::default(),
        tag: 0,
        _pad2: 0,
        headers,
    }
}

fn decoder(conntrack: bool) -> Decoder {
    let (reasons, symbols) = tables();
    // 2026-11-26T09:51:57Z at a monotonic 1 s.
    Decoder {
        reasons,
        symbols,
        clock_offset_ns: 1_795_168_316_000_000_000,
        node: "node-a".into(),
        conntrack,
    }
}

fn classified(d: &Decoder, ev: &DropEvent) -> DropRecord {
    let mut r = d.decode(ev, d.symbols.locate(ev.location));
    let facts = Facts {
        reason: &r.reason,
        function: r.location.function(),
        ct_state: ev.ct_state,
        kernel_class: ev.exact_class,
    };
    (r.classification, r.certainty) = classify::classify(&facts, &Evidence::default());
    r
}

fn peer(kind: PeerKind, pod: Option<&str>, node: &str, service: Option<(&str, &str)>) -> Peer {
    Peer {
        kind,
        pod: pod.map(Name::new),
        namespace: Some(Name::new("default")),
        node: Some(Name::new(node)),
        service: service.map(|(s, _)| Name::new(s)),
        service_port: service.map(|(_, p)| Name::new(p)),
        workload: pod.filter(|p| p.starts_with("web")).map(|_| Name::new("web")),
        ready: service.map(|_| true),
    }
}

/// Drop events: a UDP datagram to a closed port (no conntrack, no names), a TCP SYN dropped by
/// a rule after DNAT (conntrack, pre-NAT destination, names on both ends), an ICMPv6 packet.
fn drop_lines() -> Vec<DropRecord> {
    let mut out = Vec::new();
    let mut pkt = Vec::new();
    PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
        .udp(40713, 9999)
        .write(&mut pkt, &[0; 10])
        .expect("udp");
    out.push(classified(&decoder(false), &event(3, UDP_RCV, &pkt, 0x0800)));

    let mut pkt = Vec::new();
    PacketBuilder::ipv4([10, 244, 1, 7], [10, 244, 2, 10], 63)
        .tcp(35632, 8080, 1, 64240)
        .syn()
        .write(&mut pkt, &[])
        .expect("tcp");
    let mut ev = event(12, NFT, &pkt, 0x0800);
    ev.ct_state = ct::UNCONFIRMED;
    ev.exact_class = 0;
    ev.tag = 3;
    ev.ct_orig = ConntrackTuple {
        src: [10, 244, 1, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [10, 96, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        src_port: 35632u16.to_be(),
        dst_port: 80u16.to_be(),
        l3num: 2,
        protonum: 6,
        _pad: 0,
    };
    let mut r = classified(&decoder(true), &ev);
    r.node = "node-b".into();
    if let Some(e) = &mut r.src {
        e.k8s = Some(peer(PeerKind::Pod, Some("client"), "node-a", None));
    }
    if let Some(e) = &mut r.dst {
        e.k8s = Some(peer(PeerKind::Pod, Some("web-2"), "node-b", Some(("web", "http"))));
    }
    if let Some(e) = &mut r.orig_dst {
        e.k8s = Some(peer(PeerKind::Service, None, "node-b", Some(("web", "http"))));
    }
    out.push(r);

    let mut pkt = Vec::new();
    PacketBuilder::ipv6(
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        64,
    )
    .icmpv6_echo_request(1, 2)
    .write(&mut pkt, &[0; 8])
    .expect("icmpv6");
    let mut ev = event(2, UDP_RCV, &pkt, 0x86dd);
    ev.effect = effect::DATA;
    ev.netns = 0;
    out.push(classified(&decoder(false), &ev));
    out
}

fn key(reason: u32, location: u64, netns: u32, tag: u32, eff: u8) -> DropKey {
    DropKey {
        location,
        reason,
        netns,
        ip_version: 4,
        ct_state: ct::NONE,
        exact_class: 0,
        effect: eff,
        tag,
        netns_cookie: 0,
    }
}

/// As on a kernel that refuses fexit and has no kprobes, with TCX.
fn attach_report() -> AttachReport {
    let mut r = AttachReport::default();
    r.attached(Attached::new(Program::KfreeSkb, Hook::TpBtf));
    r.attached(Attached::new(Program::Conntrack, PreciseHook::Inferred).fallbacks(vec![
            Fallback {
                hook: AttachHook::Fexit,
                error: "ct_confirm_exit: load refused: Operation not permitted (os error 1)".into(),
            },
            Fallback {
                hook: AttachHook::Kprobe,
                error:
                    "kernel program ct_confirm_entry: `perf_event_open` failed: No such file or directory (os error 2)"
                        .into(),
            },
        ]));
    r.attached(Attached::new(Program::Timewait, AttachHook::RxSk));
    r.attached(Attached::new(Program::Tc, TcMode::Tcx));
    r
}

fn plain_summary() -> aggregate::Summary {
    let (reasons, symbols) = tables();
    let mut stats = [0u64; stat::COUNT as usize];
    stats[stat::EVENTS_LOST as usize] = 2;
    let counts = KernelCounts {
        drops: vec![
            (key(3, UDP_RCV, 4_026_532_177, 0, effect::ATTEMPT), 812),
            (key(12, NFT, 4_026_531_840, 0, effect::ATTEMPT), 97),
            (key(104, PURGE, 4_026_531_840, 0, effect::UNKNOWN), 21),
        ],
        stats,
    };
    let mut cfg = netdrop_common::Config::DEFAULT;
    for r in [2, 3, 12] {
        cfg.set_emit(r, true);
    }
    let visibility = Visibility::new(&cfg, true);
    let classify_row = |k: &DropKey, function: Option<&str>| {
        let reason = reasons.reason(k.reason);
        let facts = Facts {
            reason: &reason,
            function,
            ct_state: k.ct_state,
            kernel_class: k.exact_class,
        };
        classify::classify(&facts, &Evidence::default())
    };
    let ct_stats = CtStats {
        count: 120,
        max: 262_144,
        insert_failed: 3,
        ..CtStats::default()
    };
    let attach = attach_report();
    let ctx = SummaryContext {
        reasons: &reasons,
        symbols: &symbols,
        visibility: &visibility,
        node: "node-a",
        attach: &attach,
        classify: &classify_row,
        conntrack: vec![(4_026_531_840, ct_stats)],
    };
    let mut s = aggregate::summarize(&counts, &ctx, 12.0, 909);
    s.time = "2026-11-26T09:52:09.519058312Z".into();
    s
}

/// The lab's `default/web`: three backends on two nodes (also the merge tests' Service).
pub(crate) fn service() -> ServiceInfo {
    let backend = |pod: &str, node: &str, ip: &str| Backend {
        pod: Some(Name::new(pod)),
        namespace: Some(Name::new("default")),
        node: Some(Name::new(node)),
        ip: ip.parse().expect("ip"),
        port: 8080,
        port_name: Some(Name::new("http")),
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
        ports: vec![ServicePort {
            name: Some(Name::new("http")),
            port: 80,
            protocol: Proto::Tcp,
            target_port: "8080".into(),
            node_port: None,
        }],
        backends: vec![
            backend("web-0", "node-a", "10.244.1.10"),
            backend("web-1", "node-a", "10.244.1.11"),
            backend("web-2", "node-b", "10.244.2.10"),
        ],
    }
}

fn svc_summaries() -> Vec<target_summary::TargetSummary> {
    let t = TargetSet::from_service(&service(), &|_| vec![]);
    let bad = t.backends[2].tag;
    let summary = plain_summary();
    let mut rows = summary.drops.clone();
    for r in &mut rows {
        if r.reason == "NETFILTER_DROP" {
            r.tag = bad;
            r.netns = 99;
        }
    }
    let dest = |ip: IpAddr, port: u16| Destination { ip, port, proto: 6 };
    let snap = TcSnapshot {
        interfaces: vec![],
        destinations: vec![
            DestinationSnapshot {
                node: "node-a".into(),
                dest: dest(t.frontends[0].0, 80),
                from_pod: 500,
                to_pod: 0,
            },
            DestinationSnapshot {
                node: "node-a".into(),
                dest: dest(t.backends[0].ip, 8080),
                from_pod: 0,
                to_pod: 179,
            },
            DestinationSnapshot {
                node: "node-a".into(),
                dest: dest(t.backends[1].ip, 8080),
                from_pod: 0,
                to_pod: 169,
            },
        ],
        stats: WatchStats::default(),
    };
    let node_of = |n: u32| (n == 99).then(|| "node-b".to_string());
    let observed = |is_final| Observed {
        rows: &rows,
        tc: Some(&snap),
        node_of: &node_of,
        nodes_given: true,
        lost_events: 0,
        conntrack: &[],
        duration_s: 7.0,
        time: "2026-11-26T09:52:04Z".into(),
        is_final,
    };
    let periodic = target_summary::build(&t, &observed(false));
    let mut last = target_summary::build(&t, &observed(true));
    last.detail = Some(summary);
    vec![periodic, last]
}

fn rendered() -> String {
    let mut buf = Vec::new();
    {
        let mut sink = JsonSink::new(&mut buf);
        for d in drop_lines() {
            sink.on_drop(&d).expect("drop line");
        }
        sink.on_summary(&plain_summary()).expect("summary line");
        for s in svc_summaries() {
            sink.on_target_summary(&s).expect("svc line");
        }
        sink.flush().expect("flush");
    }
    String::from_utf8(buf).expect("utf-8")
}

#[test]
fn json_lines_are_unchanged() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/lines.jsonl");
    let got = rendered();
    if std::env::var_os("NETDROP_BLESS").is_some() {
        std::fs::write(path, &got).expect("writing the golden file");
    }
    let want = std::fs::read_to_string(path).expect("the golden file (NETDROP_BLESS=1 writes it)");
    for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {} differs from {path}", i + 1);
    }
    assert_eq!(got.lines().count(), want.lines().count(), "number of lines");
    // Every line type is there.
    for kind in [
        r#"{"type":"drop""#,
        r#""type":"summary""#,
        r#""service":"default/web""#,
        r#""final":true"#,
        r#""final":false"#,
    ] {
        assert!(got.contains(kind), "{kind} missing");
    }
}

/// The summary lines read back are the lines written (a node's summaries cross the wire in a
/// cluster-wide trace).
#[test]
fn summary_lines_read_back_byte_for_byte() {
    let line = serde_json::to_string(&plain_summary()).expect("json");
    let back: aggregate::Summary = serde_json::from_str(&line).expect("summary from JSON");
    assert_eq!(serde_json::to_string(&back).expect("json"), line);
    for s in svc_summaries() {
        let line = serde_json::to_string(&s).expect("json");
        let back: target_summary::TargetSummary = serde_json::from_str(&line).expect("target summary from JSON");
        assert_eq!(serde_json::to_string(&back).expect("json"), line);
    }
}
