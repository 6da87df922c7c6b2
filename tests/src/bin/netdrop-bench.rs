//! `netdrop-bench`: benchmarks that need the test labs (`cargo xtask bench snat-race|svc` runs
//! it). Each compares the same workload with and without netdrop in one run, alternating the
//! phases over several rounds (this machine is shared and noisy), and checks netdrop's numbers
//! against the kernel's counters.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use netdrop_tests::{
    NatLab,
    lab::{
        Lab, LabOptions,
        faults::{FaultKind, FaultRequest},
        topology::Proto,
        traffic::TrafficOptions,
    },
    netdrop_bin, send_flows,
};
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Rounds of alternating phases.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// SNAT port exhaustion at full speed: sender rate with and without netdrop, and
    /// classification accuracy against the kernel's insert_failed.
    SnatRace,
    /// `trace --svc` on the lab: the Service's request rate with and without it, and the time
    /// from a drop to its row updating.
    Svc,
}

/// A running `netdrop trace` whose stdout lines arrive on a channel.
struct Netdrop {
    child: Child,
    /// Lines with the moment they arrived (wall clock, comparable with events' `time`).
    lines: mpsc::Receiver<(std::time::SystemTime, String)>,
}

impl Netdrop {
    fn start(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = netdrop_tools::project(netdrop_bin())
            .arg("trace")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting netdrop")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (ready_tx, ready) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if l.starts_with("netdrop: attached") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send((std::time::SystemTime::now(), l));
            }
        });
        ready
            .recv_timeout(Duration::from_mins(1))
            .context("netdrop did not attach")?;
        Ok(Self { child, lines })
    }

    /// SIGINT, then the last summary line.
    fn stop(mut self) -> anyhow::Result<Value> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        self.child.wait()?;
        let mut last = None;
        while let Ok((_, l)) = self.lines.recv_timeout(Duration::from_secs(2)) {
            if l.contains("\"type\":\"summary\"") {
                last = Some(l);
            }
        }
        Ok(serde_json::from_str(&last.context("no summary line")?)?)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn snat_race(rounds: usize) -> anyhow::Result<Value> {
    const FLOWS: usize = 20_000;
    let lab = NatLab::new("iptables");
    lab.node.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &lab.uplink,
            "-p",
            "udp",
            "-j",
            "MASQUERADE",
            "--to-ports",
            "20000-20003",
        ],
    );
    let node_arg = lab.node.path().display().to_string();
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut accuracy = Vec::new();
    for round in 0..rounds {
        // Entries of the previous phase would make every flow an insert failure at once.
        let _ = netdrop_tools::tool("ip")
            .args(["netns", "exec", &lab.node.name, "conntrack", "-F"])
            .output();
        let t = Instant::now();
        let sent = send_flows(&lab.pod, 2, FLOWS / 2, "10.20.0.2:9999");
        without.push(sent as f64 / t.elapsed().as_secs_f64());

        let _ = netdrop_tools::tool("ip")
            .args(["netns", "exec", &lab.node.name, "conntrack", "-F"])
            .output();
        let nd = Netdrop::start(&["-o", "json", "--netns", &node_arg])?;
        let before = lab.node.ct_stat("insert_failed");
        let t = Instant::now();
        let sent = send_flows(&lab.pod, 2, FLOWS / 2, "10.20.0.2:9999");
        with.push(sent as f64 / t.elapsed().as_secs_f64());
        thread::sleep(Duration::from_millis(300));
        let kernel = lab.node.ct_stat("insert_failed") - before;
        let s = nd.stop()?;
        let ours = s["by_classification"]["conntrack_insert_failed"].as_u64().unwrap_or(0);
        println!(
            "round {round}: kernel insert_failed +{kernel}, netdrop conntrack_insert_failed {ours} ({})",
            s["conntrack_hook"]
        );
        accuracy.push(json!({"kernel_insert_failed": kernel, "netdrop": ours, "hook": s["conntrack_hook"]}));
    }
    let (a, b) = (median(without.clone()), median(with.clone()));
    println!(
        "\nSNAT race: {FLOWS} new UDP flows per phase through MASQUERADE on 4 ports, 2 sender threads, {rounds} rounds"
    );
    println!(
        "| phase | flows/s (median) |\n|---|---:|\n| no tracer | {a:.0} |\n| netdrop | {b:.0} |\n| ratio | {:.1}% |",
        100.0 * b / a
    );
    Ok(
        json!({"benchmark": "snat-race", "flows_per_phase": FLOWS, "without": without, "with": with, "ratio": b / a, "accuracy": accuracy}),
    )
}

#[expect(clippy::too_many_lines, reason = "one measurement, read top to bottom")]
fn svc(rounds: usize) -> anyhow::Result<Value> {
    let lab = Lab::up(&LabOptions::for_test()).map_err(|e| anyhow::anyhow!("lab up: {e}"))?;
    let st = lab.status();
    let mut args: Vec<String> = vec![
        "--svc".into(),
        "default/web".into(),
        "--kubeconfig".into(),
        st.kubeconfig.display().to_string(),
    ];
    for n in &st.nodes {
        args.push("--node-netns".into());
        args.push(format!("{}={}", n.name, n.netns_path.display()));
    }
    args.extend(["-o".into(), "json".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // A rate above what the generator reaches on this machine: achieved rate is the measure.
    let load = TrafficOptions {
        rate: 5000,
        duration: Duration::from_secs(8),
        proto: Proto::Tcp,
        timeout: Duration::from_millis(700),
        ..TrafficOptions::default()
    };
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let r = lab
            .traffic("default/web", &load)
            .map_err(|e| anyhow::anyhow!("traffic: {e}"))?;
        without.push(r.achieved_rate * (r.successes as f64 / r.attempts.max(1) as f64));
        let nd = Netdrop::start(&refs)?;
        let r = lab
            .traffic("default/web", &load)
            .map_err(|e| anyhow::anyhow!("traffic: {e}"))?;
        with.push(r.achieved_rate * (r.successes as f64 / r.attempts.max(1) as f64));
        nd.stop()?;
    }
    let (base, traced) = (median(without.clone()), median(with.clone()));
    println!(
        "\ntrace --svc on the lab: default/web, 3 backends, TCP request/response at the generator's top speed, {rounds} rounds"
    );
    println!(
        "| phase | successful requests/s (median) |\n|---|---:|\n| no netdrop | {base:.0} |\n| netdrop --svc | {traced:.0} |\n| ratio | {:.1}% |",
        100.0 * traced / base
    );

    // Time from a drop to its row updating (default --interval 1s): one request at a time until
    // requests to the bad backend have been dropped, timing each drop to the summary line whose
    // count includes it.
    let fault = lab
        .fault(&FaultRequest::new(FaultKind::PolicyDrop))
        .map_err(|e| anyhow::anyhow!("fault: {e}"))?;
    let bad = fault.backend.context("fault backend")?.pod;
    let nd = Netdrop::start(&refs)?;
    // One request per call (rate 1/s for 1 s).
    let one = TrafficOptions {
        rate: 1,
        duration: Duration::from_secs(1),
        proto: Proto::Tcp,
        timeout: Duration::from_millis(700),
        ..TrafficOptions::default()
    };
    let mut latencies = Vec::new();
    let mut seen = 0u64;
    for _ in 0..80 {
        if latencies.len() >= 10 {
            break;
        }
        let r = lab
            .traffic("default/web", &one)
            .map_err(|e| anyhow::anyhow!("traffic: {e}"))?;
        if r.failures == 0 {
            continue;
        }
        // The drop event carries the kernel's timestamp of the drop; the first summary line
        // whose count includes it is when its row updated.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dropped_at = None;
        while Instant::now() < deadline {
            let Ok((arrived, l)) = nd.lines.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let v: Value = serde_json::from_str(&l)?;
            if v["type"] == "drop" && dropped_at.is_none() {
                dropped_at = v["time"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok());
                continue;
            }
            if v["type"] != "summary" {
                continue;
            }
            let drops = v["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["pod"] == bad.as_str()))
                .and_then(|b| b["drops"].as_u64())
                .unwrap_or(0);
            if drops > seen {
                seen = drops;
                if let Some(t) = dropped_at
                    && let Ok(d) = arrived.duration_since(t)
                {
                    latencies.push(d.as_secs_f64());
                }
                break;
            }
        }
    }
    nd.stop()?;
    if latencies.is_empty() {
        bail!("no drop reached the table");
    }
    let lat_median = median(latencies.clone());
    let lat_max = latencies.iter().copied().fold(0.0, f64::max);
    println!(
        "drop → row updated (--interval 1s, {} samples): median {:.2} s, max {:.2} s",
        latencies.len(),
        lat_median,
        lat_max
    );
    Ok(
        json!({"benchmark": "svc", "without": without, "with": with, "ratio": traced / base, "drop_to_row_s": latencies}),
    )
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::SnatRace => snat_race(cli.rounds)?,
        Cmd::Svc => svc(cli.rounds)?,
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let name = result["benchmark"].as_str().unwrap_or("bench").to_string();
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&result)?)?;
    Ok(())
}
