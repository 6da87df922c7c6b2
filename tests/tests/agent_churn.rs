//! `netdrop agent` under pod churn: one agent on the lab's node-a while pods come and go in
//! batches (each: a network namespace, a `cali…` veth and its Pod object in the API stand-in,
//! then all deleted), each pod making known drops (UDP to a closed port of its own: the kernel's
//! `Udp NoPorts` in its namespace) and known attempts (TCP connections to `default/web`, an
//! observed Service) while it exists. Checked against the kernel and the generator:
//! - every drop of every pod was counted under that pod (its series = its namespace's NoPorts),
//!   and every attempt (the Service's attempts, summed over node-a's agent and node-b's — an
//!   attempt delivered to web-2 is counted by node-b's — grew by the connections made);
//! - counters never go down from one scrape to the next, gone pods' series included until they
//!   are removed;
//! - after `--gone-after` the gone pods' series are gone and the series count is the baseline's;
//!   the kernel maps keyed by namespace (`DROPS`) and by interface (`TC_COUNTERS`) are back to
//!   their baseline size, and no netdrop tc program is left on a deleted pod's interface;
//! - the agent's RSS after the churn is within [`RSS_BOUND_KIB`] of its RSS after a warm-up
//!   round of the same batch size.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use netdrop_tests::{
    Tracer,
    lab::{
        Lab, LabOptions,
        net::{in_netns, netns_path},
        topology::PodSpec,
    },
    map_entries, map_id_of_pid, parse_snmp,
    prometheus::http_get,
    require_root,
};

/// Pods alive at once (one batch); each is one create/delete cycle.
const BATCH: usize = 25;
/// Datagrams each pod sends to a closed port of its own: its drops.
const DROPS_PER_POD: usize = 3;
/// TCP connections each pod opens to `default/web`: its attempts.
const ATTEMPTS_PER_POD: usize = 2;
/// `--gone-after` for the test (the agent's default is 1 minute).
const GONE_AFTER: Duration = Duration::from_secs(2);
/// How much RSS may grow from after the warm-up round to after the churn. Chosen before
/// measuring, from what must be caught: the full run's 1,000 cycles with a leak of 4 KiB per
/// pod (a pod's series, resolver entry and interface record are each a few hundred bytes to a
/// KiB) grow by ~4 MiB. The warm-up round reaches the working set of a batch (the same number
/// of pods alive at once), so growth beyond it is state never freed.
const RSS_BOUND_KIB: u64 = 4096;
/// The closed port the pods' datagrams go to.
const CLOSED_PORT: u16 = 9;

/// One scrape in the classic text format: `name{labels}` → value.
type Scrape = BTreeMap<String, f64>;

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics", Some("text/plain; version=0.0.4")).expect("scrape");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Counters (`…_total`) never go down between two scrapes, for every series in both.
fn assert_monotonic(prev: &Scrape, now: &Scrape) {
    for (k, v) in now {
        let name = k.split('{').next().unwrap_or(k);
        if name.ends_with("_total")
            && let Some(p) = prev.get(k)
        {
            assert!(v >= p, "counter went down: {k}: {p} → {v}");
        }
    }
}

/// The value of a pod's drop series for `reason` (its workload is its name: no owner).
fn pod_drops(s: &Scrape, pod: &PodSpec, reason: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            k.starts_with("netdrop_drops_total{")
                && k.contains(&format!("pod_namespace=\"{}\"", pod.namespace))
                && k.contains(&format!("workload=\"{}\"", pod.name))
                && k.contains(&format!("reason=\"{reason}\""))
        })
        .map(|(_, v)| v)
        .sum()
}

fn churn_series(s: &Scrape) -> Vec<&String> {
    s.keys().filter(|k| k.contains("pod_namespace=\"churn\"")).collect()
}

fn attempts(s: &Scrape) -> f64 {
    s.iter()
        .filter(|(k, _)| k.starts_with("netdrop_service_attempts_total{") && k.contains("service=\"web\""))
        .map(|(_, v)| v)
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// A pod's traffic, from inside its namespace: (datagrams sent, its NoPorts, connections made).
fn pod_traffic(pod: &PodSpec, path: &std::path::Path, web: SocketAddr) -> (usize, u64, usize) {
    let ip = pod.ip;
    in_netns(path, move || {
        let s = UdpSocket::bind((ip, 0)).expect("bind");
        let sent = (0..DROPS_PER_POD)
            .filter(|_| s.send_to(b"churn", (ip, CLOSED_PORT)).is_ok())
            .count();
        let mut made = 0;
        for _ in 0..ATTEMPTS_PER_POD {
            // Each connect is an attempt whatever its outcome (web's backends all listen).
            made += 1;
            let _ = TcpStream::connect_timeout(&web, Duration::from_secs(2));
        }
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        Ok((sent, parse_snmp(&snmp)["Udp"]["NoPorts"], made))
    })
    .expect("in the pod's namespace")
}

struct Churn<'a> {
    lab: &'a Lab,
    addr: SocketAddr,
    /// node-b's agent: an attempt delivered to web-2 (on node-b) is counted there (an attempt
    /// is counted by the agent whose tc saw it; the sum over agents is the Service's).
    other: SocketAddr,
    web: SocketAddr,
    last: Scrape,
    scrapes: u64,
    next: usize,
    attempts_made: u64,
}

impl Churn<'_> {
    fn scrape(&mut self) -> Scrape {
        let now = scrape(self.addr);
        assert_monotonic(&self.last, &now);
        self.scrapes += 1;
        self.last.clone_from(&now);
        now
    }

    /// One batch of `n` pods: created, traffic, every drop and attempt counted, deleted.
    fn round(&mut self, n: usize) {
        let pods: Vec<PodSpec> = (0..n)
            .map(|i| {
                let k = self.next + i;
                self.lab
                    .churn_pod("churn", &format!("churn-{k}"), "node-a", 100 + (k % BATCH) as u8)
                    .expect("pod spec")
            })
            .collect();
        self.next += n;
        self.lab.add_pods(&pods).unwrap_or_else(|e| panic!("add pods: {e}"));
        let before = self.attempts();
        let mut noports = Vec::new();
        let mut made = 0;
        for p in &pods {
            let path = netns_path(&self.lab.names().pod_ns(p));
            let (sent, np, m) = pod_traffic(p, &path, self.web);
            assert_eq!(sent, DROPS_PER_POD, "{}: datagrams sent", p.name);
            assert_eq!(np, DROPS_PER_POD as u64, "{}: the kernel's NoPorts", p.name);
            noports.push(np);
            made += m;
        }
        self.attempts_made += made as u64;
        // Every drop under its pod, every attempt under the Service, before the pods go.
        let start = Instant::now();
        loop {
            let s = self.scrape();
            let counted: Vec<f64> = pods.iter().map(|p| pod_drops(&s, p, "NO_SOCKET")).collect();
            let all = counted.iter().zip(&noports).all(|(c, n)| same(*c, *n as f64));
            let att = self.attempts() - before;
            if all && same(att, made as f64) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "pods {}..: counted {counted:?} vs the kernel's NoPorts {noports:?}; attempts {att} vs {made} made",
                pods[0].name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.lab
            .remove_pods(&pods)
            .unwrap_or_else(|e| panic!("remove pods: {e}"));
    }

    /// The Service's attempts summed over both agents.
    fn attempts(&self) -> f64 {
        attempts(&scrape(self.addr)) + attempts(&scrape(self.other))
    }

    /// Waits until no churn pod has a series any more and `maps` are back to `sizes`; returns
    /// how long it took.
    fn settle(&mut self, maps: &[(&str, u64)], sizes: Option<&[usize]>) -> Duration {
        let start = Instant::now();
        loop {
            let s = self.scrape();
            let left = churn_series(&s).len();
            let now: Vec<usize> = maps.iter().map(|(_, id)| map_entries(*id)).collect();
            if left == 0 && sizes.is_none_or(|b| now.iter().zip(b).all(|(n, b)| n <= b)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < GONE_AFTER + Duration::from_secs(30),
                "after {:?}: {left} churn series left, maps {maps:?} at {now:?} (baseline {sizes:?})",
                start.elapsed()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Metric values are floats; counts this size are exact in an f64.
fn same(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.5
}

#[expect(
    clippy::too_many_lines,
    reason = "one churn run: warm-up, batches, settle, then each baseline checked in turn"
)]
fn churn(test: &str, cycles: usize) {
    require_root!(test);
    let lab = Lab::up(&LabOptions::for_test()).unwrap_or_else(|e| panic!("lab up: {e}"));
    let st = lab.status();
    let node = st.nodes.iter().find(|n| n.name == "node-a").expect("node-a");
    let web = st
        .target("default/web", netdrop_tests::lab::topology::Proto::Tcp)
        .expect("web");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let netns = format!("node-a={}", node.netns_path.display());
    let gone = format!("{}s", GONE_AFTER.as_secs());
    let agent = Tracer::start_agent(&[
        "--node-name",
        "node-a",
        "--node-netns",
        &netns,
        "--listen",
        &addr.to_string(),
        "--kubeconfig",
        &st.kubeconfig.display().to_string(),
        "--observe",
        "default/web",
        "--gone-after",
        &gone,
    ]);
    let node_b = st.nodes.iter().find(|n| n.name == "node-b").expect("node-b");
    let other = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let netns_b = format!("node-b={}", node_b.netns_path.display());
    let agent_b = Tracer::start_agent(&[
        "--node-name",
        "node-b",
        "--node-netns",
        &netns_b,
        "--listen",
        &other.to_string(),
        "--kubeconfig",
        &st.kubeconfig.display().to_string(),
        "--observe",
        "default/web",
    ]);
    let start = Instant::now();
    while [addr, other]
        .iter()
        .any(|a| http_get(*a, "/readyz", None).is_none_or(|r| r.0 != 200))
    {
        assert!(start.elapsed() < Duration::from_secs(30), "agent ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = agent.pid();
    let maps = [
        ("DROPS", map_id_of_pid(pid, "DROPS")),
        ("TC_COUNTERS", map_id_of_pid(pid, "TC_COUNTERS")),
    ];
    let mut c = Churn {
        lab: &lab,
        addr,
        other,
        web,
        last: Scrape::new(),
        scrapes: 0,
        next: 0,
        attempts_made: 0,
    };
    let first = c.scrape();
    let attempts0 = c.attempts();
    let rss_start = rss_kib(pid);

    // Warm-up: one batch, then settled; this is the baseline.
    c.round(BATCH);
    c.settle(&maps, None);
    // Give the harvests a few more turns so the maps are at their idle size.
    std::thread::sleep(Duration::from_secs(2));
    let base = c.scrape();
    let base_sizes: Vec<usize> = maps.iter().map(|(_, id)| map_entries(*id)).collect();
    let rss_warm = rss_kib(pid);

    let t0 = Instant::now();
    let mut done = 0;
    while done < cycles {
        let n = BATCH.min(cycles - done);
        c.round(n);
        done += n;
    }
    let churn_time = t0.elapsed();
    let settle_time = c.settle(&maps, Some(&base_sizes));
    let after = c.scrape();
    let sizes_after: Vec<usize> = maps.iter().map(|(_, id)| map_entries(*id)).collect();
    let rss_after = rss_kib(pid);
    let tc_left: Vec<String> =
        netdrop_tests::lab::net::ns_cmd(&lab.node_netns("node-a"), "bpftool", &["-j", "net", "show"], None)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v[0]["tc"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e["devname"].as_str().map(str::to_string))
            .collect();
    let total_attempts = c.attempts() - attempts0;

    println!(
        "{cycles} pod cycles (+{BATCH} warm-up) in batches of {BATCH}: {:.1} s ({:.1} ms/pod), {} scrapes; \
         series gone {settle_time:?} after the last pod (--gone-after {GONE_AFTER:?})",
        churn_time.as_secs_f64(),
        churn_time.as_secs_f64() * 1000.0 / cycles as f64,
        c.scrapes
    );
    println!(
        "series: {} before any pod, {} after warm-up, {} after the churn",
        first.len(),
        base.len(),
        after.len()
    );
    println!(
        "kernel maps {:?}: {base_sizes:?} after warm-up, {sizes_after:?} after the churn; tc on node-a: {tc_left:?}",
        maps.iter().map(|m| m.0).collect::<Vec<_>>()
    );
    println!(
        "attempts to default/web: {total_attempts} counted, {} made; RSS {rss_start} KiB at start, {rss_warm} KiB after warm-up, \
         {rss_after} KiB after the churn ({:+} KiB; bound {RSS_BOUND_KIB} KiB)",
        c.attempts_made,
        rss_after.cast_signed() - rss_warm.cast_signed()
    );
    let (ok_b, stderr_b) = agent_b.terminate();
    assert!(ok_b, "node-b's agent: exit 0 after SIGTERM:\n{}", stderr_b.join("\n"));
    let (ok, stderr) = agent.terminate();
    assert!(ok, "exit 0 after SIGTERM:\n{}", stderr.join("\n"));

    assert!(churn_series(&after).is_empty(), "gone pods' series removed");
    let keys = |s: &Scrape| s.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&after), keys(&base), "the same series as after the warm-up");
    assert!(
        sizes_after.iter().zip(&base_sizes).all(|(a, b)| a <= b),
        "kernel maps back to the baseline: {sizes_after:?} vs {base_sizes:?}"
    );
    assert!(
        tc_left
            .iter()
            .all(|d| !d.starts_with("cali") || st.pods.iter().any(|p| &p.interface == d)),
        "no tc program left on a deleted pod's interface: {tc_left:?}"
    );
    assert!(
        same(total_attempts, c.attempts_made as f64),
        "every attempt counted, gone pods' too: {total_attempts} counted, {} made",
        c.attempts_made
    );
    assert!(
        rss_after <= rss_warm + RSS_BOUND_KIB,
        "RSS grew {rss_warm} → {rss_after} KiB over {cycles} cycles"
    );
}

#[test]
#[ignore = "open bug (issue 14): a new pod that takes a deleted pod's netns inode is charged with the drops evicted from it (source/counters folds evicted keys by inode); fails at the second batch until that is fixed"]
fn agent_pod_churn_100() {
    churn("agent_pod_churn_100", 100);
}

#[test]
#[ignore = "full: 1,000 pod create/delete cycles under one agent"]
fn agent_pod_churn_1000() {
    churn("agent_pod_churn_1000", 1000);
}
