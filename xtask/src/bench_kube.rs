//! `cargo xtask bench kube`: the resolver against a synthetic cluster served by the API stand-in
//! (100k pods, 10k Services, 10k `EndpointSlices`, 1k nodes).
//!
//! Measures, in a separate resolver process (`netdrop resolve --serve-stats`): time to sync, RSS after sync, lookup latency, and whether 1,000 pod updates/s are absorbed
//! without lag (events applied keep pace; the last update is visible right after it is sent).
//! Targets: RSS <= 150 MB, lookups <= 1 us.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

const PODS: u64 = 100_000;
const SERVICES: u64 = 10_000;
const SLICES: u64 = 10_000;
const NODES: u64 = 1_000;
const CHURN_RATE: u64 = 1_000;
const CHURN_SECS: u64 = 10;

/// A child process speaking JSON lines; killed on drop.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub(crate) fn spawn(name: &'static str, mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name,
            child,
            stdin,
            lines,
        })
    }

    /// Next JSON line (non-JSON lines, e.g. the test harness's, are skipped).
    pub(crate) fn next(&self, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("{} said nothing within {timeout:?}", self.name))?;
            // The libtest harness may print `test name ... ` in front of the first line.
            let json = line.find('{').map_or("", |i| &line[i..]);
            if let Ok(v) = serde_json::from_str::<Value>(json)
                && v.get("type").is_some()
            {
                return Ok(v);
            }
        }
    }

    fn ask(&mut self, cmd: &str, timeout: Duration) -> anyhow::Result<Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let v = self.next(timeout)?;
        if v["type"] == "error" {
            bail!("{}: {cmd}: {}", self.name, v["error"]);
        }
        Ok(v)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<String> {
    let out = netdrop_tools::try_tool("cargo")?
        .args(args)
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The resolver command: `netdrop resolve --serve-stats`, release build.
fn resolver_command(kubeconfig: &Path) -> anyhow::Result<(Command, &'static str)> {
    cargo(&["build", "--release", "-p", "netdrop", "--bin", "netdrop"])?;
    let mut cmd = netdrop_tools::project(target_dir().join("release/netdrop"));
    cmd.arg("resolve").args([
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--serve-stats",
        "--sync-timeout",
        "300s",
    ]);
    Ok((cmd, "netdrop resolve --serve-stats"))
}

fn mib(kib: &Value) -> f64 {
    kib.as_f64().unwrap_or(0.0) / 1024.0
}

#[expect(clippy::too_many_lines, reason = "one linear benchmark script with its report")]
#[expect(clippy::cast_precision_loss, reason = "event counts far below 2^52")]
pub fn run() -> anyhow::Result<()> {
    eprintln!("bench kube: building kube-standin and the resolver (release)");
    cargo(&["build", "--release", "-p", "netdrop-tests", "--bin", "kube-standin"])?;
    let tmp = std::env::temp_dir().join(format!("netdrop-bench-kube-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let kubeconfig = tmp.join("kubeconfig");
    let (resolver_cmd, how) = resolver_command(&kubeconfig)?;

    eprintln!("bench kube: generating {PODS} pods, {SERVICES} services, {SLICES} endpointslices, {NODES} nodes");
    let mut standin_cmd = netdrop_tools::project(target_dir().join("release/kube-standin"));
    standin_cmd.args([
        "--synthetic",
        &format!("{PODS},{SERVICES},{SLICES},{NODES}"),
        "--kubeconfig-out",
        kubeconfig.to_str().context("utf-8 temp path")?,
        "--bookmark-interval",
        "5s",
    ]);
    let t = Instant::now();
    let mut standin = Proc::spawn("kube-standin", standin_cmd)?;
    let ready = standin.next(Duration::from_mins(10))?;
    eprintln!(
        "bench kube: stand-in ready in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        ready["objects"]
    );

    eprintln!("bench kube: starting the resolver ({how})");
    let mut resolver = Proc::spawn("resolver", resolver_cmd)?;
    let synced = resolver.next(Duration::from_mins(10))?;
    if synced["synced"] != true {
        bail!("resolver did not sync: {}", synced["status"]);
    }
    let stats = &synced["stats"];
    if stats["pods"].as_u64() != Some(PODS) {
        bail!("resolver holds {} pods, expected {PODS}", stats["pods"]);
    }

    eprintln!(
        "bench kube: synced in {} ms, RSS {:.1} MiB; churning {CHURN_RATE} pod updates/s for {CHURN_SECS} s",
        synced["sync_ms"],
        mib(&synced["rss_kib"])
    );
    // Churn: 1,000 pod IP changes per second for 10 s, sampled every second.
    writeln!(standin.stdin, "churn {CHURN_RATE} {CHURN_SECS}")?;
    standin.stdin.flush()?;
    let events0 = synced["events"].as_u64().unwrap_or(0);
    let t_churn = Instant::now();
    let mut samples = Vec::new();
    let churned = loop {
        if let Ok(v) = standin.next(Duration::from_secs(1)) {
            break v;
        }
        let s = resolver.ask("stats", Duration::from_secs(10))?;
        let applied = s["events"].as_u64().unwrap_or(0) - events0;
        let sent = (t_churn.elapsed().as_secs_f64() * CHURN_RATE as f64) as u64;
        samples.push((
            t_churn.elapsed().as_secs_f64(),
            sent.min(CHURN_RATE * CHURN_SECS),
            applied,
        ));
        if t_churn.elapsed() > Duration::from_secs(CHURN_SECS * 6) {
            bail!("churn did not finish");
        }
    };
    let t_done = Instant::now();
    let last_ip = churned["last_ip"].as_str().unwrap_or_default().to_owned();
    let last_pod = churned["last_pod"].as_str().unwrap_or_default().to_owned();
    let lag = loop {
        let v = resolver.ask(&format!("lookup {last_ip}"), Duration::from_secs(10))?;
        let p = &v["peer"];
        if format!(
            "{}/{}",
            p["namespace"].as_str().unwrap_or(""),
            p["pod"].as_str().unwrap_or("")
        ) == last_pod
        {
            break t_done.elapsed();
        }
        if t_done.elapsed() > Duration::from_secs(30) {
            bail!("last update ({last_pod} → {last_ip}) not visible after 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let after = resolver.ask("stats", Duration::from_secs(10))?;
    let applied = after["events"].as_u64().unwrap_or(0) - events0;
    let latency_after = resolver.ask("latency", Duration::from_mins(1))?;
    let _ = resolver.ask("quit", Duration::from_millis(200));
    let _ = standin.ask("quit", Duration::from_millis(200));

    let lk = &synced["lookup"];
    let lk2 = &latency_after["lookup"];
    let rss = mib(&synced["rss_kib"]);
    println!("netdrop kube resolver benchmark ({how})");
    println!("  cluster:            {PODS} pods, {SERVICES} services, {SLICES} endpointslices, {NODES} nodes");
    println!("  indexed:            {stats}");
    println!(
        "  time to sync:       {:.2} s (process start to all four kinds listed)",
        synced["sync_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    println!(
        "  RSS after sync:     {rss:.1} MiB (peak during sync {:.1} MiB; target <= 150 MB)",
        mib(&synced["peak_rss_kib"])
    );
    println!(
        "  lookup latency:     mean {:.0} ns, p50 {} ns, p99 {} ns, max {} ns over {} addresses (target <= 1000 ns)",
        lk["mean_ns"].as_f64().unwrap_or(0.0),
        lk["p50_ns"],
        lk["p99_ns"],
        lk["max_ns"],
        lk["samples"]
    );
    println!(
        "  after churn:        mean {:.0} ns, p99 {} ns; RSS {:.1} MiB",
        lk2["mean_ns"].as_f64().unwrap_or(0.0),
        lk2["p99_ns"],
        mib(&after["rss_kib"])
    );
    println!(
        "  watch throughput:   {} pod updates sent in {:.1} s, {applied} events applied; last update visible {:.0} ms after it was sent",
        churned["updates"],
        churned["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        lag.as_secs_f64() * 1000.0
    );
    for (t, sent, applied) in &samples {
        println!(
            "    t={t:>5.1}s  sent~{sent:>6}  applied {applied:>6}  behind {:>5}",
            sent.saturating_sub(*applied)
        );
    }
    let ok_rss = rss <= 150.0 * 1_000_000.0 / 1_048_576.0;
    let ok_lookup = lk["mean_ns"].as_f64().unwrap_or(f64::MAX) <= 1000.0;
    let ok_churn = applied >= CHURN_RATE * CHURN_SECS && lag < Duration::from_secs(1);
    println!(
        "  targets:            RSS {} / lookups {} / 1,000 updates/s {}",
        if ok_rss { "met" } else { "MISSED" },
        if ok_lookup { "met" } else { "MISSED" },
        if ok_churn { "met" } else { "MISSED" }
    );
    let _ = std::fs::remove_dir_all(&tmp);
    if !(ok_rss && ok_lookup && ok_churn) {
        bail!("kube benchmark missed a target");
    }
    Ok(())
}
