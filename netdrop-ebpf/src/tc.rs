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

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use netdrop_common::{
    TC_DIR_FROM_POD, TC_DIR_TO_POD, TcConfig, TcCounters, TcDestCounters, TcDestKey, TcFlowKey, TcKey, tc_stat,
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
    count_dest::<DIR>(&dest);
    // Pods as targets (`--pod`, `--node`, `-n`): an entry with port 0 counts attempts to the
    // address on any port. Only attempts pay this second lookup, not established flows.
    if dest.port != 0 {
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

/// The destination of an attempt (a TCP SYN without ACK, or a UDP datagram) and whether it
/// starts a flow (always for a SYN; for UDP, a 5-tuple unseen for the flow timeout), `None` for
/// any other packet. `Err` when the IP or L4 header cannot be read.
#[inline(always)]
fn classify(ctx: &TcContext, ifindex: u32, ethertype: u16) -> Result<Option<(TcDestKey, bool)>, i64> {
    let mut dest = TcDestKey {
        addr: [0; 16],
        port: 0,
        proto: 0,
        family: 0,
    };
    let mut saddr = [0u8; 16];
    let l4_off: usize;
    if ethertype == ETH_P_IP {
        let ip: [u8; 20] = ctx.load(ETH_HLEN)?;
        // Only the first fragment (offset 0) carries the L4 header.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
            return Ok(None);
        }
        dest.proto = ip[9];
        dest.family = 4;
        saddr[..4].copy_from_slice(&ip[12..16]);
        dest.addr[..4].copy_from_slice(&ip[16..20]);
        l4_off = ETH_HLEN + usize::from(ip[0] & 0x0f) * 4;
    } else if ethertype == ETH_P_IPV6 {
        // The first next-header only: with extension headers the packet is not classified.
        let ip: [u8; 40] = ctx.load(ETH_HLEN)?;
        dest.proto = ip[6];
        dest.family = 6;
        saddr.copy_from_slice(&ip[8..24]);
        dest.addr.copy_from_slice(&ip[24..40]);
        l4_off = ETH_HLEN + 40;
    } else {
        return Ok(None);
    }
    if dest.proto == IPPROTO_TCP {
        let tcp: [u8; 14] = ctx.load(l4_off)?;
        if tcp[13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return Ok(None);
        }
        dest.port = u16::from_be_bytes([tcp[2], tcp[3]]);
        return Ok(Some((dest, true)));
    }
    if dest.proto != IPPROTO_UDP {
        return Ok(None);
    }
    let udp: [u8; 4] = ctx.load(l4_off)?;
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    dest.port = u16::from_be_bytes([udp[2], udp[3]]);
    let new_flow = tc_conf!(udp_flows) != 0 && new_udp_flow(ifindex, &saddr, sport, &dest);
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
