//! Command-line types: clap only, no logic. The only module that knows clap; the rest of the
//! crate gets plain option types through the `From` impls and small methods here.

mod agent;
mod capture;
mod interfaces;
mod kube;
mod resolve;
mod trace;

use clap::{Parser, Subcommand};

pub use self::{
    agent::{AgentArgs, DEFAULT_LISTEN, EventsFormat, RecorderArgs},
    capture::{CaptureArgs, CaptureOptions, ReportArgs},
    interfaces::{InterfacesArgs, TcArgs, TcModeArg},
    kube::KubeArgs,
    resolve::ResolveArgs,
    trace::{CtHookArg, FilterArgs, HookArg, ProbeArgs, TargetArgs, TraceArgs, TwHookArg},
};

/// netdrop: every dropped packet with the kernel's own reason, location, and the pods and
/// Services it belongs to.
#[derive(Debug, Parser)]
#[command(name = "netdrop", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level for netdrop's own diagnostics on stderr (error, warn, info, debug).
    #[arg(long, global = true, env = "NETDROP_LOG", default_value = "warn")]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream packet drops as they happen, then print a summary.
    Trace(TraceArgs),
    /// List the drop reasons this kernel knows, with their numbers.
    Reasons(ReasonsArgs),
    /// Name addresses the way drops are named: pods, Services, backends, nodes, e.g.
    /// `netdrop resolve 10.244.1.7 10.96.0.10:53/udp cali1b2c3d4e5f6`, or `--svc ns/name`.
    Resolve(ResolveArgs),
    /// Count each pod's traffic on its workload interfaces (cali*), following pod churn.
    Interfaces(InterfacesArgs),
    /// Write the dropped packets, with their verdicts, to a pcapng file for Wireshark, e.g.
    /// `netdrop capture --svc default/web --duration 60s -o incident.pcapng`.
    Capture(CaptureArgs),
    /// Re-render a capture's summary offline (no BPF, no cluster), e.g.
    /// `netdrop report incident.pcapng`.
    Report(ReportArgs),
    /// Run as a node's agent (a DaemonSet): count every drop, observe Services' backends, and
    /// serve Prometheus metrics, e.g. `netdrop agent --node-name=$(NODE_NAME) --listen=0.0.0.0:9965`.
    Agent(Box<AgentArgs>),
    /// Remove netdrop's tc filters from every interface of the given node namespaces (after an
    /// agent was killed or uninstalled), e.g. `netdrop cleanup --node-netns node-a=/run/netns/node-a`.
    Cleanup(CleanupArgs),
}

/// `netdrop cleanup`.
#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// A node's network namespace (repeatable); none: this process's own.
    #[arg(long = "node-netns", value_name = "NAME=PATH")]
    pub node_netns: Vec<crate::source::interfaces::NodeNetns>,
}

/// `-o text|json`, for every command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A readable line per drop and a table at the end.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ReasonsArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}
