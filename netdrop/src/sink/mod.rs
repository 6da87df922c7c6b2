//! Sinks: where drop events and summaries go. One pipeline feeds any number of sinks: the
//! terminal ([`text`], [`live`]), JSON lines ([`json`]), pcapng capture files ([`pcapng`]), the
//! postmortem bundle ([`bundle`]), the agent's Prometheus metrics ([`metrics`]). Sinks turn
//! typed values into text; nothing here computes a count.

pub mod bundle;
pub mod json;
pub mod live;
pub mod metrics;
pub mod pcapng;
pub mod recorder;
pub mod table;
pub mod terminal;
pub mod text;

use std::io;

pub use self::{
    json::JsonSink,
    live::{LiveTable, RecentSink},
    terminal::log_colour,
    text::TextSink,
};
use crate::{
    aggregate::{Summary, target_summary::TargetSummary},
    enrich::record::DropRecord,
};

/// Receives what the pipeline produces.
pub trait Sink: Send {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()>;
    fn on_summary(&mut self, summary: &Summary) -> io::Result<()>;
    /// A `--svc`/`--pod`/`--node` summary (periodic and final).
    fn on_target_summary(&mut self, summary: &TargetSummary) -> io::Result<()>;
    /// Called after each batch of events: a sink that buffers writes them out here.
    fn flush(&mut self) -> io::Result<()>;
    /// The sink has all it wants (`capture --count`): the command stops.
    fn done(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        ffi::OsStr,
        net::{IpAddr, SocketAddr},
    };

    use super::{
        live::{final_text, live_frame},
        terminal::{log_colour, wrap},
        text::{TextLine, endpoint, fit_summary_line, k8s_name, text_fields, text_line},
        *,
    };
    use crate::{
        enrich::{
            classify::{Certainty, Classification, Effect},
            record::{CtState, Endpoint, RawDetail, TcpFlags},
        },
        kernel::{
            proto::{IpProto, Protocol},
            reasons::Reason,
            symbols::KernelSymbols,
        },
        resolve::{Name, Peer, PeerKind},
    };

    fn ep(addr: &str, peer: Option<Peer>) -> Endpoint {
        let a: SocketAddr = addr.parse().expect("addr");
        Endpoint {
            ip: a.ip(),
            port: Some(a.port()),
            k8s: peer,
        }
    }

    fn pod(ns: &str, name: &str, node: &str) -> Peer {
        Peer {
            kind: PeerKind::Pod,
            namespace: Some(Name::new(ns)),
            pod: Some(Name::new(name)),
            node: Some(Name::new(node)),
            ..Peer::default()
        }
    }

    fn backend(ns: &str, name: &str, node: &str, svc: &str, port: &str) -> Peer {
        Peer {
            service: Some(Name::new(svc)),
            service_port: Some(Name::new(port)),
            ready: Some(true),
            ..pod(ns, name, node)
        }
    }

    fn service(svc: &str, port: &str) -> Peer {
        Peer {
            kind: PeerKind::Service,
            namespace: Some(Name::new("default")),
            service: Some(Name::new(svc)),
            service_port: Some(Name::new(port)),
            ..Peer::default()
        }
    }

    fn node(name: &str) -> Peer {
        Peer {
            kind: PeerKind::Node,
            node: Some(Name::new(name)),
            ..Peer::default()
        }
    }

    fn reason(name: &str) -> Reason {
        Reason::Named {
            code: 12,
            name: name.into(),
        }
    }

    fn record(src: Endpoint, dst: Endpoint) -> DropRecord {
        DropRecord {
            kind: "drop",
            time: humantime::parse_rfc3339("2026-11-26T10:21:33.123456789Z").expect("time"),
            node: "node-a".into(),
            reason: reason("NETFILTER_DROP"),
            location: KernelSymbols::parse("ffffffff81a00000 T nf_hook_slow\n").locate(0xffff_ffff_81a0_007d),
            protocol: Protocol::Ip(IpProto::TCP),
            src: Some(src),
            dst: Some(dst),
            ifindex: 2,
            ifname: "eth0".into(),
            netns: 4_026_531_840,
            len: 60,
            tcp_flags: Some(TcpFlags(TcpFlags::SYN)),
            payload_len: Some(0),
            icmp: None,
            classification: Classification::InsertFailed,
            certainty: Certainty::Exact,
            effect: Effect::Attempt,
            conntrack: Some(CtState::Unconfirmed),
            orig_dst: None,
            orig_src: None,
            tag: 0,
            ip_version: 4,
            raw: RawDetail::default(),
        }
    }

    /// The drop of the field notes: SNAT to node-a's address, DNAT to web-2 on node-b.
    fn snat_dnat() -> DropRecord {
        let mut d = record(
            ep("192.168.50.10:40002", Some(node("node-a"))),
            ep(
                "10.244.2.10:8080",
                Some(backend("default", "web-2", "node-b", "default/web", "http")),
            ),
        );
        d.orig_dst = Some(ep("10.96.0.10:80", Some(service("default/web", "http"))));
        d.orig_src = Some(ep("10.244.1.2:35632", Some(pod("default", "client", "node-a"))));
        d
    }

    #[test]
    fn names_both_ends_the_service_and_the_node_then_the_addresses() {
        assert_eq!(
            text_line(&snat_dnat()),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2 via svc default/web:80 [SYN] \
             (conntrack_insert_failed)  on node-a  at nf_hook_slow+0x7d  192.168.50.10:40002 → 10.244.2.10:8080 \
             orig-dst=10.96.0.10:80 orig-src=10.244.1.2:35632  if=eth0 netns=4026531840"
        );
    }

    #[test]
    fn without_kubernetes_the_line_is_addresses_as_before() {
        let mut d = snat_dnat();
        for e in [&mut d.src, &mut d.dst, &mut d.orig_src, &mut d.orig_dst]
            .into_iter()
            .flatten()
        {
            e.k8s = None;
        }
        assert_eq!(
            text_line(&d),
            "10:21:33.123456 NETFILTER_DROP   tcp    192.168.50.10:40002 → 10.244.2.10:8080 [SYN] (conntrack_insert_failed) \
             orig-dst=10.96.0.10:80 orig-src=10.244.1.2:35632  if=eth0 netns=4026531840  at nf_hook_slow+0x7d"
        );
        // Resolution on, the addresses outside the cluster: the same.
        for e in [&mut d.src, &mut d.dst, &mut d.orig_src, &mut d.orig_dst]
            .into_iter()
            .flatten()
        {
            e.k8s = Some(Peer::external());
        }
        assert!(
            text_line(&d)
                .starts_with("10:21:33.123456 NETFILTER_DROP   tcp    192.168.50.10:40002 → 10.244.2.10:8080 [SYN]")
        );
    }

    #[test]
    fn a_drop_before_dnat_names_the_service_as_the_destination() {
        let mut d = record(
            ep("10.244.1.2:35632", Some(pod("default", "client", "node-a"))),
            ep("10.96.0.10:80", Some(service("default/web", "http"))),
        );
        d.classification = Classification::NetfilterRule;
        let line = text_line(&d);
        assert!(
            line.contains("   default/client → svc default/web:80 [SYN] (netfilter_rule)  on node-a  at "),
            "{line}"
        );
        assert!(!line.contains(" via "), "{line}");
        // One end unknown: its address stands in for the name.
        d.dst = Some(ep("203.0.113.9:443", Some(Peer::external())));
        assert!(
            text_line(&d).contains("   default/client → 203.0.113.9:443 [SYN]"),
            "{}",
            text_line(&d)
        );
        // A backend reached without conntrack's help still names its Service, by port name.
        d.dst = Some(ep(
            "10.244.2.10:8080",
            Some(backend("default", "web-2", "node-b", "default/web", "http")),
        ));
        assert!(
            text_line(&d).contains("default/client → default/web-2 via svc default/web:http [SYN]"),
            "{}",
            text_line(&d)
        );
    }

    #[test]
    fn discards_that_lose_nothing_or_reset_say_so_and_an_unknown_namespace_is_not_0() {
        let mut d = record(
            ep("10.244.1.2:35632", Some(pod("default", "client", "node-a"))),
            ep("10.244.2.10:8080", None),
        );
        (d.reason, d.tcp_flags, d.effect) = (reason("TCP_OLD_DATA"), Some(TcpFlags(TcpFlags::ACK)), Effect::Lossless);
        d.classification = Classification::Reason(d.reason.clone());
        assert!(
            text_line(&d).contains(" [ACK] (lossless)  on node-a"),
            "{}",
            text_line(&d)
        );
        (d.reason, d.effect) = (reason("TCP_FLAGS"), Effect::Reset);
        d.classification = Classification::Reason(d.reason.clone());
        assert!(text_line(&d).contains(" [ACK] (reset)  on node-a"), "{}", text_line(&d));
        (d.classification, d.certainty) = (Classification::Invalid, Certainty::Inferred);
        assert!(
            text_line(&d).contains(" (conntrack_invalid?, reset)"),
            "{}",
            text_line(&d)
        );
        d.netns = 0;
        assert!(text_line(&d).ends_with(" netns=unknown"), "{}", text_line(&d));
    }

    #[test]
    fn ipv6_addresses_are_bracketed_with_their_ports() {
        let mut d = record(ep("[fd00:10:244:1::2]:35632", None), ep("[fd00:96::50]:80", None));
        d.orig_dst = Some(ep("[fd00:96::50]:80", None));
        let line = text_line(&d);
        assert!(
            line.contains("[fd00:10:244:1::2]:35632 → [fd00:96::50]:80 [SYN]"),
            "{line}"
        );
        assert!(line.contains("orig-dst=[fd00:96::50]:80"), "{line}");
        let no_port = Endpoint::new("fd00::1".parse::<IpAddr>().expect("ip"), None);
        assert_eq!(endpoint(Some(&no_port)), "fd00::1");
        let svc6 = ep("[fd00:96::50]:80", Some(service("default/web6", "http")));
        assert_eq!(k8s_name(&svc6).as_deref(), Some("svc default/web6:80"));
    }

    #[test]
    fn lines_fit_the_terminal_by_leaving_out_the_least_important_fields() {
        let line = text_fields(&snat_dnat());
        let full = line.full();
        assert_eq!(line.fit(None), full, "not a terminal: whole lines");
        assert_eq!(line.fit(Some(500)), full);
        for width in [80, 100, 120, 160, 200] {
            let fit = line.fit(Some(width));
            assert!(fit.chars().count() <= width, "{width}: {fit}");
            assert!(
                fit.starts_with("10:21:33.123456 NETFILTER_DROP   tcp    default/client"),
                "{width}: {fit}"
            );
            assert!(
                !fit.contains("netns=4026") || fit == full,
                "the interface goes first: {width}: {fit}"
            );
        }
        // 200 columns: all but the interface and the pre-NAT addresses.
        assert!(
            line.fit(Some(200))
                .ends_with("  at nf_hook_slow+0x7d  192.168.50.10:40002 → 10.244.2.10:8080"),
            "{}",
            line.fit(Some(200))
        );
        // 160: the addresses give way; the location stays.
        assert!(
            line.fit(Some(160))
                .ends_with("(conntrack_insert_failed)  on node-a  at nf_hook_slow+0x7d"),
            "{}",
            line.fit(Some(160))
        );
        // 120: the location, flags and node too; names, Service and classification stay.
        assert_eq!(
            line.fit(Some(120)),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2 via svc default/web:80 (conntrack_insert_failed)"
        );
        // 100: the Service gives way before the classification.
        assert_eq!(
            line.fit(Some(100)),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2 (conntrack_insert_failed)"
        );
        // 80: the names, whole; fields are left out, not cut.
        assert_eq!(
            line.fit(Some(80)),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2"
        );
        // Narrower than the names: cut, never wrapped.
        let narrow = line.fit(Some(30));
        assert_eq!((narrow.chars().count(), narrow.ends_with('…')), (30, true), "{narrow}");
    }

    fn summary(backends: usize, bad: usize) -> TargetSummary {
        use crate::aggregate::target_summary::{BackendRow, Basis, TargetSummary, TopReason, Unmatched};
        let rows = (0..backends)
            .map(|i| BackendRow {
                pod: format!("default/big-{i:02}"),
                node: Some(if i % 2 == 0 { "node-a" } else { "node-b" }.into()),
                ip: IpAddr::from([10, 244, 1, 50 + i as u8]),
                ports: vec!["8080/tcp".into()],
                ready: true,
                attempts: Some(100),
                drops: if i == bad { 40 } else { 0 },
                drop_ratio: Some(if i == bad { 0.4 } else { 0.0 }),
                top_reasons: if i == bad {
                    vec![TopReason {
                        reason: "NETFILTER_DROP".into(),
                        classification: "netfilter_rule".into(),
                        certainty: Certainty::Exact,
                        location: "nft_do_chain+0x3e8".into(),
                        node: Some("node-b".into()),
                        count: 40,
                        effect: Effect::Attempt,
                    }]
                } else {
                    vec![]
                },
                drops_by_node: vec![],
                lossless: 0,
                resets: 0,
                discard_reasons: vec![],
            })
            .collect();
        TargetSummary {
            kind: "summary",
            service: "default/big".into(),
            time: String::new(),
            duration_s: 5.0,
            is_final: false,
            attempts: Some(100 * backends as u64),
            drops: 40,
            drop_ratio: Some(40.0 / (100.0 * f64::from(backends as u32))),
            lossless: 0,
            resets: 0,
            backends: rows,
            unmatched: Unmatched::default(),
            other_namespaces: 0,
            lost_events: 0,
            diagnosis: vec![
                "default/big: 40 drops for 5000 attempts (0.8% of attempts).".into(),
                "Next (netfilter_rule): a firewall rule dropped it: find the chain with `iptables-save -c | grep -- '-j DROP'` or `nft list ruleset` (NetworkPolicy: `kubectl get networkpolicy -A`, Calico: `calicoctl get networkpolicy`).".into(),
            ],
            detail: None,
            basis: Basis::default(),
        }
    }

    fn recent(n: usize) -> VecDeque<TextLine> {
        (0..n).map(|_| text_fields(&snat_dnat())).collect()
    }

    #[test]
    fn the_live_frame_fits_the_terminal_so_it_redraws_in_place() {
        let s = summary(3, 2);
        let frame = live_frame(&s, &recent(8), 200, 50);
        let table = table::render(&s);
        let rows: Vec<&str> = table.lines().map(str::trim_end).collect();
        assert_eq!(frame[..rows.len()], rows[..], "room for everything: the whole table");
        assert_eq!(frame.len(), table.lines().count() + 2 + 8, "and the 8 recent drops");
        for (w, h) in [(200, 50), (80, 24), (60, 12), (40, 6)] {
            let frame = live_frame(&s, &recent(8), w, h);
            assert!(frame.len() < h, "{w}x{h}: {} lines", frame.len());
            assert!(frame.iter().all(|l| l.chars().count() <= w), "{w}x{h}: {frame:#?}");
            assert!(
                frame[0].starts_with("default/big — attempts 300  drops 40"),
                "{frame:#?}"
            );
        }
        // 50 backends in 24 rows: the bad one stays, a line counts the others, no drops shown.
        let s = summary(50, 37);
        let frame = live_frame(&s, &recent(8), 100, 24);
        assert_eq!(frame.len(), 23, "{frame:#?}");
        assert!(frame.iter().any(|l| l.starts_with("default/big-37 ")), "{frame:#?}");
        let more = frame
            .iter()
            .find(|l| l.starts_with("... "))
            .expect("a line counts the backends left out");
        let shown = frame.iter().filter(|l| l.starts_with("default/big-")).count();
        assert_eq!(
            more,
            &format!(
                "... {} more backends (0 with drops; a taller terminal or -o json shows them)",
                50 - shown
            )
        );
        assert!(!frame.iter().any(|l| l.starts_with("most recent drops")), "{frame:#?}");
    }

    #[test]
    fn long_pod_names_widen_the_backend_column_instead_of_shifting_the_numbers() {
        let mut s = summary(2, 1);
        s.backends[0].pod = "kube-system/coredns-5d78c9869d-x2x9z-canary".into();
        s.backends[1].ready = false;
        let table = table::render(&s);
        let lines: Vec<&str> = table.lines().collect();
        let node_col = lines[1].find("NODE").expect("header");
        for row in &lines[2..5] {
            assert_eq!(row.chars().nth(node_col - 1), Some(' '), "{table}");
            assert_ne!(
                row.chars().nth(node_col),
                Some(' '),
                "the node starts under NODE: {table}"
            );
        }
        assert!(lines[3].starts_with("default/big-01 (not ready) "), "{table}");
    }

    #[test]
    fn the_final_text_wraps_the_diagnosis_and_cuts_table_rows() {
        let s = summary(3, 2);
        let lines = final_text(&s, Some(60));
        assert!(lines.iter().all(|l| l.chars().count() <= 60), "{lines:#?}");
        let words = |t: &str| t.split_whitespace().map(String::from).collect::<Vec<_>>();
        let after_table = table::render(&s).lines().count() + 1;
        assert_eq!(
            words(&lines[after_table..].join(" ")),
            words(&s.diagnosis.join(" ")),
            "wrapped, nothing lost"
        );
        assert_eq!(lines[after_table], s.diagnosis[0], "a short line stays whole");
        assert!(
            lines[after_table + 2].starts_with("  "),
            "continuation lines are indented: {lines:#?}"
        );
        let whole = final_text(&s, None);
        assert_eq!(whole[after_table..], s.diagnosis[..], "not a terminal: whole lines");
    }

    #[test]
    fn the_drop_summary_fits_a_terminal() {
        let row = "       812  NO_SOCKET            no_socket                  ipv4  4026532177   __udp4_lib_rcv+0x4bc";
        assert_eq!(
            fit_summary_line(row, Some(60)),
            [format!("{}…", &row[..59])],
            "table rows are cut"
        );
        let hint = "hint: 3 no_socket: nothing listens on that port: the backend is not listening on targetPort, or the process is down";
        let wrapped = fit_summary_line(hint, Some(60));
        assert!(
            wrapped.len() > 1 && wrapped.iter().all(|l| l.chars().count() <= 60),
            "{wrapped:#?}"
        );
        assert_eq!(fit_summary_line(hint, None), [hint], "not a terminal: whole lines");
    }

    #[test]
    fn wrap_keeps_words_and_cuts_only_what_cannot_fit() {
        assert_eq!(wrap("a bb ccc dddd", Some(9)), ["a bb ccc", "  dddd"]);
        assert_eq!(wrap("short", Some(80)), ["short"]);
        assert_eq!(wrap("x".repeat(20).as_str(), Some(10)), [format!("{}…", "x".repeat(9))]);
    }

    #[test]
    fn log_lines_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(
            log_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR does not count"
        );
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None), "piped or redirected: no escape codes");
    }
}
