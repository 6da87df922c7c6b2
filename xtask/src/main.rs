//! netdrop's developer commands. `cargo xtask --help` lists them.
use clap::{Parser, Subcommand};

mod bench_kube;
mod vm;

#[derive(Parser)]
#[command(about = "netdrop developer commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run netdrop's integration tests on Debian kernels under qemu.
    VmTest(vm::Args),
    /// Benchmarks; `kube`: the resolver against a synthetic cluster.
    Bench {
        /// Which benchmark: kube.
        which: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::VmTest(args) => vm::run(&args),
        Cmd::Bench { which } => match which.as_str() {
            "kube" => bench_kube::run(),
            other => anyhow::bail!("unknown benchmark {other:?}"),
        },
    }
}
