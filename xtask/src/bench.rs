//! `cargo xtask bench drop-storm`: what tracing every drop costs, and whether the counts are
//! exact. Two sender threads in a namespace blast UDP at a closed port for a fixed time, with no
//! tracer, under netdrop (default settings, and with `--event-rate 0`), and under bpftrace
//! counting the same tracepoint; the same run, back to back. Exactness is netdrop's NO_SOCKET
//! count against the namespace's `Udp: NoPorts` delta.

use std::{
    fs,
    net::UdpSocket,
    os::fd::AsFd as _,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup;

pub(crate) const SECONDS: u64 = 10;
const ROUNDS: usize = 3;
pub(crate) const SENDERS: usize = 2;
pub(crate) const NS: &str = "nd-bench-storm";

pub(crate) struct Ns;

impl Ns {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let _ = netdrop_tools::tool("ip").args(["netns", "del", NS]).status();
        sh("ip", &["netns", "add", NS])?;
        let ns = Self;
        sh("ip", &["-n", NS, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = netdrop_tools::tool("ip").args(["netns", "del", NS]).status();
    }
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = netdrop_tools::try_tool(cmd)?
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn noports() -> anyhow::Result<u64> {
    let text = sh("ip", &["netns", "exec", NS, "cat", "/proc/net/snmp"])?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let [names, values] = lines[..] else {
        bail!("no Udp lines in snmp")
    };
    let idx = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .context("NoPorts")?;
    Ok(values.split_whitespace().nth(idx).context("value")?.parse()?)
}

/// Packets per second over `SENDERS` threads for `SECONDS`.
pub(crate) fn storm() -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..SENDERS {
        let stop = stop.clone();
        let nsfile = fs::File::open(format!("/run/netns/{NS}"))?;
        handles.push(thread::spawn(move || -> u64 {
            nix::sched::setns(nsfile.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    if s.send_to(b"storm", "127.0.0.1:9").is_ok() {
                        n += 1;
                    }
                }
            }
            n
        }));
    }
    let start = Instant::now();
    thread::sleep(Duration::from_secs(SECONDS));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().expect("sender")).sum();
    Ok((total as f64 / start.elapsed().as_secs_f64(), total))
}

/// utime+stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn wait_attached(child: &mut Child, marker: &str) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&marker) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_mins(1))
        .context("tracer did not attach")?;
    Ok(())
}

#[derive(Clone)]
struct Phase {
    name: String,
    rate: f64,
    sent: u64,
    noports: u64,
    counted: Option<u64>,
    events: Option<u64>,
    cpu: Option<f64>,
}

/// The storm while a netdrop runs: netdrop started with `cmd` (its JSON lines to `out`), the
/// storm once it has attached, netdrop stopped with SIGINT; its last line is the summary.
struct UnderNetdrop {
    rate: f64,
    sent: u64,
    noports: u64,
    /// netdrop's CPU (cores) during the storm.
    cpu: f64,
    summary: serde_json::Value,
}

fn storm_under(mut cmd: std::process::Command, out: &std::path::Path) -> anyhow::Result<UnderNetdrop> {
    let mut child = cmd.stdout(fs::File::create(out)?).stderr(Stdio::piped()).spawn()?;
    wait_attached(&mut child, "netdrop: attached")?;
    let before = noports()?;
    let cpu0 = cpu_seconds(child.id());
    let (rate, sent) = storm()?;
    thread::sleep(Duration::from_millis(300));
    let cpu = (cpu_seconds(child.id()) - cpu0) / SECONDS as f64;
    let noports = noports()? - before;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    child.wait()?;
    let text = fs::read_to_string(out)?;
    let summary = serde_json::from_str(text.lines().last().context("no summary")?)?;
    Ok(UnderNetdrop {
        rate,
        sent,
        noports,
        cpu,
        summary,
    })
}

fn netdrop_phase(bin: &str, name: &str, extra: &[&str]) -> anyhow::Result<Phase> {
    let out = std::env::temp_dir().join("netdrop-bench.json");
    let mut cmd = netdrop_tools::project(bin);
    cmd.args(["trace", "-o", "json", "--netns", NS]).args(extra);
    let UnderNetdrop {
        rate,
        sent,
        noports,
        cpu,
        summary,
    } = storm_under(cmd, &out)?;
    let counted = summary["by_reason"]["NO_SOCKET"].as_u64().unwrap_or(0);
    let events = summary["events_shown"].as_u64().unwrap_or(0);
    Ok(Phase {
        name: name.into(),
        rate,
        sent,
        noports,
        counted: Some(counted),
        events: Some(events),
        cpu: Some(cpu),
    })
}

#[expect(clippy::too_many_lines, reason = "one measurement, read top to bottom")]
pub fn drop_storm(compare: Option<&std::path::Path>) -> anyhow::Result<()> {
    let bin = setup::release_netdrop()?.display().to_string();
    let _ns = Ns::new()?;
    let kernel = sh("uname", &["-r"])?.trim().to_string();
    let base = |name: &str| -> anyhow::Result<Phase> {
        let before = noports()?;
        let (rate, sent) = storm()?;
        Ok(Phase {
            name: name.into(),
            rate,
            sent,
            noports: noports()? - before,
            counted: None,
            events: None,
            cpu: None,
        })
    };
    let bpftrace = |name: &str| -> anyhow::Result<Phase> {
        let mut child = netdrop_tools::try_tool("bpftrace")?
            .args([
                "-e",
                "BEGIN { printf(\"attached\\n\"); } tracepoint:skb:kfree_skb { @[args->reason] = count(); }",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        // bpftrace prints "Attaching N probes..." then our BEGIN line on stdout.
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead as _;
            for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if l.contains("attached") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_mins(1))
            .context("bpftrace did not start")?;
        let cpu0 = cpu_seconds(child.id());
        let mut p = base(name)?;
        p.cpu = Some((cpu_seconds(child.id()) - cpu0) / SECONDS as f64);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = child.wait();
        Ok(p)
    };
    let have_bpftrace = which::which("bpftrace").is_ok();
    // Rounds of alternating phases: this 2-core machine is shared, and a drift between phases
    // would otherwise read as overhead. Each phase reports its median round.
    let compare_name = compare.map(|p| format!("netdrop (defaults), {}", p.display()));
    let names = [
        "no tracer",
        "netdrop (defaults)",
        "netdrop --event-rate 0 (every event)",
        "bpftrace (count by reason)",
        compare_name.as_deref().unwrap_or("-"),
    ];
    let mut rounds: Vec<Vec<Phase>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        rounds[0].push(base(names[0])?);
        rounds[1].push(netdrop_phase(&bin, names[1], &[])?);
        rounds[2].push(netdrop_phase(&bin, names[2], &["--event-rate", "0"])?);
        if have_bpftrace {
            rounds[3].push(bpftrace(names[3])?);
        }
        if let Some(other) = compare {
            rounds[4].push(netdrop_phase(&other.display().to_string(), names[4], &[])?);
        }
    }
    let phases: Vec<Phase> = rounds
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|mut r| {
            r.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let exact_all = r.iter().all(|p| p.counted.is_none_or(|c| c == p.noports));
            let mut m = r.swap_remove(r.len() / 2);
            if !exact_all {
                m.counted = Some(u64::MAX);
            }
            m
        })
        .collect();

    let baseline = phases[0].rate;
    println!(
        "\ndrop storm: {SENDERS} senders → closed UDP port, {SECONDS} s per phase, {ROUNDS} rounds (median), kernel {kernel}"
    );
    println!(
        "| phase | sender rate (pkt/s) | vs no tracer | NoPorts delta | netdrop count | exact (all rounds) | events shown | tracer CPU (cores) |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|---:|");
    let mut json = Vec::new();
    for p in &phases {
        let exact = match p.counted {
            None => "-".to_string(),
            Some(u64::MAX) => "no".to_string(),
            Some(c) if c == p.noports => "yes".to_string(),
            Some(c) => format!("no ({c} vs {})", p.noports),
        };
        println!(
            "| {} | {:.0} | {:.1}% | {} | {} | {} | {} | {} |",
            p.name,
            p.rate,
            100.0 * p.rate / baseline,
            p.noports,
            p.counted
                .filter(|c| *c != u64::MAX)
                .map_or("-".into(), |c| c.to_string()),
            exact,
            p.events.map_or("-".into(), |c| c.to_string()),
            p.cpu.map_or("-".into(), |c| format!("{c:.3}")),
        );
        json.push(
            serde_json::json!({"phase": p.name, "rate": p.rate, "ratio": p.rate / baseline, "sent": p.sent,
            "noports": p.noports, "counted": p.counted, "events": p.events, "cpu_cores": p.cpu}),
        );
    }
    let dir = setup::workspace_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    fs::write(
        dir.join("drop-storm.json"),
        serde_json::to_string_pretty(&serde_json::json!({"kernel": kernel, "phases": json}))?,
    )?;
    println!("(also in target/bench/drop-storm.json)");
    Ok(())
}

/// One `netdrop capture` phase of the capture benchmark.
#[derive(Clone)]
struct CapturePhase {
    name: String,
    rate: f64,
    noports: u64,
    /// Packets in the file (`netdrop report`).
    packets: u64,
    /// Packets the file says it did not keep (ring full, --event-rate, ...).
    not_kept: u64,
    /// netdrop's exact NO_SOCKET count (the run's summary).
    counted: u64,
    bytes: u64,
    cpu: f64,
}

fn capture_phase(bin: &str, name: &str, extra: &[&str]) -> anyhow::Result<CapturePhase> {
    let dir = std::env::temp_dir();
    let file = dir.join("netdrop-bench-capture.pcapng");
    let out = dir.join("netdrop-bench-capture.json");
    let mut cmd = netdrop_tools::project(bin);
    cmd.args(["capture", "--format", "json", "--netns", NS, "-o"])
        .arg(&file)
        .args(extra);
    let UnderNetdrop {
        rate,
        noports,
        cpu,
        summary,
        ..
    } = storm_under(cmd, &out)?;
    let counted = summary["by_reason"]["NO_SOCKET"].as_u64().unwrap_or(0);
    let report = netdrop_tools::project(bin)
        .args(["report", "-o", "json"])
        .arg(&file)
        .output()?;
    anyhow::ensure!(
        report.status.success(),
        "netdrop report: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    let line = String::from_utf8_lossy(&report.stdout)
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .filter_map(Result::ok)
        .find(|v| v["type"] == "capture")
        .context("no capture line in netdrop report")?;
    let bytes = fs::metadata(&file)?.len();
    let _ = fs::remove_file(&file);
    Ok(CapturePhase {
        name: name.into(),
        rate,
        noports,
        packets: line["packets"].as_u64().unwrap_or(0),
        not_kept: line["not_kept"]["not_kept"].as_u64().unwrap_or_else(|| {
            ["ring_full", "rate_limited", "size_cap", "count_reached", "no_ip_header"]
                .iter()
                .filter_map(|k| line["not_kept"][k].as_u64())
                .sum()
        }),
        counted,
        bytes,
        cpu,
    })
}

/// `cargo xtask bench capture`: `netdrop capture` during the drop storm: packets written per
/// second, packets not kept (the file's own count), file size per million packets, and the
/// storm's rate against no netdrop in the same run. Exactness: packets + not kept = the
/// kernel's `Udp: NoPorts` delta (every drop in the namespace is one of the storm's).
pub fn capture() -> anyhow::Result<()> {
    let bin = setup::release_netdrop()?.display().to_string();
    let _ns = Ns::new()?;
    let kernel = sh("uname", &["-r"])?.trim().to_string();
    let names = [
        "no netdrop",
        "capture (defaults: --event-rate 10000)",
        "capture --event-rate 0 (every event)",
    ];
    let mut base = Vec::new();
    let mut rounds: Vec<Vec<CapturePhase>> = vec![Vec::new(); 2];
    for _ in 0..ROUNDS {
        let before = noports()?;
        let (rate, _) = storm()?;
        base.push((rate, noports()? - before));
        rounds[0].push(capture_phase(&bin, names[1], &[])?);
        rounds[1].push(capture_phase(&bin, names[2], &["--event-rate", "0"])?);
    }
    base.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (baseline, base_noports) = base[base.len() / 2];
    println!(
        "\ncapture during the drop storm: {SENDERS} senders → closed UDP port, {SECONDS} s per phase, {ROUNDS} rounds (median), kernel {kernel}"
    );
    println!(
        "| phase | sender rate (pkt/s) | vs no netdrop | NoPorts delta | written | written/s | not kept | written + not kept = NoPorts (all rounds) | count exact | file MB | MB per 1M written | netdrop CPU (cores) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|");
    println!(
        "| {} | {baseline:.0} | 100% | {base_noports} | - | - | - | - | - | - | - | - |",
        names[0]
    );
    let mut json = vec![serde_json::json!({"phase": names[0], "rate": baseline, "noports": base_noports})];
    for r in rounds {
        let whole = r.iter().all(|p| p.packets + p.not_kept == p.noports);
        let exact = r.iter().all(|p| p.counted == p.noports);
        let mut r = r;
        r.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let p = r.swap_remove(r.len() / 2);
        let mb = p.bytes as f64 / 1e6;
        let per_m = if p.packets > 0 {
            mb * 1e6 / p.packets as f64
        } else {
            0.0
        };
        println!(
            "| {} | {:.0} | {:.1}% | {} | {} | {:.0} | {} | {} | {} | {mb:.1} | {per_m:.0} | {:.3} |",
            p.name,
            p.rate,
            100.0 * p.rate / baseline,
            p.noports,
            p.packets,
            p.packets as f64 / SECONDS as f64,
            p.not_kept,
            if whole { "yes" } else { "no" },
            if exact { "yes" } else { "no" },
            p.cpu,
        );
        json.push(
            serde_json::json!({"phase": p.name, "rate": p.rate, "ratio": p.rate / baseline,
            "noports": p.noports, "written": p.packets, "not_kept": p.not_kept, "bytes": p.bytes,
            "mb_per_million_written": per_m, "whole_all_rounds": whole, "exact_all_rounds": exact,
            "cpu_cores": p.cpu}),
        );
    }
    let dir = setup::workspace_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    fs::write(
        dir.join("capture.json"),
        serde_json::to_string_pretty(&serde_json::json!({"kernel": kernel, "phases": json}))?,
    )?;
    println!("(also in target/bench/capture.json)");
    Ok(())
}

/// `snat-race` and `svc`: they need the test labs, so they live in the netdrop-tests crate's
/// `netdrop-bench` binary; both run against a release build of netdrop.
pub fn lab_bench(which: &str) -> anyhow::Result<()> {
    setup::release_netdrop()?;
    let root = setup::workspace_root();
    let status = netdrop_tools::try_tool("cargo")?
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "netdrop-tests",
            "--bin",
            "netdrop-bench",
            "--",
            which,
        ])
        .env("NETDROP_BIN", root.join("target/release/netdrop"))
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(status.success(), "benchmark {which} failed");
    Ok(())
}
