//! Resolution table tests over `tests/fixtures/kube/cluster.json` (kubectl `-o json` shape), no root,
//! no API: every rule, IPv4 and IPv6.

use std::net::IpAddr;

use super::{
    Name, Peer, PeerKind, Proto, calico,
    index::Index,
    objects::{SlimEndpointSlice, SlimPod},
    snapshot,
};

const CLUSTER: &str = include_str!("../../../tests/fixtures/kube/cluster.json");

fn index() -> Index {
    snapshot::parse(CLUSTER.as_bytes()).expect("fixture parses")
}

#[expect(clippy::unnecessary_wraps, reason = "Peer fields are Options")]
fn n(s: &str) -> Option<Name> {
    Some(Name::new(s))
}

fn pod(ns: &str, name: &str, node: &str, workload: Option<&str>) -> Peer {
    Peer {
        kind: PeerKind::Pod,
        pod: n(name),
        namespace: n(ns),
        node: n(node),
        workload: workload.and_then(n),
        ..Peer::default()
    }
}

fn backend(mut p: Peer, svc: &str, port: &str, ready: bool) -> Peer {
    p.service = n(svc);
    p.service_port = n(port);
    p.ready = Some(ready);
    p
}

fn service(ns: &str, full: &str, port: Option<&str>) -> Peer {
    Peer {
        kind: PeerKind::Service,
        namespace: n(ns),
        service: n(full),
        service_port: port.and_then(n),
        ..Peer::default()
    }
}

fn node(name: &str) -> Peer {
    Peer {
        kind: PeerKind::Node,
        node: n(name),
        ..Peer::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// (case name, address, port and protocol, expected result)
type Case = (&'static str, &'static str, Option<(u16, Proto)>, Peer);

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases, read top to bottom")]
fn resolution_table() {
    let ix = index();
    let web_a = || pod("default", "web-7d4b9c8f6d-abcde", "node-a", Some("Deployment/web"));
    let web_b = || pod("default", "web-7d4b9c8f6d-fghij", "node-b", Some("Deployment/web"));
    let web_c = || pod("default", "web-7d4b9c8f6d-klmno", "node-b", Some("Deployment/web"));
    let tcp = |p| Some((p, Proto::Tcp));
    let cases: Vec<Case> = vec![
        ("pod IPv4", "10.244.1.7", None, web_a()),
        ("pod IPv6", "fd00:10:244:1::7", None, web_a()),
        (
            "backend IPv4, named port",
            "10.244.2.13",
            tcp(8080),
            backend(web_b(), "default/web", "http", true),
        ),
        (
            "backend of two Services: ready first, then by name",
            "10.244.1.7",
            tcp(8080),
            backend(web_a(), "default/lb", "80", true),
        ),
        (
            "backend IPv6, named port",
            "fd00:10:244:1::7",
            tcp(8080),
            backend(web_a(), "default/web", "http", true),
        ),
        (
            "backend IPv6, second port",
            "fd00:10:244:2::d",
            tcp(8443),
            backend(web_b(), "default/web", "https", true),
        ),
        (
            "backend not ready",
            "10.244.2.14",
            tcp(8080),
            backend(web_c(), "default/web", "http", false),
        ),
        ("pod, port no Service uses", "10.244.1.7", tcp(9999), web_a()),
        ("pod, wrong protocol", "10.244.1.7", Some((8080, Proto::Udp)), web_a()),
        (
            "ClusterIP v4 port",
            "10.96.0.50",
            tcp(80),
            service("default", "default/web", Some("http")),
        ),
        (
            "ClusterIP v6 port",
            "fd00:96::50",
            tcp(443),
            service("default", "default/web", Some("https")),
        ),
        (
            "ClusterIP, unknown port",
            "10.96.0.50",
            tcp(81),
            service("default", "default/web", None),
        ),
        (
            "ClusterIP no port",
            "10.96.0.50",
            None,
            service("default", "default/web", None),
        ),
        (
            "ClusterIP UDP",
            "10.96.0.10",
            Some((53, Proto::Udp)),
            service("kube-system", "kube-system/kube-dns", Some("dns")),
        ),
        (
            "ClusterIP TCP same number",
            "10.96.0.10",
            tcp(53),
            service("kube-system", "kube-system/kube-dns", Some("dns-tcp")),
        ),
        (
            "ClusterIP v6 dns",
            "fd00:96::a",
            Some((53, Proto::Udp)),
            service("kube-system", "kube-system/kube-dns", Some("dns")),
        ),
        (
            "unnamed Service port",
            "10.96.0.90",
            tcp(9100),
            service("kube-system", "kube-system/node-exporter", Some("9100")),
        ),
        (
            "LB ingress IP",
            "198.51.100.7",
            tcp(80),
            service("default", "default/lb", Some("80")),
        ),
        (
            "externalIP",
            "198.51.100.8",
            tcp(80),
            service("default", "default/lb", Some("80")),
        ),
        ("node InternalIP v4", "192.168.50.10", None, node("node-a")),
        ("node InternalIP v6", "fd00:50::11", None, node("node-b")),
        ("node ExternalIP", "203.0.113.10", None, node("node-a")),
        ("NodePort", "192.168.50.11", tcp(30080), {
            let mut p = node("node-b");
            p.service = n("default/web");
            p.namespace = n("default");
            p.service_port = n("http");
            p
        }),
        ("hostNetwork pod → node", "192.168.50.10", tcp(10256), node("node-a")),
        ("hostNetwork backend", "192.168.50.11", tcp(9100), {
            let mut p = node("node-b");
            p.pod = n("node-exporter-xyz");
            p.namespace = n("kube-system");
            backend(p, "kube-system/node-exporter", "9100", true)
        }),
        (
            "headless backend, unnamed port",
            "10.244.1.20",
            tcp(5432),
            backend(
                pod("default", "db-0", "node-a", Some("StatefulSet/db")),
                "default/db",
                "5432",
                true,
            ),
        ),
        ("finished pod's IP is free", "10.244.1.30", None, Peer::external()),
        (
            "IP reused: live pod wins over terminating",
            "10.244.1.40",
            None,
            pod("default", "new-pod", "node-a", Some("ReplicaSet/standalone")),
        ),
        (
            "other Deployment, v6",
            "fd00:10:244:2::2",
            None,
            pod(
                "kube-system",
                "coredns-5d78c9869d-q2w4x",
                "node-b",
                Some("Deployment/coredns"),
            ),
        ),
        ("external v4", "8.8.8.8", tcp(53), Peer::external()),
        ("external v6", "2001:db8::1", None, Peer::external()),
    ];
    let mut failures = Vec::new();
    for (name, addr, port, want) in cases {
        let got = ix.lookup(ip(addr), port);
        if got != want {
            failures.push(format!("{name}: {addr} {port:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn calico_interface_names_resolve_pods() {
    let ix = index();
    let name = calico::interface_name("default", "web-7d4b9c8f6d-abcde");
    assert_eq!(ix.lookup_ifname(&name).and_then(|p| p.pod), n("web-7d4b9c8f6d-abcde"));
    // Another FELIX_INTERFACEPREFIX, same hash.
    let other = format!("tap0{}", &name[4..]);
    assert!(ix.lookup_ifname(&other).is_some());
    // hostNetwork pods have no interface of their own.
    assert!(
        ix.lookup_ifname(&calico::interface_name("kube-system", "kube-proxy-abcde"))
            .is_none()
    );
    assert!(ix.lookup_ifname("eth0").is_none());
}

#[test]
fn netns_registration() {
    let mut ix = index();
    ix.netns
        .insert(4_026_532_000, (Name::new("default"), Name::new("db-0")));
    assert_eq!(ix.lookup_netns(4_026_532_000).and_then(|p| p.pod), n("db-0"));
    assert!(ix.lookup_netns(1).is_none());
}

#[test]
fn service_with_backends() {
    let ix = index();
    let s = ix.service_info("default", "web").expect("web exists");
    assert_eq!(s.cluster_ips, vec![ip("10.96.0.50"), ip("fd00:96::50")]);
    assert_eq!(s.ports.len(), 2);
    assert_eq!(
        (s.ports[0].port, s.ports[0].target_port.as_str(), s.ports[0].node_port),
        (80, "8080", Some(30080))
    );
    assert_eq!(s.ports[1].target_port, "https");
    // 3 IPv4 + 2 IPv6 endpoints × 2 ports.
    assert_eq!(s.backends.len(), 10);
    let not_ready: Vec<_> = s.backends.iter().filter(|b| !b.ready).collect();
    assert_eq!(not_ready.len(), 2);
    assert!(
        not_ready
            .iter()
            .all(|b| b.pod.as_deref() == Some("web-7d4b9c8f6d-klmno") && b.node.as_deref() == Some("node-b"))
    );
    let empty = ix.service_info("default", "empty").expect("empty exists");
    assert!(empty.backends.is_empty());
    assert!(ix.service_info("default", "nope").is_none());
    let db = ix.service_info("default", "db").expect("headless exists");
    assert!(db.cluster_ips.is_empty());
    assert_eq!(db.backends.len(), 1);
}

#[test]
fn pods_filters_and_cronjob_workload() {
    let ix = index();
    let on_b = ix.pods(None, Some("node-b"), None);
    assert_eq!(on_b.len(), 4, "{on_b:?}");
    let backup = ix.pods(Some("default"), None, Some("backup-29000000-xyz12"));
    assert_eq!(backup[0].0.workload, n("CronJob/backup"));
    assert_eq!(ix.node_ips("node-a").map(|v| v.len()), Some(3));
}

fn pod_json(name: &str, ip: &str, extra_meta: &str) -> SlimPod {
    serde_json::from_str(&format!(
        r#"{{"metadata":{{"name":"{name}","namespace":"default","resourceVersion":"1"{extra_meta}}},
        "spec":{{"nodeName":"node-a"}},"status":{{"phase":"Running","podIP":"{ip}"}}}}"#
    ))
    .expect("pod json")
}

#[test]
fn watch_events_patch_the_index() {
    let mut ix = index();
    ix.pods.apply(pod_json("fresh", "10.244.1.99", ""));
    assert_eq!(ix.lookup(ip("10.244.1.99"), None).pod, n("fresh"));
    // IP changes: the old address is released.
    ix.pods.apply(pod_json("fresh", "10.244.1.98", ""));
    assert_eq!(ix.lookup(ip("10.244.1.99"), None).kind, PeerKind::External);
    assert_eq!(ix.lookup(ip("10.244.1.98"), None).pod, n("fresh"));
    // IP reuse: a new pod takes the address, then the old pod's deletion must not remove it.
    ix.pods.apply(pod_json("successor", "10.244.1.98", ""));
    ix.pods.delete(&pod_json("fresh", "10.244.1.98", ""));
    assert_eq!(ix.lookup(ip("10.244.1.98"), None).pod, n("successor"));
    // A terminating update of the displaced pod does not take it back.
    ix.pods.apply(pod_json(
        "fresh",
        "10.244.1.98",
        r#","deletionTimestamp":"2026-11-26T00:00:00Z""#,
    ));
    assert_eq!(ix.lookup(ip("10.244.1.98"), None).pod, n("successor"));
    ix.pods.delete(&pod_json("successor", "10.244.1.98", ""));
    assert_eq!(ix.lookup(ip("10.244.1.98"), None).kind, PeerKind::External);

    // EndpointSlice update: the backend goes not-ready, then the slice is deleted.
    let slice = |ready: bool| -> SlimEndpointSlice {
        serde_json::from_str(&format!(
            r#"{{"metadata":{{"name":"web-4x7kq","namespace":"default","labels":{{"kubernetes.io/service-name":"web"}}}},
            "endpoints":[{{"addresses":["10.244.1.7"],"conditions":{{"ready":{ready}}}}}],
            "ports":[{{"name":"http","port":8080,"protocol":"TCP"}}]}}"#
        ))
        .expect("slice json")
    };
    ix.slices.apply(slice(false));
    // Shared with default/lb, whose endpoint is ready: that one is named first now.
    let p = ix.lookup(ip("10.244.1.7"), Some((8080, Proto::Tcp)));
    assert_eq!((p.service.as_deref(), p.ready), (Some("default/lb"), Some(true)));
    let p = ix.lookup(ip("10.244.1.7"), Some((8443, Proto::Tcp)));
    assert_eq!(
        (p.service.as_deref(), p.ready),
        (None, None),
        "the update dropped port 8443"
    );
    // The slice no longer lists 10.244.2.13.
    assert_eq!(ix.lookup(ip("10.244.2.13"), Some((8080, Proto::Tcp))).service, None);
    ix.slices.delete(&slice(false));
    // 10.244.1.7:8080 is still a backend of default/lb (a second slice shares it).
    assert_eq!(
        ix.lookup(ip("10.244.1.7"), Some((8080, Proto::Tcp))).service,
        n("default/lb")
    );
}

#[test]
fn unsynced_kinds_mean_unresolved_not_external() {
    let ix = Index::default();
    assert_eq!(ix.lookup(ip("10.1.2.3"), None).kind, PeerKind::Unresolved);
}

#[test]
fn real_kubectl_output_loads_the_same() {
    // `kubectl get pods,services,endpointslices,nodes -A -o json` run against the stand-in serving
    // cluster.json (kubectl 1.32).
    let from_kubectl = snapshot::parse(include_bytes!("../../../tests/fixtures/kube/kubectl-snapshot.json"))
        .expect("kubectl output parses");
    let ix = index();
    assert_eq!(from_kubectl.stats(), ix.stats());
    assert_eq!(
        from_kubectl.service_info("default", "web"),
        ix.service_info("default", "web")
    );
}
