//! netdrop's developer commands. `cargo xtask --help` lists them.
use clap::{Parser, Subcommand};

mod bench;
mod bench_agent;
mod bench_kube;
mod bench_tc;
mod demo;
mod image;
mod lab;
mod setup;
mod test;
mod vm;

#[derive(Parser)]
#[command(about = "netdrop developer commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing netdrop needs (Debian packages, rust-src, bpf-linker).
    Setup,
    /// THE test command: set-up, unit tests, root-only integration tests, the CI kernel under qemu.
    Test(test::Args),
    /// Build netdrop and run `netdrop trace` on this machine (arguments after `--` go to it).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The headline without a cluster: lab up, a fault, traffic, `netdrop trace --svc`, lab down.
    Demo {
        /// The fault to inject: policy-drop, not-listening, conntrack-insert, conntrack-full,
        /// route-missing, big-one-bad, mtu-blackhole, node-route-missing, egress-deny,
        /// snat-exhaustion, dns-udp-drop, dns-conntrack-full, dns-race.
        #[arg(long, default_value = "policy-drop")]
        fault: String,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// The container image (buildah from scratch: the release binary and its libraries), saved
    /// as an OCI archive under target/image/.
    Image,
    /// Run netdrop's integration tests on Debian kernels under qemu.
    VmTest(vm::Args),
    /// The lab (two nodes, Services, faults): `lab up|down|status|fault NAME|traffic --svc default/web` (`lab --help`).
    #[command(disable_help_flag = true)]
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `drop-storm` (kfree_skb overhead and exactness), `capture` (netdrop capture
    /// during the drop storm), `snat-race` (conntrack
    /// classification at full speed), `svc` (trace --svc on the lab), `kube` (the resolver), `tc`.
    Bench {
        /// Which benchmark: drop-storm, capture, snat-race, svc, kube, tc, agent.
        which: String,
        /// drop-storm: also run this netdrop binary (e.g. one built from an older commit) in
        /// every round, so a change is compared with its predecessor in the same run.
        #[arg(long, value_name = "NETDROP_BINARY")]
        compare: Option<std::path::PathBuf>,
        /// tc: rounds of (no netdrop, TCX, clsact), plus a closing no-netdrop phase.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// tc: seconds per iperf3 run (the request/response probe runs 3 s).
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// tc: the overhead part only (skip attaching to 1,000 veths and the churn).
        #[arg(long)]
        overhead_only: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test(args) => test::run(&args),
        Cmd::Run { args } => run(&args),
        Cmd::VmTest(args) => vm::run(&args),
        Cmd::Image => image::run(),
        Cmd::Demo { fault, seconds } => demo::run(&fault, seconds),
        Cmd::Lab { args } => lab::run(&args),
        Cmd::Bench {
            which,
            compare,
            rounds,
            seconds,
            overhead_only,
        } => match which.as_str() {
            "drop-storm" => bench::drop_storm(compare.as_deref()),
            "capture" => bench::capture(),
            "kube" => bench_kube::run(),
            "agent" => bench_agent::run(),
            "tc" => bench_tc::run(&bench_tc::Options {
                rounds,
                seconds,
                overhead_only,
            }),
            "snat-race" | "svc" => bench::lab_bench(&which),
            other => anyhow::bail!("unknown benchmark {other:?}: drop-storm, capture, snat-race, svc, kube, tc, agent"),
        },
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    let root = setup::workspace_root();
    let status = netdrop_tools::try_tool("cargo")?
        .args(["build", "-p", "netdrop"])
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(status.success(), "building netdrop failed");
    let mut cmd = netdrop_tools::project(root.join("target/debug/netdrop"));
    if args.is_empty() {
        cmd.arg("trace");
    } else {
        cmd.args(args);
    }
    let status = cmd.status()?;
    std::process::exit(status.code().unwrap_or(1));
}
