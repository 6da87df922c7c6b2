//! The API stand-in behaves like the real API for the requests kube-rs and kubectl make:
//! paged lists, watch resume, 410 Gone after compaction, bookmarks, streaming lists, and the real
//! `kubectl get` / `kubectl get --watch`.

use std::{path::Path, sync::Arc, time::Duration};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use netdrop_tests::apiserver::{Cluster, ResKind, ServeOptions, StandIn};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/kube/cluster.json");

async fn setup() -> (Arc<Cluster>, StandIn, Client) {
    let c = Arc::new(Cluster::new());
    c.load_fixture(Path::new(FIXTURE)).expect("fixture");
    let server = StandIn::start(
        c.clone(),
        ServeOptions {
            bookmark_interval: Duration::from_millis(300),
            ..ServeOptions::default()
        },
    )
    .await
    .expect("stand-in");
    let kc = Kubeconfig::from_yaml(&server.kubeconfig().to_string()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    let client = Client::try_from(config).expect("client");
    (c, server, client)
}

fn pod(name: &str) -> serde_json::Value {
    json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":"default"},
        "spec":{"containers":[{"name":"c","image":"i"}]},"status":{"phase":"Running","podIP":"10.244.9.9"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_list_and_namespaced_list() {
    let (_c, _server, client) = setup().await;
    let all: Api<Pod> = Api::all(client.clone());
    let first = all.list(&ListParams::default().limit(4)).await.expect("page 1");
    assert_eq!(first.items.len(), 4);
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = all
        .list(&ListParams::default().limit(100).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(second.items.len(), 6);
    assert!(second.metadata.continue_.is_none());
    let ks: Api<Pod> = Api::namespaced(client, "kube-system");
    assert_eq!(ks.list(&ListParams::default()).await.expect("ns list").items.len(), 3);
    assert!(ks.get("coredns-5d78c9869d-q2w4x").await.is_ok());
    let err = ks.get("nope").await.expect_err("404");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resume_and_410_after_compaction() {
    let (c, _server, client) = setup().await;
    let api: Api<Pod> = Api::all(client);
    let rv = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    c.apply(pod("after-list")).expect("add");
    c.delete(ResKind::Pods, "default", "db-0").expect("delete");
    let mut s = api.watch(&WatchParams::default(), &rv).await.expect("watch").boxed();
    let e1 = s.try_next().await.expect("ok").expect("event");
    assert!(
        matches!(&e1, WatchEvent::Added(p) if p.metadata.name.as_deref() == Some("after-list")),
        "{e1:?}"
    );
    let e2 = s.try_next().await.expect("ok").expect("event");
    assert!(
        matches!(&e2, WatchEvent::Deleted(p) if p.metadata.name.as_deref() == Some("db-0")),
        "{e2:?}"
    );
    // Bookmarks arrive when asked for.
    let mut bm = api
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            },
            &c.resource_version().to_string(),
        )
        .await
        .expect("watch")
        .boxed();
    let e = tokio::time::timeout(Duration::from_secs(3), bm.try_next())
        .await
        .expect("bookmark in time")
        .expect("ok");
    assert!(matches!(e, Some(WatchEvent::Bookmark(_))), "{e:?}");

    c.compact();
    let mut s = api.watch(&WatchParams::default(), &rv).await.expect("watch").boxed();
    match s.try_next().await.expect("ok") {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_runtime_watcher_list_watch_and_streaming_list() {
    let (c, _server, client) = setup().await;
    for cfg in [watcher::Config::default(), watcher::Config::default().streaming_lists()] {
        let api: Api<Pod> = Api::all(client.clone());
        let mut s = watcher(api, cfg).boxed();
        let mut initial = 0;
        loop {
            match s.try_next().await.expect("watcher ok").expect("event") {
                watcher::Event::Init => {}
                watcher::Event::InitApply(_) => initial += 1,
                watcher::Event::InitDone => break,
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(initial, c.count(ResKind::Pods));
        let name = format!("live-{}", c.resource_version());
        c.apply(pod(&name)).expect("add");
        let e = tokio::time::timeout(Duration::from_secs(5), s.try_next())
            .await
            .expect("in time")
            .expect("ok");
        assert!(
            matches!(&e, Some(watcher::Event::Apply(p)) if p.metadata.name.as_deref() == Some(name.as_str())),
            "{e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kubectl_get_and_watch() {
    let (c, server, _client) = setup().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let kc = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kc).expect("kubeconfig");
    let base = |cmd: &mut tokio::process::Command| {
        cmd.arg("--kubeconfig")
            .arg(&kc)
            .arg("--cache-dir")
            .arg(tmp.path().join("cache"));
    };
    let mut cmd = tokio::process::Command::from(netdrop_tools::tool("kubectl"));
    base(&mut cmd);
    let out = cmd
        .args(["get", "pods", "-A", "-o", "json"])
        .output()
        .await
        .expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(10));

    let mut cmd = tokio::process::Command::from(netdrop_tools::tool("kubectl"));
    base(&mut cmd);
    let mut child = cmd
        .args(["get", "pods", "-n", "default", "--watch", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl --watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let read = async {
        let mut added = false;
        while let Some(l) = lines.next_line().await.expect("read") {
            seen.push(l.clone());
            if l.contains("db-0") && !added {
                // The initial list arrived: change the cluster.
                c.apply(pod("watched-pod")).expect("add");
                added = true;
            }
            // `-o name` prints the object for every event: the add, then the deletion.
            match seen.iter().filter(|s| s.contains("watched-pod")).count() {
                1 if l.contains("watched-pod") => {
                    c.delete(ResKind::Pods, "default", "watched-pod").expect("delete");
                }
                2 => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("kubectl --watch saw {seen:?}"));
}
