//! `netdrop agent` flags.

use std::net::SocketAddr;

use clap::Args;

use super::{KubeArgs, ProbeArgs, TcArgs};

/// The port of the agent contract (`deploy/README.md`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9965";

/// `netdrop agent`: always on, one per node; counts every drop and serves them to Prometheus.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Serve `/metrics`, `/healthz` and `/readyz` on ADDR (repeatable). With hostNetwork the
    /// kubelet probes the node's address: listen where it can reach.
    #[arg(long = "listen", value_name = "ADDR", default_value = DEFAULT_LISTEN, help_heading = "Metrics")]
    pub listen: Vec<SocketAddr>,

    /// Observe this Service's per-backend drops and attempts (repeatable), besides those
    /// annotated `netdrop.io/observe: "true"`. A Service not found yet is observed once it is.
    #[arg(long = "observe", value_name = "[NS/]NAME", value_parser = crate::resolve::ns_name_arg, help_heading = "Metrics")]
    pub observe: Vec<String>,

    /// Observe every Service, up to --max-services.
    #[arg(long, help_heading = "Metrics")]
    pub observe_all: bool,

    /// The most Services observed at once (the kernel's address filter holds 4096 addresses);
    /// the rest are named in a warning.
    #[arg(long, value_name = "N", default_value_t = 100, help_heading = "Metrics")]
    pub max_services: usize,

    /// Add the `pod_name` label to the per-pod drop series (one series per pod instead of per
    /// workload).
    #[arg(long, help_heading = "Metrics")]
    pub pod_names: bool,

    /// Remove a pod's (or Service's) series this long after it is gone: a last scrape shows
    /// its final value first, e.g. `--gone-after 5m`.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = humantime::parse_duration, help_heading = "Metrics")]
    pub gone_after: std::time::Duration,

    /// Also write every drop event to stdout in this format (for log shippers); none by default.
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Output")]
    pub events: Option<EventsFormat>,

    #[command(flatten)]
    pub tc: TcArgs,

    #[command(flatten)]
    pub probe: ProbeArgs,

    #[command(flatten, next_help_heading = "Kubernetes")]
    pub kube: KubeArgs,
}

/// `--events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsFormat {
    /// One JSON object per line, as `trace -o json`.
    Json,
}

impl AgentArgs {
    /// `--observe` as (namespace, name); a bare name is in `default`.
    pub fn observe_names(&self) -> Vec<(String, String)> {
        self.observe
            .iter()
            .filter_map(|s| crate::resolve::parse_ns_name(s, None).ok())
            .collect()
    }
}
