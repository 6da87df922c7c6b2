//! The lab through its Rust API: real traffic to every Service, a policy drop
//! measured against the rule's own packet counter, kubectl through the API stand-in, and
//! nothing left behind (also after a simulated crash with a global sysctl changed).
//!
//! The tests share the machine's global `nf_conntrack_max`, so they run one at a time.

use std::{collections::BTreeSet, fs, sync::Mutex, time::Duration};

use netdrop_tests::{
    lab::{
        self, Lab, LabOptions,
        faults::{FaultKind, FaultRequest},
        topology::Proto,
        traffic::{TrafficOptions, TrafficShape},
    },
    require_root, run,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn traffic(rate: u32, secs: u64, proto: Proto) -> TrafficOptions {
    TrafficOptions {
        rate,
        duration: Duration::from_secs(secs),
        proto,
        ..TrafficOptions::default()
    }
}

/// Namespaces whose name starts with `prefix` (`ip netns list`), and links of the lab's
/// Calico-style names or underlay left in this namespace (`ip link`).
fn leftovers(prefix: &str, ifnames: &[String]) -> (Vec<String>, Vec<String>) {
    let ns: Vec<String> = run("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect();
    let links = run("ip", &["-o", "link", "show"]);
    let links: Vec<String> = ifnames
        .iter()
        .filter(|i| links.contains(&format!(" {i}")))
        .cloned()
        .collect();
    (ns, links)
}

fn ct_max() -> String {
    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[test]
#[expect(clippy::too_many_lines, reason = "one lab, brought up once, many checks")]
fn lab_traffic_faults_kubectl_and_clean_down() {
    require_root!("lab_traffic_faults_kubectl_and_clean_down");
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let max_before = ct_max();
    let t0 = std::time::Instant::now();
    let lab = Lab::up(&LabOptions::for_test()).expect("lab up");
    let st = lab.status();
    println!(
        "lab {} up in {:.2} s: {} pods, {} services",
        st.instance,
        t0.elapsed().as_secs_f64(),
        st.pods.len(),
        st.services.len()
    );
    let prefix = st.prefix.clone();
    let ifnames: Vec<String> = st.pods.iter().map(|p| p.interface.clone()).collect();
    assert_eq!(st.nodes.len(), 2);
    assert!(st.nodes.iter().all(|n| n.netns_path.exists() && n.netns_inode != 0));
    assert_eq!(st.service("default/web").expect("web").backends.len(), 3);
    assert_eq!(st.service("default/big").expect("big").backends.len(), 50);

    // Healthy: every request to every Service with endpoints answers, TCP and UDP.
    for (svc, backends) in [("default/web", 3), ("default/healthy", 2), ("default/big", 50)] {
        let r = lab.traffic(svc, &traffic(200, 2, Proto::Tcp)).expect("traffic");
        println!(
            "{svc}: {} attempts, {} failures, {:.0}/s, p99 {:.2} ms",
            r.attempts, r.failures, r.achieved_rate, r.latency_ms_p99
        );
        assert_eq!(r.attempts, 400);
        assert_eq!(r.failures, 0, "{svc} healthy: {r:?}");
        if backends <= 3 {
            assert_eq!(
                r.successes_by_backend.len(),
                backends,
                "every backend of {svc} answered: {r:?}"
            );
        }
    }
    let udp = lab
        .traffic("default/web", &traffic(200, 2, Proto::Udp))
        .expect("udp traffic");
    assert_eq!(udp.failures, 0, "UDP healthy: {udp:?}");
    // DNS over UDP to kube-dns: both replicas (one per node) answer.
    let dns = lab
        .traffic("kube-system/kube-dns", &traffic(200, 2, Proto::Udp))
        .expect("dns traffic");
    assert_eq!(dns.failures, 0, "DNS healthy: {dns:?}");
    assert_eq!(dns.successes_by_backend.len(), 2, "both replicas answer: {dns:?}");
    // The "external" host, through the node's SNAT and the upstream router.
    let ext = lab
        .traffic_to(lab.external(), &traffic(200, 2, Proto::Tcp), TrafficShape::default())
        .expect("external traffic");
    assert_eq!(ext.failures, 0, "egress healthy: {ext:?}");
    assert_eq!(
        ext.successes_by_backend.keys().collect::<Vec<_>>(),
        vec![lab::EXTERNAL_WHO.split(' ').next().expect("who")],
        "{ext:?}"
    );
    // No endpoints: kube-proxy's REJECT in FORWARD.
    let empty = lab
        .traffic("default/empty", &traffic(100, 1, Proto::Tcp))
        .expect("traffic");
    assert_eq!(empty.successes, 0);

    // policy-drop: one of three backends behind a DROP rule on its node.
    let fault = lab
        .fault(&FaultRequest::new(FaultKind::PolicyDrop))
        .expect("policy-drop");
    let target = fault.backend.clone().expect("a backend");
    let r = lab
        .traffic("default/web", &traffic(200, 5, Proto::Tcp))
        .expect("traffic");
    let dropped = lab.fault_packets(&fault).expect("rule counter");
    println!(
        "policy-drop on {}@{}: {} of {} failed ({:.1} %), rule dropped {dropped} packets",
        target.pod,
        fault.node,
        r.failures,
        r.attempts,
        r.failure_ratio * 100.0
    );
    assert!(
        !r.successes_by_backend.contains_key(&target.pod),
        "the dropped backend never answers: {r:?}"
    );
    // One SYN per failed connection: the generator's timeout is below TCP's initial RTO.
    assert_eq!(
        r.failures, dropped,
        "generator failures vs the DROP rule's packet counter"
    );
    // Binomial(1000, 1/3): sd ≈ 15; ±5 sd.
    assert!((0.26..=0.41).contains(&r.failure_ratio), "about 1/3 fail: {r:?}");
    lab.clear(None).expect("clear");
    let r = lab
        .traffic("default/web", &traffic(200, 2, Proto::Tcp))
        .expect("traffic");
    assert_eq!(r.failures, 0, "cleared: {r:?}");

    // conntrack-insert: the client's flows to one backend fail at conntrack's insert on the
    // client's node, one insert_failed per failed flow.
    let fault = lab
        .fault(&FaultRequest::new(FaultKind::ConntrackInsert))
        .expect("conntrack-insert");
    let before = lab.conntrack_stat(&fault.node, "insert_failed").expect("ct stat");
    let r = lab
        .traffic("default/web", &traffic(200, 3, Proto::Tcp))
        .expect("traffic");
    let failed = lab.conntrack_stat(&fault.node, "insert_failed").expect("ct stat") - before;
    println!(
        "conntrack-insert on {}: {} of {} failed, insert_failed +{failed}",
        fault.node, r.failures, r.attempts
    );
    assert_eq!(
        r.failures, failed,
        "generator failures vs the kernel's insert_failed: {r:?}"
    );
    assert!((0.22..=0.45).contains(&r.failure_ratio), "about 1/3 fail: {r:?}");
    lab.clear(None).expect("clear");

    // kubectl through the API stand-in lists the lab's pods with their IPs and nodes.
    let out = netdrop_tools::tool("kubectl")
        .args([
            "--kubeconfig",
            &lab.kubeconfig().to_string_lossy(),
            "get",
            "pods",
            // Every namespace: the DNS replicas live in kube-system.
            "--all-namespaces",
            "-o",
            "json",
        ])
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("kubectl json");
    let got: BTreeSet<(String, String, String)> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            let s = |ptr: &str| p.pointer(ptr).and_then(|x| x.as_str()).unwrap_or_default().to_string();
            (s("/metadata/name"), s("/status/podIP"), s("/spec/nodeName"))
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = st
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.ip.to_string(), p.node.clone()))
        .collect();
    assert_eq!(got, want, "kubectl sees the lab's pods");

    let dir = lab.state_dir().to_path_buf();
    let t1 = std::time::Instant::now();
    drop(lab);
    println!("lab down in {:.2} s", t1.elapsed().as_secs_f64());
    let (ns, links) = leftovers(&prefix, &ifnames);
    assert!(ns.is_empty(), "namespaces left: {ns:?}");
    assert!(links.is_empty(), "links left in this namespace: {links:?}");
    assert!(!dir.exists(), "{} left", dir.display());
    assert_eq!(ct_max(), max_before);
}

/// A lab whose holder vanished without `down` (a crash) with conntrack-full active: `cleanup`
/// restores `nf_conntrack_max` from the saved state and removes every namespace.
#[test]
fn crashed_lab_is_cleaned_up_and_sysctl_restored() {
    require_root!("crashed_lab_is_cleaned_up_and_sysctl_restored");
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let max_before = ct_max();
    let opts = LabOptions {
        sizes: lab::topology::Sizes { big: 4 },
        ..LabOptions::for_test()
    };
    let lab = Lab::up(&opts).expect("lab up");
    let prefix = lab.names().prefix.clone();
    let ifnames: Vec<String> = lab.status().pods.iter().map(|p| p.interface.clone()).collect();
    // Whatever happens, the sysctl comes back (a guard of our own in case the lab code fails).
    let _restore = netdrop_tests::Sysctl::set("net.netfilter.nf_conntrack_max", &max_before);
    let f = lab
        .fault(&FaultRequest {
            max: Some(4096),
            ..FaultRequest::new(FaultKind::ConntrackFull)
        })
        .expect("conntrack-full");
    assert_eq!(f.sysctl.as_ref().map(|s| s.old.as_str()), Some(max_before.as_str()));
    assert_eq!(ct_max(), "4096");
    // The crash: no down, no drop.
    std::mem::forget(lab);
    let c = lab::cleanup(opts.instance.as_deref(), false);
    println!(
        "cleanup after the crash: {} namespaces, restored {:?}",
        c.namespaces.len(),
        c.sysctls_restored
    );
    assert_eq!(ct_max(), max_before, "nf_conntrack_max restored from the saved state");
    let (ns, links) = leftovers(&prefix, &ifnames);
    assert!(ns.is_empty(), "namespaces left: {ns:?}");
    assert!(links.is_empty(), "links left: {links:?}");
    assert!(!opts.state_dir().exists());
}
