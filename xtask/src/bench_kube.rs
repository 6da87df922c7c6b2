//! `cargo xtask bench kube`: resolver benchmark against a synthetic cluster (being written).
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the kube benchmark is not written yet")
}
