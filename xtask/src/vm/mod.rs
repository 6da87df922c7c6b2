//! `cargo xtask vm-test`: the kernel matrix (being written).
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("vm-test is not written yet")
}
