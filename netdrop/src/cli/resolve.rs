//! `netdrop resolve` flags.

use std::time::Duration;

use super::{Format, KubeArgs};

/// `netdrop resolve <IP[:PORT]>... | --svc NS/NAME`
#[derive(clap::Args, Debug, Clone)]
pub struct ResolveArgs {
    /// Addresses to resolve, e.g. `10.244.1.7`, `10.96.0.10:53/udp`, `[fd00::7]:8080`, or a Calico
    /// interface name such as `cali0d7763386da`
    #[arg(value_name = "IP[:PORT[/PROTO]]")]
    pub targets: Vec<String>,

    /// Show a Service, its ports and its backends, e.g. `--svc default/web` (or `--svc web -n default`)
    #[arg(long, value_name = "NS/NAME", value_parser = crate::resolve::ns_name_arg)]
    pub svc: Option<String>,

    /// Namespace for `--svc NAME`, e.g. `-n kube-system`
    #[arg(short = 'n', long, value_name = "NS")]
    pub namespace: Option<String>,

    /// Output format: `text`, or `json` (one JSON object per line)
    // The values are named above: the shared enum's descriptions are about drops.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text, hide_possible_values = true)]
    pub output: Format,

    /// How long to wait for the first sync with the API, e.g. `--sync-timeout 30s`
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_timeout: Duration,

    #[command(flatten)]
    pub kube: KubeArgs,

    /// Diagnostics for benchmarks: sync, print stats and lookup latency as JSON, then answer
    /// `stats` / `lookup TARGET` / `quit` lines on stdin.
    #[arg(long, hide = true)]
    pub serve_stats: bool,
}
