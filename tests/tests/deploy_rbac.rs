//! RBAC proven, not assumed: the API stand-in enforces deploy/base/clusterrole.yaml for the
//! agent's token (HTTP verb → RBAC verb as kube-apiserver maps it) and records every decision;
//! `netdrop resolve` — the resolver the agent runs — syncs, follows watch events and resolves
//! with exactly that role, and no request of it is denied. A role missing any one of its rules
//! makes netdrop name the missing permission in one line.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use netdrop_tests::{
    apiserver::{Cluster, Rbac, ServeOptions, StandIn, rbac::PolicyRule},
    deploy,
};
use serde_json::{Value, json};

const TOKEN: &str = "netdrop-sa-token";

fn cluster() -> Arc<Cluster> {
    let c = Arc::new(Cluster::new());
    c.load_fixture(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube/cluster.json"))
        .expect("fixture");
    c
}

async fn serve(rbac: Rbac) -> (StandIn, Arc<Rbac>) {
    let rbac = Arc::new(rbac);
    let server = StandIn::start(
        cluster(),
        ServeOptions {
            token: Some(TOKEN.into()),
            rbac: Some(rbac.clone()),
            bookmark_interval: Duration::from_secs(1),
            ..ServeOptions::default()
        },
    )
    .await
    .expect("stand-in");
    (server, rbac)
}

/// `netdrop resolve --serve-stats`: syncs, then answers `lookup`/`stats` lines on stdin.
struct Resolve {
    child: Child,
    lines: std::sync::mpsc::Receiver<Value>,
}

impl Resolve {
    fn start(kubeconfig: &Path) -> (Self, Value) {
        let mut child = netdrop_tools::project(netdrop_tests::netdrop_bin())
            .args(["resolve", "--serve-stats", "--sync-timeout", "20s", "--kubeconfig"])
            .arg(kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("netdrop resolve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let mut r = Self { child, lines: rx };
        let first = r.next();
        (r, first)
    }

    fn next(&mut self) -> Value {
        self.lines
            .recv_timeout(Duration::from_secs(40))
            .expect("netdrop resolve answers")
    }

    fn ask(&mut self, line: &str) -> Value {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write");
        stdin.flush().expect("flush");
        self.next()
    }
}

impl Drop for Resolve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_clusterrole_is_enough_and_nothing_is_denied() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rbac = Rbac::from_yaml(&deploy::clusterrole_yaml()).expect("deploy/base/clusterrole.yaml");
    let (server, rbac) = serve(rbac).await;
    let kubeconfig = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");

    let (mut r, synced) = tokio::task::block_in_place(|| Resolve::start(&kubeconfig));
    assert_eq!(synced["synced"], true, "{synced}");
    assert!(
        synced["status"].as_str().unwrap_or("").starts_with("kube: synced"),
        "{synced}"
    );
    let lookup = tokio::task::block_in_place(|| r.ask("lookup 10.96.0.50:80"));
    assert_eq!(lookup["peer"]["service"], "default/web", "{lookup}");

    // Watches are live under the role: a pod created now is resolved.
    server
        .cluster()
        .apply(
            json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"late-0","namespace":"default",
            "uid":"late-0-uid"},"spec":{"nodeName":"node-a"},"status":{"phase":"Running","podIP":"10.244.1.99",
            "podIPs":[{"ip":"10.244.1.99"}]}}),
        )
        .expect("apply");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = tokio::task::block_in_place(|| r.ask("lookup 10.244.1.99"));
        if v["peer"]["pod"] == "late-0" {
            break;
        }
        assert!(Instant::now() < deadline, "the new pod was never resolved: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(r);

    let denied = rbac.denied();
    assert!(denied.is_empty(), "requests outside deploy/'s ClusterRole: {denied:?}");
    // And the role was exercised: list and watch of every kind the resolver reads.
    let allowed = rbac.allowed();
    for (group, resource) in [
        ("", "pods"),
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["list", "watch"] {
            assert!(
                allowed
                    .iter()
                    .any(|a| a.verb == verb && a.group == group && a.resource == resource),
                "never saw {verb} {resource}: {allowed:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_rule_is_named_in_one_line() {
    let full = Rbac::from_yaml(&deploy::clusterrole_yaml()).expect("ClusterRole");
    // Each (group, resource) of the role taken away in turn.
    let mut pairs = Vec::new();
    for rule in full.rules() {
        for g in &rule.api_groups {
            for res in &rule.resources {
                pairs.push((g.clone(), res.clone()));
            }
        }
    }
    assert_eq!(pairs.len(), 4, "{pairs:?}");
    for (group, resource) in pairs {
        let rules: Vec<PolicyRule> = full
            .rules()
            .iter()
            .map(|r| PolicyRule {
                resources: if r.api_groups.contains(&group) {
                    r.resources.iter().filter(|x| **x != resource).cloned().collect()
                } else {
                    r.resources.clone()
                },
                ..r.clone()
            })
            .collect();
        let (server, rbac) = serve(Rbac::new(rules)).await;
        let tmp = tempfile::tempdir().expect("tempdir");
        let kubeconfig = tmp.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let kc = kubeconfig.display().to_string();
        let (ok, stdout, stderr) = tokio::task::block_in_place(|| {
            netdrop_tests::netdrop(&["resolve", "--kubeconfig", &kc, "--sync-timeout", "20s", "10.244.1.7"])
        });
        let qualified = if group.is_empty() {
            resource.clone()
        } else {
            format!("{resource}.{group}")
        };
        // The resolver goes on with the other kinds; the status line names what to grant.
        assert!(ok, "netdrop resolve failed: {stderr}");
        assert!(!stdout.is_empty(), "nothing resolved: {stderr}");
        let named: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(&format!("grant list,watch on {qualified} ")))
            .collect();
        assert!(
            named.iter().any(|l| l.starts_with("kube: degraded; cannot list/watch")),
            "no one-line status naming {qualified}:\n{stderr}"
        );
        assert!(
            rbac.denied().iter().any(|a| a.resource == resource && a.group == group),
            "the stand-in denied nothing for {qualified}"
        );
        assert!(
            rbac.denied().iter().all(|a| a.resource == resource),
            "only {qualified} may be denied: {:?}",
            rbac.denied()
        );
    }
}

/// `netdrop agent` itself under the deployed role: ready (caches synced), observing every
/// Service (`--observe-all` lists nothing more than the resolver does), and not one request
/// denied. Root: the agent loads its kernel programs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_syncs_and_observes_under_the_clusterrole() {
    netdrop_tests::require_root!("the_agent_syncs_and_observes_under_the_clusterrole");
    let tmp = tempfile::tempdir().expect("tempdir");
    let rbac = Rbac::from_yaml(&deploy::clusterrole_yaml()).expect("deploy/base/clusterrole.yaml");
    let (server, rbac) = serve(rbac).await;
    let kubeconfig = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (ok, body) = tokio::task::block_in_place(|| {
        let agent = netdrop_tests::Tracer::start_agent(&[
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--node-name",
            "node-a",
            "--listen",
            &addr.to_string(),
            "--observe-all",
        ]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while netdrop_tests::prometheus::http_get(addr, "/readyz", None).is_none_or(|(s, _)| s != 200) {
            assert!(Instant::now() < deadline, "the agent never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        // The observed Services appear within a loop turn of readiness.
        let mut body = String::new();
        while !body.contains(r#"service="web""#) {
            assert!(Instant::now() < deadline, "default/web never observed:\n{body}");
            std::thread::sleep(Duration::from_millis(300));
            body = netdrop_tests::prometheus::http_get(addr, "/metrics", None).map_or_else(String::new, |r| r.1);
        }
        let (ok, _) = agent.terminate();
        (ok, body)
    });
    assert!(ok, "the agent exits 0 on SIGTERM");
    assert!(body.contains("netdrop_ready{node=\"node-a\"} 1"), "{body}");
    let denied = rbac.denied();
    assert!(denied.is_empty(), "requests outside deploy/'s ClusterRole: {denied:?}");
}
