//! netdrop's developer commands. `cargo xtask --help` lists them.
use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::VmTest(args) => vm::run(&args),
    }
}
