//! Types shared by netdrop's kernel programs (`netdrop-ebpf`) and its userspace (`netdrop`).
//!
//! Everything here crosses the kernel/user boundary byte for byte: `#[repr(C)]`, fixed-width
//! integers, explicit padding, no `bool` (its bit patterns are not all valid). Events carry the
//! kernel's raw values (reason number, location address, raw header bytes); names and decoding
//! are attached in userspace.
#![no_std]
#![allow(
    clippy::pub_underscore_fields,
    reason = "explicit ABI padding: public so both sides build these structs with literals"
)]
#![allow(
    clippy::inline_always,
    reason = "called from the eBPF programs, where every helper must be inlined into its caller"
)]

/// How many bytes of a dropped packet, starting at its network header, each event carries.
///
/// 128 covers an IPv6 header (40) plus a TCP header with options (60), or IPv4 with options plus
/// TCP; it is what the decoder needs and what a postmortem capture keeps per packet.
pub const HEADER_BYTES: usize = 128;

/// Length of a kernel interface name (`IFNAMSIZ`).
pub const IFNAMSIZ: usize = 16;

/// Drop reasons below this number have a bit in [`Config::emit_reasons`]; higher ones (and the
/// subsystem-encoded ones, `subsys << 16 | code`) follow [`Config::emit_other_reasons`].
///
/// Linux 6.18 defines about 130 core reasons, so 512 leaves room for years of growth.
pub const REASON_BITMAP_BITS: usize = 512;

/// Key of the exact per-CPU drop counters: one count per (reason, location, netns).
///
/// The namespace is keyed by its cookie as well as its inode: inode numbers are handed out
/// lowest-free and reused as soon as a namespace is freed, so under pod churn a new namespace
/// would otherwise add to a dead one's counters, and userspace could never tell when that key's
/// namespace is gone. Userspace evicts the keys of dead namespaces (`netdrop::source::counters`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// Kernel text address that freed the skb (the tracepoint's `location`).
    pub location: u64,
    /// Raw `enum skb_drop_reason` value (0 when the kernel has no reasons).
    pub reason: u32,
    /// Inode number of the network namespace the drop happened in (0 when unknown).
    pub netns: u32,
    /// 4 or 6 when the skb had an IPv4/IPv6 network header, else 0: the summary tells socket
    /// teardown frees (no IP header) from packet drops with the same reason.
    pub ip_version: u8,
    /// The skb's conntrack state, [`ct`] bits: none/unconfirmed/confirmed/untracked plus the
    /// NAT-done bits. Classifies NETFILTER_DROP without the precise hooks.
    pub ct_state: u8,
    /// A [`class`] the kernel program gave this skb, else 0. The name is kept for the ABI, but
    /// not every class is exact: `TCP_FIN_OR_RST` and `TCP_SYN` are inferred from the TCP flags;
    /// the others come from the precise hooks or the socket. Userspace calls it `kernel_class`.
    pub exact_class: u8,
    /// What the drop cost ([`effect`]), decided per packet by the kernel program, so that
    /// counts of lost attempts and data stay exact.
    pub effect: u8,
    /// The `ADDR_FILTER` entry the packet matched (a Service backend or frontend), else 0.
    pub tag: u32,
    /// `net->net_cookie` of that namespace: unique for the whole boot, never reused (Linux
    /// 5.12+, where it is set when the namespace is made); 0 when unknown or the kernel has no
    /// such cookie ([`KernelOffsets::net_cookie`] is [`ABSENT`]).
    pub netns_cookie: u64,
}

/// An address the `--svc`-style filters watch: IP (as on the wire, IPv4 in the first 4 bytes),
/// port (host order) and IP protocol. Port 0 matches any port of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `ADDR_FILTER` values: which part of a Service an address is.
/// `Config::addr_filter`: what the kfree_skb program does with `ADDR_FILTER`.
pub mod addr_mode {
    /// Not consulted: every drop counts, untagged.
    pub const OFF: u32 = 0;
    /// Only packets from or to a listed address count, under its tag (`trace --svc` and the
    /// other targets).
    pub const FILTER: u32 = 1;
    /// Every drop counts; packets from or to a listed address carry its tag (`agent`).
    pub const TAG: u32 = 2;
}

pub mod tag {
    /// Backends are numbered from 1.
    pub const FIRST_BACKEND: u32 = 1;
    /// A Service frontend: ClusterIP:port, NodePort, external IP.
    pub const FRONTEND: u32 = 0x8000_0000;
}

/// `DropKey::ct_state` / `DropEvent::ct_state` encoding.
pub mod ct {
    /// Low two bits: the skb's conntrack entry.
    pub const STATE_MASK: u8 = 0b11;
    /// No conntrack entry attached (conntrack off, invalid packet, or allocation failed).
    pub const NONE: u8 = 0;
    /// An entry not yet in the table: a new flow before its confirm hook.
    pub const UNCONFIRMED: u8 = 1;
    /// An entry in the table.
    pub const CONFIRMED: u8 = 2;
    /// Explicitly untracked (`NOTRACK`/`notrack`), or a template.
    pub const UNTRACKED: u8 = 3;
    /// `IPS_SRC_NAT_DONE`: the source-NAT hook (POSTROUTING/INPUT) has run.
    pub const SRC_NAT_DONE: u8 = 1 << 2;
    /// `IPS_DST_NAT_DONE`: the destination-NAT hook (PREROUTING/OUTPUT) has run.
    pub const DST_NAT_DONE: u8 = 1 << 3;
    /// `IPS_SRC_NAT`: the source address/port was rewritten.
    pub const SRC_NAT: u8 = 1 << 4;
    /// `IPS_DST_NAT`: the destination address/port was rewritten.
    pub const DST_NAT: u8 = 1 << 5;

    /// UAPI `enum ip_conntrack_status` bits (include/uapi/linux/netfilter/nf_conntrack_common.h),
    /// stable across kernels.
    pub const IPS_CONFIRMED: u64 = 1 << 3;
    pub const IPS_SRC_NAT: u64 = 1 << 4;
    pub const IPS_DST_NAT: u64 = 1 << 5;
    pub const IPS_SRC_NAT_DONE: u64 = 1 << 7;
    pub const IPS_DST_NAT_DONE: u64 = 1 << 8;
    pub const IPS_TEMPLATE: u64 = 1 << 11;
    pub const IPS_UNTRACKED: u64 = 1 << 12;
    /// `IP_CT_UNTRACKED`: the ctinfo of untracked packets (`skb->_nfct == 7`, no entry).
    pub const IP_CT_UNTRACKED: u64 = 7;
}

/// Classifications the precise conntrack hooks (fexit/kprobe) can establish per skb.
pub mod class {
    /// `__nf_conntrack_confirm` returned NF_DROP: the entry could not be inserted (clash).
    pub const INSERT_FAILED: u8 = 1;
    /// `nf_conntrack_in` returned NF_DROP without attaching an entry: allocation failed
    /// (table full).
    pub const TABLE_FULL: u8 = 2;
    /// A TCP segment with FIN or RST freed as `NOT_SPECIFIED`: at `tcp_v4_rcv`/`tcp_v6_rcv`
    /// that is a TIME_WAIT (or orphaned FIN_WAIT2) socket taking a peer's FIN or RST, which
    /// kernels up to at least 7.2 free with `kfree_skb` — connection teardown, not a loss.
    pub const TCP_FIN_OR_RST: u8 = 3;
    /// A TCP SYN (without ACK) freed as `NOT_SPECIFIED` — or, on kernels without drop reasons,
    /// freed at all: at `tcp_v4_rcv`/`tcp_v6_rcv` nothing listened on the port.
    pub const TCP_SYN: u8 = 4;
    /// Freed as `NOT_SPECIFIED` after a TIME_WAIT socket (or an orphaned FIN_WAIT2 one, which
    /// the kernel keeps as a timewait socket) took the segment: the kernel answered it (ACK, or
    /// RST to new data) and freed it. Known from the socket itself: the `kfree_skb`
    /// tracepoint's `rx_sk` (6.11+), or the timewait hooks' mark on older kernels.
    pub const TCP_TIME_WAIT: u8 = 5;
}

/// The precise hooks' per-skb marks: a [`class`] in the low byte, the time it was set
/// (`bpf_ktime_get_ns`) in the 56 bits above, one `u64` map value.
pub mod mark {
    /// A mark set at `now_ns` for `class`.
    #[inline(always)]
    pub const fn new(now_ns: u64, class: u8) -> u64 {
        (now_ns << 8) | class as u64
    }

    /// The mark's class.
    #[inline(always)]
    pub const fn class(mark: u64) -> u8 {
        (mark & 0xff) as u8
    }

    /// How long ago the mark was set. The time is kept modulo 2^56 ns (834 days): the
    /// difference is taken in that same width, so it stays right once the uptime passes it
    /// (comparing `now` with `mark >> 8` would then call every mark stale).
    #[inline(always)]
    pub const fn age_ns(now_ns: u64, mark: u64) -> u64 {
        (now_ns << 8).wrapping_sub(mark & !0xff) >> 8
    }
}

/// `DropKey::effect` / `DropEvent::effect`: what a drop cost, decided in the kernel program from
/// the packet (protocol, TCP flags, payload length), the drop reason and the receiving socket's
/// state (`rx_sk`, Linux 6.11+).
pub mod effect {
    /// Not decided: the program did not parse the packet (a trace without a target or filter),
    /// or it has no IP header. Counted as a loss.
    pub const UNKNOWN: u8 = 0;
    /// A connection attempt lost: a TCP SYN without ACK, or a UDP datagram (sent to the
    /// watched address, when an address filter matched: one from it is [`DATA`]).
    pub const ATTEMPT: u8 = 1;
    /// Data lost: a TCP segment with payload the receiver did not have yet, a SYN-ACK, FIN or
    /// RST, ICMP, any other protocol.
    pub const DATA: u8 = 2;
    /// Nothing lost: data the receiver already had ([`Config::stale_reasons`]: `TCP_OLD_DATA`,
    /// `TCP_OLD_SEQUENCE`, `TCP_OFOMERGE`, PAWS), or a bare ACK (no payload, no SYN/FIN/RST)
    /// TCP judged stale or duplicate ([`Config::stale_ack_reasons`]: out of window, old ACK) or
    /// netfilter dropped as invalid (no conntrack entry): ACKs are cumulative, the next one says
    /// the same.
    pub const LOSSLESS: u8 = 3;
    /// The kernel answered the segment with a reset: an ACK without SYN/RST that met a
    /// listening socket (`TCP_FLAGS` at `tcp_v4_do_rcv`/`tcp_v6_do_rcv`, checked against the
    /// receiving socket's LISTEN state where the kernel passes it) or no socket (`NO_SOCKET`).
    pub const RESET: u8 = 4;
}

/// How many reasons [`Config::stale_reasons`] holds.
pub const STALE_REASONS: usize = 6;
/// How many reasons [`Config::stale_ack_reasons`] holds.
pub const STALE_ACK_REASONS: usize = 4;

/// One dropped packet, as sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel text address that freed the skb.
    pub location: u64,
    /// The skb's kernel address: joins this drop with other programs' per-skb marks.
    pub skb_addr: u64,
    /// Raw `enum skb_drop_reason` value.
    pub reason: u32,
    /// Network namespace inode.
    pub netns: u32,
    /// `skb->dev->ifindex`, else `skb->skb_iif`, else 0.
    pub ifindex: u32,
    /// `skb->len`.
    pub skb_len: u32,
    /// `skb->protocol` in host byte order (an ethertype: 0x0800 IPv4, 0x86dd IPv6).
    pub l3_proto: u16,
    /// Valid bytes in [`DropEvent::headers`]; 0 when the skb has no network header.
    pub header_len: u16,
    /// CPU the drop happened on.
    pub cpu: u32,
    /// `skb->dev->name`, NUL-padded; empty when the skb has no device.
    pub ifname: [u8; IFNAMSIZ],
    /// `nf_conn.status` (low 32 bits), 0 without an entry.
    pub ct_status: u32,
    /// [`ct`] encoding, as in [`DropKey::ct_state`].
    pub ct_state: u8,
    /// `skb->_nfct & 7`: the packet's `enum ip_conntrack_info` (direction/state).
    pub ct_info: u8,
    /// As [`DropKey::exact_class`]: a [`class`] from the precise hooks, the socket or the TCP
    /// flags (not all exact, despite the ABI name), else 0.
    pub exact_class: u8,
    /// [`effect`], as in [`DropKey::effect`].
    pub effect: u8,
    /// The entry's original-direction tuple (before NAT), valid when `ct_state` is
    /// unconfirmed or confirmed.
    pub ct_orig: ConntrackTuple,
    /// The `ADDR_FILTER` entry the packet matched, else 0.
    pub tag: u32,
    pub _pad2: u32,
    /// The packet from its network (L3) header on.
    pub headers: [u8; HEADER_BYTES],
}

/// A conntrack tuple as netdrop carries it: addresses as on the wire (IPv4 in the first 4
/// bytes), ports in network byte order as the kernel stores them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackTuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order (`__be16`).
    pub src_port: u16,
    pub dst_port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub l3num: u16,
    pub protonum: u8,
    pub _pad: u8,
}

/// Indexes of the per-CPU `STATS` array: what happened to drops that did not become events.
pub mod stat {
    /// Events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 0;
    /// Events lost because the ring buffer was full (reserve failed).
    pub const EVENTS_LOST: u32 = 1;
    /// Events not sent because of the event-rate limit (their drops are still counted).
    pub const EVENTS_RATE_LIMITED: u32 = 2;
    /// Drops whose (reason, location, netns) counter could not be inserted (counter map full).
    pub const COUNTER_MAP_FULL: u32 = 3;
    /// Number of slots.
    pub const COUNT: u32 = 8;
}

/// Where each `sk_buff`/`net_device`/... field sits in the running kernel, read from its BTF.
///
/// Rust eBPF cannot emit CO-RE relocations, so the loader fills this in at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_len: u32,
    pub skb_iif: u32,
    pub skb_protocol: u32,
    pub skb_transport_header: u32,
    pub skb_network_header: u32,
    pub skb_tail: u32,
    pub skb_head: u32,
    pub dev_ifindex: u32,
    pub dev_name: u32,
    pub dev_nd_net: u32,
    pub sk_net: u32,
    pub net_ns_inum: u32,
    /// `sk_buff._nfct`.
    pub skb_nfct: u32,
    /// `nf_conn.status`.
    pub ct_status: u32,
    /// `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple`.
    pub ct_orig_tuple: u32,
    /// Within `struct nf_conntrack_tuple`: `src.u3`, `src.u.all`, `src.l3num`, `dst.u3`,
    /// `dst.u.all`, `dst.protonum`.
    pub tuple_src_u3: u32,
    pub tuple_src_port: u32,
    pub tuple_src_l3num: u32,
    pub tuple_dst_u3: u32,
    pub tuple_dst_port: u32,
    pub tuple_dst_protonum: u32,
    /// `sock.__sk_common.skc_state` (a `u8`): read from the `kfree_skb` tracepoint's `rx_sk`.
    pub sk_state: u32,
    /// `sk_buff._skb_refdst`: the route (`struct dst_entry *`, low bit a no-reference flag);
    /// [`ABSENT`] when the BTF lacks it.
    pub skb_refdst: u32,
    /// `dst_entry.dev`: the route's device, whose namespace a drop without `skb->dev` is in;
    /// [`ABSENT`] when the BTF lacks it.
    pub dst_dev: u32,
    /// `net.net_cookie` as a plain `u64` (Linux 5.12+); [`ABSENT`] when the BTF lacks it or it is
    /// the lazily generated `atomic64_t` of 5.7 to 5.11 (0 until something asked for it).
    pub net_cookie: u32,
    pub _pad: u32,
}

/// Fields of the classic `skb/kfree_skb` tracepoint record, from its tracefs `format` file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    pub skbaddr: u32,
    pub location: u32,
    /// [`ABSENT`] before Linux 5.17 (no drop reasons).
    pub reason: u32,
    /// The receiving socket (`rx_sk`, Linux 6.11+); [`ABSENT`] before.
    pub rx_sk: u32,
}

/// Marks a field the running kernel does not have.
pub const ABSENT: u32 = u32::MAX;

/// Settings of one run, handed to the kernel programs as a read-only global (`.rodata`).
///
/// Zero in a filter field means "any".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub offsets: KernelOffsets,
    pub tracepoint: TracepointLayout,
    /// 1 when the `tp_btf` program may read the `reason` argument (Linux 5.17+).
    pub btf_has_reason: u32,
    /// Only drops in this network namespace (inode).
    pub netns: u32,
    /// Only drops with this IP protocol number; [`ANY_PROTO`] for any.
    pub l4_proto: u32,
    /// Only drops whose source or destination port is this (host byte order).
    pub port: u16,
    /// 0: no address filter; 4 or 6: match `ip_addr`/`ip_mask` against source or destination.
    pub ip_family: u8,
    pub _pad0: u8,
    /// Network address of the filter, as on the wire; IPv4 in the first 4 bytes, rest zero.
    pub ip_addr: [u8; 16],
    /// Netmask of the address filter, same layout as `ip_addr` (one loop serves both families).
    pub ip_mask: [u8; 16],
    /// Bit `r` set: drops with reason `r` become events (all drops are counted).
    pub emit_reasons: [u64; REASON_BITMAP_BITS / 64],
    /// 1: reasons outside the bitmap become events.
    pub emit_other_reasons: u32,
    /// Most events per second per CPU; 0 for no limit.
    pub events_per_cpu_sec: u32,
    /// Wake the reader only once this many bytes wait in the ring buffer (it also drains on a
    /// timer): one wakeup per event would cost more than the event itself during a drop storm.
    pub wakeup_bytes: u32,
    /// 0: the kernel has no usable BTF, offsets are unknown and the programs must not read the
    /// skb (counting by reason and location still works).
    pub read_skb: u32,
    /// Drops with this reason and no IP header (netlink, unix and other socket teardown frees)
    /// are counted but not sent as events; [`ABSENT`] to send them.
    pub quiet_reason_without_ip: u32,
    /// 1: read the skb's conntrack entry (the kernel has `struct nf_conn` in its BTF).
    pub conntrack: u32,
    /// 1: the precise conntrack hooks are attached; consult `SKB_CLASS` on NETFILTER_DROP.
    pub precise_conntrack: u32,
    /// This kernel's NETFILTER_DROP reason number ([`ABSENT`] without reasons).
    pub netfilter_drop_reason: u32,
    /// What `ADDR_FILTER` does ([`addr_mode`]): 1, only packets from or to an address in it
    /// (the `--svc` set) count; 2, every drop counts and those packets carry its tag.
    pub addr_filter: u32,
    /// This kernel's NOT_SPECIFIED reason number (0 on kernels without reasons, where every
    /// drop is 0): such drops of TCP segments get [`class::TCP_FIN_OR_RST`] or
    /// [`class::TCP_SYN`] from their flags.
    pub not_specified_reason: u32,
    /// 1 when the `tp_btf` program may read the `rx_sk` argument (Linux 6.11+): a
    /// NOT_SPECIFIED drop whose receiving socket is in TIME_WAIT gets [`class::TCP_TIME_WAIT`].
    pub btf_has_rx_sk: u32,
    /// 1: the timewait hooks are attached (kernels without `rx_sk`); consult `SKB_CLASS` on
    /// NOT_SPECIFIED drops.
    pub timewait_marks: u32,
    /// This kernel's `TCP_TW_SYN` (`enum tcp_tw_status`): a SYN that reopens the connection
    /// leaves the TIME_WAIT socket for a listener and is not marked.
    pub tw_syn_status: u32,
    /// 1: read the receiving socket (`rx_sk`) to tell `TIME_WAIT` segments; `--tw-hook` may pick
    /// another way while `rx_sk` still gives the namespace and the LISTEN state.
    pub rx_sk_timewait: u32,
    /// 1: decide each drop's [`effect`] and fall back to the route's device for its namespace.
    /// 0 where the kernel's verifier refuses the program with them (too many states on Debian
    /// 6.1): effects are then `unknown` and such drops' namespace unknown.
    pub effects: u32,
    pub _pad_effects: u32,
    /// Reasons that mean the receiver already had the segment's data ([`effect::LOSSLESS`]):
    /// `TCP_OLD_DATA`, `TCP_OLD_SEQUENCE`, `TCP_OFOMERGE`, `TCP_RFC7323_PAWS`,
    /// `TCP_RFC7323_PAWS_ACK`; [`ABSENT`] for those this kernel does not have.
    pub stale_reasons: [u32; STALE_REASONS],
    /// Reasons that make a bare ACK stale ([`effect::LOSSLESS`]): `TCP_INVALID_SEQUENCE`,
    /// `TCP_OLD_ACK`, `TCP_TOO_OLD_ACK`, `TCP_INVALID_ACK_SEQUENCE`.
    pub stale_ack_reasons: [u32; STALE_ACK_REASONS],
    /// [`Config::stale_reasons`] as a bitmap by reason number: the kernel program tests one bit
    /// instead of looping (a loop per drop multiplied the verifier's states past its limit on 6.1).
    pub stale_bits: [u64; REASON_BITMAP_BITS / 64],
    /// [`Config::stale_ack_reasons`] as a bitmap, likewise.
    pub stale_ack_bits: [u64; REASON_BITMAP_BITS / 64],
    /// This kernel's `TCP_FLAGS` reason: an ACK freed with it met a listening socket, which
    /// answers with a reset ([`effect::RESET`]); [`ABSENT`] without it.
    pub tcp_flags_reason: u32,
    /// This kernel's `NO_SOCKET` reason: a segment without SYN/RST freed with it was answered
    /// with a reset; [`ABSENT`] without it.
    pub no_socket_reason: u32,
}

/// `Config::l4_proto` value that matches every protocol (IP protocol numbers stop at 255).
pub const ANY_PROTO: u32 = u32::MAX;

impl Config {
    /// A configuration that matches and emits every drop; offsets must still be filled in.
    pub const DEFAULT: Self = Self {
        offsets: KernelOffsets {
            skb_dev: 0,
            skb_sk: 0,
            skb_len: 0,
            skb_iif: 0,
            skb_protocol: 0,
            skb_transport_header: 0,
            skb_network_header: 0,
            skb_tail: 0,
            skb_head: 0,
            dev_ifindex: 0,
            dev_name: 0,
            dev_nd_net: 0,
            sk_net: 0,
            net_ns_inum: 0,
            skb_nfct: 0,
            ct_status: 0,
            ct_orig_tuple: 0,
            tuple_src_u3: 0,
            tuple_src_port: 0,
            tuple_src_l3num: 0,
            tuple_dst_u3: 0,
            tuple_dst_port: 0,
            tuple_dst_protonum: 0,
            sk_state: 0,
            skb_refdst: 0,
            dst_dev: 0,
            net_cookie: ABSENT,
            _pad: 0,
        },
        tracepoint: TracepointLayout {
            skbaddr: 0,
            location: 0,
            reason: ABSENT,
            rx_sk: ABSENT,
        },
        btf_has_reason: 0,
        netns: 0,
        l4_proto: ANY_PROTO,
        port: 0,
        ip_family: 0,
        _pad0: 0,
        ip_addr: [0; 16],
        ip_mask: [0; 16],
        emit_reasons: [u64::MAX; REASON_BITMAP_BITS / 64],
        emit_other_reasons: 1,
        events_per_cpu_sec: 0,
        wakeup_bytes: 0,
        read_skb: 0,
        quiet_reason_without_ip: ABSENT,
        conntrack: 0,
        precise_conntrack: 0,
        netfilter_drop_reason: ABSENT,
        addr_filter: 0,
        not_specified_reason: ABSENT,
        btf_has_rx_sk: 0,
        timewait_marks: 0,
        tw_syn_status: ABSENT,
        rx_sk_timewait: 0,
        effects: 1,
        _pad_effects: 0,
        stale_reasons: [ABSENT; STALE_REASONS],
        stale_ack_reasons: [ABSENT; STALE_ACK_REASONS],
        stale_bits: [0; REASON_BITMAP_BITS / 64],
        stale_ack_bits: [0; REASON_BITMAP_BITS / 64],
        tcp_flags_reason: ABSENT,
        no_socket_reason: ABSENT,
    };

    /// Whether a drop with `reason` becomes an event.
    #[inline(always)]
    pub fn emits(&self, reason: u32) -> bool {
        let r = reason as usize;
        if r < REASON_BITMAP_BITS {
            self.emit_reasons[r / 64] & (1u64 << (r % 64)) != 0
        } else {
            self.emit_other_reasons != 0
        }
    }

    /// Sets the lossless-reason bitmaps from [`Config::stale_reasons`] and
    /// [`Config::stale_ack_reasons`].
    pub fn set_stale_bits(&mut self) {
        for (bits, list) in [
            (&mut self.stale_bits, &self.stale_reasons[..]),
            (&mut self.stale_ack_bits, &self.stale_ack_reasons[..]),
        ] {
            *bits = [0; REASON_BITMAP_BITS / 64];
            for &r in list {
                let r = r as usize;
                if r < REASON_BITMAP_BITS {
                    bits[r / 64] |= 1u64 << (r % 64);
                }
            }
        }
    }

    /// Sets whether drops with `reason` become events.
    pub fn set_emit(&mut self, reason: u32, on: bool) {
        let r = reason as usize;
        if r < REASON_BITMAP_BITS {
            let bit = 1u64 << (r % 64);
            if on {
                self.emit_reasons[r / 64] |= bit;
            } else {
                self.emit_reasons[r / 64] &= !bit;
            }
        }
    }
}

/// Per-CPU state of the event-rate limiter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RateWindow {
    pub window_start_ns: u64,
    pub events: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): #[repr(C)], only integers and arrays of integers, padding explicit.
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::RateWindow {}
    unsafe impl aya::Pod for super::ConntrackTuple {}
    unsafe impl aya::Pod for super::AddrKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::mem::size_of;

    use super::*;

    #[test]
    fn mark_age_survives_the_56_bit_wrap() {
        let wrap = 1u64 << 56;
        for set in [5_000, wrap - 300, wrap + 7, 3 * wrap + 1_000_000] {
            let m = mark::new(set, class::TCP_TIME_WAIT);
            assert_eq!(mark::class(m), class::TCP_TIME_WAIT);
            assert_eq!(mark::age_ns(set, m), 0, "set at {set}");
            assert_eq!(mark::age_ns(set + 900, m), 900, "set at {set}, read 900 ns later");
            assert_eq!(mark::age_ns(set + 2_000_000_000, m), 2_000_000_000);
        }
    }

    /// Layouts must have no implicit padding: the kernel and userspace read the same bytes.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<DropKey>(), 32);
        assert_eq!(size_of::<ConntrackTuple>(), 40);
        assert_eq!(
            size_of::<DropEvent>(),
            8 * 3 + 4 * 4 + 2 * 2 + 4 + IFNAMSIZ + 8 + 40 + 8 + HEADER_BYTES
        );
        assert_eq!(size_of::<KernelOffsets>(), 28 * 4);
        assert_eq!(size_of::<Config>(), 480);
        assert_eq!(size_of::<AddrKey>(), 20);
    }

    #[test]
    fn emit_bitmap_round_trips() {
        let mut c = Config::DEFAULT;
        assert!(c.emits(2));
        c.set_emit(2, false);
        assert!(!c.emits(2));
        assert!(c.emits(3));
        assert!(c.emits(0x0003_0001), "subsystem reasons follow emit_other_reasons");
        c.emit_other_reasons = 0;
        assert!(!c.emits(0x0003_0001));
    }
}

// ---- tc accounting ----
//
// Passive tc programs on the host side of workload veths (`cali*`) count what each pod sends and
// receives. On the host-side veth, tc *ingress* sees the packets the pod sends and tc *egress*
// the packets delivered to the pod; [`TC_DIR_FROM_POD`] and [`TC_DIR_TO_POD`] name them so.

/// Direction index: tc ingress on the host-side veth = packets the pod sends.
pub const TC_DIR_FROM_POD: u32 = 0;
/// Direction index: tc egress on the host-side veth = packets delivered to the pod.
pub const TC_DIR_TO_POD: u32 = 1;

/// Key of the exact per-CPU interface counters (`TC_COUNTERS`). Userspace inserts one zeroed
/// entry per watched interface and direction before attaching, and removes it when the
/// interface goes; the programs only update existing entries, so the map never leaks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcKey {
    /// `skb->ifindex` of the host-side interface, in its own network namespace.
    pub ifindex: u32,
    /// Inode of that network namespace ([`TcConfig::netns`] of the program instance).
    pub netns: u32,
    /// [`TC_DIR_FROM_POD`] or [`TC_DIR_TO_POD`].
    pub direction: u32,
    pub _pad: u32,
}

/// Per-CPU counters of one interface and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcCounters {
    pub packets: u64,
    /// `skb->len` at tc, which includes the Ethernet header (as the interface statistics do).
    pub bytes: u64,
    /// TCP segments with SYN set and ACK clear (every SYN, retransmissions included).
    pub tcp_syn: u64,
    /// First UDP packet of a flow (see [`TcFlowKey`]).
    pub udp_new: u64,
}

/// Key of the destinations whose connection attempts are counted (`TC_DESTS`), e.g. the
/// backends of a Service. Userspace inserts the entries; the programs only update them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcDestKey {
    /// Destination address as on the wire; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
    /// Destination port, host byte order; 0 counts attempts to the address on any port (each
    /// attempt also counts in its port's entry, if there is one).
    pub port: u16,
    /// IP protocol (6 TCP, 17 UDP).
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
}

impl TcDestKey {
    /// The [`tc_dest_kind`] of this entry: port 0 counts any port of the address.
    pub const fn kind(&self) -> u32 {
        if self.port == 0 {
            tc_dest_kind::ANY_PORT
        } else {
            tc_dest_kind::PORT
        }
    }
}

/// Bits of `TC_DEST_KINDS`, the one-element array that says which kinds of `TC_DESTS` entries
/// exist: the programs look up only those (with none, attempts cost no lookup at all).
pub mod tc_dest_kind {
    /// Entries with a port (a Service's frontends and backends).
    pub const PORT: u32 = 1;
    /// Entries with port 0: any port of the address (pods as targets).
    pub const ANY_PORT: u32 = 2;
}

/// Per-CPU attempt counts of one destination, indexed by direction ([`TC_DIR_FROM_POD`]: a pod
/// on a watched interface sent it; [`TC_DIR_TO_POD`]: it was delivered to a watched pod). An
/// attempt is a TCP SYN without ACK (retransmissions included) or a UDP datagram — every one,
/// not only a flow's first: drops are counted per datagram too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcDestCounters {
    pub attempts: [u64; 2],
}

/// Key of the recent-UDP-flow LRU map (`TC_UDP_FLOWS`): the flow's endpoints in a fixed order
/// (lower address/port first), so a reply finds its request's entry and is not a new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcFlowKey {
    pub ifindex: u32,
    pub family: u8,
    pub proto: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub _pad: u16,
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
}

/// Settings of one tc program instance (one per watched network namespace), handed over as the
/// read-only global `TC_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcConfig {
    /// Inode of the network namespace this instance's interfaces live in (goes into [`TcKey`]).
    pub netns: u32,
    /// 1: count the first packet of each UDP flow ([`TcCounters::udp_new`]); 0: leave it at 0
    /// and skip the flow table (a lookup and a clock read per datagram) altogether.
    pub udp_flows: u32,
    /// A UDP flow idle this long starts anew (conntrack's own UDP timeout is 30 s).
    pub udp_flow_timeout_ns: u64,
}

impl TcConfig {
    pub const DEFAULT: Self = Self {
        netns: 0,
        udp_flows: 1,
        udp_flow_timeout_ns: 30_000_000_000,
    };
}

/// Indexes of the per-CPU `TC_STATS` array.
pub mod tc_stat {
    /// Packets on an interface that has no counter entry (attached but not registered: should
    /// stay 0).
    pub const UNREGISTERED: u32 = 0;
    /// UDP flows that could not be recorded (LRU insert failed for a reason other than a race).
    pub const FLOW_INSERT_FAILED: u32 = 1;
    /// IP packets whose headers could not be read (truncated: an IPv4 header under 20 bytes, an
    /// IPv6 one under 40, or a TCP or UDP header cut short).
    pub const SHORT_PACKETS: u32 = 2;
    /// Number of slots.
    pub const COUNT: u32 = 4;
}

#[cfg(feature = "user")]
mod tc_user {
    // SAFETY (all impls): #[repr(C)], only integers and arrays of integers, padding explicit.
    unsafe impl aya::Pod for super::TcKey {}
    unsafe impl aya::Pod for super::TcCounters {}
    unsafe impl aya::Pod for super::TcDestKey {}
    unsafe impl aya::Pod for super::TcDestCounters {}
    unsafe impl aya::Pod for super::TcFlowKey {}
    unsafe impl aya::Pod for super::TcConfig {}
}

#[cfg(test)]
mod tc_tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn tc_layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<TcKey>(), 16);
        assert_eq!(size_of::<TcCounters>(), 32);
        assert_eq!(size_of::<TcDestKey>(), 20);
        assert_eq!(size_of::<TcDestCounters>(), 16);
        assert_eq!(size_of::<TcFlowKey>(), 4 + 1 + 1 + 2 + 2 + 2 + 32);
        assert_eq!(size_of::<TcConfig>(), 16);
    }
}
