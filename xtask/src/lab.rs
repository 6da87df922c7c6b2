//! `cargo xtask lab up|down|status|fault NAME|traffic ...`: builds the `netdrop-lab` binary of
//! the netdrop-tests crate (where the lab lives, next to the API stand-in and the end-to-end
//! tests that use it as a guard) and runs it with the arguments given.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::setup::workspace_root;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Builds `netdrop-lab` and runs it; exits with its exit code.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the lab creates network namespaces and iptables rules: run as root (sudo -E cargo xtask lab ...)"
    );
    let status = netdrop_tools::try_tool("cargo")?
        .args(["build", "--quiet", "--package", "netdrop-tests", "--bin", "netdrop-lab"])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "building netdrop-lab failed");
    let bin = target_dir().join("debug/netdrop-lab");
    let status = netdrop_tools::project(&bin)
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}
