//! `netdrop interfaces` flags, and the interface flags `netdrop trace` shares.

use std::time::Duration;

use clap::Args;

use super::Format;
use crate::{
    probe::tc::{DEFAULT_PRIORITY, TcModeChoice},
    source::interfaces::{Destination, IfacePattern, NodeNetns, WatchOptions},
};

/// Which workload interfaces to watch and how to attach: shared by `netdrop interfaces` and
/// `netdrop trace` (where the tc counters give attempts, the denominator of drop ratios).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Interfaces")]
pub struct TcArgs {
    /// Interfaces to watch, shell-style; repeatable, e.g. `--iface-pattern 'lxc*'` (Cilium).
    #[arg(long = "iface-pattern", value_name = "GLOB", default_value = "cali*")]
    pub iface_patterns: Vec<String>,

    /// How to attach: `tcx` (Linux 6.6+; links die with the process), `clsact` (netlink filters,
    /// removed by the next run after a SIGKILL), or `auto` (tcx when available). Each TCX
    /// attach/detach waits for an RCU grace period under the rtnl lock (about 23 ms per
    /// interface measured on 6.18): with hundreds of pods, `clsact` starts ~50x faster.
    #[arg(long, value_enum, default_value_t = TcModeArg::Auto)]
    pub tc_mode: TcModeArg,

    /// Priority of the clsact filters (lower runs first), e.g. `--tc-priority 100`.
    #[arg(long, default_value_t = DEFAULT_PRIORITY, value_parser = clap::value_parser!(u16).range(1..))]
    pub tc_priority: u16,

    /// Also watch this network namespace as node NAME (repeatable): one netdrop for several
    /// nodes sharing a kernel (kind, k3d, the lab), e.g. `--node-netns node-a=/run/netns/node-a`;
    /// default: this namespace, as --node-name.
    #[arg(long = "node-netns", value_name = "NAME=PATH")]
    pub node_netns: Vec<NodeNetns>,
}

impl TcArgs {
    /// What `trace` (and the commands built like it) attach with: attempts per destination only,
    /// no UDP flow table (`udp_new` is `netdrop interfaces`' column; it sets its own load options).
    pub fn watch_options(&self) -> WatchOptions {
        let mut opts = WatchOptions {
            pattern: IfacePattern::new(&self.iface_patterns),
            mode: self.tc_mode.into(),
            priority: self.tc_priority,
            ..WatchOptions::default()
        };
        opts.load.udp_flows = false;
        opts
    }

    /// `--tc-mode` as typed when it forces a mode, for the attach report.
    pub fn mode_flag(&self) -> Option<&'static str> {
        match self.tc_mode {
            TcModeArg::Auto => None,
            TcModeArg::Tcx => Some("--tc-mode tcx"),
            TcModeArg::Clsact => Some("--tc-mode clsact"),
        }
    }
}

/// `netdrop interfaces`: attach to workload interfaces, follow them, and show their counters.
#[derive(Debug, Args)]
pub struct InterfacesArgs {
    #[command(flatten)]
    pub tc: TcArgs,

    /// Name of this node (default: `$NODE_NAME`, else the hostname).
    #[arg(long, env = "NODE_NAME", help_heading = "Interfaces")]
    pub node_name: Option<String>,

    /// Also count connection attempts to this destination (repeatable), e.g.
    /// `--dest 10.96.0.10:53/udp`.
    #[arg(long = "dest", value_name = "IP:PORT/PROTO", help_heading = "Counters")]
    pub dests: Vec<Destination>,

    /// Most interfaces per namespace the counters can hold.
    #[arg(long, default_value_t = 4096, help_heading = "Counters")]
    pub max_interfaces: u32,

    /// Leave the UDP-flow column at 0 and skip the flow table (a lookup and a clock read per UDP
    /// datagram): what `trace` attaches with, for a busy node.
    #[arg(long, help_heading = "Counters")]
    pub no_udp_flows: bool,

    /// Print the table every this long, e.g. `5s` (also at exit).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", help_heading = "Output")]
    pub interval: Duration,

    /// Stop after this long, e.g. `30s` (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Output")]
    pub duration: Option<Duration>,

    /// `text` for people, `json` for one object per line.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text, help_heading = "Output")]
    pub output: Format,
}

/// `--tc-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcModeArg {
    /// TCX when the kernel has it (6.6+), else clsact.
    #[default]
    Auto,
    Tcx,
    Clsact,
}

impl From<TcModeArg> for TcModeChoice {
    fn from(m: TcModeArg) -> Self {
        match m {
            TcModeArg::Auto => Self::Auto,
            TcModeArg::Tcx => Self::Tcx,
            TcModeArg::Clsact => Self::Clsact,
        }
    }
}
