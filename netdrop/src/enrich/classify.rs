//! Classification: what a drop is (a firewall rule, a conntrack insert failure, a `TIME_WAIT`
//! socket's segment, ...), from its reason, location, conntrack state and the kernel program's
//! class, and what it cost ([`Effect`]).
//!
//! Benign frees (hidden by default) are listed in [`crate::kernel::benign`].

use netdrop_common::{class, ct};
use serde::{Deserialize, Serialize};

use crate::source::conntrack::Evidence;

/// What a drop cost, as the kernel program decided it per packet (`netdrop_common::effect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// The packet was not parsed (a trace without a target or filter) or has no IP header;
    /// counted as a loss.
    Unknown,
    /// A TCP SYN or a UDP datagram: a lost attempt.
    Attempt,
    /// A segment with data the receiver did not have, a SYN-ACK/FIN/RST, ICMP, other protocols.
    Data,
    /// A bare ACK TCP discarded, or data the receiver already had: nothing lost.
    Lossless,
    /// The kernel answered with a reset (an ACK that met a listening socket or no socket).
    Reset,
}

impl Effect {
    pub fn from_raw(v: u8) -> Self {
        use netdrop_common::effect as e;
        match v {
            e::ATTEMPT => Self::Attempt,
            e::DATA => Self::Data,
            e::LOSSLESS => Self::Lossless,
            e::RESET => Self::Reset,
            _ => Self::Unknown,
        }
    }

    /// Whether the drop lost an attempt or data (what drop counts and ratios count).
    pub fn loses(self) -> bool {
        matches!(self, Self::Unknown | Self::Attempt | Self::Data)
    }
}

/// Serializes a namespace inode, 0 (the kernel gave no way to tell) as `null`. Generic over
/// the integer only because serde's `serialize_with` hands a reference.
pub fn netns_or_null<T: Copy + Into<u64>, S: serde::Serializer>(netns: &T, s: S) -> Result<S::Ok, S::Error> {
    match (*netns).into() {
        0 => s.serialize_none(),
        n => s.serialize_u64(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_reasons_the_site_and_flags_classify() {
        let none = Evidence::default();
        let c = |f: &str, class: u8| classify(NO_REASON, Some(f), 0, class, &none);
        assert_eq!(
            c("tcp_v4_rcv", class::TCP_SYN),
            ("no_socket".into(), Certainty::Inferred)
        );
        assert_eq!(
            c("tcp_v6_rcv", class::TCP_FIN_OR_RST),
            (TCP_TEARDOWN.into(), Certainty::Inferred)
        );
        assert_eq!(
            c("tcp_v4_rcv", class::TCP_TIME_WAIT),
            (TCP_TEARDOWN.into(), Certainty::Exact)
        );
        assert_eq!(
            c("tcp_v4_rcv", 0).0,
            "unclassified",
            "a bare ACK there may be a listen overflow"
        );
        assert_eq!(c("__udp4_lib_rcv", 0).0, "no_socket");
        assert_eq!(c("ip_error", 0).0, BLACKHOLE);
        assert_eq!(c("nf_hook_slow", 0), (NETFILTER_RULE.into(), Certainty::Inferred));
        assert_eq!(c("e1000_clean_rx_irq", 0).0, "unclassified");
    }

    #[test]
    fn a_fin_or_rst_freed_by_tcp_rcv_is_teardown() {
        let none = Evidence::default();
        for f in ["tcp_v4_rcv", "tcp_v6_rcv"] {
            assert_eq!(
                classify("NOT_SPECIFIED", Some(f), 0, class::TCP_FIN_OR_RST, &none).0,
                TCP_TEARDOWN
            );
            // Any segment a TIME_WAIT socket took, a bare ACK included: the socket says so.
            assert_eq!(
                classify("NOT_SPECIFIED", Some(f), 0, class::TCP_TIME_WAIT, &none).0,
                TCP_TEARDOWN
            );
            // A plain ACK or data segment there may be a listen-queue overflow: stays visible.
            assert_eq!(classify("NOT_SPECIFIED", Some(f), 0, 0, &none).0, "not_specified");
        }
        assert_eq!(
            classify(
                "NOT_SPECIFIED",
                Some("e1000_clean_rx_irq"),
                0,
                class::TCP_FIN_OR_RST,
                &none
            )
            .0,
            "not_specified"
        );
    }
}

// ---- NETFILTER_DROP classification ----

/// How a classification was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Certainty {
    /// Established by the kernel for this packet: its reason, the function that freed it, or a
    /// precise conntrack hook that saw the verdict.
    Exact,
    /// Deduced from the packet's conntrack state and the namespace's conntrack statistics.
    Inferred,
}

/// Functions that evaluate rules and free the packets their rules drop.
pub const RULE_ENGINES: &[&str] = &[
    "nft_do_chain",
    "ipt_do_table",
    "ip6t_do_table",
    "arpt_do_table",
    "ebt_do_table",
    "nft_do_chain_ipv4",
    "nft_do_chain_inet",
];

pub const NETFILTER_RULE: &str = "netfilter_rule";
pub const INSERT_FAILED: &str = "conntrack_insert_failed";
pub const TABLE_FULL: &str = "conntrack_table_full";
pub const INVALID: &str = "conntrack_invalid";
pub const BLACKHOLE: &str = "route_blackhole";
/// Out-of-order TCP data a socket still held when it was destroyed: a segment before it never
/// arrived, so it could never be delivered. A consequence of another loss (e.g. a path-MTU black
/// hole), seen on the receiver once the connection is aborted. Freed by `skb_rbtree_purge` on
/// `tp->out_of_order_queue` (`tcp_v4_destroy_sock`, `tcp_disconnect`), no reason given; pruning
/// under memory pressure has its own reason (`TCP_OFO_QUEUE_PRUNE`).
/// <https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_ipv4.c> (`tcp_v4_destroy_sock`)
pub const OFO_PURGED: &str = "tcp_ofo_purged";
const OFO_PURGE_SITE: &str = "skb_rbtree_purge";
/// `PKT_TOO_BIG`: forwarded, larger than the next hop's MTU, Don't Fragment set.
pub const PKT_TOO_BIG: &str = "pkt_too_big";
/// `IP_INNOROUTES`: no route on input (a forwarding host without a route to the destination).
pub const NO_ROUTE: &str = "ip_innoroutes";

/// What the conntrack statistics' `clash_resolve` rise means, for summaries and diagnoses.
pub const CLASH_RESOLVED: &str = "packets of one new flow (parallel DNS A/AAAA queries from one socket) raced to create the same conntrack entry; Linux 5.6+ keeps the later packet (NF_ACCEPT, counted in `conntrack -S` clash_resolve) instead of dropping it, so nothing was lost to this race";

/// TCP's receive entry points: a `NOT_SPECIFIED` segment freed here after a TIME_WAIT socket
/// (or an orphaned FIN_WAIT2 one) took it — see [`TCP_TEARDOWN`].
pub const TCP_RCV_SITES: &[&str] = &["tcp_v4_rcv", "tcp_v6_rcv"];

/// A segment of a connection that is closing, taken by its TIME_WAIT/FIN_WAIT2 socket:
/// `tcp_v4_rcv` sends the ACK (or an RST, or kills the socket) and then frees the segment with
/// `kfree_skb`, no reason given — the peer's FIN|ACK after the server closed (seen on Debian 6.1,
/// 6.12 and 7.2 under the lab's request/response traffic: 1–4 per 500 connections), a duplicate
/// ACK, a keepalive probe. The connection completed; nothing was lost. Hidden like socket
/// teardown; `--all-reasons` shows it.
///
/// Known exactly from the socket (the kernel program's [`class::TCP_TIME_WAIT`]: the
/// tracepoint's `rx_sk` on 6.11+, the timewait hooks before), else from FIN/RST flags
/// ([`class::TCP_FIN_OR_RST`]). A bare ACK freed there without that knowledge stays visible:
/// a listen-queue overflow frees the handshake's last ACK at the same place.
pub const TCP_TEARDOWN: &str = "tcp_teardown";

/// How a drop's reason reads on kernels without drop reasons (before 5.17): every drop is 0.
pub const NO_REASON: &str = "0";

/// UDP's receive paths: on kernels without reasons, most of their frees are datagrams to a
/// port nobody listens on (the rest are checksum errors).
pub const UDP_RCV_SITES: &[&str] = &["__udp4_lib_rcv", "__udp6_lib_rcv", "udp_rcv", "udpv6_rcv"];

/// Where netfilter frees a packet a hook returned NF_DROP for: `nf_hook_slow` (every kernel)
/// and the rule engines.
pub const NETFILTER_SITES: &[&str] = &["nf_hook_slow", "nft_do_chain", "ipt_do_table", "ip6t_do_table"];

/// Whether a drop is a [`TCP_TEARDOWN`]. The kernel program marks timewait and FIN/RST segments
/// only among `NOT_SPECIFIED` drops (every drop on kernels without reasons), so the mark implies
/// the reason.
pub fn is_tcp_teardown(function: Option<&str>, kernel_class: u8) -> bool {
    matches!(kernel_class, class::TCP_FIN_OR_RST | class::TCP_TIME_WAIT)
        && function.is_some_and(|f| TCP_RCV_SITES.contains(&f))
}

/// Where the kernel frees packets routed to a blackhole route with no reason of its own:
/// `ip_error` on input for `RTN_BLACKHOLE` (`dst.error` is `-EINVAL`: no SNMP counter moves), and
/// `dst_discard`/`dst_discard_out` on output.
/// <https://github.com/torvalds/linux/blob/v6.18/net/ipv4/route.c> (`ip_error`)
pub const BLACKHOLE_SITES: &[&str] = &[
    "ip_error",
    "dst_discard",
    "dst_discard_out",
    "ip6_pkt_discard",
    "ip6_pkt_discard_out",
];

/// What a drop is, in the words the summary and hints use.
///
/// Non-netfilter reasons classify as themselves (`NO_SOCKET` → `no_socket`, exact). A
/// NETFILTER_DROP is one of `netfilter_rule`, `conntrack_insert_failed`,
/// `conntrack_table_full`, `conntrack_invalid`:
/// 1. a precise hook's mark decides (exact);
/// 2. freed inside a rule engine (`nft_do_chain`, `ipt_do_table`...) → a rule (exact), or
///    `conntrack_invalid` (inferred) when the packet has no entry and `invalid` rose;
/// 3. freed by `nf_hook_slow` (legacy iptables rules, conntrack's own verdicts):
///    - new entry, not confirmed, and the source-NAT hook already ran (only the confirm hook
///      comes after it) or `insert_failed` rose → `conntrack_insert_failed`;
///    - no entry and allocation drops rose (`drop` beyond `insert_failed`, `early_drop`, or a
///      nearly full table) → `conntrack_table_full`; `invalid` rose → `conntrack_invalid`;
///    - otherwise a rule (legacy iptables drops here too).
pub fn classify(
    reason: &str,
    function: Option<&str>,
    ct_state: u8,
    kernel_class: u8,
    evidence: &Evidence,
) -> (String, Certainty) {
    if reason == NO_REASON {
        return by_location(function, ct_state, kernel_class, evidence);
    }
    if reason == "NOT_SPECIFIED" && function.is_some_and(|f| BLACKHOLE_SITES.contains(&f)) {
        return (BLACKHOLE.into(), Certainty::Exact);
    }
    if reason == "NOT_SPECIFIED" && function == Some(OFO_PURGE_SITE) {
        return (OFO_PURGED.into(), Certainty::Exact);
    }
    if is_tcp_teardown(function, kernel_class) {
        return (TCP_TEARDOWN.into(), Certainty::Exact);
    }
    if reason != "NETFILTER_DROP" {
        return (reason.to_ascii_lowercase(), Certainty::Exact);
    }
    match kernel_class {
        class::INSERT_FAILED => return (INSERT_FAILED.into(), Certainty::Exact),
        class::TABLE_FULL => return (TABLE_FULL.into(), Certainty::Exact),
        _ => {}
    }
    let state = ct_state & ct::STATE_MASK;
    if function.is_some_and(|f| RULE_ENGINES.contains(&f)) {
        if state == ct::NONE && evidence.invalid {
            return (INVALID.into(), Certainty::Inferred);
        }
        return (NETFILTER_RULE.into(), Certainty::Exact);
    }
    let c = match state {
        ct::UNCONFIRMED if ct_state & ct::SRC_NAT_DONE != 0 || evidence.insert_failed => INSERT_FAILED,
        ct::NONE if evidence.table_full => TABLE_FULL,
        ct::NONE if evidence.invalid => INVALID,
        _ => NETFILTER_RULE,
    };
    (c.into(), Certainty::Inferred)
}

/// Kernels without drop reasons (before 5.17): what the drop site and the packet's TCP flags
/// say, always inferred. `unclassified` where they say nothing.
fn by_location(function: Option<&str>, ct_state: u8, kernel_class: u8, evidence: &Evidence) -> (String, Certainty) {
    let Some(f) = function else {
        return ("unclassified".into(), Certainty::Inferred);
    };
    if is_tcp_teardown(function, kernel_class) {
        // The socket itself said TIME_WAIT; flags alone only suggest it.
        let certainty = if kernel_class == class::TCP_TIME_WAIT {
            Certainty::Exact
        } else {
            Certainty::Inferred
        };
        return (TCP_TEARDOWN.into(), certainty);
    }
    let c = if TCP_RCV_SITES.contains(&f) && kernel_class == class::TCP_SYN {
        "no_socket"
    } else if UDP_RCV_SITES.contains(&f) {
        "no_socket"
    } else if BLACKHOLE_SITES.contains(&f) {
        BLACKHOLE
    } else if NETFILTER_SITES.contains(&f) {
        return (
            classify("NETFILTER_DROP", function, ct_state, 0, evidence).0,
            Certainty::Inferred,
        );
    } else {
        "unclassified"
    };
    (c.into(), Certainty::Inferred)
}

/// `none`, `unconfirmed`, `confirmed`, `untracked`.
pub fn ct_state_name(ct_state: u8) -> &'static str {
    match ct_state & ct::STATE_MASK {
        ct::UNCONFIRMED => "unconfirmed",
        ct::CONFIRMED => "confirmed",
        ct::UNTRACKED => "untracked",
        _ => "none",
    }
}

/// What to check next, per classification (from the on-call field notes this tool grew from).
pub fn hint(classification: &str) -> Option<&'static str> {
    Some(match classification {
        NETFILTER_RULE => {
            "a firewall rule dropped it: find the chain with `iptables-save -c | grep -- '-j DROP'` or `nft list ruleset` (NetworkPolicy: `kubectl get networkpolicy -A`, Calico: `calicoctl get networkpolicy`)"
        }
        INSERT_FAILED => {
            "conntrack insert failures: a new flow's tuple, after NAT, is already taken. Usually SNAT port exhaustion (many connections from one node address to one destination:port; compare `conntrack -L -d <dest> | wc -l` with the MASQUERADE/SNAT port range, add egress IPs or a NAT gateway, reuse connections); before Linux 5.6 also the UDP DNAT race of parallel DNS queries (A/AAAA from one socket: NodeLocal DNSCache, `single-request-reopen`). Watch `conntrack -S` insert_failed"
        }
        TABLE_FULL => {
            "the conntrack table is full: raise net.netfilter.nf_conntrack_max (and hashsize), shorten nf_conntrack_tcp_timeout_established/time_wait, find who opens so many flows (`conntrack -L | awk ...`)"
        }
        INVALID => {
            "conntrack marked the packets INVALID and a rule dropped them: asymmetric routing, out-of-window TCP, or a too-short timeout; check `conntrack -S` invalid and net.netfilter.nf_conntrack_tcp_be_liberal"
        }
        "no_socket" => {
            "nothing listens on that port: the backend is not listening on targetPort, or the process is down"
        }
        "tcp_listen_overflow" => {
            "the listener's accept queue is full: the application accepts too slowly for its backlog; raise the backlog (its listen() argument, capped by net.core.somaxconn), add workers or replicas, and watch `nstat -az TcpExtListenOverflows`"
        }
        PKT_TOO_BIG => {
            "larger than the next hop's MTU with Don't Fragment set, dropped where it was forwarded (`nstat IpFragFails`): the ICMP 'fragmentation needed' sent back should make the sender shrink its packets; if large transfers keep stalling while small requests work, that ICMP is filtered (a path-MTU black hole). Make the pods' MTU fit the overlay (Calico: veth MTU = link MTU - 50 for VXLAN, - 20 for IP-in-IP), allow ICMP type 3 code 4 between nodes, or clamp the TCP MSS"
        }
        OFO_PURGED => {
            "out-of-order data the receiving socket held until the connection ended: a segment before it never arrived, so this data could not be delivered. It follows from a loss elsewhere on the path (see the other drops: too-big packets, a rule, a missing route), it is not the cause"
        }
        NO_ROUTE => {
            "no route to the destination where it was dropped (`nstat IpInNoRoutes`): for a pod address, the node that sent it lost its route to that pod's block (Calico BGP: `calicoctl node status`, `ip route | grep bird` on the sending node; `ip route get <pod IP>`). A drop outside the nodes (an upstream router) means the node sent it to its default gateway"
        }
        BLACKHOLE => {
            "a blackhole route took it: the node has no more specific route to the destination (Calico blackholes each node's IPAM block, so a local pod whose /32 route is missing lands here): run `ip route get <pod IP>` on that node and check calico-node/felix logs"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod class_tests {
    use super::*;

    const NO_EVIDENCE: Evidence = Evidence {
        known: true,
        insert_failed: false,
        table_full: false,
        invalid: false,
    };

    #[test]
    fn rule_engine_locations_are_exact_rules() {
        let (c, k) = classify("NETFILTER_DROP", Some("nft_do_chain"), ct::UNCONFIRMED, 0, &NO_EVIDENCE);
        assert_eq!((c.as_str(), k), (NETFILTER_RULE, Certainty::Exact));
    }

    #[test]
    fn precise_marks_win() {
        let (c, k) = classify(
            "NETFILTER_DROP",
            Some("nf_hook_slow"),
            ct::NONE,
            class::TABLE_FULL,
            &NO_EVIDENCE,
        );
        assert_eq!((c.as_str(), k), (TABLE_FULL, Certainty::Exact));
    }

    #[test]
    fn unconfirmed_after_snat_is_an_insert_failure() {
        let st = ct::UNCONFIRMED | ct::SRC_NAT_DONE | ct::DST_NAT_DONE;
        let (c, _) = classify("NETFILTER_DROP", Some("nf_hook_slow"), st, 0, &NO_EVIDENCE);
        assert_eq!(c, INSERT_FAILED);
    }

    #[test]
    fn legacy_rule_on_a_new_flow_is_a_rule() {
        let (c, k) = classify(
            "NETFILTER_DROP",
            Some("nf_hook_slow"),
            ct::UNCONFIRMED | ct::DST_NAT_DONE,
            0,
            &NO_EVIDENCE,
        );
        assert_eq!((c.as_str(), k), (NETFILTER_RULE, Certainty::Inferred));
    }

    #[test]
    fn no_entry_with_allocation_drops_is_table_full() {
        let ev = Evidence {
            table_full: true,
            ..NO_EVIDENCE
        };
        assert_eq!(
            classify("NETFILTER_DROP", Some("nf_hook_slow"), ct::NONE, 0, &ev).0,
            TABLE_FULL
        );
        let ev = Evidence {
            invalid: true,
            ..NO_EVIDENCE
        };
        assert_eq!(
            classify("NETFILTER_DROP", Some("nf_hook_slow"), ct::NONE, 0, &ev).0,
            INVALID
        );
    }

    #[test]
    fn unspecified_drops_at_blackhole_sites_are_blackhole_routes() {
        assert_eq!(
            classify("NOT_SPECIFIED", Some("ip_error"), 0, 0, &NO_EVIDENCE),
            (BLACKHOLE.into(), Certainty::Exact)
        );
        assert_eq!(
            classify("NOT_SPECIFIED", Some("tcp_v4_rcv"), 0, 0, &NO_EVIDENCE).0,
            "not_specified"
        );
    }

    #[test]
    fn purged_out_of_order_data_is_named() {
        assert_eq!(
            classify("NOT_SPECIFIED", Some("skb_rbtree_purge"), 0, 0, &NO_EVIDENCE),
            (OFO_PURGED.into(), Certainty::Exact)
        );
        assert!(hint(OFO_PURGED).is_some_and(|h| h.contains("not the cause")));
        assert!(hint(PKT_TOO_BIG).is_some_and(|h| h.contains("path-MTU black hole")));
        assert_eq!(
            classify("IP_INNOROUTES", Some("ip_error"), 0, 0, &NO_EVIDENCE).0,
            NO_ROUTE
        );
    }

    #[test]
    fn other_reasons_classify_as_themselves() {
        assert_eq!(
            classify("NO_SOCKET", None, 0, 0, &NO_EVIDENCE),
            ("no_socket".into(), Certainty::Exact)
        );
    }
}
