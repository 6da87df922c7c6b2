//! `cargo xtask test`: THE test command (CI's too). Set-up, the unit tests, the root-only
//! integration tests on this kernel, and the kernel matrix's CI kernel, then one closing line
//! `total: N passed, M failed, K skipped` where skipped tests are not counted as passed.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::setup;

#[derive(clap::Args)]
pub struct Args {
    /// Kernels to run the integration tests on under qemu after the host run (`none` to skip).
    #[arg(long, default_value = "6.1", value_delimiter = ',')]
    pub vm_kernels: Vec<String>,
    /// Test binaries to run in the guests; `all` for every one. CI runs the kernel-facing suites:
    /// kfree_skb drops; conntrack classification, which on Debian's modular nf_conntrack takes
    /// the kprobe path (aya 0.14 cannot fexit module functions); tc accounting, which on 6.1
    /// (no TCX) takes the clsact path, also under `auto`; and the no-BTF mode.
    #[arg(long, default_value = "vm_smoke,drops,conntrack,tc_counts,tc_signals,nobtf", value_delimiter = ',')]
    pub vm_tests: Vec<String>,
    /// Only tests whose name contains this (passed to libtest).
    pub filter: Option<String>,
}

/// Outcome counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    setup::run()?;
    let root = setup::workspace_root();
    let status = Command::new("cargo")
        .args(["build", "-p", "netdrop"])
        .current_dir(&root)
        .status()
        .context("cargo build")?;
    if !status.success() {
        bail!("building netdrop failed");
    }
    let target = root.join("target");
    let skip_file = target.join("netdrop-skips.txt");
    let _ = fs::remove_file(&skip_file);
    let mut cmd = Command::new("cargo");
    // The default members: `--workspace` would also build netdrop-ebpf for the host, where its
    // binary cannot link (no `main` outside BPF).
    cmd.args(["test", "--no-fail-fast"])
        .current_dir(&root)
        .env("NETDROP_BIN", target.join("debug/netdrop"))
        .env("NETDROP_SKIP_FILE", &skip_file)
        .stdout(Stdio::piped());
    if let Some(f) = &args.filter {
        cmd.args(["--", f]);
    }
    let mut child = cmd.spawn().context("cargo test")?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            tally.passed += count(rest, " passed");
            tally.failed += count(rest, " failed");
        }
    }
    let status = child.wait()?;
    let skips = fs::read_to_string(&skip_file).unwrap_or_default();
    tally.skipped = skips.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    // A skipped test returned early and libtest counted it as passed: take it back.
    tally.passed = tally.passed.saturating_sub(tally.skipped);
    if !status.success() && tally.failed == 0 {
        tally.failed += 1; // a build failure or crash: never report green
    }
    if !skips.is_empty() {
        println!("\nskipped on the host:");
        for l in skips.lines() {
            println!("  {}", l.replace('\t', ": "));
        }
    }

    let kernels: Vec<&str> = args.vm_kernels.iter().map(String::as_str).filter(|k| *k != "none").collect();
    if !kernels.is_empty() {
        let tests: Vec<&str> = args.vm_tests.iter().map(String::as_str).filter(|t| *t != "all").collect();
        match crate::vm::run_kernels_tests(&kernels, &tests) {
            Ok(()) => println!("kernel matrix ({}): passed", kernels.join(", ")),
            Err(e) => {
                println!("kernel matrix: {e:#}");
                tally.failed += 1;
            }
        }
    }
    println!("total: {} passed, {} failed, {} skipped", tally.passed, tally.failed, tally.skipped);
    if tally.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// `"ok. 15 passed; 1 failed; ..."` → the number before `what`.
fn count(s: &str, what: &str) -> u64 {
    s.split(';')
        .find_map(|part| part.trim().trim_start_matches("ok.").trim_start_matches("FAILED.").trim().strip_suffix(what.trim()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_libtest_lines() {
        let l = "FAILED. 15 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 13.64s";
        assert_eq!(super::count(l, " passed"), 15);
        assert_eq!(super::count(l, " failed"), 1);
        assert_eq!(super::count("ok. 3 passed; 0 failed; 0 ignored", " passed"), 3);
    }
}
