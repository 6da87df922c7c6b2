//! The in-cluster path: service-account token + CA from a directory, API address from
//! `KUBERNETES_SERVICE_HOST`/`PORT`, TLS verified against that CA. Its own test binary because it sets
//! process environment.

use std::{path::Path, sync::Arc, time::Duration};

use netdrop::resolve::{Health, KubeOptions, PeerKind, Resolver};
use netdrop_tests::apiserver::{Cluster, ServeOptions, StandIn, TlsMaterial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_service_account_over_tls() {
    let c = Arc::new(Cluster::new());
    c.load_fixture(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/kube/cluster.json"
    )))
    .expect("fixture");
    let server = StandIn::start(
        c,
        ServeOptions {
            tls: Some(TlsMaterial::generate().expect("tls")),
            token: Some("sa-token-123".into()),
            ..ServeOptions::default()
        },
    )
    .await
    .expect("stand-in");
    let tmp = tempfile::tempdir().expect("tempdir");
    let sa = tmp.path().join("serviceaccount");
    server.write_serviceaccount(&sa).expect("service account dir");
    // SAFETY: this test binary has a single test, so nothing reads the environment concurrently.
    unsafe {
        std::env::remove_var("KUBECONFIG");
        std::env::set_var("HOME", tmp.path());
        std::env::set_var("KUBERNETES_SERVICE_HOST", "127.0.0.1");
        std::env::set_var("KUBERNETES_SERVICE_PORT", server.addr().port().to_string());
    }
    let args = KubeOptions {
        serviceaccount_dir: sa.clone(),
        ..KubeOptions::default()
    };
    let r = Resolver::start(&args).await.expect("in-cluster start");
    assert!(r.wait_synced(Duration::from_secs(20)).await, "{}", r.status());
    let st = r.status();
    assert_eq!(st.health, Health::Synced, "{st}");
    assert!(st.source.contains("in-cluster service account"), "{}", st.source);
    assert_eq!(r.lookup_ip("10.244.1.7".parse().expect("ip")).kind, PeerKind::Pod);

    // A wrong token is refused (401) and reported, not a panic.
    std::fs::write(sa.join("token"), "wrong").expect("token");
    let r = Resolver::start(&args).await.expect("start");
    assert!(r.wait_synced(Duration::from_secs(20)).await);
    let st = r.status();
    assert_eq!(st.health, Health::Degraded, "{st}");
    assert!(st.to_string().contains("Unauthorized"), "{st}");
}
