//! `cargo xtask bench tc`: what the cali* tc programs cost, and how fast they follow churn.
//!
//! 1. Overhead: two pod namespaces joined by Calico-style veths to a node namespace that routes
//!    between them; iperf3 TCP and UDP throughput and a TCP request/response latency probe,
//!    without netdrop, with `netdrop interfaces` attached (TCX, then clsact), in rounds, and
//!    without again at the end, in the same run. Ratios are against the mean of the runs without.
//!    The kernel's own statistics of each netdrop tc program (run time and run count, enabled
//!    with `BPF_ENABLE_STATS` for the run) give its cost in ns per run for each workload.
//! 2. Attach time: 1,000 cali veths exist when netdrop starts (TCX and clsact).
//! 3. Churn: link events offered at 100/s (creations and deletions through one `ip -batch`),
//!    then a burst of 500 creations at once; every attach/forget is timed from netdrop's JSON
//!    events and missed ones are counted.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::setup;

const NODE: &str = "nd-bench-tc-node";
const POD_A: &str = "nd-bench-tc-a";
const POD_B: &str = "nd-bench-tc-b";
const MANY: &str = "nd-bench-tc-many";
/// The tc programs' names as the kernel shows them.
const PROGRAMS: [&str; 2] = ["netdrop_ingress", "netdrop_egress"];
/// The workloads of one overhead phase, in order.
const WORKLOADS: [&str; 3] = ["tcp", "udp", "rr"];

/// `cargo xtask bench tc` settings.
pub struct Options {
    /// Rounds of (no netdrop, TCX, clsact); one closing no-netdrop phase follows.
    pub rounds: u32,
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Skip the attach and churn parts.
    pub overhead_only: bool,
}

/// Network namespaces made for the benchmark, deleted on drop (also on error).
#[derive(Default)]
pub(crate) struct Namespaces(Vec<String>);

impl Namespaces {
    pub(crate) fn add(&mut self, name: &str) -> anyhow::Result<()> {
        let _ = netdrop_tools::try_tool("ip")?.args(["netns", "del", name]).status();
        sh("ip", &["netns", "add", name])?;
        self.0.push(name.to_string());
        sh("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = netdrop_tools::tool("ip").args(["netns", "del", n]).status();
        }
    }
}

pub(crate) fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
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

fn ns_sh(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    netdrop_tools::path(cmd)?; // `ip` runs it: check it against the tool table here
    let mut a = vec!["netns", "exec", ns, cmd];
    a.extend_from_slice(args);
    sh("ip", &a)
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Runs `f` on a thread inside network namespace `ns`.
fn within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<thread::JoinHandle<T>> {
    let file = fs::File::open(format!("/run/netns/{ns}"))?;
    Ok(thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    }))
}

/// Pod A (10.123.1.2) and pod B (10.123.2.2), each behind a cali veth of the node, which routes.
fn topology(ns: &mut Namespaces) -> anyhow::Result<()> {
    for n in [NODE, POD_A, POD_B] {
        ns.add(n)?;
    }
    ns_sh(NODE, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    for (pod, host, subnet) in [(POD_A, "calibencha0001", 1), (POD_B, "calibenchb0002", 2)] {
        sh(
            "ip",
            &[
                "-n", NODE, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pod,
            ],
        )?;
        sh(
            "ip",
            &["-n", NODE, "addr", "add", &format!("10.123.{subnet}.1/24"), "dev", host],
        )?;
        sh("ip", &["-n", NODE, "link", "set", host, "up"])?;
        sh(
            "ip",
            &[
                "-n",
                pod,
                "addr",
                "add",
                &format!("10.123.{subnet}.2/24"),
                "dev",
                "eth0",
            ],
        )?;
        sh("ip", &["-n", pod, "link", "set", "eth0", "up"])?;
        sh(
            "ip",
            &[
                "-n",
                pod,
                "route",
                "add",
                "default",
                "via",
                &format!("10.123.{subnet}.1"),
            ],
        )?;
    }
    Ok(())
}

/// A running `netdrop interfaces -o json`; its JSON lines are kept with their arrival time.
struct Netdrop {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    attached_line: String,
    /// Kernel ids of this process's tc programs with their names (loaded after it started;
    /// other netdrops on the machine keep theirs out of the numbers).
    programs: Vec<(u32, &'static str)>,
}

/// Ids of the loaded netdrop tc programs, by name.
fn tc_programs() -> Vec<(u32, &'static str)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = PROGRAMS.into_iter().find(|n| p.name_as_str() == Some(n))?;
            Some((p.id(), name))
        })
        .collect()
}

/// Run time and run count of a set of programs (the kernel's `bpf_stats`), or a difference.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    ns: u64,
    runs: u64,
}

impl Cost {
    fn ns_per_run(self) -> f64 {
        if self.runs == 0 {
            f64::NAN
        } else {
            self.ns as f64 / self.runs as f64
        }
    }

    fn add(&mut self, o: Self) {
        self.ns += o.ns;
        self.runs += o.runs;
    }
}

/// Per program name (in [`PROGRAMS`] order), the run time and count of `ids` summed.
fn costs(ids: &[(u32, &'static str)]) -> [Cost; 2] {
    let mut out = [Cost::default(); 2];
    for p in aya::programs::loaded_programs().filter_map(Result::ok) {
        if let Some((_, name)) = ids.iter().find(|(id, _)| *id == p.id()) {
            let i = PROGRAMS.iter().position(|n| n == name).unwrap_or(0);
            out[i].add(Cost {
                ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                runs: p.run_count(),
            });
        }
    }
    out
}

fn cost_delta(before: [Cost; 2], after: [Cost; 2]) -> [Cost; 2] {
    let mut out = [Cost::default(); 2];
    for i in 0..2 {
        out[i] = Cost {
            ns: after[i].ns.saturating_sub(before[i].ns),
            runs: after[i].runs.saturating_sub(before[i].runs),
        };
    }
    out
}

impl Netdrop {
    fn start(bin: &PathBuf, args: &[&str]) -> anyhow::Result<Self> {
        let before: Vec<u32> = tc_programs().into_iter().map(|(id, _)| id).collect();
        let mut child = netdrop_tools::project(bin)
            .args(["interfaces", "-o", "json", "--interval", "1h"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keep = lines.clone();
        let stdout = child.stdout.take().context("stdout")?;
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    keep.lock().expect("lock").push(v);
                }
            }
        });
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if l.starts_with("netdrop: attached") || l.starts_with("netdrop: ") && l.contains("rror") {
                    let _ = tx.send(l.clone());
                }
                eprintln!("  {l}");
            }
        });
        let attached_line = rx
            .recv_timeout(Duration::from_mins(2))
            .context("netdrop did not attach")?;
        if !attached_line.starts_with("netdrop: attached") {
            bail!("netdrop failed: {attached_line}");
        }
        let programs = tc_programs()
            .into_iter()
            .filter(|(id, _)| !before.contains(id))
            .collect();
        Ok(Self {
            child,
            lines,
            attached_line,
            programs,
        })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Netdrop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// iperf3 from pod A to pod B: Gbit/s received (TCP) or (Gbit/s, loss %) for UDP.
fn iperf(udp: bool, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let mut server = netdrop_tools::try_tool("ip")?
        .args(["netns", "exec", POD_B, "iperf3", "-s", "-1", "-B", "10.123.2.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let mut args = vec!["-c", "10.123.2.2", "-t", &secs, "-J"];
    if udp {
        // Unlimited rate, 1400-byte datagrams: the sender's CPU is the limit, as for TCP.
        args.extend(["-u", "-b", "0", "-l", "1400"]);
    }
    let out = ns_sh(POD_A, "iperf3", &args);
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_str(&out?)?;
    if udp {
        let sum = &v["end"]["sum"];
        let sent_bps = sum["bits_per_second"].as_f64().context("udp bps")?;
        let lost = sum["lost_percent"].as_f64().unwrap_or(0.0);
        Ok((sent_bps * (1.0 - lost / 100.0) / 1e9, lost))
    } else {
        Ok((
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("tcp bps")?
                / 1e9,
            0.0,
        ))
    }
}

/// One-byte TCP request/response between the pods for 3 s: (mean µs, p99 µs).
fn latency() -> anyhow::Result<(f64, f64)> {
    let listener = within(POD_B, || TcpListener::bind("10.123.2.2:7007").expect("bind"))?
        .join()
        .expect("listener");
    let server = thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_nodelay(true);
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
        }
    });
    let client = within(POD_A, || -> Vec<f64> {
        let mut s = TcpStream::connect("10.123.2.2:7007").expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut samples = Vec::new();
        let end = Instant::now() + Duration::from_secs(3);
        let mut b = [1u8; 1];
        while Instant::now() < end {
            let t = Instant::now();
            s.write_all(&b).expect("write");
            s.read_exact(&mut b).expect("read");
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        samples
    })?;
    let mut samples = client.join().map_err(|_| anyhow::anyhow!("latency client panicked"))?;
    let _ = server.join();
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    let p99 = samples.get(samples.len() * 99 / 100).copied().unwrap_or(0.0);
    Ok((mean, p99))
}

#[derive(Clone, Copy, Default)]
struct Overhead {
    tcp_gbps: f64,
    udp_gbps: f64,
    udp_loss: f64,
    rr_mean_us: f64,
    rr_p99_us: f64,
    /// Per workload ([`WORKLOADS`]), per program ([`PROGRAMS`]): the kernel's run time and count.
    cost: [[Cost; 2]; 3],
}

/// The three workloads; with `programs` (a running netdrop's), their cost per workload.
fn measure(seconds: u32, programs: &[(u32, &'static str)]) -> anyhow::Result<Overhead> {
    let mut cost = [[Cost::default(); 2]; 3];
    let timed = |i: usize| {
        let before = costs(programs);
        move |cost: &mut [[Cost; 2]; 3]| cost[i] = cost_delta(before, costs(programs))
    };
    let done = timed(0);
    let tcp = iperf(false, seconds)?.0;
    done(&mut cost);
    let done = timed(1);
    let (udp, loss) = iperf(true, seconds)?;
    done(&mut cost);
    let done = timed(2);
    let (mean, p99) = latency()?;
    done(&mut cost);
    Ok(Overhead {
        tcp_gbps: tcp,
        udp_gbps: udp,
        udp_loss: loss,
        rr_mean_us: mean,
        rr_p99_us: p99,
        cost,
    })
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`).
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Creates `names` (with peers in the same namespace) through one `ip -batch`.
pub(crate) fn create_veths(ns: &str, names: &[String]) -> anyhow::Result<()> {
    let mut child = netdrop_tools::try_tool("ip")?
        .args(["-n", ns, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    for (i, n) in names.iter().enumerate() {
        writeln!(stdin, "link add {n} type veth peer name bp{i}")?;
    }
    drop(stdin);
    anyhow::ensure!(child.wait()?.success(), "ip -batch failed");
    Ok(())
}

pub(crate) fn cali(i: usize) -> String {
    format!("cali{i:011x}")
}

/// Times of netdrop's attach/forget events by interface name (unix ms).
fn event_times(nd: &Netdrop, action: &str) -> HashMap<String, f64> {
    nd.lines
        .lock()
        .expect("lock")
        .iter()
        .filter(|v| v["type"] == "interface" && v["action"] == action)
        .filter_map(|v| Some((v["name"].as_str()?.to_string(), v["unix_ms"].as_f64()?)))
        .collect()
}

fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

struct ChurnResult {
    offered: usize,
    seconds: f64,
    missed: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Offers link events through one `ip -batch` at `rate` per second (0 = as fast as possible):
/// creations of new cali veths, and (when `delete_after` is set) deletions of those created
/// that many events earlier. Returns latency from writing the command to netdrop's event.
fn churn(
    bin: &PathBuf,
    ns: &str,
    first: usize,
    creates: usize,
    rate: u32,
    delete_after: Option<usize>,
    mode: &str,
) -> anyhow::Result<ChurnResult> {
    let nd = Netdrop::start(
        bin,
        &[
            "--node-netns",
            &format!("n={}", PathBuf::from("/run/netns").join(ns).display()),
            "--tc-mode",
            mode,
        ],
    )?;
    let mut child = netdrop_tools::try_tool("ip")?
        .args(["-n", ns, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut created_at: HashMap<String, f64> = HashMap::new();
    let mut deleted_at: HashMap<String, f64> = HashMap::new();
    let start = Instant::now();
    let mut offered = 0usize;
    let interval = if rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(1.0 / f64::from(rate))
    };
    let mut order = Vec::new();
    for i in 0..creates {
        let name = cali(first + i);
        writeln!(stdin, "link add {name} type veth peer name cp{}", first + i)?;
        stdin.flush()?;
        created_at.insert(name.clone(), unix_ms());
        order.push(name);
        offered += 1;
        if rate > 0 {
            pace(start, offered, interval);
        }
        if let Some(lag) = delete_after
            && order.len() > lag
        {
            let victim = order[order.len() - 1 - lag].clone();
            writeln!(stdin, "link del {victim}")?;
            stdin.flush()?;
            deleted_at.insert(victim, unix_ms());
            offered += 1;
            if rate > 0 {
                pace(start, offered, interval);
            }
        }
    }
    drop(stdin);
    child.wait()?;
    let issued = start.elapsed().as_secs_f64();
    // Wait for netdrop to catch up (or give up after 30 s and count the misses).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (a, f) = (event_times(&nd, "attached"), event_times(&nd, "forgotten"));
        let done = created_at.keys().all(|n| a.contains_key(n)) && deleted_at.keys().all(|n| f.contains_key(n));
        if done || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (attached, forgotten) = (event_times(&nd, "attached"), event_times(&nd, "forgotten"));
    let mut lat = Vec::new();
    let mut missed = 0;
    for (name, t) in &created_at {
        match attached.get(name) {
            Some(a) => lat.push(a - t),
            None => missed += 1,
        }
    }
    for (name, t) in &deleted_at {
        match forgotten.get(name) {
            Some(f) => lat.push(f - t),
            None => missed += 1,
        }
    }
    nd.stop()?;
    let max = lat.iter().copied().fold(0.0, f64::max);
    Ok(ChurnResult {
        offered,
        seconds: issued,
        missed,
        p50_ms: percentile(&mut lat, 50),
        p99_ms: percentile(&mut lat, 99),
        max_ms: max,
    })
}

fn pace(start: Instant, n: usize, interval: Duration) {
    let due = start + interval * n as u32;
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        thread::sleep(wait);
    }
}

/// `attached to N interfaces matching ... (n N in X ms; Y ms since start)` → (X, Y).
fn attach_ms(line: &str) -> (f64, f64) {
    let num_before = |marker: &str| -> f64 {
        line.find(marker)
            .and_then(|i| line[..i].rsplit(|c: char| !c.is_ascii_digit() && c != '.').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (num_before(" ms;"), num_before(" ms since start"))
}

#[expect(clippy::too_many_lines, reason = "one measurement, read top to bottom")]
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let seconds = opts.seconds;
    let bin = setup::release_netdrop()?;
    let kernel = sh("uname", &["-r"])?.trim().to_string();
    let mut ns = Namespaces(Vec::new());
    topology(&mut ns)?;
    let node_arg = format!("n={}", PathBuf::from("/run/netns").join(NODE).display());
    // The kernel keeps run time and count per program while this fd is open (the same switch as
    // `kernel.bpf_stats_enabled`, counted separately from the sysctl): closed when this process
    // ends, however it ends, so the machine is never left with statistics on.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")?;
    let load_before = loadavg();

    // 1. Overhead, same run, in rounds: without, TCX, clsact, ..., without.
    let mut phases: Vec<(String, Overhead)> = Vec::new();
    println!(
        "overhead: `netdrop (MODE)` runs `netdrop interfaces` as `trace` attaches (attempts to the server's ports, no UDP flow table); iperf3 TCP/UDP pod A → pod B through two cali veths and the node ({seconds} s each) + 1-byte TCP RR (3 s), {} rounds; load average {load_before}",
        opts.rounds
    );
    // `trace`'s configuration: attempts counted to the server's ports (as for a Service's
    // backend), no UDP flow table; and `netdrop interfaces`' defaults (the flow table, no
    // destinations), in one mode: the programs are the same in both.
    let mut trace_config = vec!["--no-udp-flows"];
    for d in ["10.123.2.2:5201/tcp", "10.123.2.2:5201/udp", "10.123.2.2:7007/tcp"] {
        trace_config.extend(["--dest", d]);
    }
    let configs: [(&str, &str, &[&str]); 3] = [
        ("netdrop (tcx)", "tcx", &trace_config),
        ("netdrop (clsact)", "clsact", &trace_config),
        ("netdrop interfaces (tcx, UDP flows)", "tcx", &[]),
    ];
    for _round in 0..opts.rounds {
        phases.push(("no netdrop".into(), measure(seconds, &[])?));
        for (name, mode, extra) in configs {
            let mut args = vec!["--node-netns", &node_arg, "--tc-mode", mode];
            args.extend_from_slice(extra);
            let nd = Netdrop::start(&bin, &args)?;
            let m = measure(seconds, &nd.programs)?;
            nd.stop()?;
            phases.push((name.to_string(), m));
        }
    }
    phases.push(("no netdrop".into(), measure(seconds, &[])?));
    let load_after = loadavg();
    let mean_of = |name: &str| -> Overhead {
        let sel: Vec<Overhead> = phases.iter().filter(|(n, _)| n == name).map(|(_, m)| *m).collect();
        let k = sel.len().max(1) as f64;
        // Costs add up over the phases: the mean per run is total time over total runs.
        let mut cost = [[Cost::default(); 2]; 3];
        for m in &sel {
            for (w, per_prog) in m.cost.iter().enumerate() {
                for (p, c) in per_prog.iter().enumerate() {
                    cost[w][p].add(*c);
                }
            }
        }
        Overhead {
            tcp_gbps: sel.iter().map(|m| m.tcp_gbps).sum::<f64>() / k,
            udp_gbps: sel.iter().map(|m| m.udp_gbps).sum::<f64>() / k,
            udp_loss: sel.iter().map(|m| m.udp_loss).sum::<f64>() / k,
            rr_mean_us: sel.iter().map(|m| m.rr_mean_us).sum::<f64>() / k,
            rr_p99_us: sel.iter().map(|m| m.rr_p99_us).sum::<f64>() / k,
            cost,
        }
    };
    let base = mean_of("no netdrop");
    let means: Vec<(String, Overhead)> = configs
        .iter()
        .map(|(n, _, _)| (format!("mean: {n}"), mean_of(n)))
        .collect();
    phases.extend(means);
    phases.push(("mean: no netdrop".into(), base));

    let mut attach = Vec::new();
    let mut churns = Vec::new();
    if !opts.overhead_only {
        attach_and_churn(&bin, &mut ns, &mut attach, &mut churns)?;
    }

    println!(
        "\nkernel {kernel}, {} CPUs, load average {load_before} before, {load_after} after the overhead part",
        aya::util::nr_cpus().map_or(0, |n| n)
    );
    println!(
        "| phase | TCP Gbit/s | vs none | UDP Gbit/s (loss) | vs none | RR mean µs | RR p99 µs | RR mean vs none |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut jphases = Vec::new();
    for (name, m) in &phases {
        println!(
            "| {name} | {:.2} | {:.1}% | {:.2} ({:.1}%) | {:.1}% | {:.1} | {:.1} | {:.1}% |",
            m.tcp_gbps,
            100.0 * m.tcp_gbps / base.tcp_gbps,
            m.udp_gbps,
            m.udp_loss,
            100.0 * m.udp_gbps / base.udp_gbps,
            m.rr_mean_us,
            m.rr_p99_us,
            100.0 * m.rr_mean_us / base.rr_mean_us
        );
        let mut programs = serde_json::Map::new();
        if name.contains("netdrop") && !name.contains("no netdrop") {
            for (w, workload) in WORKLOADS.iter().enumerate() {
                let per: serde_json::Map<String, Value> = PROGRAMS
                    .iter()
                    .enumerate()
                    .map(|(p, prog)| {
                        let c = m.cost[w][p];
                        let ns = c.ns_per_run();
                        (
                            (*prog).to_string(),
                            json!({"ns_per_run": if ns.is_finite() { json!(ns) } else { Value::Null },
                                "runs": c.runs, "run_time_ns": c.ns}),
                        )
                    })
                    .collect();
                programs.insert((*workload).to_string(), Value::Object(per));
            }
        }
        jphases.push(
            json!({"phase": name, "tcp_gbps": m.tcp_gbps, "tcp_ratio": m.tcp_gbps / base.tcp_gbps,
            "udp_gbps": m.udp_gbps, "udp_loss_percent": m.udp_loss, "udp_ratio": m.udp_gbps / base.udp_gbps,
            "rr_mean_us": m.rr_mean_us, "rr_p99_us": m.rr_p99_us, "rr_mean_ratio": m.rr_mean_us / base.rr_mean_us,
            "programs": programs}),
        );
    }
    println!(
        "\nper-program cost (the kernel's bpf_stats: run time / run count over each workload; runs in parentheses)"
    );
    println!("| phase | workload | netdrop_ingress ns/run | netdrop_egress ns/run | sum (one packet pod → pod) |");
    println!("|---|---|---:|---:|---:|");
    for (name, m) in phases
        .iter()
        .filter(|(n, _)| n.contains("netdrop") && !n.contains("no netdrop"))
    {
        for (w, workload) in WORKLOADS.iter().enumerate() {
            let [i, e] = m.cost[w];
            println!(
                "| {name} | {workload} | {:.1} ({}) | {:.1} ({}) | {:.1} |",
                i.ns_per_run(),
                i.runs,
                e.ns_per_run(),
                e.runs,
                i.ns_per_run() + e.ns_per_run()
            );
        }
    }
    println!(
        "\n| attach 1,000 cali veths | attach phase (ms) | process start → attached (ms) | wall incl. exec (ms) | detach + exit (ms) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (mode, p, s, w, d) in &attach {
        println!("| {mode} | {p:.0} | {s:.0} | {w:.0} | {d:.0} |");
    }
    println!(
        "\n| churn | link events offered | over (s) | rate (events/s) | missed | latency p50 (ms) | p99 (ms) | max (ms) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, c) in &churns {
        println!(
            "| {name} | {} | {:.2} | {:.0} | {} | {:.1} | {:.1} | {:.1} |",
            c.offered,
            c.seconds,
            c.offered as f64 / c.seconds,
            c.missed,
            c.p50_ms,
            c.p99_ms,
            c.max_ms
        );
    }
    let dir = bin
        .parent()
        .and_then(std::path::Path::parent)
        .map_or_else(|| setup::workspace_root().join("target"), std::path::Path::to_path_buf)
        .join("bench");
    fs::create_dir_all(&dir)?;
    let doc = json!({"kernel": kernel, "cpus": aya::util::nr_cpus().map_or(0, |n| n),
        "rounds": opts.rounds, "seconds": seconds, "load_average_before": load_before, "load_average_after": load_after,
        "overhead": jphases,
        "attach_1000": attach.iter().map(|(m, p, s, w, d)| json!({"mode": m, "attach_ms": p, "start_to_attached_ms": s, "wall_ms": w, "detach_ms": d})).collect::<Vec<_>>(),
        "churn": churns.iter().map(|(n, c)| json!({"name": n, "offered": c.offered, "seconds": c.seconds, "missed": c.missed,
            "p50_ms": c.p50_ms, "p99_ms": c.p99_ms, "max_ms": c.max_ms})).collect::<Vec<_>>()});
    fs::write(dir.join("tc.json"), serde_json::to_string_pretty(&doc)?)?;
    println!("(also in {})", dir.join("tc.json").display());
    Ok(())
}

type Attach = (&'static str, f64, f64, f64, f64);

/// 2. Attach time for 1,000 cali veths present at start-up; 3. churn.
fn attach_and_churn(
    bin: &PathBuf,
    ns: &mut Namespaces,
    attach: &mut Vec<Attach>,
    churns: &mut Vec<(String, ChurnResult)>,
) -> anyhow::Result<()> {
    ns.add(MANY)?;
    let names: Vec<String> = (0..1000).map(|i| cali(0x100_0000 + i)).collect();
    create_veths(MANY, &names)?;
    let many_arg = format!("n={}", PathBuf::from("/run/netns").join(MANY).display());
    for mode in ["tcx", "clsact"] {
        let t = Instant::now();
        let nd = Netdrop::start(bin, &["--node-netns", &many_arg, "--tc-mode", mode])?;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let (phase_ms, since_start_ms) = attach_ms(&nd.attached_line);
        let t = Instant::now();
        nd.stop()?;
        attach.push((mode, phase_ms, since_start_ms, wall, t.elapsed().as_secs_f64() * 1e3));
    }
    sh("ip", &["netns", "del", MANY])?;
    ns.0.retain(|n| n != MANY);

    // 3. Churn: 100 events/s for 10 s (creations, each deleted 50 events later), then a burst,
    // in both modes (a fresh namespace each time).
    for (i, mode) in ["tcx", "clsact"].into_iter().enumerate() {
        ns.add(MANY)?;
        let base_id = 0x200_0000 + i * 0x10_0000;
        let paced = churn(bin, MANY, base_id, 500, 100, Some(50), mode)?;
        let burst = churn(bin, MANY, base_id + 0x8_0000, 500, 0, None, mode)?;
        churns.push((format!("{mode}: paced 100/s (create + delete)"), paced));
        churns.push((format!("{mode}: burst of 500 creations"), burst));
        sh("ip", &["netns", "del", MANY])?;
        ns.0.retain(|n| n != MANY);
    }

    Ok(())
}
