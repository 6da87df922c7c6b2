//! `netdrop trace` flags.

use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

use super::{Format, KubeArgs, TcArgs};
use crate::{
    aggregate::target_set::TargetSpec,
    probe::{
        Hook, PreciseHook,
        filter::{self, FilterSpec},
    },
};

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub tc: TcArgs,

    /// Do not attach tc counters to the workload interfaces (no attempts, no ratios).
    #[arg(long, help_heading = "Interfaces")]
    pub no_tc: bool,

    /// Stop after this long, e.g. `30s`, `5m` (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Output")]
    pub duration: Option<Duration>,

    /// Output format: `text` for people, `json` for one object per line [default: text; with
    /// `--svc` and friends a live table in a terminal, JSON lines when piped].
    #[arg(short = 'o', long, value_enum, help_heading = "Output")]
    pub output: Option<Format>,

    #[command(flatten)]
    pub probe: ProbeArgs,

    #[command(flatten, next_help_heading = "Kubernetes")]
    pub kube: KubeArgs,
}

/// How the kernel side runs, shared by `trace` and `capture`: the event rate, the ring and which
/// hooks to use instead of probing.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// At most this many drop events per second are sent to userspace, e.g. `--event-rate 0`
    /// for no limit. Counts stay exact either way; the summary says how many events were not sent.
    #[arg(long, default_value_t = 10_000, help_heading = "Output")]
    pub event_rate: u32,

    /// Ring buffer size in KiB (a power of two), e.g. `--ring-kib 16384` for long bursts.
    #[arg(long, default_value_t = 4096, value_parser = parse_ring_kib, help_heading = "Output")]
    pub ring_kib: u32,

    /// Use this hook instead of probing: `tp-btf` or `tracepoint`.
    #[arg(long, value_enum, help_heading = "Kernel")]
    pub hook: Option<HookArg>,

    /// How to observe conntrack verdicts: `fexit`, `kprobe`, `inferred` (from conntrack state
    /// and statistics), `off`. Default: the best that works here.
    #[arg(long, value_enum, help_heading = "Kernel")]
    pub ct_hook: Option<CtHookArg>,

    /// How to tell segments a TIME_WAIT socket answered and freed (hidden as `tcp_teardown`):
    /// `rx-sk` (the kfree_skb tracepoint's socket, 6.11+), `fexit` or `kprobe` (on
    /// tcp_timewait_state_process), `flags` (FIN/RST only). Default: the first that works here.
    #[arg(long, value_enum, help_heading = "Kernel")]
    pub tw_hook: Option<TwHookArg>,
}

/// What the trace is about, in Kubernetes terms. Each selects a set of addresses the kernel
/// watches; drops are counted per Service backend or per pod.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Kubernetes targets")]
pub struct TargetArgs {
    /// A Service, `NAMESPACE/NAME` or `NAME` with `-n`: its ClusterIPs, NodePorts and every
    /// backend; a live per-backend table and a diagnosis, e.g. `--svc default/web`.
    #[arg(long, value_name = "[NS/]NAME", value_parser = crate::resolve::ns_name_arg)]
    pub svc: Option<String>,

    /// A pod, `NAMESPACE/NAME` or `NAME` with `-n`, e.g. `--pod kube-system/coredns-5d78c9869d-x2x9z`.
    #[arg(long, value_name = "[NS/]NAME", conflicts_with = "svc", value_parser = crate::resolve::ns_name_arg)]
    pub pod: Option<String>,

    /// The namespace of `--svc`/`--pod`, or alone: every pod in it, e.g. `-n default`.
    #[arg(short = 'n', long, value_name = "NS")]
    pub namespace: Option<String>,

    /// Every pod on this node, and the node's own addresses, e.g. `--node node-b`.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["svc", "pod"])]
    pub node: Option<String>,

    /// How often the table is refreshed (terminal) or a summary line is printed (JSON), e.g. `5s`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub interval: Duration,
}

impl TargetArgs {
    pub fn any(&self) -> bool {
        self.svc.is_some() || self.pod.is_some() || self.node.is_some() || self.namespace.is_some()
    }

    /// What the flags ask about; `None` without a target flag.
    pub fn spec(&self) -> Option<TargetSpec> {
        let ns = self.namespace.as_deref();
        if let Some(s) = &self.svc {
            let (namespace, name) = ns_name(s, ns);
            return Some(TargetSpec::Svc { namespace, name });
        }
        if let Some(p) = &self.pod {
            let (namespace, name) = ns_name(p, ns);
            return Some(TargetSpec::Pod { namespace, name });
        }
        if let Some(n) = &self.node {
            return Some(TargetSpec::Node(n.clone()));
        }
        ns.map(|n| TargetSpec::Namespace(n.to_string()))
    }
}

/// `ns/name`, or `name` with `-n ns`, or `name` in `default` (kubectl's rule); clap checked the
/// syntax (`resolve::ns_name_arg`), so a bad value here can only be an empty one from code.
fn ns_name(value: &str, namespace: Option<&str>) -> (String, String) {
    crate::resolve::parse_ns_name(value, namespace)
        .unwrap_or_else(|_| (namespace.unwrap_or("default").to_string(), value.to_string()))
}

/// `--ct-hook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CtHookArg {
    Fexit,
    Kprobe,
    Inferred,
    Off,
}

impl CtHookArg {
    pub fn hook(self) -> Option<PreciseHook> {
        match self {
            Self::Fexit => Some(PreciseHook::Fexit),
            Self::Kprobe => Some(PreciseHook::Kprobe),
            Self::Inferred => Some(PreciseHook::Inferred),
            Self::Off => None,
        }
    }

    /// The flag as typed, for the attach report.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Fexit => "--ct-hook fexit",
            Self::Kprobe => "--ct-hook kprobe",
            Self::Inferred => "--ct-hook inferred",
            Self::Off => "--ct-hook off",
        }
    }
}

/// `--hook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookArg {
    /// BTF-typed tracepoint (`tp_btf/kfree_skb`, Linux 5.5+): typed arguments, no record copy.
    TpBtf,
    /// Classic tracepoint (`tracepoint/skb/kfree_skb`): any kernel with tracefs.
    Tracepoint,
}

impl HookArg {
    /// The flag as typed, for the attach report.
    pub fn flag(self) -> &'static str {
        match self {
            Self::TpBtf => "--hook tp-btf",
            Self::Tracepoint => "--hook tracepoint",
        }
    }
}

impl From<HookArg> for Hook {
    fn from(h: HookArg) -> Self {
        match h {
            HookArg::TpBtf => Self::TpBtf,
            HookArg::Tracepoint => Self::Tracepoint,
        }
    }
}

/// `--tw-hook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TwHookArg {
    RxSk,
    Fexit,
    Kprobe,
    Flags,
}

impl TwHookArg {
    /// The flag as typed, for the attach report.
    pub fn flag(self) -> &'static str {
        match self {
            Self::RxSk => "--tw-hook rx-sk",
            Self::Fexit => "--tw-hook fexit",
            Self::Kprobe => "--tw-hook kprobe",
            Self::Flags => "--tw-hook flags",
        }
    }
}

#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only these drop reasons, e.g. `--reason NO_SOCKET --reason NETFILTER_DROP` (see
    /// `netdrop reasons`).
    #[arg(long = "reason", value_name = "REASON")]
    pub reasons: Vec<String>,

    /// Only packets from or to this port, e.g. `--port 53`.
    #[arg(long)]
    pub port: Option<u16>,

    /// Only this protocol: `tcp`, `udp`, `icmp`, `icmpv6`, `sctp` or a number.
    #[arg(long, value_parser = filter::parse_proto)]
    pub proto: Option<u8>,

    /// Only packets from or to this network, e.g. `--ip 10.244.0.0/16` or `--ip fd00::1`.
    #[arg(long, value_name = "CIDR", value_parser = filter::parse_cidr)]
    pub ip: Option<IpNet>,

    /// Only drops in this network namespace: an inode, a path (`/proc/PID/ns/net`,
    /// `/run/netns/NAME`) or a name from `ip netns list`.
    #[arg(long, value_name = "INODE|PATH", value_parser = filter::parse_netns)]
    pub netns: Option<u32>,

    /// Also show benign frees (SOCKET_CLOSE, QUEUE_PURGE, non-IP NOT_SPECIFIED, ...).
    #[arg(long)]
    pub all_reasons: bool,
}

impl FilterArgs {
    pub fn to_spec(&self) -> FilterSpec {
        FilterSpec {
            reasons: self.reasons.clone(),
            port: self.port,
            proto: self.proto,
            ip: self.ip,
            netns: self.netns,
            all_reasons: self.all_reasons,
        }
    }
}

pub(super) fn parse_ring_kib(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("{s:?} is not a number of KiB"))?;
    if !v.is_power_of_two() || !(4..=1 << 20).contains(&v) {
        return Err("must be a power of two between 4 and 1048576".into());
    }
    Ok(v)
}
