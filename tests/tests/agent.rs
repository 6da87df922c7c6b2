//! `netdrop agent` end to end: one agent per lab node (each scoped to its node with
//! `--node-netns`), a real Prometheus server scraping both every second while the lab runs the
//! broken-backend fault, and PromQL answering "which backend, on which node" — checked against
//! the DROP rule's own packet counter and the traffic generator's failures. Then `promtool check
//! metrics` on a real scrape, and SIGTERM: exit 0 with nothing left attached.

use std::{collections::BTreeMap, io::Write as _, net::SocketAddr, process::Stdio, time::Duration};

use netdrop_tests::{
    Tracer,
    lab::{
        Lab, LabOptions,
        faults::{FaultKind, FaultRequest},
        net::ns_cmd,
        topology::Proto,
        traffic::TrafficOptions,
    },
    prog_exists,
    prometheus::{Prometheus, http_get},
    require_root,
};
use serde_json::Value;

/// A free local port for an agent's `--listen`.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// Ids of the BPF programs process `pid` holds (its fds' `prog_id`).
fn prog_ids_of(pid: u32) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// netdrop's tc programs (clsact or TCX) on the interfaces of a node namespace.
fn netdrop_tc_programs(netns: &str) -> Vec<String> {
    let text = ns_cmd(netns, "bpftool", &["-j", "net", "show"], None).expect("bpftool net show");
    let v: Value = serde_json::from_str(&text).expect("bpftool json");
    v[0]["tc"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("netdrop")))
        .map(|e| format!("{} {} {}", e["devname"], e["kind"], e["name"]))
        .collect()
}

/// `sum by (backend_pod, backend_node) (expr)` as backend → (node, value as Prometheus writes it).
fn by_backend(p: &Prometheus, expr: &str) -> BTreeMap<String, (String, String)> {
    p.values(&format!("sum by (backend_pod, backend_node) ({expr})"))
        .into_iter()
        .map(|(l, v)| {
            let s = |k: &str| l.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            (s("backend_pod"), (s("backend_node"), v))
        })
        .collect()
}

/// A counter's value (Prometheus writes whole numbers without a point).
fn count(v: &str) -> u64 {
    v.parse().unwrap_or_else(|_| panic!("not a count: {v}"))
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one lab run: agents, Prometheus, traffic, then each check in turn"
)]
fn prometheus_over_two_agents_names_the_bad_backend_and_its_node() {
    require_root!("prometheus_over_two_agents_names_the_bad_backend_and_its_node");
    if !netdrop_tools::available("prometheus") {
        netdrop_tests::skip(
            "prometheus_over_two_agents_names_the_bad_backend_and_its_node",
            "prometheus is not installed (cargo xtask setup, or apt-get install prometheus)",
        );
        return;
    }
    let lab = Lab::up(&LabOptions::for_test()).unwrap_or_else(|e| panic!("lab up: {e}"));
    let st = lab.status();
    let fault = lab.fault(&FaultRequest::new(FaultKind::PolicyDrop)).expect("fault");
    let bad = fault.backend.clone().expect("targets a backend");
    let kubeconfig = st.kubeconfig.display().to_string();
    let mut agents = Vec::new();
    for n in &st.nodes {
        let addr = free_addr();
        let netns = format!("{}={}", n.name, n.netns_path.display());
        let listen = addr.to_string();
        let mut args = vec![
            "--node-name",
            &n.name,
            "--node-netns",
            &netns,
            "--listen",
            &listen,
            "--kubeconfig",
            &kubeconfig,
        ];
        // The first agent is told with --observe (and about a Service that does not exist); the
        // second follows the Service's annotation, set once it runs.
        if agents.is_empty() {
            args.extend(["--observe", "default/web", "--observe", "default/not-yet"]);
        }
        let a = Tracer::start_agent(&args);
        agents.push((n.name.clone(), n.netns.clone(), addr, a));
    }
    lab.annotate_service("default", "web", "netdrop.io/observe", "true")
        .expect("annotate");
    let follows = |addr: SocketAddr| {
        http_get(addr, "/metrics", None).is_some_and(|(_, body)| {
            body.lines()
                .any(|l| l.starts_with("netdrop_service_attempts_total{") && l.contains(r#"service="web""#))
        })
    };
    let start = std::time::Instant::now();
    while !agents.iter().all(|a| follows(a.2)) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the agents observe default/web (flag, annotation)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("both agents observe default/web after {:?}", start.elapsed());
    let addrs: Vec<SocketAddr> = agents.iter().map(|a| a.2).collect();
    let prometheus = Prometheus::start(&addrs);
    prometheus.wait_up(addrs.len());
    for (node, _, addr, _) in &agents {
        let ready = http_get(*addr, "/readyz", None).expect("readyz");
        assert_eq!(ready.0, 200, "{node} ready: {}", ready.1);
    }

    let opts = TrafficOptions::one_syn_per_request(Duration::from_secs(5));
    let report = lab
        .traffic("default/web", &opts)
        .unwrap_or_else(|e| panic!("traffic: {e}"));
    // Two scrapes after the last drop.
    std::thread::sleep(Duration::from_millis(2500));
    let rule = lab.fault_packets(&fault).expect("rule counter");

    let drops: BTreeMap<String, (String, u64)> = by_backend(&prometheus, "netdrop_service_drops_total")
        .into_iter()
        .map(|(pod, (node, v))| (pod, (node, count(&v))))
        .collect();
    let attempts: BTreeMap<String, u64> = by_backend(&prometheus, "netdrop_service_attempts_total")
        .into_iter()
        .map(|(pod, (_, v))| (pod, count(&v)))
        .collect();
    let ratios: BTreeMap<String, (String, f64)> = by_backend(
        &prometheus,
        "netdrop_service_drops_total) / sum by (backend_pod, backend_node) (netdrop_service_attempts_total",
    )
    .into_iter()
    .map(|(pod, (node, v))| (pod, (node, v.parse().unwrap_or(f64::NAN))))
    .collect();
    println!(
        "generator: {} attempts, {} failures ({:.3}); DROP rule counter {rule}; bad backend {} on {}",
        report.attempts, report.failures, report.failure_ratio, bad.pod, bad.node
    );
    for (pod, (node, d)) in &drops {
        let r = ratios.get(pod).map_or(f64::NAN, |x| x.1);
        println!(
            "prometheus: backend {pod:?} on {node:?}: drops {d} attempts {} ratio {r:.3}",
            attempts.get(pod).copied().unwrap_or_default()
        );
    }
    // The per-backend ratio names the bad backend and its node.
    let worst = ratios
        .iter()
        .filter(|(_, (_, r))| r.is_finite())
        .max_by(|a, b| a.1.1.total_cmp(&b.1.1))
        .expect("a ratio");
    assert_eq!(worst.0, &bad.pod, "the worst ratio is the bad backend's: {ratios:?}");
    assert_eq!(worst.1.0, bad.node, "and names its node");
    assert!(worst.1.1 > 0.99, "every attempt to it dropped: {}", worst.1.1);
    // Its drops are the DROP rule's own packet counter, counted by the agent of the node where
    // the rule dropped them.
    assert_eq!(drops[&bad.pod].1, rule, "drops = the DROP rule's counter");
    let by_agent: BTreeMap<String, u64> = prometheus
        .values("sum by (node) (netdrop_service_drops_total)")
        .into_iter()
        .map(|(l, v)| (l["node"].as_str().unwrap_or_default().to_string(), count(&v)))
        .collect();
    println!("service drops by the agent that counted them: {by_agent:?}");
    assert_eq!(
        by_agent.get(&fault.node),
        Some(&rule),
        "counted where dropped: {by_agent:?}"
    );
    assert_eq!(by_agent.values().sum::<u64>(), rule, "and by no other agent");
    // The same drops in the node's own series: node-b itself (its FORWARD chain), classified
    // as a firewall rule's.
    let node_drops: u64 = prometheus
        .values(&format!(
            r#"sum(netdrop_drops_total{{node="{}",pod_namespace="",reason="NETFILTER_DROP",classification="netfilter_rule"}})"#,
            fault.node
        ))
        .first()
        .map_or(0, |(_, v)| count(v));
    println!(
        "netdrop_drops_total of {} itself, netfilter_rule: {node_drops}",
        fault.node
    );
    assert_eq!(node_drops, rule, "the node's drops by reason and classification");
    // The healthy backends: series present, 0 drops; nothing without a backend.
    for (pod, (_, d)) in &drops {
        if pod != &bad.pod {
            assert_eq!(*d, 0, "{pod:?} has no drops");
        }
    }
    let healthy = drops.keys().filter(|p| !p.is_empty() && *p != &bad.pod).count();
    assert_eq!(healthy, 2, "both healthy backends have series: {drops:?}");
    // The Service's ratio over both agents matches the generator's failures.
    let d: u64 = drops.values().map(|x| x.1).sum();
    let a: u64 = attempts.values().sum();
    let ratio = d as f64 / a as f64;
    println!(
        "service ratio over both agents: {d} / {a} = {ratio:.3}; generator {:.3}",
        report.failure_ratio
    );
    assert!(
        (ratio - report.failure_ratio).abs() < 0.05,
        "netdrop {ratio:.3} vs generator {:.3}",
        report.failure_ratio
    );
    assert_eq!(a, report.attempts, "attempts over both agents = requests made");
    drop(prometheus);

    promtool_check(agents[0].2);
    let stderr = sigterm_leaves_nothing(agents);
    // A Service that does not exist (yet) is a warning, not the end of the agent.
    assert!(
        stderr[0].iter().any(|l| l.contains("--observe default/not-yet")),
        "warned about the unknown Service: {}",
        stderr[0].join("\n")
    );
}

/// `promtool check metrics` on a real scrape of `addr` in the classic text format.
fn promtool_check(addr: SocketAddr) {
    let (status, body) = http_get(addr, "/metrics", Some("text/plain; version=0.0.4")).expect("scrape");
    assert_eq!(status, 200);
    let mut promtool = netdrop_tools::tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    println!(
        "promtool check metrics: {} ({} lines scraped) {}{}",
        out.status,
        body.lines().count(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics failed:\n{body}");
}

/// SIGTERM to each agent: exit 0, every program it held unloaded, no netdrop tc program on its
/// node's interfaces. Returns each agent's stderr.
fn sigterm_leaves_nothing(agents: Vec<(String, String, SocketAddr, Tracer)>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (node, netns, _, a) in agents {
        let progs = prog_ids_of(a.pid());
        assert!(!progs.is_empty(), "{node}: the agent holds its programs");
        let (ok, stderr) = a.terminate();
        assert!(ok, "{node}: exit 0 after SIGTERM:\n{}", stderr.join("\n"));
        let left: Vec<u64> = progs.iter().copied().filter(|p| prog_exists(*p)).collect();
        assert!(left.is_empty(), "{node}: programs left loaded: {left:?}");
        let tc = netdrop_tc_programs(&netns);
        assert!(tc.is_empty(), "{node}: tc programs left: {tc:?}");
        println!(
            "{node}: SIGTERM → exit 0; {} programs unloaded, no tc filters left",
            progs.len()
        );
        out.push(stderr);
    }
    out
}

/// Errors a user can hit are one line and a non-zero exit, before anything is attached: a port
/// in use, an address that is none, no permission to load programs.
#[test]
fn user_errors_are_one_line() {
    require_root!("user_errors_are_one_line");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (ok, _, err) = netdrop_tests::netdrop(&["agent", "--no-kube", "--listen", &addr]);
    println!("port in use: {err}");
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "said once: {err}");

    let (ok, _, err) = netdrop_tests::netdrop(&["agent", "--listen", "nonsense"]);
    println!("bad --listen: {err}");
    assert!(!ok);
    assert!(
        err.lines()
            .next()
            .is_some_and(|l| l.contains("invalid value 'nonsense' for '--listen")),
        "{err}"
    );

    // Without capabilities (nobody, none inherited): the first line names what is missing.
    let out = netdrop_tools::tool("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(netdrop_tests::netdrop_bin())
        .args(["agent", "--no-kube", "--listen", "127.0.0.1:0"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    println!("no permission: {err}");
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("CAP_BPF"), "{err}");
}

/// Until Kubernetes is synced the agent counts drops but is not ready, and says why; its reader
/// is alive all the while.
#[test]
fn not_ready_with_the_reason_while_kubernetes_is_unreachable() {
    require_root!("not_ready_with_the_reason_while_kubernetes_is_unreachable");
    let dir = std::env::temp_dir().join(format!("netdrop-agent-dead-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    // Nothing listens on port 1.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}\n  name: dead\ncontexts:\n- context: {cluster: dead, user: u}\n  name: dead\ncurrent-context: dead\nusers:\n- name: u\n  user: {token: x}\n",
    )
    .expect("kubeconfig");
    let addr = free_addr();
    let a = Tracer::start_agent(&[
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--node-name",
        "node-x",
        "--listen",
        &addr.to_string(),
    ]);
    // "attached" is said a moment before readiness turns to Kubernetes'.
    let start = std::time::Instant::now();
    let (ready, why) = loop {
        let (ready, why) = http_get(addr, "/readyz", None).expect("readyz");
        if !why.contains("attaching") || start.elapsed() > Duration::from_secs(5) {
            break (ready, why);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (alive, _) = http_get(addr, "/healthz", None).expect("healthz");
    let (_, metrics) = http_get(addr, "/metrics", None).expect("metrics");
    println!("readyz {ready}: {why}");
    let (ok, stderr) = a.terminate();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(ready, 503);
    assert!(why.contains("API unreachable"), "the reason: {why}");
    assert_eq!(alive, 200, "the reader is alive");
    assert!(metrics.contains(r#"netdrop_ready{node="node-x"} 0"#), "{metrics}");
    assert!(ok, "exit 0 on SIGTERM:\n{}", stderr.join("\n"));
}

/// The samples of `name` in a scrape (classic text format): labels and value.
fn samples(body: &str, name: &str) -> Vec<(BTreeMap<String, String>, u64)> {
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// A backend that does not listen: each refused SYN is a drop in the backend pod's own network
/// namespace. Its node's agent counts it under the pod (namespace, workload), reason and
/// classification, and as the Service backend's drop; the other node's agent has no series of
/// that pod. Both equal the traffic generator's failures.
#[test]
fn a_pods_own_drops_are_its_series_on_its_node() {
    require_root!("a_pods_own_drops_are_its_series_on_its_node");
    let lab = Lab::up(&LabOptions::for_test()).unwrap_or_else(|e| panic!("lab up: {e}"));
    let st = lab.status();
    let fault = lab.fault(&FaultRequest::new(FaultKind::NotListening)).expect("fault");
    let bad = fault.backend.clone().expect("targets a backend");
    let kubeconfig = st.kubeconfig.display().to_string();
    let agents: Vec<(String, SocketAddr, Tracer)> = st
        .nodes
        .iter()
        .map(|n| {
            let addr = free_addr();
            let netns = format!("{}={}", n.name, n.netns_path.display());
            let a = Tracer::start_agent(&[
                "--node-name",
                &n.name,
                "--node-netns",
                &netns,
                "--listen",
                &addr.to_string(),
                "--observe",
                "default/web",
                "--kubeconfig",
                &kubeconfig,
            ]);
            (n.name.clone(), addr, a)
        })
        .collect();
    let opts = TrafficOptions {
        rate: 100,
        duration: Duration::from_secs(4),
        proto: Proto::Tcp,
        timeout: Duration::from_millis(700),
        ..TrafficOptions::default()
    };
    let report = lab
        .traffic("default/web", &opts)
        .unwrap_or_else(|e| panic!("traffic: {e}"));
    std::thread::sleep(Duration::from_millis(500));
    let (ns, pod) = bad.pod.split_once('/').expect("ns/name");
    println!(
        "generator: {} attempts, {} failures; not listening: {} on {}",
        report.attempts, report.failures, bad.pod, bad.node
    );
    for (node, addr, _) in &agents {
        let (_, body) = http_get(*addr, "/metrics", Some("text/plain; version=0.0.4")).expect("scrape");
        let of_pod: Vec<_> = samples(&body, "netdrop_drops_total")
            .into_iter()
            .filter(|(l, _)| {
                l.get("pod_namespace").map(String::as_str) == Some(ns)
                    && l.get("workload").map(String::as_str) == Some(pod)
            })
            .collect();
        let svc: Vec<_> = samples(&body, "netdrop_service_drops_total")
            .into_iter()
            .filter(|(l, _)| l.get("backend_pod") == Some(&bad.pod))
            .collect();
        println!("{node}: drops of pod {}: {of_pod:?}; service drops: {svc:?}", bad.pod);
        if *node == bad.node {
            assert_eq!(of_pod.len(), 1, "one series: {of_pod:?}");
            let (labels, n) = &of_pod[0];
            assert_eq!(labels["reason"], "NO_SOCKET");
            assert_eq!(labels["classification"], "no_socket");
            assert_eq!(labels["node"], bad.node);
            assert_eq!(*n, report.failures, "the pod's drops = the generator's failures");
            assert_eq!(
                svc.iter().map(|s| s.1).sum::<u64>(),
                report.failures,
                "and the backend's"
            );
        } else {
            assert!(of_pod.is_empty(), "another node's pod has no series here: {of_pod:?}");
            assert!(svc.iter().all(|s| s.1 == 0), "{svc:?}");
        }
    }
    for (node, _, a) in agents {
        let (ok, stderr) = a.terminate();
        assert!(ok, "{node}: exit 0 after SIGTERM:\n{}", stderr.join("\n"));
    }
}
