//! The agent's metrics endpoint end to end, no root: `sink::metrics::Exporter` on 127.0.0.1
//! with a task answering its snapshot requests (counters growing at each one), read over HTTP in
//! both formats and with the health probes; then a real Prometheus server (Debian's
//! `prometheus`) scrapes it, and what Prometheus stores — series, labels, values — is compared
//! with the snapshots the task served.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use netdrop::{
    aggregate::{
        attach::{AttachHook, Program},
        node_metrics::{
            ConntrackCounts, DropOwner, DropSeries, HookInUse, LostSeries, LostSource, NodeMetrics, ServiceSeries,
        },
    },
    enrich::classify::Classification,
    kernel::reasons::Reason,
    sink::metrics::{Exporter, Health, MetricsOptions, SnapshotRequest},
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

const NODE: &str = "node-t";
const VERSION: &str = "0.1.0-test";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The agent's snapshot after its `n`-th answer: every running total grows with `n`.
fn snapshot(n: u64) -> NodeMetrics {
    let pod = |ns: &str, workload: &str, pod: &str, reason: &str, count| DropSeries {
        owner: DropOwner::Pod {
            namespace: ns.into(),
            workload: workload.into(),
            pod: pod.into(),
        },
        reason: reason.into(),
        classification: Classification::Reason(Reason::Named {
            code: 2,
            name: reason.into(),
        }),
        count,
    };
    NodeMetrics {
        node: NODE.into(),
        drops: vec![
            DropSeries {
                owner: DropOwner::Node,
                reason: "NETFILTER_DROP".into(),
                classification: Classification::NetfilterRule,
                count: 10 * n,
            },
            pod("default", "Deployment/web", "web-1", "NO_SOCKET", 3 * n),
            pod("kube-system", "Deployment/coredns", "coredns-1", "TCP_FLAGS", n + 1),
        ],
        services: vec![ServiceSeries {
            service_namespace: "default".into(),
            service: "web".into(),
            backend_pod: "default/web-2".into(),
            backend_node: "node-b".into(),
            drops: 2 * n,
            attempts: 7 * n,
        }],
        conntrack: Some(ConntrackCounts {
            entries: 100 + n,
            max: 65_536,
            insert_failed: n,
            drop: 0,
            early_drop: 1,
            invalid: 5 * n,
            clash_resolve: 2,
        }),
        lost_events: vec![LostSeries {
            source: LostSource::Ring,
            count: n,
        }],
        interfaces_attached: 4,
        hooks: vec![
            HookInUse {
                program: Program::KfreeSkb,
                hook: AttachHook::TpBtf,
            },
            HookInUse {
                program: Program::Tc,
                hook: AttachHook::Tcx,
            },
        ],
        ready: true,
    }
}

type Series = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// The series a snapshot must become, written out from the contract (deploy/README.md), not
/// from the exporter's code.
fn expected(m: &NodeMetrics) -> Series {
    let mut out = Series::new();
    let mut put = |name: &str, labels: &[(&str, &str)], v: u64| {
        // Prometheus stores an empty label as no label (the node's own drops: empty
        // pod_namespace and workload); `{pod_namespace=""}` still selects them.
        let labels = labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        out.insert((name.to_owned(), labels), v as f64);
    };
    put("netdrop_build_info", &[("version", VERSION)], 1);
    for d in &m.drops {
        let (ns, workload) = match &d.owner {
            DropOwner::Node => ("", ""),
            DropOwner::Pod {
                namespace, workload, ..
            } => (namespace.as_str(), workload.as_str()),
        };
        let class = d.classification.to_string();
        put(
            "netdrop_drops_total",
            &[
                ("node", NODE),
                ("pod_namespace", ns),
                ("workload", workload),
                ("reason", &d.reason),
                ("classification", &class),
            ],
            d.count,
        );
    }
    for s in &m.services {
        let labels = [
            ("service_namespace", s.service_namespace.as_str()),
            ("service", &s.service),
            ("backend_pod", &s.backend_pod),
            ("backend_node", &s.backend_node),
            ("node", NODE),
        ];
        put("netdrop_service_drops_total", &labels, s.drops);
        put("netdrop_service_attempts_total", &labels, s.attempts);
    }
    let ct = m.conntrack.expect("conntrack");
    let node = [("node", NODE)];
    put("netdrop_conntrack_entries", &node, ct.entries);
    put("netdrop_conntrack_max", &node, ct.max);
    put("netdrop_conntrack_insert_failed_total", &node, ct.insert_failed);
    put("netdrop_conntrack_drop_total", &node, ct.drop);
    put("netdrop_conntrack_early_drop_total", &node, ct.early_drop);
    put("netdrop_conntrack_invalid_total", &node, ct.invalid);
    put("netdrop_conntrack_clash_resolve_total", &node, ct.clash_resolve);
    for l in &m.lost_events {
        put(
            "netdrop_lost_events_total",
            &[("node", NODE), ("source", l.source.name())],
            l.count,
        );
    }
    put("netdrop_interfaces_attached", &node, m.interfaces_attached);
    for h in &m.hooks {
        put(
            "netdrop_hook_info",
            &[("node", NODE), ("program", h.program.name()), ("hook", h.hook.name())],
            1,
        );
    }
    put("netdrop_ready", &node, u64::from(m.ready));
    for family in [
        "netdrop_drops_total",
        "netdrop_service_drops_total",
        "netdrop_service_attempts_total",
        "netdrop_lost_events_total",
    ] {
        put(
            "netdrop_series_overflow_total",
            &[("node", NODE), ("family", family)],
            0,
        );
    }
    put("netdrop_stale_scrapes_total", &node, 0);
    out
}

/// Answers the exporter's snapshot requests like the agent, counting them; `frozen` stops the
/// growth.
struct Agent {
    requests: AtomicU64,
    frozen: AtomicBool,
    served: Mutex<Vec<NodeMetrics>>,
}

impl Agent {
    fn spawn(mut rx: mpsc::Receiver<SnapshotRequest>) -> Arc<Self> {
        let agent = Arc::new(Self {
            requests: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
            served: Mutex::new(Vec::new()),
        });
        let a = Arc::clone(&agent);
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(req) = rx.recv().await {
                a.requests.fetch_add(1, Ordering::SeqCst);
                if !a.frozen.load(Ordering::SeqCst) {
                    n += 1;
                }
                let m = snapshot(n);
                a.served.lock().expect("served").push(m.clone());
                let _ = req.send(m);
            }
        });
        agent
    }

    fn last(&self) -> NodeMetrics {
        self.served
            .lock()
            .expect("served")
            .last()
            .cloned()
            .expect("a snapshot was served")
    }
}

/// One HTTP/1.0 request (no keep-alive, no chunking): status, headers (lower-case names), body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    accept: Option<&str>,
) -> (u16, BTreeMap<String, String>, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").as_bytes())
        .await
        .expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the server answers within 10 s")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header");
    let mut lines = head.lines();
    let status = lines
        .next()
        .expect("status line")
        .split(' ')
        .nth(1)
        .expect("status")
        .parse()
        .expect("status code");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn drop_line(n: u64) -> String {
    format!(
        "netdrop_drops_total{{node=\"{NODE}\",pod_namespace=\"\",workload=\"\",reason=\"NETFILTER_DROP\",classification=\"netfilter_rule\"}} {}\n",
        10 * n
    )
}

/// The n of a served snapshot (its node drop count is 10 n).
fn n_of(m: &NodeMetrics) -> u64 {
    m.drops[0].count / 10
}

/// A Prometheus server in a temporary directory, killed and removed when dropped (also when
/// the test fails).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: netdrop\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        // A free port: Prometheus takes no port 0 it would tell us.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = netdrop_tools::tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Self { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/query`: the result vector (or matrix), or `None` while Prometheus is not up.
    async fn query(&self, promql: &str) -> Option<Vec<Value>> {
        let q: String = promql
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"_-.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        TcpStream::connect(self.addr).await.ok()?;
        let (status, _, body) = http(self.addr, "GET", &format!("/api/v1/query?query={q}"), None).await;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).expect("json");
        Some(v["data"]["result"].as_array().expect("result").clone())
    }

    /// Prometheus's latest value of every `netdrop_*` series, without the target labels it adds.
    async fn series(&self) -> Series {
        let mut out = Series::new();
        for s in self.query(r#"{__name__=~"netdrop_.+"}"#).await.unwrap_or_default() {
            let mut labels: BTreeMap<String, String> = serde_json::from_value(s["metric"].clone()).expect("labels");
            let name = labels.remove("__name__").expect("name");
            assert_eq!(labels.remove("job").as_deref(), Some("netdrop"));
            labels.remove("instance").expect("instance label");
            let v: f64 = s["value"][1].as_str().expect("value").parse().expect("number");
            out.insert((name, labels), v);
        }
        out
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both formats by the `Accept` header, the probes, refused methods and paths.
async fn endpoints(addr: SocketAddr, agent: &Agent, health: &Health) {
    // Classic without an Accept header, OpenMetrics when asked; each scrape takes a fresh
    // snapshot, so the second shows the grown counters.
    let (status, headers, classic) = http(addr, "GET", "/metrics", None).await;
    assert_eq!((status, headers["content-type"].as_str()), (200, CLASSIC), "{classic}");
    let first = n_of(&agent.last());
    assert!(classic.contains("# TYPE netdrop_drops_total counter\n"), "{classic}");
    assert!(classic.contains(&drop_line(first)), "{classic}");
    assert!(!classic.contains("# EOF"), "{classic}");
    let (status, headers, om) = http(
        addr,
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert_eq!((status, headers["content-type"].as_str()), (200, OPENMETRICS), "{om}");
    let second = n_of(&agent.last());
    assert!(second > first, "counters grow between scrapes");
    assert!(om.contains("# TYPE netdrop_drops counter\n"), "{om}");
    assert!(om.contains(&drop_line(second)), "{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");

    // Probes answer from the health state alone; other methods and paths are refused.
    health.beat();
    let requests = agent.requests.load(Ordering::SeqCst);
    let (status, _, body) = http(addr, "GET", "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!((status, body.as_str()), (503, "not ready: starting\n"));
    health.set_ready(false, "kubernetes caches not synced (pods)");
    let (status, _, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: kubernetes caches not synced (pods)\n")
    );
    health.set_ready(true, "");
    let (status, _, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _, body) = http(addr, "HEAD", "/readyz", None).await;
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, headers, _) = http(addr, "POST", "/metrics", None).await;
    assert_eq!(
        (status, headers.get("allow").map(String::as_str)),
        (405, Some("GET, HEAD"))
    );
    let (status, _, _) = http(addr, "GET", "/", None).await;
    assert_eq!(status, 404);
    let (status, headers, body) = http(addr, "HEAD", "/metrics", None).await;
    assert_eq!(
        (status, headers["content-type"].as_str(), body.as_str()),
        (200, CLASSIC, "")
    );
    assert_eq!(
        agent.requests.load(Ordering::SeqCst),
        requests,
        "probes, refused requests and HEAD took no snapshot"
    );
}

/// A real Prometheus scrapes every second: it stores the served series and values.
async fn prometheus_stores_what_was_served(addr: SocketAddr, agent: &Agent) {
    let prometheus = Prometheus::start(addr);
    let deadline = Instant::now() + Duration::from_mins(1);
    let up = loop {
        if let Some(up) = prometheus.query("up").await
            && let Some(v) = up.first()
        {
            break v["value"][1].as_str().expect("value").to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped: {}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(up, "1", "up: {}", prometheus.log());
    // Let it see the counters grow for a few scrapes, then freeze them: the next scrape must
    // store exactly the frozen snapshot.
    let start = agent.requests.load(Ordering::SeqCst);
    while agent.requests.load(Ordering::SeqCst) < start + 3 {
        assert!(
            Instant::now() < deadline,
            "Prometheus stopped scraping: {}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.frozen.store(true, Ordering::SeqCst);
    let want = expected(&agent.last());
    let mut got = Series::new();
    while got != want {
        assert!(
            Instant::now() < deadline,
            "what Prometheus stores is not what was served:\n stored: {got:#?}\n served: {want:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        got = prometheus.series().await;
    }
    // Everything it stored for the node's drops (one sample per scrape) was served, in order.
    let served: BTreeSet<u64> = agent
        .served
        .lock()
        .expect("served")
        .iter()
        .map(|m| m.drops[0].count)
        .collect();
    let stored = prometheus
        .query(r#"netdrop_drops_total{pod_namespace="",reason="NETFILTER_DROP"}[1m]"#)
        .await
        .expect("range query");
    let values: Vec<u64> = stored[0]["values"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| s[1].as_str().expect("value").parse().expect("integer"))
        .collect();
    assert!(values.len() >= 3, "{values:?}");
    assert!(
        values.iter().all(|v| served.contains(v)),
        "stored {values:?}, served {served:?}"
    );
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "monotonic: {values:?}");
    assert!(values.first() < values.last(), "it saw the counter grow: {values:?}");
    drop(prometheus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_and_a_real_prometheus_scraping_them() {
    let exporter = Exporter::new(MetricsOptions::default(), VERSION);
    let health = exporter.health();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel(4);
    let agent = Agent::spawn(rx);
    let server = tokio::spawn(exporter.serve(vec![listener], tx));

    endpoints(addr, &agent, &health).await;

    // The event reader beats once more, then goes silent while Prometheus scrapes.
    let last_beat = Instant::now();
    health.beat();
    if netdrop_tools::available("prometheus") {
        prometheus_stores_what_was_served(addr, &agent).await;
    } else {
        netdrop_tests::skip(
            "the_endpoints_and_a_real_prometheus_scraping_them (Prometheus part)",
            "prometheus is not installed (cargo xtask setup, or apt-get install prometheus)",
        );
    }
    // /healthz fails 10 s after the last beat, saying since when.
    tokio::time::sleep(Duration::from_millis(10_500).saturating_sub(last_beat.elapsed())).await;
    let (status, _, body) = http(addr, "GET", "/healthz", None).await;
    assert_eq!(status, 503, "{body}");
    let silent: u64 = body
        .strip_prefix("event reader silent since 20")
        .and_then(|b| b.rsplit_once(" ("))
        .and_then(|(_, s)| s.strip_suffix(" s)\n"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("one line saying since when: {body:?}"));
    assert!(silent >= 10, "{body}");
    health.beat();
    assert_eq!(http(addr, "GET", "/healthz", None).await.0, 200);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_the_agent_does_not_answer_serves_the_last_snapshot() {
    let exporter = Exporter::new(MetricsOptions::default(), VERSION);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::channel::<SnapshotRequest>(4);
    let server = tokio::spawn(exporter.serve(vec![listener], tx));
    // The agent answers the first request, sits on the second (busy) and drops the third.
    let agent = tokio::spawn(async move {
        let first = rx.recv().await.expect("first request");
        let _ = first.send(snapshot(1));
        let busy = rx.recv().await.expect("second request");
        let gone = rx.recv().await.expect("third request");
        drop((busy, gone));
        rx
    });
    let stale = |n: u64| format!("netdrop_stale_scrapes_total{{node=\"{NODE}\"}} {n}\n");
    let (_, _, body) = http(addr, "GET", "/metrics", None).await;
    assert!(body.contains(&drop_line(1)) && body.contains(&stale(0)), "{body}");
    let t = Instant::now();
    let (status, _, body) = http(addr, "GET", "/metrics", None).await;
    let waited = t.elapsed();
    assert_eq!(status, 200);
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(4)).contains(&waited),
        "waited {waited:?} for the busy agent"
    );
    assert!(body.contains(&drop_line(1)) && body.contains(&stale(1)), "{body}");
    let (_, _, body) = http(addr, "GET", "/metrics", None).await;
    assert!(body.contains(&drop_line(1)) && body.contains(&stale(2)), "{body}");
    drop(agent.await.expect("agent"));
    server.abort();
}
