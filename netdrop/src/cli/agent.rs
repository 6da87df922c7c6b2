//! `netdrop agent` flags.

use std::{net::SocketAddr, path::PathBuf};

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
    pub recorder: RecorderArgs,

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

/// The flight recorder's flags (`netdrop agent`).
#[derive(Debug, Clone, Args)]
pub struct RecorderArgs {
    /// Keep the last N drops in memory for a dump (`GET /debug/recorder.pcapng`, SIGUSR1,
    /// --recorder-trigger), e.g. `--recorder-events 50000`; 0 turns the recorder off.
    #[arg(long, value_name = "N", default_value_t = 10_000, help_heading = "Flight recorder")]
    pub recorder_events: usize,

    /// And at most this much memory for them, e.g. `--recorder-bytes 64M` (K, M, G: powers of
    /// 1024); 0 turns the recorder off.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size_or_zero, help_heading = "Flight recorder")]
    pub recorder_bytes: u64,

    /// Where SIGUSR1 and --recorder-trigger write their dumps (created, mode 0700; files 0600),
    /// e.g. `--recorder-dir /var/lib/netdrop/recorder`.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/netdrop/recorder",
        help_heading = "Flight recorder"
    )]
    pub recorder_dir: PathBuf,

    /// Also dump when the drops seen reach this rate, e.g. `--recorder-trigger 1000/s`: the
    /// recorder's content up to that second (the time before the trigger); at most one such
    /// dump a minute.
    #[arg(long, value_name = "RATE/s", value_parser = parse_rate, help_heading = "Flight recorder")]
    pub recorder_trigger: Option<u64>,
}

/// `16M`, or `0` (off).
fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        super::capture::parse_size(s)
    }
}

/// `1000/s` or `1000`: drops per second, more than 0.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let n = t.strip_suffix("/s").unwrap_or(t);
    match n.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a rate (e.g. 1000/s)")),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_rate, parse_size_or_zero};

    #[test]
    fn rates_and_sizes_of_the_recorder_parse() {
        assert_eq!(parse_rate("1000/s"), Ok(1000));
        assert_eq!(parse_rate("5"), Ok(5));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("16M"), Ok(16 << 20));
    }
}
