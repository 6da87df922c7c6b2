//! Passive tc programs for the host side of workload veths (`cali*`): count what each pod sends
//! (tc ingress) and receives (tc egress), exactly and per CPU, with connection attempts (TCP SYN
//! without ACK, first UDP packet of a flow) and attempts per chosen destination (TCP SYNs and
//! every UDP datagram: the unit drops are counted in, so ratios compare like with like).
//!
//! They never change a verdict: both return `TC_ACT_UNSPEC`, which is also `TCX_NEXT`, so the
//! next program in the TCX chain or the next clsact filter (Calico's, Cilium's) runs as if we were
//! not there. The same two programs serve TCX and clsact attachments.
//!
//! One instance is loaded per watched network namespace: a tc program cannot tell which
//! namespace its `skb->ifindex` belongs to (before Linux 6.14 it has no `bpf_get_netns_cookie`),
//! and ifindexes repeat across namespaces, so each instance carries its namespace in `TC_CONFIG`.
//!
//! Every packet pays for this, so the common path is short: one counter lookup, the headers read
//! straight from the packet's linear data (no helper call), and for a TCP segment of an
//! established flow (no SYN) nothing more. Destination lookups happen only when userspace has
//! set destinations of that kind (`TC_DEST_KINDS`), UDP flow tracking only when the loader asked
//! for it (`TcConfig::udp_flows`, frozen: the verifier removes the code when it is off).

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use netdrop_common::{
    TC_DIR_FROM_POD, TC_DIR_TO_POD, TcConfig, TcCounters, TcDestCounters, TcDestKey, TcFlowKey, TcKey, tc_dest_kind,
    tc_stat,
};

/// Settings of this instance; the loader overrides it before loading (`.rodata`, frozen).
#[unsafe(no_mangle)]
static TC_CONFIG: TcConfig = TcConfig::DEFAULT;

/// Exact per-interface counters. Entries are inserted and removed by userspace only; the
/// loader sizes the map for the number of interfaces it will watch.
#[map]
static TC_COUNTERS: PerCpuHashMap<TcKey, TcCounters> = PerCpuHashMap::with_max_entries(8192, 0);

/// Attempts per destination (Service backends; port 0: any port of the address, for pods as
/// targets); entries inserted by userspace only.
#[map]
static TC_DESTS: PerCpuHashMap<TcDestKey, TcDestCounters> = PerCpuHashMap::with_max_entries(4096, 0);

/// Which kinds of `TC_DESTS` entries exist ([`tc_dest_kind`] bits), set by userspace around its
/// changes to `TC_DESTS`: an attempt looks up only the kinds there are (with none, no lookup). A
/// one-element array: the verifier inlines the lookup to a few instructions.
#[map]
static TC_DEST_KINDS: Array<u32> = Array::with_max_entries(1, 0);

/// Recently seen UDP flows → last-seen time (ns). An LRU evicts the least recently used flow when
/// full; an evicted flow that speaks again counts as new, so the map is sized for a busy node.
#[map]
static TC_UDP_FLOWS: LruHashMap<TcFlowKey, u64> = LruHashMap::with_max_entries(65536, 0);

#[map]
static TC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(tc_stat::COUNT, 0);

macro_rules! tc_conf {
    ($($field:tt)+) => {
        tc_vread(&raw const TC_CONFIG.$($field)+)
    };
}

#[inline(always)]
fn tc_vread<T: Copy>(p: *const T) -> T {
    // SAFETY: only called on fields of the TC_CONFIG static: aligned, in bounds, initialised.
    // Volatile so the verifier, not rustc, sees the frozen value.
    unsafe { read_volatile(p) }
}

/// tc ingress of the host-side veth: packets the pod sends.
#[classifier]
pub fn netdrop_ingress(ctx: TcContext) -> i32 {
    account::<TC_DIR_FROM_POD>(&ctx);
    TC_ACT_UNSPEC
}

/// tc egress of the host-side veth: packets delivered to the pod.
#[classifier]
pub fn netdrop_egress(ctx: TcContext) -> i32 {
    account::<TC_DIR_TO_POD>(&ctx);
    TC_ACT_UNSPEC
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const EEXIST: i32 = 17;
/// A live flow's last-seen time is rewritten at most this often: a write per packet would bounce
/// the entry's cache line between CPUs at line rate.
const FLOW_REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = TC_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn account<const DIR: u32>(ctx: &TcContext) {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer the kernel handed us; the verifier checks the field access.
    let (ifindex, protocol) = unsafe { ((*skb).ifindex, (*skb).protocol) };
    let key = TcKey {
        ifindex,
        netns: tc_conf!(netns),
        direction: DIR,
        _pad: 0,
    };
    let Some(counters) = TC_COUNTERS.get_ptr_mut(&key) else {
        bump(tc_stat::UNREGISTERED);
        return;
    };
    // SAFETY: per-CPU value, only this CPU writes it while we run.
    unsafe {
        (*counters).packets += 1;
        (*counters).bytes += u64::from(ctx.len());
    }
    // `skb->protocol` is the ethertype in network byte order. Workload veths carry Ethernet,
    // so the network header starts at 14 (at tc the data starts at the MAC header).
    let ethertype = u16::from_be(protocol as u16);
    let Ok(attempt) = classify(ctx, ifindex, ethertype) else {
        bump(tc_stat::SHORT_PACKETS);
        return;
    };
    let Some((dest, new_flow)) = attempt else { return };
    // SAFETY: as above.
    unsafe {
        if dest.proto == IPPROTO_TCP {
            (*counters).tcp_syn += 1;
        } else if new_flow {
            (*counters).udp_new += 1;
        }
    }
    let kinds = TC_DEST_KINDS.get(0).copied().unwrap_or(0);
    if kinds == 0 {
        return;
    }
    let own = if dest.port == 0 {
        tc_dest_kind::ANY_PORT
    } else {
        tc_dest_kind::PORT
    };
    if kinds & own != 0 {
        count_dest::<DIR>(&dest);
    }
    // Pods as targets (`--pod`, `--node`, `-n`): an entry with port 0 counts attempts to the
    // address on any port. Only attempts pay this second lookup, not established flows.
    if dest.port != 0 && kinds & tc_dest_kind::ANY_PORT != 0 {
        let mut any = dest;
        any.port = 0;
        count_dest::<DIR>(&any);
    }
}

#[inline(always)]
fn count_dest<const DIR: u32>(dest: &TcDestKey) {
    if let Some(d) = TC_DESTS.get_ptr_mut(dest) {
        // SAFETY: per-CPU value, only this CPU writes it while we run. DIR is 0 or 1.
        unsafe { (*d).attempts[DIR as usize] += 1 };
    }
}

/// Where [`classify`] reads the headers from.
trait Headers {
    /// `N` bytes of the packet at `off`; only the bytes a caller uses are loaded.
    fn get<const N: usize>(&self, off: usize) -> Result<[u8; N], i64>;
}

/// `Headers::get` of [`Linear`]: the bytes are not in the linear data (not a helper's error:
/// those are negative).
const NOT_LINEAR: i64 = 1;

/// The packet's linear data, read directly: a pointer the verifier checks against `data_end`,
/// no helper call. On veths the headers are there (the sender's stack built them there).
struct Linear {
    data: usize,
    end: usize,
}

impl Headers for Linear {
    #[inline(always)]
    fn get<const N: usize>(&self, off: usize) -> Result<[u8; N], i64> {
        let start = self.data + off;
        if start + N > self.end {
            return Err(NOT_LINEAR);
        }
        // SAFETY: `start..start + N` lies within the packet's linear data, checked just above
        // (and again by the verifier); `[u8; N]` has no alignment requirement.
        Ok(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
    }
}

/// Any part of the packet, through `bpf_skb_load_bytes`: for headers in paged data.
struct Loaded<'a>(&'a TcContext);

impl Headers for Loaded<'_> {
    #[inline(always)]
    fn get<const N: usize>(&self, off: usize) -> Result<[u8; N], i64> {
        self.0.load(off)
    }
}

/// [`classify_from`] the linear data, or through the helper when the headers are not all there.
#[inline(always)]
fn classify(ctx: &TcContext, ifindex: u32, ethertype: u16) -> Result<Option<(TcDestKey, bool)>, i64> {
    let linear = Linear {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    match classify_from(&linear, ifindex, ethertype) {
        // Nothing was counted yet (the flow table is updated only after every read succeeded):
        // start again through the helper.
        Err(NOT_LINEAR) => classify_from(&Loaded(ctx), ifindex, ethertype),
        r => r,
    }
}

/// The destination of an attempt (a TCP SYN without ACK, or a UDP datagram) and whether it
/// starts a flow (always for a SYN; for UDP, a 5-tuple unseen for the flow timeout), `None` for
/// any other packet. `Err` when the IP or L4 header cannot be read.
///
/// Read in the order that lets most packets go first: the IP protocol, then for TCP only the
/// flags byte — a segment of an established flow needs no address nor port.
#[inline(always)]
fn classify_from<H: Headers>(h: &H, ifindex: u32, ethertype: u16) -> Result<Option<(TcDestKey, bool)>, i64> {
    // Each read below takes only the bytes used right after it, so that the compiler cannot
    // load (and spill) the addresses before the TCP flags have said whether they are needed.
    let proto: u8;
    let family: u8;
    let l4_off: usize;
    if ethertype == ETH_P_IP {
        // The whole fixed header must be there; of it, version/IHL, fragment offset, protocol.
        let ip: [u8; 20] = h.get(ETH_HLEN)?;
        // Only the first fragment (offset 0) carries the L4 header.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
            return Ok(None);
        }
        proto = ip[9];
        family = 4;
        l4_off = ETH_HLEN + usize::from(ip[0] & 0x0f) * 4;
    } else if ethertype == ETH_P_IPV6 {
        // The first next-header only: with extension headers the packet is not classified.
        let ip: [u8; 40] = h.get(ETH_HLEN)?;
        proto = ip[6];
        family = 6;
        l4_off = ETH_HLEN + 40;
    } else {
        return Ok(None);
    }
    let port: u16;
    let mut sport = 0u16;
    if proto == IPPROTO_TCP {
        let tcp: [u8; 14] = h.get(l4_off)?;
        if tcp[13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return Ok(None);
        }
        port = u16::from_be_bytes([tcp[2], tcp[3]]);
    } else if proto == IPPROTO_UDP {
        let udp: [u8; 4] = h.get(l4_off)?;
        sport = u16::from_be_bytes([udp[0], udp[1]]);
        port = u16::from_be_bytes([udp[2], udp[3]]);
    } else {
        return Ok(None);
    }
    let flows = proto == IPPROTO_UDP && tc_conf!(udp_flows) != 0;
    // The addresses, now that this is an attempt (source and destination are adjacent).
    let (saddr, daddr) = if family == 4 {
        let a: [u8; 8] = h.get(ETH_HLEN + 12)?;
        (
            [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [a[4], a[5], a[6], a[7], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
    } else if flows {
        let a: [u8; 32] = h.get(ETH_HLEN + 8)?;
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&a[..16]);
        d.copy_from_slice(&a[16..]);
        (s, d)
    } else {
        ([0u8; 16], h.get(ETH_HLEN + 24)?)
    };
    let dest = TcDestKey {
        addr: daddr,
        port,
        proto,
        family,
    };
    let new_flow = flows && new_udp_flow(ifindex, &saddr, sport, &dest);
    Ok(Some((dest, new_flow)))
}

/// Whether this UDP packet starts a flow on this interface: its (normalised) 5-tuple was not
/// seen within the timeout. Two CPUs racing on a brand-new flow both try `BPF_NOEXIST`; only the
/// winner counts it.
#[inline(always)]
fn new_udp_flow(ifindex: u32, saddr: &[u8; 16], sport: u16, dest: &TcDestKey) -> bool {
    let src_first = less_or_equal(saddr, sport, &dest.addr, dest.port);
    let mut key = TcFlowKey {
        ifindex,
        family: dest.family,
        proto: dest.proto,
        port_lo: 0,
        port_hi: 0,
        _pad: 0,
        addr_lo: [0; 16],
        addr_hi: [0; 16],
    };
    if src_first {
        key.addr_lo = *saddr;
        key.port_lo = sport;
        key.addr_hi = dest.addr;
        key.port_hi = dest.port;
    } else {
        key.addr_lo = dest.addr;
        key.port_lo = dest.port;
        key.addr_hi = *saddr;
        key.port_hi = sport;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match TC_UDP_FLOWS.get_ptr_mut(&key) {
        Some(last) => {
            // SAFETY: points into the map value; a concurrent writer stores a similar time, and a
            // torn race only decides which CPU counts an expired flow's restart.
            let age = now.wrapping_sub(unsafe { *last });
            if age >= tc_conf!(udp_flow_timeout_ns) {
                // SAFETY: as above: a store into the map value this CPU looked up.
                unsafe { *last = now };
                true
            } else {
                if age >= FLOW_REFRESH_NS {
                    // SAFETY: as above.
                    unsafe { *last = now };
                }
                false
            }
        }
        None => match TC_UDP_FLOWS.insert(&key, &now, u64::from(BPF_NOEXIST)) {
            Ok(()) => true,
            Err(e) => {
                if e != -EEXIST {
                    bump(tc_stat::FLOW_INSERT_FAILED);
                }
                false
            }
        },
    }
}

/// (a, ap) <= (b, bp), addresses compared byte by byte as on the wire.
#[inline(always)]
fn less_or_equal(a: &[u8; 16], ap: u16, b: &[u8; 16], bp: u16) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return a[i] < b[i];
        }
        i += 1;
    }
    ap <= bp
}
