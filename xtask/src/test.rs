//! `cargo xtask test`: THE test command (CI's too). Set-up, the unit tests, the root-only
//! integration tests on this kernel, and the kernel matrix's CI kernel; then each suite's time
//! and one closing line `total: N passed, M failed, K skipped`, where skipped tests are not
//! counted as passed.
//!
//! The default run keeps CI within its budget: one test per feature. Long variants are marked
//! `#[ignore = "full: <why>"]` and run with `--full` (before resolving an issue).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
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
    #[arg(
        long,
        default_value = "vm_smoke,drops,conntrack,tc_counts,tc_signals,nobtf",
        value_delimiter = ','
    )]
    pub vm_tests: Vec<String>,
    /// Also the long variants (tests marked `#[ignore = "full: ..."]`), here and in the guests.
    #[arg(long)]
    pub full: bool,
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

impl Tally {
    fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

/// One test binary cargo built.
struct Suite {
    /// `drops`, `netdrop (lib)`, ...
    name: String,
    executable: PathBuf,
    /// The package's directory: cargo runs tests from there.
    package_dir: PathBuf,
}

/// One suite's result, for the closing table.
struct Timing {
    name: String,
    tally: Tally,
    time: Duration,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    let root = setup::workspace_root();
    let status = netdrop_tools::try_tool("cargo")?
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

    let mut tally = Tally::default();
    let mut timings = Vec::new();
    for t in lint(&root)? {
        tally.add(t.tally);
        timings.push(t);
    }
    match suites(&root) {
        Ok(suites) => {
            for s in &suites {
                let t = run_suite(s, args, &target.join("debug/netdrop"), &skip_file)?;
                tally.add(t.tally);
                timings.push(t);
            }
            let t = run_doctests(&root, &skip_file)?;
            tally.add(t.tally);
            timings.push(t);
        }
        Err(e) => {
            println!("building the tests failed: {e:#}");
            tally.failed += 1; // never report green without tests
        }
    }
    let skips = fs::read_to_string(&skip_file).unwrap_or_default();
    if !skips.is_empty() {
        println!("\nskipped on the host:");
        for l in skips.lines() {
            println!("  {}", l.replace('\t', ": "));
        }
    }

    let kernels: Vec<&str> = args
        .vm_kernels
        .iter()
        .map(String::as_str)
        .filter(|k| *k != "none")
        .collect();
    if !kernels.is_empty() {
        let tests: Vec<&str> = args
            .vm_tests
            .iter()
            .map(String::as_str)
            .filter(|t| *t != "all")
            .collect();
        let t0 = Instant::now();
        let failed = match crate::vm::run_kernels_tests(&kernels, &tests, args.full) {
            Ok(()) => {
                println!("kernel matrix ({}): passed", kernels.join(", "));
                0
            }
            Err(e) => {
                println!("kernel matrix: {e:#}");
                1
            }
        };
        tally.failed += failed;
        timings.push(Timing {
            name: format!("guests {} ({})", kernels.join(","), tests.join(",")),
            tally: Tally {
                failed,
                ..Tally::default()
            },
            time: t0.elapsed(),
        });
    }
    print_timings(&timings, started.elapsed());
    println!(
        "total: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    if tally.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Formatting and lints, each a row of the closing table: `cargo fmt --check`; clippy with
/// warnings denied on every default member and target (this includes `clippy.toml`'s disallowed
/// methods: external programs only through the tool table); and clippy on the eBPF crate for its
/// target, where every unsafe block must say why it is sound.
fn lint(root: &Path) -> anyhow::Result<Vec<Timing>> {
    let checks: [(&str, &str, Vec<&str>); 3] = [
        ("rustfmt --check", "cargo", vec!["fmt", "--all", "--check"]),
        (
            "clippy -D warnings",
            "cargo",
            vec!["clippy", "--all-targets", "--", "-D", "warnings"],
        ),
        (
            "clippy (eBPF crate)",
            "rustup",
            vec![
                "run",
                "nightly",
                "cargo",
                "clippy",
                "-p",
                "netdrop-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    let mut rows = Vec::new();
    for (name, program, args) in checks {
        println!("\n=== {name} ===");
        let t0 = Instant::now();
        let status = netdrop_tools::try_tool(program)?
            .args(&args)
            .current_dir(root)
            .status()
            .with_context(|| format!("{program} {}", args.join(" ")))?;
        let tally = if status.success() {
            Tally {
                passed: 1,
                ..Tally::default()
            }
        } else {
            Tally {
                failed: 1,
                ..Tally::default()
            }
        };
        rows.push(Timing {
            name: name.into(),
            tally,
            time: t0.elapsed(),
        });
    }
    Ok(rows)
}

/// Builds every test binary of the default members and lists them, as `cargo test` would run
/// them.
fn suites(root: &Path) -> anyhow::Result<Vec<Suite>> {
    let mut child = netdrop_tools::try_tool("cargo")?
        // The default members: `--workspace` would also build netdrop-ebpf for the host, where
        // its binary cannot link (no `main` outside BPF).
        .args(["test", "--no-run", "--message-format=json-render-diagnostics"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("cargo test --no-run")?;
    let mut out = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let v: serde_json::Value = match serde_json::from_str(&line?) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else { continue };
        let name = v["target"]["name"].as_str().unwrap_or("?");
        let kind = v["target"]["kind"][0].as_str().unwrap_or("?");
        let manifest = PathBuf::from(v["manifest_path"].as_str().unwrap_or_default());
        out.push(Suite {
            name: if kind == "test" {
                name.to_string()
            } else {
                format!("{name} ({kind})")
            },
            executable: PathBuf::from(exe),
            package_dir: manifest.parent().map_or_else(|| root.to_path_buf(), Path::to_path_buf),
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test --no-run failed ({status})");
    }
    // Unit tests first, then the integration suites by name: a stable order to compare runs.
    out.sort_by(|a, b| (!a.name.contains(" ("), &a.name).cmp(&(!b.name.contains(" ("), &b.name)));
    Ok(out)
}

fn run_suite(s: &Suite, args: &Args, netdrop: &Path, skip_file: &Path) -> anyhow::Result<Timing> {
    let mut cmd = netdrop_tools::project(&s.executable);
    cmd.current_dir(&s.package_dir)
        .env("CARGO_MANIFEST_DIR", &s.package_dir)
        .env("NETDROP_BIN", netdrop);
    if args.full {
        cmd.arg("--include-ignored");
    }
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    run_libtest(&s.name, cmd, skip_file)
}

/// The examples in the libraries' docs (compiled; `no_run` ones are not run).
fn run_doctests(root: &Path, skip_file: &Path) -> anyhow::Result<Timing> {
    let mut cmd = netdrop_tools::try_tool("cargo")?;
    cmd.args(["test", "--doc"]).current_dir(root);
    run_libtest("doctests", cmd, skip_file)
}

/// Runs one libtest process, echoing its output, and counts its results.
fn run_libtest(name: &str, mut cmd: std::process::Command, skip_file: &Path) -> anyhow::Result<Timing> {
    println!("\n=== {name} ===");
    let skips_before = count_lines(skip_file);
    let t0 = Instant::now();
    cmd.env("NETDROP_SKIP_FILE", skip_file).stdout(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running the {name} tests"))?;
    let mut tally = Tally::default();
    let mut saw_result = false;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            saw_result = true;
            tally.passed += count(rest, " passed");
            tally.failed += count(rest, " failed");
        }
    }
    let status = child.wait()?;
    tally.skipped = count_lines(skip_file).saturating_sub(skips_before);
    // A skipped test returned early and libtest counted it as passed: take it back.
    tally.passed = tally.passed.saturating_sub(tally.skipped);
    if (!status.success() || !saw_result) && tally.failed == 0 {
        println!(
            "{name}: exited with {status} without a failed test (a crash or a build failure): counted as one failure"
        );
        tally.failed += 1; // never report green
    }
    Ok(Timing {
        name: name.to_string(),
        tally,
        time: t0.elapsed(),
    })
}

fn count_lines(path: &Path) -> u64 {
    fs::read_to_string(path).map_or(0, |s| s.lines().filter(|l| !l.trim().is_empty()).count() as u64)
}

fn print_timings(timings: &[Timing], total: Duration) {
    println!("\nsuite times:");
    println!(
        "  {:<44} {:>7} {:>7} {:>7} {:>9}",
        "SUITE", "PASSED", "FAILED", "SKIPPED", "SECONDS"
    );
    for t in timings {
        println!(
            "  {:<44} {:>7} {:>7} {:>7} {:>9.1}",
            t.name,
            t.tally.passed,
            t.tally.failed,
            t.tally.skipped,
            t.time.as_secs_f64()
        );
    }
    println!(
        "  {:<44} {:>7} {:>7} {:>7} {:>9.1}",
        "whole run (set-up and builds included)",
        "",
        "",
        "",
        total.as_secs_f64()
    );
}

/// `"ok. 15 passed; 1 failed; ..."` → the number before `what`.
fn count(s: &str, what: &str) -> u64 {
    s.split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok.")
                .trim_start_matches("FAILED.")
                .trim()
                .strip_suffix(what.trim())
        })
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
