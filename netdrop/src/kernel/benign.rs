//! Benign frees: kernel frees that are not network drops (hidden by default, always counted;
//! `--all-reasons` shows them).
//!
//! `kfree_skb` fires for every skb freed with a reason other than `SKB_CONSUMED`, and several
//! reasons are ordinary end-of-life frees, not network drops. Measured on Linux 6.18 (this
//! project's test machine) with netdrop `--all-reasons` over an idle minute and over the test
//! suite (TCP/UDP traffic, closing sockets, `ip`/`iptables` netlink traffic):
//! - `SOCKET_CLOSE`: a socket closed with unread data (`tcp_close`, `__unix_...`): the
//!   application chose not to read it.
//! - `QUEUE_PURGE`: queues emptied at teardown (`__skb_queue_purge` on socket/device close).
//! - `UNIX_DISCONNECT`, `UNIX_SKIP_OOB`: AF_UNIX bookkeeping, no network involved.
//! - `NOT_DROPPED_YET`, `CONSUMED`: never real drops (the kernel routes `CONSUMED` to
//!   `consume_skb`; listed for kernels that might not).
//! - `NOT_SPECIFIED` *without an IP header*: netlink and other non-IP socket skbs freed with a
//!   plain `kfree_skb()`. With an IP header, `NOT_SPECIFIED` stays visible: many real drop
//!   sites (drivers, older protocol code) still pass no reason...
//! - ...except in socket destructors ([`BENIGN_LOCATIONS`]): a UDP socket closed with datagrams
//!   still queued frees them as `NOT_SPECIFIED` at `udp_destruct_common` (seen: 20 of 20 in the
//!   measurement above), with an IP header. The packet was delivered; the application left it.
//!
//! Seen in the same measurement and kept visible: `TCP_OLD_DATA` at `tcp_rcv_established`
//! (duplicate segments: a symptom of retransmissions, which an SRE wants to see).

use super::reasons::ReasonTable;

/// Reasons that are end-of-life frees, never network drops.
pub const BENIGN_REASONS: &[&str] = &[
    "NOT_DROPPED_YET",
    "CONSUMED",
    "SOCKET_CLOSE",
    "QUEUE_PURGE",
    "UNIX_DISCONNECT",
    "UNIX_SKIP_OOB",
];

/// Socket destructors and queue purges: any reason freed here is a teardown, not a drop. And
/// `ip6_mc_input`, which frees IPv6 multicast for groups this host has not joined (neighbour
/// discovery and MLD reports on every IPv6 link: 5 in 9 s on a fresh veth pair) — not for this
/// host, like `OTHERHOST`.
/// <https://github.com/torvalds/linux/blob/v6.18/net/ipv6/ip6_input.c> (`ip6_mc_input`)
pub const BENIGN_LOCATIONS: &[&str] = &[
    "udp_destruct_common",
    "inet_sock_destruct",
    "sk_stream_kill_queues",
    "unix_release_sock",
    "skb_queue_purge_reason",
    "__skb_queue_purge_reason",
    "ip6_mc_input",
];

/// Whether a drop location (function name) is a socket teardown.
pub fn is_benign_location(function: &str) -> bool {
    BENIGN_LOCATIONS.contains(&function)
}

/// Whether a reason (by name) is a benign free.
pub fn is_benign(name: &str) -> bool {
    BENIGN_REASONS.contains(&name)
}

/// The reason numbers of [`BENIGN_REASONS`] on this kernel.
pub fn benign_codes(reasons: &ReasonTable) -> Vec<u32> {
    BENIGN_REASONS.iter().filter_map(|n| reasons.lookup(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benign_names_resolve_on_a_6_18_style_table() {
        let t = ReasonTable::from_print_fmt(
            r#"__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 4, "SOCKET_CLOSE" }, { 7, "UNIX_DISCONNECT" }, { 80, "QUEUE_PURGE" })"#,
        )
        .expect("table");
        let mut codes = benign_codes(&t);
        codes.sort_unstable();
        assert_eq!(codes, vec![4, 7, 80]);
        assert!(!is_benign("NO_SOCKET"));
    }
}
