//! `netdrop capture` and `netdrop report` flags.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use super::{FilterArgs, Format, KubeArgs, ProbeArgs, TargetArgs, TcArgs, TraceArgs};

/// `netdrop capture`: the trace's filters and targets, and where the packets go.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// The capture file (pcapng), e.g. `-o incident.pcapng`; created with mode 0600, replaced if
    /// it exists.
    #[arg(short = 'o', long = "output", value_name = "FILE.pcapng", help_heading = "Capture")]
    pub file: PathBuf,

    /// Stop after this long, e.g. `60s` (default: until Ctrl-C or --count).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Capture")]
    pub duration: Option<Duration>,

    /// Stop after this many packets, e.g. `--count 10000`.
    #[arg(long, value_name = "N", help_heading = "Capture")]
    pub count: Option<u64>,

    /// Keep no more packets once the file reaches this size, e.g. `--max-size 100M` (K, M, G:
    /// powers of 1024); later packets are counted as not kept. The summary at the end adds a
    /// few KiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Capture")]
    pub max_size: Option<u64>,

    /// Also leave a bundle for the postmortem, e.g. `--bundle incident.tar.gz` (or `--bundle
    /// DIR/`): the capture, the JSON events and summary, the attach report, the Kubernetes
    /// objects, and the node's state per network namespace (conntrack, rules, routes, tc,
    /// sysctls, counters) at the end, and conntrack statistics at the start. Mode 0600.
    #[arg(long, value_name = "FILE.tar.gz|DIR/", help_heading = "Capture")]
    pub bundle: Option<PathBuf>,

    /// The CNI configuration directory the bundle copies (secrets redacted).
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d", help_heading = "Capture")]
    pub cni_dir: PathBuf,

    /// What is printed while capturing: `text` lines and summary, or `json` lines.
    #[arg(long, value_enum, help_heading = "Capture")]
    pub format: Option<Format>,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub tc: TcArgs,

    /// Do not attach tc counters to the workload interfaces (no attempts, no ratios).
    #[arg(long, help_heading = "Interfaces")]
    pub no_tc: bool,

    #[command(flatten)]
    pub probe: ProbeArgs,

    #[command(flatten, next_help_heading = "Kubernetes")]
    pub kube: KubeArgs,
}

/// What the capture adds to a trace.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub file: PathBuf,
    pub count: Option<u64>,
    pub max_size: Option<u64>,
    pub bundle: Option<PathBuf>,
    pub cni_dir: PathBuf,
}

impl CaptureArgs {
    /// The trace this capture runs, and the capture's own settings.
    pub fn into_trace(self) -> (TraceArgs, CaptureOptions) {
        let opts = CaptureOptions {
            file: self.file,
            count: self.count,
            max_size: self.max_size,
            bundle: self.bundle,
            cni_dir: self.cni_dir,
        };
        let trace = TraceArgs {
            filter: self.filter,
            target: self.target,
            tc: self.tc,
            no_tc: self.no_tc,
            duration: self.duration,
            output: self.format,
            probe: self.probe,
            kube: self.kube,
        };
        (trace, opts)
    }
}

/// `netdrop report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A capture written by `netdrop capture`, e.g. `incident.pcapng`, or a bundle
    /// (`incident.tar.gz`, or its directory).
    #[arg(value_name = "FILE.pcapng|BUNDLE")]
    pub file: PathBuf,

    /// Output format: the summary as `text`, or the `json` summary line `-o json` printed.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// `100M`, `1G`, `512K`, `4096` (bytes); K, M, G are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = t.find(|c: char| !c.is_ascii_digit()).map_or((t, ""), |i| t.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 100M, 1G, 512K)"))?;
    let mult: u64 = match unit.trim_end_matches(['i', 'B']).to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?} is not a usable size"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5T").is_err());
        assert!(parse_size("0").is_err());
    }
}
