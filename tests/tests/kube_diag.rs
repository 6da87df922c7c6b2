//! Runs `netdrop resolve` in-process from `NETDROP_RESOLVE_ARGS` (ignored by default).
//!
//! `cargo xtask bench kube` uses this when the `netdrop` binary does not have the `resolve`
//! subcommand wired in, so the benchmark still measures the real resolver in its own process.

use clap::Parser;
use netdrop::resolve::cli::{ResolveArgs, run};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: ResolveArgs,
}

#[test]
#[ignore = "driven by `cargo xtask bench kube` through NETDROP_RESOLVE_ARGS"]
fn resolve_diagnostics() {
    let raw = std::env::var("NETDROP_RESOLVE_ARGS").expect("NETDROP_RESOLVE_ARGS is set");
    let w = Wrapper::parse_from(std::iter::once("netdrop-resolve".to_owned()).chain(raw.split_whitespace().map(str::to_owned)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run(w.args)) {
        panic!("netdrop resolve: {e:#}");
    }
}
