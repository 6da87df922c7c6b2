//! Planning a trace: the kernel program's settings from the flags and what the kernel offers,
//! and which way `TIME_WAIT` segments are told.

use netdrop_common::Config;

use crate::{
    cli::{CtHookArg, FilterArgs, ProbeArgs, TwHookArg},
    kernel::{KernelInfo, reasons::ReasonTable},
    probe::{
        self, PreciseHook,
        filter::{FilterError, FilterSpec},
    },
};

/// The kernel wakes the reader once this much is waiting in the ring buffer.
const WAKEUP_BYTES: u32 = 256 * 1024;

/// What the flags and the kernel decide before anything is loaded.
pub(crate) struct Plan {
    pub(crate) spec: FilterSpec,
    /// The kernel programs' read-only settings.
    pub(crate) config: Config,
    /// Conntrack classification is on (BTF has `struct nf_conn`, not `--ct-hook off`).
    pub(crate) conntrack_on: bool,
    pub(crate) timewait: Timewait,
    /// No kernel BTF, why: the degraded mode "counts only".
    pub(crate) counts_only: Option<String>,
}

/// The kernel programs' settings from the flags and what this kernel offers; `addr_filter` is
/// the `ADDR_FILTER` mode (`netdrop_common::addr_mode`).
pub(crate) fn plan(
    filter: &FilterArgs,
    probe: &ProbeArgs,
    addr_filter: u32,
    kernel: &KernelInfo,
) -> anyhow::Result<Plan> {
    let spec = filter.to_spec();
    let mut config = Config::DEFAULT;
    spec.apply(&mut config, &kernel.reasons)?;
    let mut counts_only = None;
    if let Some(o) = kernel.offsets {
        config.offsets = o;
        config.read_skb = 1;
    } else {
        let why = kernel.btf_error.clone().unwrap_or_default();
        if spec.needs_packet() {
            return Err(FilterError::NeedsBtf(why).into());
        }
        counts_only = Some(why);
    }
    if let Some(tp) = kernel.tracepoint {
        config.tracepoint = tp;
    }
    config.btf_has_reason = u32::from(kernel.btf_has_reason);
    let conntrack_on = config.read_skb == 1 && kernel.conntrack.is_ok() && probe.ct_hook != Some(CtHookArg::Off);
    config.conntrack = u32::from(conntrack_on);
    config.netfilter_drop_reason = kernel
        .reasons
        .lookup("NETFILTER_DROP")
        .unwrap_or(netdrop_common::ABSENT);
    // Without reasons (before 5.17) every drop is 0, and the TCP flags help classify all of them.
    config.not_specified_reason = kernel.reasons.not_specified().unwrap_or(netdrop_common::ABSENT);
    set_effect_reasons(&mut config, &kernel.reasons);
    // The kfree_skb program consults the precise hooks' marks only for NETFILTER_DROP.
    config.precise_conntrack = config.conntrack;
    let timewait = timewait_source(kernel, &mut config, probe.tw_hook)?;
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
    config.events_per_cpu_sec = if probe.event_rate == 0 {
        0
    } else {
        probe.event_rate.div_ceil(cpus)
    };
    config.wakeup_bytes = WAKEUP_BYTES.min(probe.ring_kib * 1024 / 4);
    config.addr_filter = addr_filter;

    Ok(Plan {
        spec,
        config,
        conntrack_on,
        timewait,
        counts_only,
    })
}

/// The verifier gave up on the program's size (`E2BIG`, "BPF program is too large").
pub(crate) fn is_too_large(e: &probe::ProbeError) -> bool {
    let text = format!("{e}");
    text.contains("too large") || text.contains("Argument list too long")
}

/// How segments a TIME_WAIT socket answered and freed are told from drops.
pub(crate) enum Timewait {
    /// The `kfree_skb` tracepoint's receiving socket is in TIME_WAIT (6.11+).
    RxSk,
    /// Marks from hooks on `tcp_timewait_state_process` (`None`: fexit, else kprobes).
    Hooks(Option<PreciseHook>),
    /// FIN/RST flags only: chosen (`--tw-hook flags`, or no per-packet data), or, with why,
    /// because the kernel lacks what the hooks need.
    Flags(Option<String>),
}

/// Picks the way to tell timewait segments and sets the config for it; `--tw-hook` forces one.
fn timewait_source(kernel: &KernelInfo, config: &mut Config, want: Option<TwHookArg>) -> anyhow::Result<Timewait> {
    let rx_sk = config.read_skb == 1 && kernel.has_rx_sk();
    let source = match want {
        None | Some(TwHookArg::RxSk) if rx_sk => Timewait::RxSk,
        Some(TwHookArg::RxSk) => {
            anyhow::bail!(
                "--tw-hook rx-sk: this kernel's kfree_skb passes no receiving socket (Linux 6.11+); use fexit or kprobe"
            )
        }
        Some(TwHookArg::Flags) => Timewait::Flags(None),
        _ if config.read_skb == 0 => Timewait::Flags(None),
        None => Timewait::Hooks(None),
        Some(TwHookArg::Fexit) => Timewait::Hooks(Some(PreciseHook::Fexit)),
        Some(TwHookArg::Kprobe) => Timewait::Hooks(Some(PreciseHook::Kprobe)),
    };
    // The receiving socket is read whenever the kernel passes it (the drop's namespace, a
    // LISTEN socket's reset); it tells TIME_WAIT segments only when chosen for that.
    config.btf_has_rx_sk = u32::from(rx_sk && kernel.btf_has_rx_sk);
    if !rx_sk {
        config.tracepoint.rx_sk = netdrop_common::ABSENT;
    }
    config.rx_sk_timewait = u32::from(matches!(source, Timewait::RxSk));
    if let Timewait::Hooks(_) = source {
        match &kernel.timewait {
            Ok(f) => {
                config.timewait_marks = 1;
                config.tw_syn_status = f.syn_status;
            }
            Err(why) => return Ok(Timewait::Flags(Some(why.clone()))),
        }
    }
    Ok(source)
}

/// The reasons the kernel program needs to tell what a drop cost (`netdrop_common::effect`).
fn set_effect_reasons(config: &mut Config, reasons: &ReasonTable) {
    let absent = netdrop_common::ABSENT;
    // Data the receiver already had: entirely below `rcv_nxt` (OLD_DATA) or `rcv_wup`
    // (OLD_SEQUENCE), already in the out-of-order queue (OFOMERGE), or an old duplicate by its
    // timestamp (PAWS).
    let stale = [
        "TCP_OLD_DATA",
        "TCP_OLD_SEQUENCE",
        "TCP_OFOMERGE",
        "TCP_RFC7323_PAWS",
        "TCP_RFC7323_PAWS_ACK",
    ];
    for (slot, name) in config.stale_reasons.iter_mut().zip(stale) {
        *slot = reasons.lookup(name).unwrap_or(absent);
    }
    // A bare ACK out of the window or acknowledging old data is stale; with data the same
    // reasons lose the data (the sender retransmits it).
    let stale_ack = [
        "TCP_INVALID_SEQUENCE",
        "TCP_OLD_ACK",
        "TCP_TOO_OLD_ACK",
        "TCP_INVALID_ACK_SEQUENCE",
    ];
    for (slot, name) in config.stale_ack_reasons.iter_mut().zip(stale_ack) {
        *slot = reasons.lookup(name).unwrap_or(absent);
    }
    config.set_stale_bits();
    config.tcp_flags_reason = reasons.lookup("TCP_FLAGS").unwrap_or(absent);
    config.no_socket_reason = reasons.lookup("NO_SOCKET").unwrap_or(absent);
}
