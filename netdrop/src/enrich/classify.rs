//! Classification: what a drop is (a firewall rule, a conntrack insert failure, a `TIME_WAIT`
//! socket's segment, ...), from its reason, location, conntrack state and the kernel program's
//! class, and what it cost ([`Effect`]).
//!
//! Benign frees (hidden by default) are listed in [`crate::kernel::benign`].

use std::{collections::HashMap, fmt};

use netdrop_common::{DropKey, class, ct};
use serde::{Deserialize, Serialize};

use crate::{
    enrich::record::CtState,
    kernel::reasons::Reason,
    source::conntrack::{CtSampler, Evidence},
};

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

/// What a drop is. Prints (and serialises) as the words summaries, hints and the JSON use.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Classification {
    /// The kernel's reason says what it is: the reason in lower case (`no_socket`), or its number.
    Reason(Reason),
    /// Kernels without drop reasons: a receive path freed what no socket wanted (`no_socket`).
    NoSocket,
    /// `netfilter_rule`
    NetfilterRule,
    /// `conntrack_insert_failed`
    InsertFailed,
    /// `conntrack_table_full`
    TableFull,
    /// `conntrack_invalid`
    Invalid,
    /// `route_blackhole`
    RouteBlackhole,
    /// `tcp_ofo_purged`
    OfoPurged,
    /// `tcp_teardown`
    TcpTeardown,
    /// Kernels without drop reasons, where site and flags say nothing: `unclassified`.
    Unclassified,
}

impl Classification {
    /// Whether it is just the reason (the text sink then does not repeat it).
    pub fn is_reason(&self) -> bool {
        matches!(self, Self::Reason(_))
    }

    /// What to check next ([`hint`]).
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Reason(r) => r.name().and_then(|n| hint(&n.to_ascii_lowercase())),
            other => hint(other.fixed_name()?),
        }
    }

    fn fixed_name(&self) -> Option<&'static str> {
        Some(match self {
            Self::Reason(_) => return None,
            Self::NoSocket => "no_socket",
            Self::NetfilterRule => NETFILTER_RULE,
            Self::InsertFailed => INSERT_FAILED,
            Self::TableFull => TABLE_FULL,
            Self::Invalid => INVALID,
            Self::RouteBlackhole => BLACKHOLE,
            Self::OfoPurged => OFO_PURGED,
            Self::TcpTeardown => TCP_TEARDOWN,
            Self::Unclassified => "unclassified",
        })
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.fixed_name()) {
            (_, Some(n)) => f.write_str(n),
            (Self::Reason(r), None) => {
                use fmt::Write as _;
                for c in r.to_string().chars() {
                    f.write_char(c.to_ascii_lowercase())?;
                }
                Ok(())
            }
            (_, None) => Ok(()),
        }
    }
}

impl Serialize for Classification {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the classifier looks at, the same for an event and for the counter row that counts it
/// (both carry the reason, the location's function, the conntrack state and the kernel
/// program's class).
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub reason: &'a Reason,
    pub function: Option<&'a str>,
    pub ct_state: u8,
    pub kernel_class: u8,
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

/// Kernels without drop reasons (before 5.17): every drop is 0, which they do not name.
fn no_reason(reason: &Reason) -> bool {
    matches!(reason, Reason::Unnamed(0))
}

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
pub fn classify(facts: &Facts<'_>, evidence: &Evidence) -> (Classification, Certainty) {
    let Facts {
        reason,
        function,
        ct_state,
        kernel_class,
    } = *facts;
    if no_reason(reason) {
        return by_location(function, ct_state, kernel_class, *evidence);
    }
    if reason.is("NOT_SPECIFIED") && function.is_some_and(|f| BLACKHOLE_SITES.contains(&f)) {
        return (Classification::RouteBlackhole, Certainty::Exact);
    }
    if reason.is("NOT_SPECIFIED") && function == Some(OFO_PURGE_SITE) {
        return (Classification::OfoPurged, Certainty::Exact);
    }
    if is_tcp_teardown(function, kernel_class) {
        return (Classification::TcpTeardown, Certainty::Exact);
    }
    if !reason.is("NETFILTER_DROP") {
        return (Classification::Reason(reason.clone()), Certainty::Exact);
    }
    netfilter(function, ct_state, kernel_class, *evidence)
}

/// A NETFILTER_DROP (or, on kernels without reasons, a free at a netfilter site).
fn netfilter(
    function: Option<&str>,
    ct_state: u8,
    kernel_class: u8,
    evidence: Evidence,
) -> (Classification, Certainty) {
    match kernel_class {
        class::INSERT_FAILED => return (Classification::InsertFailed, Certainty::Exact),
        class::TABLE_FULL => return (Classification::TableFull, Certainty::Exact),
        _ => {}
    }
    let state = ct_state & ct::STATE_MASK;
    if function.is_some_and(|f| RULE_ENGINES.contains(&f)) {
        if state == ct::NONE && evidence.invalid {
            return (Classification::Invalid, Certainty::Inferred);
        }
        return (Classification::NetfilterRule, Certainty::Exact);
    }
    let c = match state {
        ct::UNCONFIRMED if ct_state & ct::SRC_NAT_DONE != 0 || evidence.insert_failed => Classification::InsertFailed,
        ct::NONE if evidence.table_full => Classification::TableFull,
        ct::NONE if evidence.invalid => Classification::Invalid,
        _ => Classification::NetfilterRule,
    };
    (c, Certainty::Inferred)
}

/// Whether [`classify`] would read the namespace's conntrack statistics for these facts: only
/// netfilter drops the packet itself cannot tell apart (no precise mark; not a rule engine's
/// free of a tracked packet). Events and counter rows ask this one question.
pub fn needs_evidence(facts: &Facts<'_>) -> bool {
    let netfilter = facts.reason.is("NETFILTER_DROP")
        || (no_reason(facts.reason) && facts.function.is_some_and(|f| NETFILTER_SITES.contains(&f)));
    netfilter
        && facts.kernel_class == 0
        && !facts
            .function
            .is_some_and(|f| RULE_ENGINES.contains(&f) && facts.ct_state & ct::STATE_MASK != ct::NONE)
}

/// The facts a counter row is keyed by that the classification depends on: namespace, reason,
/// location, conntrack state, kernel class.
type RowFacts = (u32, u32, u64, u8, u8);

/// The one classifier, for events and for the kernel's counter rows: the same rules
/// ([`classify`]) on the same facts with the same evidence. An event's evidence is what the
/// namespace's conntrack statistics did around its drop (from the [`CtSampler`], never read on
/// the caller's thread); a counter row's is what its own events' evidence said (any of them),
/// or, for a row none of whose drops reached userspace, what the statistics did over the run.
/// So an event and the row that counts it agree.
pub struct Classifier {
    /// Conntrack classification is on (the kernel programs read conntrack entries).
    conntrack: bool,
    sampler: CtSampler,
    /// The evidence events were classified with, per counter row.
    seen: HashMap<RowFacts, Evidence>,
}

impl Classifier {
    pub fn new(conntrack: bool, sampler: CtSampler) -> Self {
        Self {
            conntrack,
            sampler,
            seen: HashMap::new(),
        }
    }

    pub fn sampler(&self) -> &CtSampler {
        &self.sampler
    }

    /// An event's classification; `None` while the statistics sample after its drop is still to
    /// be taken (ask again later, or [`Classifier::event_now`]).
    pub fn event(
        &mut self,
        facts: &Facts<'_>,
        netns: u32,
        location: u64,
        at_ns: u64,
    ) -> Option<(Classification, Certainty)> {
        let evidence = if self.conntrack && needs_evidence(facts) {
            let e = self.sampler.around(netns, at_ns)?;
            let key = (netns, facts.reason.code(), location, facts.ct_state, facts.kernel_class);
            let seen = self.seen.entry(key).or_default();
            *seen = seen.or(e);
            e
        } else {
            Evidence::default()
        };
        Some(classify(facts, &evidence))
    }

    /// An event's classification with what is known now (its evidence never came: the
    /// namespace went away, or the run ends).
    pub fn event_now(
        &mut self,
        facts: &Facts<'_>,
        netns: u32,
        location: u64,
        at_ns: u64,
    ) -> (Classification, Certainty) {
        self.event(facts, netns, location, at_ns)
            .unwrap_or_else(|| classify(facts, &Evidence::default()))
    }

    /// A counter row's classification.
    pub fn row(&self, facts: &Facts<'_>, key: &DropKey) -> (Classification, Certainty) {
        let evidence = if self.conntrack && needs_evidence(facts) {
            self.seen
                .get(&(key.netns, key.reason, key.location, key.ct_state, key.exact_class))
                .copied()
                .unwrap_or_else(|| self.sampler.over_run(key.netns))
        } else {
            Evidence::default()
        };
        classify(facts, &evidence)
    }
}

/// Kernels without drop reasons (before 5.17): what the drop site and the packet's TCP flags
/// say, always inferred. `unclassified` where they say nothing.
fn by_location(
    function: Option<&str>,
    ct_state: u8,
    kernel_class: u8,
    evidence: Evidence,
) -> (Classification, Certainty) {
    let Some(f) = function else {
        return (Classification::Unclassified, Certainty::Inferred);
    };
    if is_tcp_teardown(function, kernel_class) {
        // The socket itself said TIME_WAIT; flags alone only suggest it.
        let certainty = if kernel_class == class::TCP_TIME_WAIT {
            Certainty::Exact
        } else {
            Certainty::Inferred
        };
        return (Classification::TcpTeardown, certainty);
    }
    let c = if (TCP_RCV_SITES.contains(&f) && kernel_class == class::TCP_SYN) || UDP_RCV_SITES.contains(&f) {
        Classification::NoSocket
    } else if BLACKHOLE_SITES.contains(&f) {
        Classification::RouteBlackhole
    } else if NETFILTER_SITES.contains(&f) {
        return (netfilter(function, ct_state, 0, evidence).0, Certainty::Inferred);
    } else {
        Classification::Unclassified
    };
    (c, Certainty::Inferred)
}

/// `none`, `unconfirmed`, `confirmed`, `untracked`.
pub fn ct_state_name(ct_state: u8) -> &'static str {
    CtState::from_raw(ct_state).name()
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

    /// The classifier on a reason named as the kernel names it ("0": a kernel without reasons),
    /// in the words it prints.
    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "the tests read as calls of `classify`, which takes evidence by reference"
    )]
    pub(super) fn cls(
        reason: &str,
        function: Option<&str>,
        ct_state: u8,
        kernel_class: u8,
        evidence: &Evidence,
    ) -> (String, Certainty) {
        let reason = match reason {
            "0" => Reason::Unnamed(0),
            name => Reason::Named {
                code: 1000,
                name: name.into(),
            },
        };
        let facts = Facts {
            reason: &reason,
            function,
            ct_state,
            kernel_class,
        };
        let (c, k) = classify(&facts, evidence);
        (c.to_string(), k)
    }

    const NO_EVIDENCE: Evidence = Evidence {
        known: true,
        insert_failed: false,
        table_full: false,
        invalid: false,
    };

    /// The same drops through the event path and the counter-row path classify alike, also where
    /// the namespace's statistics over the whole run say something else than around each drop
    /// (the old row path read the run's, and called a legacy rule's drop of a new flow an insert
    /// failure once any insert failure happened in the namespace).
    #[test]
    fn events_and_their_counter_rows_agree() {
        use crate::source::conntrack::{CtSampler, CtStats};
        let stats = |insert_failed, drop| CtStats {
            count: 10,
            max: 1000,
            insert_failed,
            drop,
            ..CtStats::default()
        };
        // netns 7: quiet until 100, table-full drops (drop +20) by 200, then insert failures.
        let samples: &[(u64, CtStats)] = &[
            (0, stats(0, 0)),
            (100, stats(0, 0)),
            (200, stats(0, 20)),
            (300, stats(5, 25)),
        ];
        let sampler = CtSampler::with_samples(&[(7, samples)]);
        let mut classifier = Classifier::new(true, sampler.clone());
        let netfilter = Reason::Named {
            code: 12,
            name: "NETFILTER_DROP".into(),
        };
        let no_socket = Reason::Named {
            code: 3,
            name: "NO_SOCKET".into(),
        };
        // (reason, function, location, ct_state, kernel class, drop time)
        let drops = [
            (
                &netfilter,
                "nf_hook_slow",
                0x10,
                ct::UNCONFIRMED | ct::DST_NAT_DONE,
                0,
                50,
            ),
            (&netfilter, "nf_hook_slow", 0x10, ct::NONE, 0, 150),
            (
                &netfilter,
                "nf_hook_slow",
                0x10,
                ct::UNCONFIRMED | ct::SRC_NAT_DONE,
                0,
                250,
            ),
            (&netfilter, "nft_do_chain", 0x20, ct::CONFIRMED, 0, 60),
            (&netfilter, "nf_hook_slow", 0x10, ct::NONE, class::TABLE_FULL, 70),
            (&no_socket, "__udp4_lib_rcv", 0x30, ct::NONE, 0, 80),
        ];
        let key = |reason: &Reason, location, ct_state, exact_class| DropKey {
            location,
            reason: reason.code(),
            netns: 7,
            ip_version: 4,
            ct_state,
            exact_class,
            effect: 0,
            tag: 0,
            netns_cookie: 7,
        };
        let mut events = Vec::new();
        for (reason, function, location, ct_state, kernel_class, at) in drops {
            let facts = Facts {
                reason,
                function: Some(function),
                ct_state,
                kernel_class,
            };
            let got = classifier
                .event(&facts, 7, location, at)
                .expect("a sample after each drop");
            events.push((facts, key(reason, location, ct_state, kernel_class), got));
        }
        let names: Vec<String> = events.iter().map(|(_, _, (c, _))| c.to_string()).collect();
        assert_eq!(
            names,
            [
                "netfilter_rule",
                "conntrack_table_full",
                "conntrack_insert_failed",
                "netfilter_rule",
                "conntrack_table_full",
                "no_socket"
            ]
        );
        for (facts, key, event) in &events {
            assert_eq!(&classifier.row(facts, key), event, "{key:?}");
        }
        // The run's statistics alone would have called the first one an insert failure.
        let (facts, _, _) = &events[0];
        assert_eq!(classify(facts, &sampler.over_run(7)).0, Classification::InsertFailed);
        // A row none of whose drops was an event: the run's statistics decide.
        let hidden = Facts {
            reason: &netfilter,
            function: Some("nf_hook_slow"),
            ct_state: ct::UNCONFIRMED,
            kernel_class: 0,
        };
        assert_eq!(
            classifier.row(&hidden, &key(&netfilter, 0x40, ct::UNCONFIRMED, 0)).0,
            Classification::InsertFailed
        );
        // A drop after the last sample waits for the next one.
        assert_eq!(classifier.event(&hidden, 7, 0x40, 400), None);
    }

    #[test]
    fn rule_engine_locations_are_exact_rules() {
        let (c, k) = cls("NETFILTER_DROP", Some("nft_do_chain"), ct::UNCONFIRMED, 0, &NO_EVIDENCE);
        assert_eq!((c.as_str(), k), (NETFILTER_RULE, Certainty::Exact));
    }

    #[test]
    fn precise_marks_win() {
        let (c, k) = cls(
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
        let (c, _) = cls("NETFILTER_DROP", Some("nf_hook_slow"), st, 0, &NO_EVIDENCE);
        assert_eq!(c, INSERT_FAILED);
    }

    #[test]
    fn legacy_rule_on_a_new_flow_is_a_rule() {
        let (c, k) = cls(
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
            cls("NETFILTER_DROP", Some("nf_hook_slow"), ct::NONE, 0, &ev).0,
            TABLE_FULL
        );
        let ev = Evidence {
            invalid: true,
            ..NO_EVIDENCE
        };
        assert_eq!(cls("NETFILTER_DROP", Some("nf_hook_slow"), ct::NONE, 0, &ev).0, INVALID);
    }

    #[test]
    fn unspecified_drops_at_blackhole_sites_are_blackhole_routes() {
        assert_eq!(
            cls("NOT_SPECIFIED", Some("ip_error"), 0, 0, &NO_EVIDENCE),
            (BLACKHOLE.into(), Certainty::Exact)
        );
        assert_eq!(
            cls("NOT_SPECIFIED", Some("tcp_v4_rcv"), 0, 0, &NO_EVIDENCE).0,
            "not_specified"
        );
    }

    #[test]
    fn purged_out_of_order_data_is_named() {
        assert_eq!(
            cls("NOT_SPECIFIED", Some("skb_rbtree_purge"), 0, 0, &NO_EVIDENCE),
            (OFO_PURGED.into(), Certainty::Exact)
        );
        assert!(hint(OFO_PURGED).is_some_and(|h| h.contains("not the cause")));
        assert!(hint(PKT_TOO_BIG).is_some_and(|h| h.contains("path-MTU black hole")));
        assert_eq!(cls("IP_INNOROUTES", Some("ip_error"), 0, 0, &NO_EVIDENCE).0, NO_ROUTE);
    }

    #[test]
    fn other_reasons_classify_as_themselves() {
        assert_eq!(
            cls("NO_SOCKET", None, 0, 0, &NO_EVIDENCE),
            ("no_socket".into(), Certainty::Exact)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{class_tests::cls, *};

    #[test]
    fn without_reasons_the_site_and_flags_cls() {
        let none = Evidence::default();
        let c = |f: &str, class: u8| cls("0", Some(f), 0, class, &none);
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
                cls("NOT_SPECIFIED", Some(f), 0, class::TCP_FIN_OR_RST, &none).0,
                TCP_TEARDOWN
            );
            // Any segment a TIME_WAIT socket took, a bare ACK included: the socket says so.
            assert_eq!(
                cls("NOT_SPECIFIED", Some(f), 0, class::TCP_TIME_WAIT, &none).0,
                TCP_TEARDOWN
            );
            // A plain ACK or data segment there may be a listen-queue overflow: stays visible.
            assert_eq!(cls("NOT_SPECIFIED", Some(f), 0, 0, &none).0, "not_specified");
        }
        assert_eq!(
            cls(
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
