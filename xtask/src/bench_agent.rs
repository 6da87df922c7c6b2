//! `cargo xtask bench agent`: what `netdrop agent` costs on a large node, release build.
//!
//! 1. Idle: the API stand-in serves the resolver benchmark's cluster (100,000 pods, 10,000
//!    Services); the agent observes up to `OBSERVED` Services (`--observe-all`); once ready, its
//!    CPU over `IDLE_SECS` and its RSS. Then scrapes of that agent: time and size, and how many
//!    series (each observed Service's backends have a drops and an attempts series).
//! 2. Drop storm (drop-storm's sender, into a namespace the agent watches as its node): the
//!    sender's rate without the agent and with it, back to back; the agent's count of the
//!    node's NO_SOCKET drops against the namespace's `Udp: NoPorts`; the agent's userspace CPU
//!    (utime in /proc/PID/stat).
//! 3. Start with 1,000 cali veths in each tc mode: time until the drop hook is live (`/readyz`
//!    200: the programs are attached; no Kubernetes) and until `netdrop_interfaces_attached`
//!    is 1,000; then SIGTERM and the time to exit (every filter or link detached).

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::{bench, bench_kube, bench_tc};

const OBSERVED: usize = 200;
const IDLE_SECS: u64 = 20;
const SCRAPES: usize = 5;
const INTERFACES: usize = 1000;
const MANY: &str = "nd-bench-agent-many";

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `GET path`: (status, body, seconds taken).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String, f64)> {
    use std::io::{Read as _, Write as _};
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain; version=0.0.4\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let secs = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_string(), secs))
}

/// Sum of the samples of a family whose line contains every one of `with`.
fn sum_of(body: &str, family: &str, with: &[&str]) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    addr: SocketAddr,
    started: Instant,
}

impl Agent {
    fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let started = Instant::now();
        let child = netdrop_tools::project(bin)
            .arg("agent")
            .args(["--listen", &addr.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the agent")?;
        Ok(Self { child, addr, started })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Seconds from start until `/readyz` answers 200.
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<f64> {
        loop {
            if get(self.addr, "/readyz").is_some_and(|r| r.0 == 200) {
                return Ok(self.started.elapsed().as_secs_f64());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("the agent exited: {st}");
            }
            if self.started.elapsed() > timeout {
                bail!("the agent was not ready within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn metrics(&self) -> anyhow::Result<(String, f64)> {
        let (status, body, secs) = get(self.addr, "/metrics").context("scrape")?;
        anyhow::ensure!(status == 200, "scrape: {status}");
        Ok((body, secs))
    }

    /// SIGTERM; seconds until it exited, and whether it exited 0.
    fn stop(mut self) -> anyhow::Result<(f64, bool)> {
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let st = self.child.wait()?;
        Ok((t.elapsed().as_secs_f64(), st.success()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (utime, stime) of a process, in seconds.
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (t(11) / hz, t(12) / hz)
}

fn rss_mib(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[expect(clippy::too_many_lines, reason = "one linear benchmark script with its report")]
pub fn run() -> anyhow::Result<()> {
    bench_kube::cargo(&["build", "--release", "-p", "netdrop", "--bin", "netdrop"])?;
    bench_kube::cargo(&["build", "--release", "-p", "netdrop-tests", "--bin", "kube-standin"])?;
    let bin = bench_kube::target_dir().join("release/netdrop");
    let mut report = serde_json::Map::new();
    println!(
        "netdrop agent benchmark (release build); load average at start {}",
        loadavg()
    );

    // 1. Idle with 100k pods, then scrapes.
    let tmp = std::env::temp_dir().join(format!("netdrop-bench-agent-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let kubeconfig = tmp.join("kubeconfig");
    let mut standin_cmd = netdrop_tools::project(bench_kube::target_dir().join("release/kube-standin"));
    standin_cmd.args([
        "--synthetic",
        "100000,10000,10000,1000",
        "--kubeconfig-out",
        kubeconfig.to_str().context("utf-8 temp path")?,
    ]);
    let standin = bench_kube::Proc::spawn("kube-standin", standin_cmd)?;
    standin.next(Duration::from_mins(10))?;
    let max = OBSERVED.to_string();
    let mut agent = Agent::start(
        &bin,
        &[
            "--kubeconfig",
            kubeconfig.to_str().context("utf-8")?,
            "--node-name",
            "node-0000",
            "--observe-all",
            "--max-services",
            &max,
        ],
    )?;
    let ready = agent.wait_ready(Duration::from_mins(5))?;
    thread::sleep(Duration::from_secs(5));
    let (u0, s0) = cpu_split(agent.pid());
    thread::sleep(Duration::from_secs(IDLE_SECS));
    let (u1, s1) = cpu_split(agent.pid());
    let idle_cpu = (u1 - u0 + s1 - s0) / IDLE_SECS as f64;
    let (rss, hwm) = rss_mib(agent.pid());
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..SCRAPES {
        let (b, secs) = agent.metrics()?;
        times.push(secs);
        body = b;
    }
    times.sort_by(f64::total_cmp);
    let series = body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    let (rss_after_scrapes, _) = rss_mib(agent.pid());
    agent.stop()?;
    drop(standin);
    let _ = fs::remove_dir_all(&tmp);
    println!(
        "idle, 100,000 pods / 10,000 Services in the API, {OBSERVED} observed: ready {ready:.1} s after start; \
         CPU {idle_cpu:.4} cores over {IDLE_SECS} s; RSS {rss:.1} MiB (peak {hwm:.1} MiB)"
    );
    println!(
        "scrape: {series} series, {} bytes; median {:.1} ms, max {:.1} ms over {SCRAPES}; RSS after {rss_after_scrapes:.1} MiB",
        body.len(),
        times[SCRAPES / 2] * 1e3,
        times[SCRAPES - 1] * 1e3
    );
    report.insert(
        "idle".into(),
        json!({"pods": 100_000, "services": 10_000, "observed": OBSERVED, "ready_s": ready, "cpu_cores": idle_cpu,
               "rss_mib": rss, "peak_rss_mib": hwm}),
    );
    report.insert(
        "scrape".into(),
        json!({"series": series, "bytes": body.len(), "median_ms": times[SCRAPES / 2] * 1e3,
               "max_ms": times[SCRAPES - 1] * 1e3, "rss_mib": rss_after_scrapes}),
    );

    // 2. Drop storm into the agent's node namespace.
    let ns = bench::Ns::new()?;
    let (rate_without, _) = bench::storm()?;
    let node_netns = format!("bench={}", Path::new("/run/netns").join(bench::NS).display());
    let mut agent = Agent::start(
        &bin,
        &["--no-kube", "--node-name", "bench", "--node-netns", &node_netns],
    )?;
    agent.wait_ready(Duration::from_mins(1))?;
    let counted0 = sum_of(&agent.metrics()?.0, "netdrop_drops_total", &["reason=\"NO_SOCKET\""]);
    let noports0 = bench::noports()?;
    let (u0, s0) = cpu_split(agent.pid());
    let (rate_with, sent) = bench::storm()?;
    thread::sleep(Duration::from_millis(500));
    let (u1, s1) = cpu_split(agent.pid());
    let noports = bench::noports()? - noports0;
    let counted = sum_of(&agent.metrics()?.0, "netdrop_drops_total", &["reason=\"NO_SOCKET\""]) - counted0;
    let secs = bench::SECONDS as f64;
    // Metric values are floats; counts this size are exact in an f64.
    let exact = (counted - noports as f64).abs() < 0.5;
    let (user, sys) = ((u1 - u0) / secs, (s1 - s0) / secs);
    agent.stop()?;
    drop(ns);
    println!(
        "drop storm ({} s, {} senders): {rate_without:.0} pkt/s without the agent, {rate_with:.0} with it ({:.1}%); \
         {sent} sent, NoPorts {noports}, agent counted {counted} ({}); agent CPU user {user:.3} sys {sys:.3} cores",
        bench::SECONDS,
        bench::SENDERS,
        100.0 * rate_with / rate_without,
        if exact { "exact" } else { "NOT exact" }
    );
    report.insert(
        "storm".into(),
        json!({"rate_without": rate_without, "rate_with": rate_with, "ratio": rate_with / rate_without,
               "sent": sent, "noports": noports, "counted": counted, "exact": exact,
               "agent_user_cores": user, "agent_sys_cores": sys}),
    );

    // 3. Start with 1,000 workload interfaces, each tc mode.
    let mut nss = bench_tc::Namespaces::default();
    nss.add(MANY)?;
    let names: Vec<String> = (0..INTERFACES).map(bench_tc::cali).collect();
    bench_tc::create_veths(MANY, &names)?;
    let node_netns = format!("bench={}", Path::new("/run/netns").join(MANY).display());
    let mut modes = Vec::new();
    for mode in ["clsact", "tcx"] {
        let mut agent = Agent::start(
            &bin,
            &[
                "--no-kube",
                "--node-name",
                "bench",
                "--node-netns",
                &node_netns,
                "--tc-mode",
                mode,
            ],
        )?;
        let live = agent.wait_ready(Duration::from_mins(5))?;
        let counted = loop {
            let (b, _) = agent.metrics()?;
            if sum_of(&b, "netdrop_interfaces_attached", &[]) >= INTERFACES as f64 {
                break agent.started.elapsed().as_secs_f64();
            }
            if agent.started.elapsed() > Duration::from_mins(5) {
                bail!("{mode}: not every interface attached after 5 minutes");
            }
            thread::sleep(Duration::from_millis(50));
        };
        let (rss, _) = rss_mib(agent.pid());
        let (stop, ok) = agent.stop()?;
        println!(
            "start with {INTERFACES} cali interfaces, --tc-mode {mode}: drop hook live {live:.2} s, \
             every interface attached {counted:.2} s; RSS {rss:.1} MiB; SIGTERM → exit {} in {stop:.2} s",
            i32::from(!ok)
        );
        modes.push(
            json!({"mode": mode, "live_s": live, "all_attached_s": counted, "rss_mib": rss,
                          "stop_s": stop, "exit_ok": ok}),
        );
    }
    drop(nss);
    report.insert("start".into(), json!(modes));
    report.insert("loadavg_end".into(), json!(loadavg()));
    println!("load average at the end {}", loadavg());
    let dir = bench_kube::root().join("target/bench");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("agent.json"), serde_json::to_string_pretty(&report)?)?;
    println!("(also in target/bench/agent.json)");
    Ok(())
}
