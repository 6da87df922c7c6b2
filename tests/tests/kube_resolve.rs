//! netdrop's resolver against the Kubernetes API stand-in: sync over TLS with a bearer token,
//! watch events, 410 relist, API killed and restarted, 403 on one kind, unreachable and hanging
//! APIs, and `--kube-snapshot` made by the real kubectl.

use std::{
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use netdrop::resolve::{Health, KubeOptions, PeerKind, Proto, Resolver};
use netdrop_tests::apiserver::{Cluster, Faults, ResKind, ServeOptions, StandIn, TlsMaterial};
use serde_json::json;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/kube/cluster.json");

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn cluster() -> Arc<Cluster> {
    let c = Arc::new(Cluster::new());
    c.load_fixture(Path::new(FIXTURE)).expect("fixture loads");
    c
}

fn fast() -> ServeOptions {
    ServeOptions {
        bookmark_interval: Duration::from_secs(1),
        ..ServeOptions::default()
    }
}

async fn start_resolver(server: &StandIn, dir: &Path) -> Resolver {
    let kc = dir.join("kubeconfig");
    server.write_kubeconfig(&kc).expect("kubeconfig written");
    let args = KubeOptions {
        kubeconfig: Some(kc),
        ..KubeOptions::default()
    };
    Resolver::start(&args).await.expect("resolver starts")
}

/// Polls `f` until it holds or `limit` passes; returns how long it took.
async fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t0.elapsed()
}

fn pod_json(name: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":"default",
        "ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"api-5f8d7c9b4d","uid":"u","controller":true}]},
        "spec":{"nodeName":"node-b"},"status":{"phase":"Running","podIP":ip,"podIPs":[{"ip":ip}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_over_tls_with_token_and_resolves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = StandIn::start(
        cluster(),
        ServeOptions {
            tls: Some(TlsMaterial::generate().expect("tls")),
            token: Some("t0ken".into()),
            ..fast()
        },
    )
    .await
    .expect("stand-in starts");
    let r = start_resolver(&server, tmp.path()).await;
    assert!(r.wait_synced(Duration::from_secs(20)).await, "{}", r.status());
    let st = r.status();
    assert_eq!(st.health, Health::Synced, "{st}");
    assert!(st.to_string().starts_with("kube: synced from kubeconfig"), "{st}");
    let p = r.lookup(ip("10.244.2.14"), 8080, Proto::Tcp);
    assert_eq!(
        (p.kind, p.pod.as_deref(), p.service.as_deref(), p.ready),
        (
            PeerKind::Pod,
            Some("web-7d4b9c8f6d-klmno"),
            Some("default/web"),
            Some(false)
        )
    );
    let p = r.lookup(ip("fd00:96::50"), 443, Proto::Tcp);
    assert_eq!((p.kind, p.service_port.as_deref()), (PeerKind::Service, Some("https")));
    assert_eq!(r.lookup_ip(ip("fd00:50::11")).node.as_deref(), Some("node-b"));
    assert_eq!(r.lookup_ip(ip("1.1.1.1")).kind, PeerKind::External);
    let svc = r.service("default", "web").expect("web");
    assert_eq!(svc.backends.len(), 10);
    assert_eq!(r.stats().pods, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_are_reflected_within_a_second() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = cluster();
    let server = StandIn::start(c.clone(), fast()).await.expect("stand-in starts");
    let r = start_resolver(&server, tmp.path()).await;
    assert!(r.wait_synced(Duration::from_secs(20)).await, "{}", r.status());
    let second = Duration::from_secs(1);

    c.apply(pod_json("api-5f8d7c9b4d-aaaaa", "10.244.2.50")).expect("add");
    let t = within(second, "added pod resolves", || {
        r.lookup_ip(ip("10.244.2.50")).pod.as_deref() == Some("api-5f8d7c9b4d-aaaaa")
    })
    .await;
    eprintln!("add visible after {t:?}");
    assert_eq!(
        r.lookup_ip(ip("10.244.2.50")).workload.as_deref(),
        Some("Deployment/api")
    );

    c.apply(pod_json("api-5f8d7c9b4d-aaaaa", "10.244.2.51"))
        .expect("modify");
    within(second, "modified IP moves", || {
        r.lookup_ip(ip("10.244.2.51")).kind == PeerKind::Pod
            && r.lookup_ip(ip("10.244.2.50")).kind == PeerKind::External
    })
    .await;

    // IP reuse: the pod is deleted and a new pod gets its address.
    c.delete(ResKind::Pods, "default", "api-5f8d7c9b4d-aaaaa")
        .expect("delete");
    within(second, "deleted pod gone", || {
        r.lookup_ip(ip("10.244.2.51")).kind == PeerKind::External
    })
    .await;
    c.apply(pod_json("api-5f8d7c9b4d-bbbbb", "10.244.2.51")).expect("reuse");
    within(second, "reused IP names the new pod", || {
        r.lookup_ip(ip("10.244.2.51")).pod.as_deref() == Some("api-5f8d7c9b4d-bbbbb")
    })
    .await;

    // A new Service and a backend turning ready.
    c.apply(json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"api","namespace":"default"},
        "spec":{"clusterIP":"10.96.0.77","clusterIPs":["10.96.0.77"],"ports":[{"name":"grpc","port":9090,"protocol":"TCP"}]}}))
    .expect("svc");
    within(second, "new ClusterIP", || {
        r.lookup(ip("10.96.0.77"), 9090, Proto::Tcp).service_port.as_deref() == Some("grpc")
    })
    .await;
    let mut slice = c.get(ResKind::EndpointSlices, "default", "web-4x7kq").expect("slice");
    slice["endpoints"][2]["conditions"]["ready"] = json!(true);
    c.apply(slice).expect("slice update");
    within(second, "backend ready", || {
        r.lookup(ip("10.244.2.14"), 8080, Proto::Tcp).ready == Some(true)
    })
    .await;
    c.delete(ResKind::Nodes, "", "node-b").expect("node delete");
    within(second, "node gone", || {
        r.lookup_ip(ip("192.168.50.11")).kind == PeerKind::External
    })
    .await;
    assert!(r.events_applied() >= 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_killed_and_restarted_with_compaction_relists() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = cluster();
    let server = StandIn::start(c.clone(), fast()).await.expect("stand-in starts");
    let r = start_resolver(&server, tmp.path()).await;
    assert!(r.wait_synced(Duration::from_secs(20)).await, "{}", r.status());

    let options = server.stop().await;
    within(Duration::from_secs(15), "stale after the API is gone", || {
        r.status().health == Health::Stale
    })
    .await;
    let st = r.status();
    assert!(st.to_string().contains("using the last known state"), "{st}");
    // Last known state keeps resolving.
    assert_eq!(
        r.lookup_ip(ip("10.244.1.7")).pod.as_deref(),
        Some("web-7d4b9c8f6d-abcde")
    );

    // While it is down: a pod goes, another comes, and history is compacted (watch → 410 → relist).
    c.delete(ResKind::Pods, "default", "web-7d4b9c8f6d-abcde")
        .expect("delete");
    c.apply(pod_json("api-5f8d7c9b4d-ccccc", "10.244.2.60")).expect("add");
    c.compact();
    let _server = StandIn::start(c.clone(), options)
        .await
        .expect("restart on the same port");
    let t = within(Duration::from_secs(40), "resynced after restart", || {
        r.lookup_ip(ip("10.244.2.60")).kind == PeerKind::Pod && r.lookup_ip(ip("10.244.1.7")).kind == PeerKind::External
    })
    .await;
    eprintln!("resynced {t:?} after restart");
    within(Duration::from_secs(40), "healthy again", || {
        r.status().health == Health::Synced
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_restarted_without_compaction_resumes_the_watch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = cluster();
    let server = StandIn::start(c.clone(), fast()).await.expect("stand-in starts");
    let r = start_resolver(&server, tmp.path()).await;
    assert!(r.wait_synced(Duration::from_secs(20)).await, "{}", r.status());
    let options = server.stop().await;
    c.delete(ResKind::Pods, "default", "db-0").expect("delete");
    let _server = StandIn::start(c.clone(), options).await.expect("restart");
    within(Duration::from_secs(40), "deletion replayed", || {
        r.lookup_ip(ip("10.244.1.20")).kind == PeerKind::External
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_kind_is_named_and_the_rest_resolves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = cluster();
    c.set_faults(Faults {
        forbidden: vec![ResKind::EndpointSlices],
        ..Faults::default()
    });
    let server = StandIn::start(c.clone(), fast()).await.expect("stand-in starts");
    let r = start_resolver(&server, tmp.path()).await;
    assert!(r.wait_synced(Duration::from_secs(20)).await, "{}", r.status());
    let st = r.status();
    assert_eq!(st.health, Health::Degraded, "{st}");
    let line = st.to_string();
    assert!(
        line.contains("cannot list/watch endpointslices.discovery.k8s.io") && line.contains("grant list,watch"),
        "{line}"
    );
    let p = r.lookup(ip("10.244.1.7"), 8080, Proto::Tcp);
    assert_eq!((p.kind, p.service), (PeerKind::Pod, None));
    assert_eq!(
        r.lookup(ip("10.96.0.50"), 80, Proto::Tcp).service.as_deref(),
        Some("default/web")
    );

    c.set_faults(Faults::default());
    within(Duration::from_mins(1), "permission granted later", || {
        r.lookup(ip("10.244.1.7"), 8080, Proto::Tcp).service.is_some()
    })
    .await;
    within(Duration::from_secs(5), "synced", || r.status().health == Health::Synced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_then_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on (yet).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let options = ServeOptions {
        addr: ([127, 0, 0, 1], port).into(),
        ..fast()
    };
    let kc = tmp.path().join("kubeconfig");
    std::fs::write(
        &kc,
        json!({"apiVersion":"v1","kind":"Config","current-context":"x",
            "clusters":[{"name":"x","cluster":{"server":format!("http://127.0.0.1:{port}")}}],
            "users":[{"name":"x","user":{}}],"contexts":[{"name":"x","context":{"cluster":"x","user":"x"}}]})
        .to_string(),
    )
    .expect("kubeconfig");
    let r = Resolver::start(&KubeOptions {
        kubeconfig: Some(kc),
        ..KubeOptions::default()
    })
    .await
    .expect("starting with the API down is not an error");
    assert!(!r.wait_synced(Duration::from_secs(2)).await);
    let st = r.status();
    assert_eq!(st.health, Health::Syncing);
    assert!(st.to_string().contains("API unreachable"), "{st}");
    assert_eq!(r.lookup_ip(ip("10.244.1.7")).kind, PeerKind::Unresolved);

    let _server = StandIn::start(cluster(), options).await.expect("stand-in starts");
    within(Duration::from_secs(40), "synced once the API is up", || {
        r.status().health == Health::Synced
    })
    .await;
    assert_eq!(r.lookup_ip(ip("10.244.1.7")).kind, PeerKind::Pod);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_api_leaves_addresses_unresolved() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = cluster();
    c.set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let server = StandIn::start(c, fast()).await.expect("stand-in starts");
    let r = start_resolver(&server, tmp.path()).await;
    assert!(!r.wait_synced(Duration::from_secs(1)).await);
    assert_eq!(r.status().health, Health::Syncing);
    assert_eq!(r.lookup_ip(ip("10.244.1.7")).kind, PeerKind::Unresolved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_count_as_unavailable_not_fatal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = cluster();
    c.set_faults(Faults {
        error_500: true,
        ..Faults::default()
    });
    let server = StandIn::start(c.clone(), fast()).await.expect("stand-in starts");
    let r = start_resolver(&server, tmp.path()).await;
    assert!(!r.wait_synced(Duration::from_secs(2)).await);
    assert!(r.status().to_string().contains("API error 500"), "{}", r.status());
    c.set_faults(Faults::default());
    within(Duration::from_secs(40), "synced after the 500s stop", || {
        r.status().health == Health::Synced
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_snapshot_made_by_kubectl_resolves_like_the_api() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = StandIn::start(cluster(), fast()).await.expect("stand-in starts");
    let kc = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kc).expect("kubeconfig");
    let out = tokio::process::Command::from(netdrop_tools::tool("kubectl"))
        .args(["--kubeconfig", kc.to_str().expect("utf-8"), "--cache-dir"])
        .arg(tmp.path().join("cache"))
        .args(["get", "pods,services,endpointslices,nodes", "-A", "-o", "json"])
        .output()
        .await
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = tmp.path().join("snapshot.json");
    std::fs::write(&snap, &out.stdout).expect("snapshot written");

    let offline = Resolver::from_snapshot(&snap).expect("snapshot loads");
    assert_eq!(offline.status().health, Health::Snapshot);
    let live = start_resolver(&server, tmp.path()).await;
    assert!(live.wait_synced(Duration::from_secs(20)).await);
    for (addr, port) in [
        ("10.244.1.7", Some(8080)),
        ("10.244.2.14", Some(8080)),
        ("fd00:10:244:2::d", Some(8443)),
        ("10.96.0.10", None),
        ("192.168.50.11", Some(9100)),
        ("192.168.50.11", Some(30080)),
        ("10.244.1.40", None),
        ("9.9.9.9", None),
    ] {
        let (a, b) = match port {
            Some(p) => (
                offline.lookup(ip(addr), p, Proto::Tcp),
                live.lookup(ip(addr), p, Proto::Tcp),
            ),
            None => (offline.lookup_ip(ip(addr)), live.lookup_ip(ip(addr))),
        };
        assert_eq!(a, b, "{addr} {port:?}");
    }
    assert_eq!(offline.service("default", "web"), live.service("default", "web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kubeconfig_is_one_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let kc = tmp.path().join("broken");
    std::fs::write(&kc, "this: [is not a kubeconfig").expect("write");
    let err = Resolver::start(&KubeOptions {
        kubeconfig: Some(kc),
        ..KubeOptions::default()
    })
    .await
    .err()
    .expect("broken kubeconfig fails");
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot use ") && msg.contains("--no-kube") && !msg.contains('\n'),
        "{msg}"
    );
    let err = Resolver::start(&KubeOptions {
        kube_snapshot: Some(tmp.path().join("missing.json")),
        ..KubeOptions::default()
    })
    .await
    .err()
    .expect("missing snapshot fails");
    assert!(err.to_string().starts_with("cannot read snapshot"), "{err}");
    let off = Resolver::start(&KubeOptions {
        no_kube: true,
        ..KubeOptions::default()
    })
    .await
    .expect("--no-kube");
    assert_eq!(off.status().health, Health::Off);
    assert_eq!(off.lookup_ip(ip("10.244.1.7")).kind, PeerKind::Unresolved);
}

/// A log line (here: the API is unreachable) on a piped stderr is plain text: no colour escape
/// codes for a file or a log collector to store.
#[test]
fn log_lines_on_a_piped_stderr_carry_no_escape_codes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let kc = tmp.path().join("kubeconfig");
    std::fs::write(
        &kc,
        json!({"apiVersion":"v1","kind":"Config","current-context":"x",
            "clusters":[{"name":"x","cluster":{"server":format!("http://127.0.0.1:{port}")}}],
            "users":[{"name":"x","user":{}}],"contexts":[{"name":"x","context":{"cluster":"x","user":"x"}}]})
        .to_string(),
    )
    .expect("kubeconfig");
    let kc = kc.display().to_string();
    let (_, _, err) = netdrop_tests::netdrop(&["resolve", "10.244.1.7", "--kubeconfig", &kc, "--sync-timeout", "2s"]);
    assert!(
        err.contains("kube: API unreachable"),
        "netdrop logged the outage: {err}"
    );
    assert!(err.contains("WARN"), "as a log line with its level: {err}");
    assert!(!err.contains('\x1b'), "no escape codes: {err:?}");
}
