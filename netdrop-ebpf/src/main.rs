//! netdrop's kernel programs.
//!
//! One job, kept small for the verifier: at every `kfree_skb`, count the drop exactly in a per-CPU
//! map keyed by (reason, location, netns), and, when the reason is one the user wants to see and
//! the rate limit allows, send the packet's detail through a ring buffer. Every event that cannot
//! be sent is counted. Struct offsets come from the loader (read from the kernel's BTF), because
//! Rust eBPF cannot emit CO-RE relocations.
#![no_std]
#![no_main]
// `cargo xtask test` runs clippy on this crate with warnings denied; every unsafe block says why it
// is sound.
#![deny(clippy::undocumented_unsafe_blocks)]
// Map keys and values stay borrowed: a by-value argument is one more stack copy in programs that
// sit close to the verifier's limits on older kernels (Debian 6.1).
#![allow(clippy::needless_borrows_for_generic_args)]

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, fexit, kprobe, kretprobe, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
};
use netdrop_common::{
    ABSENT, ANY_PROTO, AddrKey, Config, ConntrackTuple, DropEvent, DropKey, HEADER_BYTES, IFNAMSIZ, REASON_BITMAP_BITS,
    RateWindow, addr_mode, class, ct, effect, mark, stat,
};

mod tc;

/// Settings of this run; the loader overrides it before loading (`.rodata`, frozen).
#[unsafe(no_mangle)]
static CONFIG: Config = Config::DEFAULT;

/// Exact drop counts. 16k distinct (reason, location, netns) triples is far more than a node
/// produces; an insert that fails anyway is counted in `STATS[COUNTER_MAP_FULL]`.
#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(16384, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[map]
static RATE: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);

/// Per-event detail. The loader may resize it (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// The addresses a `--svc` trace watches (Service frontends and backends) → their tag.
/// Userspace keeps it in step with the Service's endpoints.
#[map]
static ADDR_FILTER: HashMap<AddrKey, u32> = HashMap::with_max_entries(4096, 0);

/// skb address → [`mark`] (time and [`class`]) set by the precise conntrack and timewait hooks
/// and consumed by the kfree_skb program. An skb a hook marks always reaches `kfree_skb` within
/// the same traversal (the netfilter hook, `tcp_v4_rcv`), so marks do not linger; the time only
/// guards against one left behind and its address reused, and is generous because a guest's
/// clock can jump by many milliseconds between two instructions when the host stalls it.
#[map]
static SKB_CLASS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

/// The skb a kprobe'd function was entered with, per CPU, for its kretprobe. Slot 0:
/// `__nf_conntrack_confirm`, slot 1: `nf_conntrack_in`, slot 2: `tcp_timewait_state_process`.
/// All run with bottom halves disabled or from softirq, so the CPU does not switch to another
/// call in between.
#[map]
static KPROBE_SKB: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

const MARK_MAX_AGE_NS: u64 = 1_000_000_000;
/// `TCP_TIME_WAIT` in `enum { TCP_ESTABLISHED = 1, ... }` (include/net/tcp_states.h), the
/// state of every timewait socket, also of an orphaned FIN_WAIT2 one (its substate differs).
const TCP_STATE_TIME_WAIT: u8 = 6;
/// `TCP_LISTEN` in the same enum.
const TCP_STATE_LISTEN: u8 = 10;
/// `NF_DROP` verdict.
const NF_DROP: i64 = 0;

/// Reads one field of the run's configuration. Volatile, so the compiler keeps the load and the
/// verifier (not rustc) sees the frozen value.
macro_rules! conf {
    ($($field:tt)+) => {
        vread(&raw const CONFIG.$($field)+)
    };
}

#[inline(always)]
fn vread<T: Copy>(p: *const T) -> T {
    // SAFETY: only called on fields of the CONFIG static: aligned, in bounds, initialised.
    unsafe { read_volatile(p) }
}

/// `skb/kfree_skb` as a BTF-typed tracepoint (Linux 5.5+): arguments are the tracepoint's own
/// `(skb, location, reason, rx_sk)`, with `reason` from 5.17 on and `rx_sk` from 6.11 on.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    // The verifier rejects reading an argument the kernel's prototype lacks; with the frozen
    // config it prunes this branch on kernels without reasons.
    let reason: u32 = if conf!(btf_has_reason) != 0 { ctx.arg(2) } else { 0 };
    // Copied as a plain number: the verifier types the argument as a nullable trusted pointer
    // and refuses the field arithmetic `read` does on it ("pointer arithmetic on
    // trusted_ptr_or_null_ prohibited"): the whole program was refused and the classic
    // tracepoint used instead. The reads go through `bpf_probe_read_kernel` anyway.
    let rx_sk: *const u8 = if conf!(btf_has_rx_sk) != 0 {
        // The fourth argument's slot in the context (the tracepoint's arguments, 8 bytes each).
        read0::<u64>(ctx.as_ptr().cast(), 3 * 8) as *const u8
    } else {
        core::ptr::null()
    };
    let _ = on_drop(skb, location, reason, rx_sk);
    0
}

/// `skb/kfree_skb` as a classic tracepoint, the fallback where `tp_btf` cannot load. Field
/// offsets come from the tracepoint's tracefs `format` file.
#[tracepoint(category = "skb", name = "kfree_skb")]
pub fn kfree_skb_tp(ctx: TracePointContext) -> u32 {
    let _ = try_kfree_skb_tp(&ctx);
    0
}

fn try_kfree_skb_tp(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets come from this tracepoint's format file; read_at bounds-checks via the helper.
    let skb: u64 = unsafe { ctx.read_at(conf!(tracepoint.skbaddr) as usize) }.map_err(i64::from)?;
    // SAFETY: as above (the `location` field of the same format file).
    let location: u64 = unsafe { ctx.read_at(conf!(tracepoint.location) as usize) }.map_err(i64::from)?;
    let reason_off = conf!(tracepoint.reason);
    let reason: u32 = if reason_off == ABSENT {
        0
    } else {
        // SAFETY: the format file's `reason` offset (present since 5.17); bounds-checked read.
        unsafe { ctx.read_at(reason_off as usize) }.map_err(i64::from)?
    };
    let rx_sk_off = conf!(tracepoint.rx_sk);
    let rx_sk: u64 = if rx_sk_off == ABSENT {
        0
    } else {
        // SAFETY: the format file's `rx_sk` offset (6.11+); bounds-checked read.
        unsafe { ctx.read_at(rx_sk_off as usize) }.unwrap_or(0)
    };
    on_drop(skb as *const u8, location, reason, rx_sk as *const u8)
}

#[inline(always)]
fn read<T>(base: *const u8, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel tolerates any address; a fault returns an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize).cast::<T>()) }.map_err(i64::from)
}

/// `base + off` read as a `T`, zero (or null) where the read faults: one path for the verifier.
/// `bpf_probe_read_kernel` zeroes its destination on failure, so no branch on its result is
/// needed; `read(..).unwrap_or(0)` forked every read into a known-zero path and an unknown
/// value, and older verifiers (Debian 6.1) kept those paths apart past their 1M-instruction
/// limit.
#[inline(always)]
fn read0<T: Copy>(base: *const u8, off: u32) -> T {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper tolerates any source address and writes all `size_of::<T>()` bytes of
    // `v` (the value, or zeroes when the read faults), so `v` is initialised afterwards.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            v.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(off as usize).cast(),
        );
        v.assume_init()
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

/// What the packet filter needs from the headers.
struct Packet {
    proto: u32,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ...); 0 for other protocols.
    tcp_flags: u8,
    /// TCP payload bytes, from the IP and TCP header lengths; 0 for other protocols.
    payload_len: u32,
}

/// What the drop accounting needs from the L4 header.
#[derive(Clone, Copy)]
struct L4 {
    proto: u32,
    tcp_flags: u8,
    payload_len: u32,
}

impl L4 {
    #[inline(always)]
    fn of(p: &Packet) -> Self {
        Self {
            proto: p.proto,
            tcp_flags: p.tcp_flags,
            payload_len: p.payload_len,
        }
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `skb->network_header` value of an skb whose network header was never set (`(u16)~0U`).
const HEADER_UNSET: u16 = 0xffff;

fn on_drop(skb: *const u8, location: u64, reason: u32, rx_sk: *const u8) -> Result<(), i64> {
    if conf!(read_skb) == 0 {
        // No BTF, so no offsets: the "counts only" mode counts by (reason, location), no events.
        count(DropKey {
            location,
            reason,
            netns: 0,
            ip_version: 0,
            ct_state: 0,
            exact_class: 0,
            effect: effect::UNKNOWN,
            tag: 0,
            netns_cookie: 0,
        });
        return Ok(());
    }
    let dev: *const u8 = read(skb, conf!(offsets.skb_dev))?;
    let net = net_of(skb, dev, rx_sk);
    let netns = netns_inode(net);
    let want_netns = conf!(netns);
    if want_netns != 0 && netns != want_netns {
        return Ok(());
    }

    // Only what every drop needs; `head` and the transport header are read when a filter or an
    // event needs them (a drop storm is mostly drops that are only counted).
    let nh: u16 = read(skb, conf!(offsets.skb_network_header))?;
    let l3_proto = u16::from_be(read(skb, conf!(offsets.skb_protocol))?);
    let has_l3 = nh != HEADER_UNSET && (l3_proto == ETH_P_IP || l3_proto == ETH_P_IPV6);

    let want_proto = conf!(l4_proto);
    let want_port = conf!(port);
    let want_family = conf!(ip_family);
    let want_addrs = conf!(addr_filter) != 0;
    let mut tag = 0u32;
    // The watched address is the packet's source: a reply (or the target's own flow), not an
    // attempt towards it.
    let mut tag_from_src = false;
    // The L4 header once parsed, so that the classification below does not parse again.
    let mut l4: Option<L4> = None;
    if conf!(addr_filter) == addr_mode::TAG {
        // The agent: every drop counts; packets from or to a watched address carry its tag. No
        // other filter is set in this mode. The other modes never reach this (the config is
        // frozen: the verifier prunes it).
        if has_l3 {
            let head: *const u8 = read(skb, conf!(offsets.skb_head))?;
            let th: u16 = read(skb, conf!(offsets.skb_transport_header))?;
            let pkt = parse(head, nh, th, l3_proto)?;
            l4 = Some(L4::of(&pkt));
            tag = addr_tag(&pkt.daddr, pkt.dport, pkt.proto);
            if tag == 0 {
                tag = addr_tag(&pkt.saddr, pkt.sport, pkt.proto);
                tag_from_src = tag != 0;
            }
        }
    } else if want_proto != ANY_PROTO || want_port != 0 || want_family != 0 || want_addrs {
        if !has_l3 {
            return Ok(());
        }
        let head: *const u8 = read(skb, conf!(offsets.skb_head))?;
        let th: u16 = read(skb, conf!(offsets.skb_transport_header))?;
        let pkt = parse(head, nh, th, l3_proto)?;
        l4 = Some(L4::of(&pkt));
        if want_addrs {
            tag = addr_tag(&pkt.daddr, pkt.dport, pkt.proto);
            if tag == 0 {
                tag = addr_tag(&pkt.saddr, pkt.sport, pkt.proto);
                tag_from_src = true;
            }
            if tag == 0 {
                return Ok(());
            }
        }
        if want_proto != ANY_PROTO && pkt.proto != want_proto {
            return Ok(());
        }
        if want_port != 0 && pkt.sport != want_port && pkt.dport != want_port {
            return Ok(());
        }
        if want_family != 0 {
            let family = if l3_proto == ETH_P_IP { 4 } else { 6 };
            if family != want_family || !(in_net(&pkt.saddr) || in_net(&pkt.daddr)) {
                return Ok(());
            }
        }
    }

    let ip_version = match (has_l3, l3_proto) {
        (false, _) => 0,
        (true, ETH_P_IP) => 4,
        (true, _) => 6,
    };
    // The conntrack state is part of the key only where it classifies: NETFILTER_DROP.
    let is_netfilter = reason == conf!(netfilter_drop_reason);
    let (mut ct_ptr, mut ct_info, mut ct_status, mut ct_state) = (core::ptr::null(), 0u8, 0u32, 0u8);
    if is_netfilter {
        (ct_ptr, ct_info, ct_status, ct_state) = conntrack_of(skb);
    }
    let exact_class = if conf!(precise_conntrack) != 0 && is_netfilter {
        take_mark(skb as u64)
    } else if has_l3 && reason == conf!(not_specified_reason) {
        l4 = l4.or_else(|| l4_of(skb, nh, l3_proto));
        // Only a TCP segment can be a timewait socket's: other protocols (a UDP storm on kernels
        // without reasons, where every drop is "NOT_SPECIFIED") skip the socket read and the
        // mark lookup.
        if matches!(l4, Some(L4 { proto: 6, .. })) && took_by_timewait(skb, rx_sk) {
            class::TCP_TIME_WAIT
        } else {
            tcp_class(l4)
        }
    } else {
        0
    };
    // Decided only where the header was parsed anyway (every target trace and filtered trace):
    // a plain trace of a drop storm pays no extra read.
    // A datagram or SYN from the watched address (a backend's reply) is data lost, not an
    // attempt to it: a backend's attempts are what was sent to it. Passed in rather than
    // tested on the result: a test of the decided effect made the verifier keep every effect's
    // paths apart (precise values), past its 1M-instruction limit on Debian 6.1.
    let attempt = if tag_from_src { effect::DATA } else { effect::ATTEMPT };
    let effect = match l4 {
        Some(l4) if conf!(effects) != 0 => effect_of(
            reason,
            l4,
            rx_sk,
            is_netfilter && ct_state & ct::STATE_MASK == ct::NONE && conf!(conntrack) != 0,
            attempt,
        ),
        _ => effect::UNKNOWN,
    };
    count(DropKey {
        location,
        reason,
        netns,
        ip_version,
        ct_state,
        exact_class,
        effect,
        tag,
        netns_cookie: netns_cookie(net),
    });

    if !emits(reason) || (!has_l3 && reason == conf!(quiet_reason_without_ip)) || !rate_allows() {
        return Ok(());
    }

    // Decide the wakeup before reserving: below the threshold the reader drains on its timer.
    let wake = if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= u64::from(conf!(wakeup_bytes)) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if !is_netfilter {
        // Events carry the entry's pre-NAT tuple whatever the reason (a NO_SOCKET after DNAT
        // names the ClusterIP it was meant for).
        (ct_ptr, ct_info, ct_status, ct_state) = conntrack_of(skb);
    }
    let head: *const u8 = if has_l3 {
        read0(skb, conf!(offsets.skb_head))
    } else {
        core::ptr::null()
    };
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        bump(stat::EVENTS_LOST);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, exclusively owned DropEvent in the ring buffer. Every
    // field is written before submit. Arrays are filled in place: a 128-byte stack copy would
    // overflow the 512-byte BPF stack.
    let ev = unsafe { &mut *ev };
    // SAFETY: a helper call without arguments; it cannot fault.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.location = location;
    ev.skb_addr = skb as u64;
    ev.reason = reason;
    ev.netns = netns;
    ev.skb_len = read0(skb, conf!(offsets.skb_len));
    ev.l3_proto = l3_proto;
    // SAFETY: a helper call without arguments; it cannot fault.
    ev.cpu = unsafe { bpf_get_smp_processor_id() };
    if dev.is_null() {
        ev.ifindex = read0(skb, conf!(offsets.skb_iif));
        ev.ifname = [0; IFNAMSIZ];
    } else {
        ev.ifindex = read0(dev, conf!(offsets.dev_ifindex));
        let name = dev.wrapping_add(conf!(offsets.dev_name) as usize);
        // SAFETY: bpf_probe_read_kernel checks the kernel address and fails rather than faults; the
        // destination is the event's own IFNAMSIZ array.
        if unsafe { bpf_probe_read_kernel_buf(name, &mut ev.ifname) }.is_err() {
            ev.ifname = [0; IFNAMSIZ];
        }
    }
    ev.ct_status = ct_status;
    ev.ct_state = ct_state;
    ev.ct_info = ct_info;
    ev.exact_class = exact_class;
    ev.effect = effect;
    ev.ct_orig = ConntrackTuple::default();
    ev.tag = tag;
    ev._pad2 = 0;
    if !ct_ptr.is_null() {
        read_tuple(ct_ptr, &mut ev.ct_orig);
    }
    ev.header_len = 0;
    // A fixed-size read keeps the verifier simple; bytes past `tail` are still inside the skb's
    // data buffer (skb_shared_info follows it) and header_len leaves them out.
    let l3 = head.wrapping_add(usize::from(nh));
    // SAFETY: a checked kernel read (fails rather than faults) into the event's own headers array.
    if !head.is_null() && unsafe { bpf_probe_read_kernel_buf(l3, &mut ev.headers) }.is_ok() {
        let tail: u32 = read0(skb, conf!(offsets.skb_tail));
        let avail = tail.saturating_sub(u32::from(nh));
        ev.header_len = if avail > HEADER_BYTES as u32 {
            HEADER_BYTES as u16
        } else {
            avail as u16
        };
    } else {
        ev.headers = [0; HEADER_BYTES];
    }
    entry.submit(u64::from(wake));
    bump(stat::EVENTS_SENT);
    Ok(())
}

#[inline(always)]
fn count(key: DropKey) {
    match DROPS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        Some(count) => unsafe { *count += 1 },
        None => {
            // Another CPU may insert the same key first (EEXIST): its copy is per-CPU too, so
            // look ours up again rather than count the drop as lost.
            if DROPS.insert(&key, &1, u64::from(BPF_NOEXIST)).is_err() {
                match DROPS.get_ptr_mut(&key) {
                    // SAFETY: a per-CPU map value: only this CPU writes it while this program runs.
                    Some(count) => unsafe { *count += 1 },
                    None => bump(stat::COUNTER_MAP_FULL),
                }
            }
        }
    }
}

/// The skb's conntrack entry: (entry, ctinfo, status, [`ct`] encoding). The entry pointer is null
/// unless it is a real (unconfirmed or confirmed) entry whose tuple can be read.
#[inline(always)]
fn conntrack_of(skb: *const u8) -> (*const u8, u8, u32, u8) {
    if conf!(conntrack) == 0 {
        return (core::ptr::null(), 0, 0, ct::NONE);
    }
    // skb->_nfct = entry pointer | ctinfo (NFCT_INFOMASK = 7).
    let nfct: u64 = read0(skb, conf!(offsets.skb_nfct));
    let info = (nfct & 7) as u8;
    let entry = (nfct & !7) as *const u8;
    if entry.is_null() {
        let state = if nfct == ct::IP_CT_UNTRACKED {
            ct::UNTRACKED
        } else {
            ct::NONE
        };
        return (core::ptr::null(), info, 0, state);
    }
    let status: u64 = read0(entry, conf!(offsets.ct_status));
    let mut state = if status & (ct::IPS_UNTRACKED | ct::IPS_TEMPLATE) != 0 {
        return (core::ptr::null(), info, status as u32, ct::UNTRACKED);
    } else if status & ct::IPS_CONFIRMED != 0 {
        ct::CONFIRMED
    } else {
        ct::UNCONFIRMED
    };
    if status & ct::IPS_SRC_NAT_DONE != 0 {
        state |= ct::SRC_NAT_DONE;
    }
    if status & ct::IPS_DST_NAT_DONE != 0 {
        state |= ct::DST_NAT_DONE;
    }
    if status & ct::IPS_SRC_NAT != 0 {
        state |= ct::SRC_NAT;
    }
    if status & ct::IPS_DST_NAT != 0 {
        state |= ct::DST_NAT;
    }
    (entry, info, status as u32, state)
}

/// The entry's original-direction tuple: the addresses before NAT (a ClusterIP, a pod's own IP).
#[inline(always)]
fn read_tuple(entry: *const u8, out: &mut ConntrackTuple) {
    let t = entry.wrapping_add(conf!(offsets.ct_orig_tuple) as usize);
    // SAFETY: checked kernel reads (they fail rather than fault) into `out`'s own arrays.
    let ok = unsafe {
        bpf_probe_read_kernel_buf(t.wrapping_add(conf!(offsets.tuple_src_u3) as usize), &mut out.src).is_ok()
            && bpf_probe_read_kernel_buf(t.wrapping_add(conf!(offsets.tuple_dst_u3) as usize), &mut out.dst).is_ok()
    };
    if !ok {
        return;
    }
    let base = t;
    out.src_port = read0(base, conf!(offsets.tuple_src_port));
    out.dst_port = read0(base, conf!(offsets.tuple_dst_port));
    out.l3num = read0(base, conf!(offsets.tuple_src_l3num));
    out.protonum = read0(base, conf!(offsets.tuple_dst_protonum));
}

/// The precise hooks' mark for this skb, if fresh; consumed.
#[inline(always)]
fn take_mark(skb: u64) -> u8 {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(m) = (unsafe { SKB_CLASS.get(&skb) }).copied() else {
        return 0;
    };
    let _ = SKB_CLASS.remove(&skb);
    // SAFETY: a helper call without arguments; it cannot fault.
    let now = unsafe { bpf_ktime_get_ns() };
    if mark::age_ns(now, m) > MARK_MAX_AGE_NS {
        return 0;
    }
    mark::class(m)
}

#[inline(always)]
fn set_mark(skb: u64, class: u8) {
    // SAFETY: a helper call without arguments; it cannot fault.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = SKB_CLASS.insert(&skb, &mark::new(now, class), 0);
}

/// Precise path (fexit, Linux 5.5+ with BTF for the function): `__nf_conntrack_confirm(skb)`
/// returning NF_DROP means the new entry could not be inserted: a clash that could not be
/// resolved (the SNAT/DNS race) or a dying entry. Both bump `insert_failed`.
/// <https://github.com/torvalds/linux/blob/v6.18/net/netfilter/nf_conntrack_core.c> (`__nf_conntrack_confirm`)
#[fexit(function = "__nf_conntrack_confirm")]
pub fn ct_confirm_exit(ctx: FExitContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg::<i32>(1).into();
    if ret == NF_DROP {
        set_mark(skb, class::INSERT_FAILED);
    }
    0
}

/// `nf_conntrack_in(skb, state)` returning NF_DROP with no entry attached: `resolve_normal_ct`
/// failed to allocate one (table full, `drop` stat), per the same file.
#[fexit(function = "nf_conntrack_in")]
pub fn ct_in_exit(ctx: FExitContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg::<i32>(2).into();
    if ret == NF_DROP && no_entry(skb as *const u8) {
        set_mark(skb, class::TABLE_FULL);
    }
    0
}

#[inline(always)]
fn no_entry(skb: *const u8) -> bool {
    read::<u64>(skb, conf!(offsets.skb_nfct)).is_ok_and(|n| n & !7 == 0)
}

/// kprobe fallback of [`ct_confirm_exit`] (kernels or modules without fexit): the entry probe
/// remembers the skb, the return probe reads the verdict.
#[kprobe]
pub fn ct_confirm_entry(ctx: ProbeContext) -> u32 {
    remember_skb(&ctx, 0, 0);
    0
}

#[kretprobe]
pub fn ct_confirm_return(ctx: RetProbeContext) -> u32 {
    let ret: i64 = ctx.ret::<i32>().into();
    if let Some(skb) = recall_skb(0)
        && ret == NF_DROP
    {
        set_mark(skb, class::INSERT_FAILED);
    }
    0
}

#[kprobe]
pub fn ct_in_entry(ctx: ProbeContext) -> u32 {
    remember_skb(&ctx, 0, 1);
    0
}

#[kretprobe]
pub fn ct_in_return(ctx: RetProbeContext) -> u32 {
    let ret: i64 = ctx.ret::<i32>().into();
    if let Some(skb) = recall_skb(1)
        && ret == NF_DROP
        && no_entry(skb as *const u8)
    {
        set_mark(skb, class::TABLE_FULL);
    }
    0
}

/// Keeps argument `arg` (the skb) of a kprobe'd call in `slot` for its kretprobe.
#[inline(always)]
fn remember_skb(ctx: &ProbeContext, arg: usize, slot: u32) {
    let skb: u64 = ctx.arg(arg).unwrap_or(0);
    if let Some(p) = KPROBE_SKB.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *p = skb };
    }
}

#[inline(always)]
fn recall_skb(slot: u32) -> Option<u64> {
    let p = KPROBE_SKB.get_ptr_mut(slot)?;
    // SAFETY: per-CPU slot.
    let skb = unsafe { core::mem::replace(&mut *p, 0) };
    (skb != 0).then_some(skb)
}

/// Whether a TIME_WAIT socket took this segment before it was freed: the receiving socket's
/// state where the tracepoint passes it (`rx_sk`, 6.11+; `tcp_v4_rcv` hands it the timewait
/// socket), else the timewait hooks' mark.
#[inline(always)]
fn took_by_timewait(skb: *const u8, rx_sk: *const u8) -> bool {
    if conf!(rx_sk_timewait) != 0 {
        return read0::<u8>(rx_sk, conf!(offsets.sk_state)) == TCP_STATE_TIME_WAIT;
    }
    conf!(timewait_marks) != 0 && take_mark(skb as u64) == class::TCP_TIME_WAIT
}

/// Precise timewait hook (fexit; kernels whose `kfree_skb` has no `rx_sk`, before 6.11):
/// `tcp_timewait_state_process(tw, skb, th, ...)` decided what a TIME_WAIT socket does with the
/// segment. Whatever it returns, `tcp_v4_rcv`/`tcp_v6_rcv` then free the segment as
/// NOT_SPECIFIED — except `TCP_TW_SYN`, which may hand it to a listener.
/// <https://github.com/torvalds/linux/blob/v6.1/net/ipv4/tcp_ipv4.c> (`do_time_wait`)
#[fexit(function = "tcp_timewait_state_process")]
pub fn tw_exit(ctx: FExitContext) -> i32 {
    let skb: u64 = ctx.arg(1);
    // `bpf_get_func_ret` (5.17+): the return value's slot follows the parameters, whose number
    // changed over time (3 on 6.1, 5 on 6.18). Before 5.17 the kprobes stand in.
    if let Ok(status) = ctx.ret::<u32>() {
        mark_timewait(skb, status);
    }
    0
}

#[inline(always)]
fn mark_timewait(skb: u64, status: u32) {
    if skb != 0 && status != conf!(tw_syn_status) {
        set_mark(skb, class::TCP_TIME_WAIT);
    }
}

/// kprobe fallback of [`tw_exit`].
#[kprobe]
pub fn tw_entry(ctx: ProbeContext) -> u32 {
    remember_skb(&ctx, 1, 2);
    0
}

#[kretprobe]
pub fn tw_return(ctx: RetProbeContext) -> u32 {
    let status: u32 = ctx.ret();
    if let Some(skb) = recall_skb(2) {
        mark_timewait(skb, status);
    }
    0
}

/// The drop's network namespace (`struct net`): the device's; else the receiving socket's (`rx_sk`, 6.11+:
/// `tcp_v4_rcv` clears `skb->dev` of every segment it hands to a full socket, and has stolen
/// `skb->sk`); else the skb's own socket's (locally generated packets freed before a device);
/// else the route's device's (`skb_dst`, still attached on receive until TCP queues the data);
/// else null, unknown.
/// <https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_ipv4.c> (`tcp_v4_rcv`: "This is
/// the only place where skb->dev is cleared")
#[inline(always)]
fn net_of(skb: *const u8, dev: *const u8, rx_sk: *const u8) -> *const u8 {
    if !dev.is_null() {
        read0(dev, conf!(offsets.dev_nd_net))
    } else if !rx_sk.is_null() {
        // Full, request and timewait sockets all start with `struct sock_common`.
        read0(rx_sk, conf!(offsets.sk_net))
    } else {
        match read::<*const u8>(skb, conf!(offsets.skb_sk)) {
            Ok(sk) if !sk.is_null() => read0(sk, conf!(offsets.sk_net)),
            _ if conf!(effects) != 0 => net_of_route(skb),
            _ => core::ptr::null(),
        }
    }
}

/// The namespace's inode number (`/proc/PID/ns/net`), 0 when unknown.
#[inline(always)]
fn netns_inode(net: *const u8) -> u32 {
    if net.is_null() {
        return 0;
    }
    read0(net, conf!(offsets.net_ns_inum))
}

/// The namespace's cookie (`net->net_cookie`, set once when the namespace is made, 5.12+), 0
/// when unknown. Keys carry it so that a namespace reusing a dead one's inode gets keys of its
/// own; userspace evicts the dead one's.
/// <https://github.com/torvalds/linux/blob/v6.18/net/core/net_namespace.c> (`preinit_net`)
#[inline(always)]
fn netns_cookie(net: *const u8) -> u64 {
    let off = conf!(offsets.net_cookie);
    if off == ABSENT {
        return 0;
    }
    read0(net, off)
}

/// `dev_net(skb_dst(skb)->dev)`, or null without a route.
#[inline(always)]
fn net_of_route(skb: *const u8) -> *const u8 {
    if conf!(offsets.dst_dev) == ABSENT || conf!(offsets.skb_refdst) == ABSENT {
        return core::ptr::null();
    }
    // `SKB_DST_PTRMASK`: the low bit is `SKB_DST_NOREF`.
    let refdst: u64 = read0::<u64>(skb, conf!(offsets.skb_refdst)) & !1;
    if refdst == 0 {
        return core::ptr::null();
    }
    let dev: *const u8 = read0(refdst as *const u8, conf!(offsets.dst_dev));
    if dev.is_null() {
        return core::ptr::null();
    }
    read0(dev, conf!(offsets.dev_nd_net))
}

/// The L4 header of the skb, read only when a filter has not parsed it already.
#[inline(always)]
fn l4_of(skb: *const u8, nh: u16, l3_proto: u16) -> Option<L4> {
    let head: *const u8 = read(skb, conf!(offsets.skb_head)).ok()?;
    let th: u16 = read(skb, conf!(offsets.skb_transport_header)).ok()?;
    parse(head, nh, th, l3_proto).ok().map(|p| L4::of(&p))
}

/// What the drop cost ([`effect`]): by protocol and TCP flags, the reason, and the receiving
/// socket's state where the kernel passes it. `no_conntrack`: a NETFILTER_DROP of a packet
/// without a conntrack entry (an invalid one, e.g. kube-proxy's `--ctstate INVALID -j DROP`).
#[inline(always)]
fn effect_of(reason: u32, l4: L4, rx_sk: *const u8, no_conntrack: bool, attempt: u8) -> u8 {
    match l4.proto {
        // UDP and UDP-Lite: every datagram is an attempt of its own.
        17 | 136 => return attempt,
        6 => {}
        _ => return effect::DATA,
    }
    let flags = l4.tcp_flags;
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return attempt;
    }
    if flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK {
        // An ACK (with or without data) a listening socket or no socket received: the kernel
        // sends a reset. `tcp_rcv_state_process` returns TCP_FLAGS for an ACK in LISTEN and
        // `tcp_v4_do_rcv` resets (6.10+); `tcp_v4_rcv`'s `no_tcp_socket` resets anything but a
        // RST. Where the kernel passes the socket, it must be the listener.
        // <https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_input.c> (`tcp_rcv_state_process`)
        let listener = rx_sk.is_null() || read0::<u8>(rx_sk, conf!(offsets.sk_state)) == TCP_STATE_LISTEN;
        if (reason == conf!(tcp_flags_reason) && listener) || reason == conf!(no_socket_reason) {
            return effect::RESET;
        }
    }
    // One bit each, no loop: a loop here, reached from every path of the program, multiplied
    // the verifier's states past its 1M-instruction limit on 6.1.
    let word = core::hint::black_box(reason >> 6) as usize;
    if word >= REASON_BITMAP_BITS / 64 {
        return effect::DATA;
    }
    let bit = 1u64 << (reason & 63);
    if conf!(stale_bits[word]) & bit != 0 {
        return effect::LOSSLESS;
    }
    if l4.payload_len == 0 && flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        // A bare ACK: ACKs are cumulative, so a stale one loses nothing.
        if no_conntrack || conf!(stale_ack_bits[word]) & bit != 0 {
            return effect::LOSSLESS;
        }
    }
    effect::DATA
}

/// [`class::TCP_FIN_OR_RST`] or [`class::TCP_SYN`] for a TCP segment with those flags, else 0
/// (asked only for NOT_SPECIFIED drops).
#[inline(always)]
fn tcp_class(l4: Option<L4>) -> u8 {
    let Some(L4 {
        proto: 6,
        tcp_flags: flags,
        ..
    }) = l4
    else {
        return 0;
    };
    if flags & (TCP_FIN | TCP_RST) != 0 {
        class::TCP_FIN_OR_RST
    } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        class::TCP_SYN
    } else {
        0
    }
}

#[inline(always)]
fn parse(head: *const u8, nh: u16, th: u16, l3_proto: u16) -> Result<Packet, i64> {
    let mut pkt = Packet {
        proto: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        payload_len: 0,
    };
    let l4_off: u32;
    // IP payload bytes (L4 header included).
    let l3_payload: u32;
    let mut first_fragment = true;
    if l3_proto == ETH_P_IP {
        let ip: [u8; 20] = read(head, u32::from(nh))?;
        pkt.proto = u32::from(ip[9]);
        pkt.saddr[..4].copy_from_slice(&ip[12..16]);
        pkt.daddr[..4].copy_from_slice(&ip[16..20]);
        // Only the first fragment (offset 0) carries the L4 header.
        first_fragment = (u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff) == 0;
        l3_payload = u32::from(u16::from_be_bytes([ip[2], ip[3]])).saturating_sub(u32::from(ip[0] & 0x0f) * 4);
        l4_off = if th != HEADER_UNSET && th > nh {
            u32::from(th)
        } else {
            u32::from(nh) + u32::from(ip[0] & 0x0f) * 4
        };
    } else {
        // IPv6: the first next-header only. A packet with extension headers reports that
        // header's number and matches no port filter (decoded fully in userspace).
        let ip: [u8; 40] = read(head, u32::from(nh))?;
        pkt.proto = u32::from(ip[6]);
        pkt.saddr.copy_from_slice(&ip[8..24]);
        pkt.daddr.copy_from_slice(&ip[24..40]);
        l3_payload = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
        l4_off = u32::from(nh) + 40;
    }
    // TCP, UDP, SCTP and UDP-Lite start with the two ports.
    if first_fragment && pkt.proto == 6 {
        // Ports, sequence and acknowledgement numbers, data offset, flags.
        let tcp: [u8; 14] = read(head, l4_off)?;
        pkt.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        pkt.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        pkt.tcp_flags = tcp[13];
        pkt.payload_len = l3_payload.saturating_sub(u32::from(tcp[12] >> 4) * 4);
    } else if first_fragment && matches!(pkt.proto, 17 | 132 | 136) {
        let ports: [u8; 4] = read(head, l4_off)?;
        pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
        pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Ok(pkt)
}

/// The tag of (address, port, protocol), or of (address, any port); 0 when not watched.
#[inline(always)]
fn addr_tag(addr: &[u8; 16], port: u16, proto: u32) -> u32 {
    let mut key = AddrKey {
        addr: *addr,
        port,
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: values are plain u32s copied out at once.
    if let Some(t) = unsafe { ADDR_FILTER.get(&key) } {
        return *t;
    }
    key.port = 0;
    // SAFETY: the value is copied out at once; userspace replaces whole entries, never in place.
    unsafe { ADDR_FILTER.get(&key) }.copied().unwrap_or(0)
}

#[inline(always)]
fn in_net(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if addr[i] & conf!(ip_mask[i]) != conf!(ip_addr[i]) {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn emits(reason: u32) -> bool {
    // Bound the word index itself (not `reason`): the verifier must see the bound on the very
    // register used for the map-value offset.
    let word = core::hint::black_box(reason >> 6) as usize;
    if word >= REASON_BITMAP_BITS / 64 {
        return conf!(emit_other_reasons) != 0;
    }
    conf!(emit_reasons[word]) & (1u64 << (reason & 63)) != 0
}

/// Per-CPU one-second windows: at most `events_per_cpu_sec` events each.
#[inline(always)]
fn rate_allows() -> bool {
    let limit = conf!(events_per_cpu_sec);
    if limit == 0 {
        return true;
    }
    let Some(w) = RATE.get_ptr_mut(0) else { return true };
    // SAFETY: a helper call without arguments; it cannot fault.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot, only this CPU writes it while we run.
    unsafe {
        if now.wrapping_sub((*w).window_start_ns) >= 1_000_000_000 {
            (*w).window_start_ns = now;
            (*w).events = 0;
        }
        if (*w).events >= u64::from(limit) {
            bump(stat::EVENTS_RATE_LIMITED);
            return false;
        }
        (*w).events += 1;
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
