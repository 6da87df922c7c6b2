//! `netdrop-lab`: the lab from the command line (`cargo xtask lab ...` runs it).
//!
//! `up` starts a detached daemon (`netdrop-lab daemon`) that builds the lab and holds its servers
//! and the Kubernetes API stand-in; `status`, `fault` and `traffic` talk to the lab through its
//! state directory (/run/netdrop-lab) and the daemon's control socket; `down` stops the daemon
//! and removes whatever is left, also after a crash.

use std::{
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    process::{ExitCode, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use netdrop_tests::lab::{
    self, Lab, LabOptions, Status,
    control::{self, Request},
    faults::{FaultKind, FaultRecord, FaultRequest},
    topology::{Proto, Sizes},
    traffic::{DEFAULT_TIMEOUT, TrafficOptions, TrafficReport, TrafficShape},
};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(
    about = "A Calico-style, kube-proxy-style Kubernetes lab in network namespaces, for netdrop's demo and tests"
)]
struct Cli {
    /// Run a separate lab instance (namespaces `ndlab-<NAME>-…`, state in /run/netdrop-lab-<NAME>)
    #[arg(long, global = true, value_parser = instance_name)]
    instance: Option<String>,
    /// Output: `-o text` or `-o json`
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab and start its daemon (servers, API stand-in), e.g. `lab up`
    Up {
        /// Backends of default/big, e.g. `--big 50`
        #[arg(long, default_value_t = 50)]
        big: usize,
    },
    /// Remove the lab: daemon, namespaces, files; restores sysctls; also after a crash
    Down,
    /// Nodes, pods, Services, faults and the kubeconfig of the running lab
    Status,
    /// Inject a fault, e.g. `lab fault policy-drop`, `lab fault not-listening --pod default/web-1`,
    /// `lab fault clear` (all) or `lab fault clear policy-drop`
    Fault {
        /// policy-drop, not-listening, conntrack-insert, conntrack-full, route-missing, big-one-bad,
        /// mtu-blackhole, node-route-missing, egress-deny, snat-exhaustion, dns-udp-drop,
        /// dns-conntrack-full, dns-race, clear
        name: String,
        /// With `clear`: which fault (default: all)
        which: Option<String>,
        /// Backend to aim at, e.g. `--pod default/web-1`
        #[arg(long)]
        pod: Option<String>,
        /// conntrack-full: the `nf_conntrack_max` to set, e.g. `--max 256`
        #[arg(long)]
        max: Option<u64>,
    },
    /// Requests from the client pod to a Service, e.g. `lab traffic --svc default/web --rate 200 --duration 10s`,
    /// or to an address outside the cluster, e.g. `lab traffic --to 203.0.113.10:5432`
    Traffic {
        /// Service as ns/name, e.g. `--svc default/web`
        #[arg(long, required_unless_present = "to", conflicts_with = "to")]
        svc: Option<String>,
        /// An address instead of a Service, e.g. `--to 203.0.113.10:5432` (the lab's "external" host)
        #[arg(long)]
        to: Option<std::net::SocketAddr>,
        /// TCP: ask for this many bytes of response, e.g. `--reply-bytes 4000` (mtu-blackhole)
        #[arg(long, default_value_t = 0)]
        reply_bytes: usize,
        /// UDP: send each query as an A/AAAA-style pair at once from one socket (dns-race)
        #[arg(long)]
        pairs: bool,
        /// New requests per second, e.g. `--rate 200`
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// How long, e.g. `--duration 10s`
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Protocol, e.g. `--proto udp`
        #[arg(long, value_enum, default_value_t = ProtoArg::Tcp)]
        proto: ProtoArg,
        /// Per-request timeout, e.g. `--timeout 800ms`
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// (internal) The lab daemon `up` starts
    #[command(hide = true)]
    Daemon {
        #[arg(long, default_value_t = 50)]
        big: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtoArg {
    Tcp,
    Udp,
}

fn instance_name(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        Ok(s.to_string())
    } else {
        Err("1-12 characters a-z0-9".into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.output == Output::Json {
                println!("{}", serde_json::json!({"type":"error","error":format!("{e:#}")}));
            }
            eprintln!("netdrop-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let inst = cli.instance.as_deref();
    match &cli.cmd {
        Cmd::Up { big } => up(cli, *big),
        Cmd::Down => down(cli),
        Cmd::Status => {
            let st = live_status(inst)?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                print_status(&st);
            }
            Ok(())
        }
        Cmd::Fault { name, which, pod, max } => fault(cli, name, which.as_deref(), pod.clone(), *max),
        Cmd::Traffic {
            svc,
            to,
            reply_bytes,
            pairs,
            rate,
            duration,
            proto,
            timeout,
        } => {
            let st = live_status(inst)?;
            let opts = TrafficOptions {
                rate: *rate,
                duration: *duration,
                proto: if *proto == ProtoArg::Udp {
                    Proto::Udp
                } else {
                    Proto::Tcp
                },
                timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
                ..TrafficOptions::default()
            };
            let shape = TrafficShape {
                reply_bytes: *reply_bytes,
                pairs: *pairs,
            };
            let what = svc.clone().or_else(|| to.map(|t| t.to_string())).unwrap_or_default();
            if cli.output == Output::Text {
                eprintln!(
                    "netdrop-lab: {} {}/s for {} from {} ...",
                    what,
                    rate,
                    humantime::format_duration(*duration),
                    st.client()
                        .map_or("?".into(), |c| format!("{}/{}", c.namespace, c.name))
                );
            }
            let r = match (svc, to) {
                (Some(svc), _) => st.traffic_shaped(svc, &opts, shape)?,
                (None, Some(to)) => st.traffic_to(*to, &opts, shape)?,
                (None, None) => bail!("--svc or --to"),
            };
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_traffic(&r);
            }
            Ok(())
        }
        Cmd::Daemon { big } => daemon(inst, *big),
    }
}

/// Reads the state and checks its owner still runs.
fn live_status(inst: Option<&str>) -> anyhow::Result<Status> {
    let st = Status::read(inst)?;
    anyhow::ensure!(
        lab::pid_alive(st.pid),
        "the lab's daemon (pid {}) is gone; `cargo xtask lab down` cleans up, then `lab up`",
        st.pid
    );
    Ok(st)
}

fn up(cli: &Cli, big: usize) -> anyhow::Result<()> {
    let inst = cli.instance.as_deref();
    let dir = lab::state_dir(inst);
    if let Ok(st) = Status::read(inst)
        && lab::pid_alive(st.pid)
    {
        bail!(
            "the lab is already up (daemon pid {}); `cargo xtask lab down` first",
            st.pid
        );
    }
    let t0 = Instant::now();
    let c = lab::cleanup(inst, true);
    if !c.namespaces.is_empty() || !c.sysctls_restored.is_empty() {
        eprintln!(
            "netdrop-lab: removed leftovers of an earlier lab: {} namespaces, sysctls restored: {:?}",
            c.namespaces.len(),
            c.sysctls_restored
        );
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("daemon.log");
    let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = netdrop_tools::project(std::env::current_exe()?);
    if let Some(i) = inst {
        cmd.args(["--instance", i]);
    }
    cmd.args(["daemon", "--big", &big.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal does not reach the daemon.
        .process_group(0);
    let mut child = cmd.spawn().context("starting the lab daemon")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        if let Ok(st) = Status::read(inst)
            && st.pid == pid
        {
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                print_status(&st);
                println!(
                    "\nup in {:.1} s (namespaces and rules {:.1} s)",
                    t0.elapsed().as_secs_f64(),
                    st.up_seconds
                );
            }
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            lab::cleanup(inst, false);
            bail!("the lab daemon exited ({status}) while coming up:\n{}", text.trim_end());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            lab::cleanup(inst, false);
            bail!("the lab did not come up within 120 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn is_daemon(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let c = String::from_utf8_lossy(&c);
        c.contains("netdrop-lab") && c.contains("daemon")
    })
}

fn down(cli: &Cli) -> anyhow::Result<()> {
    let inst = cli.instance.as_deref();
    let dir = lab::state_dir(inst);
    let t0 = Instant::now();
    let owner: Option<u32> = fs::read_to_string(dir.join("owner.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let mut stopped = None;
    if let Some(pid) = owner.filter(|p| lab::pid_alive(*p)) {
        anyhow::ensure!(
            is_daemon(pid),
            "the lab is held by pid {pid}, which is not a lab daemon (a test?); not stopping it"
        );
        // Politely first: the daemon restores sysctls and removes everything itself.
        let _ = control::request(&dir, &Request::Down, Duration::from_secs(5));
        let end = Instant::now() + Duration::from_secs(30);
        while lab::pid_alive(pid) && is_daemon(pid) && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        if lab::pid_alive(pid) && is_daemon(pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            thread::sleep(Duration::from_millis(200));
            stopped = Some(format!("killed daemon {pid} (did not stop within 30 s)"));
        } else {
            stopped = Some(format!("stopped daemon {pid}"));
        }
    }
    let c = lab::cleanup(inst, true);
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({"type":"down","daemon":stopped,"namespaces_removed":c.namespaces,
                "sysctls_restored":c.sysctls_restored,"dirs_removed":c.dirs,"seconds":t0.elapsed().as_secs_f64()})
        );
    } else {
        println!("{}", stopped.as_deref().unwrap_or("no lab daemon running"));
        if !c.namespaces.is_empty() || !c.sysctls_restored.is_empty() {
            println!(
                "removed {} leftover namespaces; restored {:?}",
                c.namespaces.len(),
                c.sysctls_restored
            );
        }
        println!("lab down in {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

fn daemon(inst: Option<&str>, big: usize) -> anyhow::Result<()> {
    // Blocked before any thread starts, so every thread inherits the mask and sigwait below
    // receives them: SIGTERM/SIGINT/SIGHUP take the lab down cleanly.
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    let opts = LabOptions {
        instance: inst.map(str::to_string),
        sizes: Sizes { big },
    };
    let lab = Arc::new(Lab::up(&opts)?);
    let me = nix::unistd::getpid();
    control::serve(lab.clone(), move || {
        let _ = nix::sys::signal::kill(me, Signal::SIGTERM);
    })?;
    println!(
        "netdrop-lab daemon {me}: lab {} up in {:.1} s",
        lab.instance(),
        lab.status().up_seconds
    );
    let sig = set.wait()?;
    println!("netdrop-lab daemon: {sig:?}, taking the lab down");
    let c = lab.down();
    println!(
        "netdrop-lab daemon: removed {} namespaces, restored {:?}",
        c.namespaces.len(),
        c.sysctls_restored
    );
    let _ = std::io::stdout().flush();
    // Other threads (control socket) may hold the Lab; it is down already.
    std::process::exit(0);
}

fn fault(cli: &Cli, name: &str, which: Option<&str>, pod: Option<String>, max: Option<u64>) -> anyhow::Result<()> {
    let st = live_status(cli.instance.as_deref())?;
    let req = if name == "clear" {
        Request::Clear {
            kind: which.map(str::parse::<FaultKind>).transpose()?,
        }
    } else {
        Request::Fault(FaultRequest {
            kind: name.parse()?,
            pod,
            max,
        })
    };
    let v = control::request(&st.state_dir, &req, Duration::from_secs(30))?;
    let records: Vec<FaultRecord> = if v["type"] == "cleared" {
        serde_json::from_value(v["faults"].clone())?
    } else {
        vec![serde_json::from_value(v)?]
    };
    for r in &records {
        if cli.output == Output::Json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            print_fault(r);
        }
    }
    if records.is_empty() && cli.output == Output::Text {
        println!("no active faults");
    }
    Ok(())
}

fn print_fault(r: &FaultRecord) {
    let target = r.backend.as_ref().map_or(String::new(), |b| {
        format!(" backend {} ({}, {} on {})", b.pod, b.ip, b.interface, b.node)
    });
    let svc = r.service.as_deref().map_or(String::new(), |s| format!(" of {s}"));
    let svc = match &r.external {
        Some(to) => format!("{svc} (to the external {to})"),
        None => svc,
    };
    println!(
        "{} {}: node {} (netns {}){target}{svc}",
        r.fault, r.action, r.node, r.node_netns
    );
    if r.action == "applied" {
        for d in &r.did {
            println!("  did:    {d}");
        }
        println!("  expect: {}", r.expect);
    }
}

fn print_status(st: &Status) {
    println!("lab {} (pid {}, state {})", st.instance, st.pid, st.state_dir.display());
    println!(
        "kubeconfig: {}   (export KUBECONFIG={}; API {})",
        st.kubeconfig.display(),
        st.kubeconfig.display(),
        st.api_server
    );
    println!("\nNODE     NETNS                       UNDERLAY        POD CIDR        NETNS INODE");
    for n in &st.nodes {
        println!(
            "{:<8} {:<27} {:<15} {:<15} {}",
            n.name,
            n.netns_path.display(),
            n.underlay_ip,
            n.pod_cidr,
            n.netns_inode
        );
    }
    if !st.router_netns.is_empty() {
        println!(
            "upstream router {} (the nodes' default gateway; no pod routes), external host {}",
            st.router_netns, st.external
        );
    }
    println!("\nSERVICE          CLUSTER-IP    PORTS               BACKENDS");
    for s in &st.services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}/{}→{}", p.port, p.protocol.lower(), p.target_port))
            .collect();
        let backends = if s.backends.len() > 4 {
            let a = s.backends.iter().filter(|b| b.node == "node-a").count();
            format!(
                "{} ({} on node-a, {} on node-b)",
                s.backends.len(),
                a,
                s.backends.len() - a
            )
        } else if s.backends.is_empty() {
            "none (kube-proxy REJECTs)".to_string()
        } else {
            s.backends
                .iter()
                .map(|b| format!("{}@{}", b.pod.trim_start_matches("default/"), b.node))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<16} {:<13} {:<19} {}",
            format!("{}/{}", s.namespace, s.name),
            s.cluster_ip,
            ports.join(","),
            backends
        );
    }
    println!("\nPOD                  IP            NODE    INTERFACE        NETNS");
    let mut big = 0;
    for p in &st.pods {
        if p.name.starts_with("big-") && p.name != "big-00" && p.name != "big-49" {
            big += 1;
            continue;
        }
        let note = if p.role == lab::topology::Role::Backend && !p.listening {
            "  (not listening)"
        } else {
            ""
        };
        println!(
            "{:<20} {:<13} {:<7} {:<16} {}{note}",
            format!("{}/{}", p.namespace, p.name),
            p.ip,
            p.node,
            p.interface,
            p.netns
        );
    }
    if big > 0 {
        println!("… and {big} more big-NN pods (`lab status -o json` lists all)");
    }
    println!();
    if st.faults.is_empty() {
        println!("faults: none");
    }
    for f in &st.faults {
        print_fault(f);
    }
}

fn print_traffic(r: &TrafficReport) {
    println!(
        "{} {} ({}): {} attempts, {} ok, {} failed ({:.1} %), {:.0}/s achieved, latency p50 {:.2} ms p99 {:.2} ms",
        r.service,
        r.target,
        r.proto,
        r.attempts,
        r.successes,
        r.failures,
        r.failure_ratio * 100.0,
        r.achieved_rate,
        r.latency_ms_p50,
        r.latency_ms_p99
    );
    if !r.failures_by_kind.is_empty() {
        let kinds: Vec<String> = r
            .failures_by_kind
            .iter()
            .map(|(k, n)| format!("{k:?} {n}").to_lowercase())
            .collect();
        println!("  failures: {}", kinds.join(", "));
    }
    for (b, n) in &r.successes_by_backend {
        println!(
            "  ok from {b}@{}: {n}",
            r.backend_nodes.get(b).map_or("?", String::as_str)
        );
    }
}
