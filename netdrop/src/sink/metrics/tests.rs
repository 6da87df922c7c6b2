use std::time::{Duration, Instant};

use super::*;
use crate::{
    aggregate::{
        attach::{AttachHook, Program},
        node_metrics::{ConntrackCounts, DropSeries, HookInUse, LostSeries, LostSource, ServiceSeries},
    },
    enrich::classify::Classification,
    kernel::reasons::Reason,
};

fn reason(name: &str) -> Reason {
    Reason::Named {
        code: 3,
        name: name.into(),
    }
}

fn node_drop(name: &str, classification: Classification, count: u64) -> DropSeries {
    DropSeries {
        owner: DropOwner::Node,
        reason: name.into(),
        classification,
        count,
    }
}

fn pod_drop(ns: &str, workload: &str, pod: &str, count: u64) -> DropSeries {
    DropSeries {
        owner: DropOwner::Pod {
            namespace: ns.into(),
            workload: workload.into(),
            pod: pod.into(),
        },
        reason: "NO_SOCKET".into(),
        classification: Classification::Reason(reason("NO_SOCKET")),
        count,
    }
}

fn small() -> NodeMetrics {
    NodeMetrics {
        node: "node-a".into(),
        drops: vec![node_drop("NETFILTER_DROP", Classification::NetfilterRule, 3)],
        interfaces_attached: 2,
        ready: true,
        ..NodeMetrics::default()
    }
}

fn state(opts: MetricsOptions) -> MetricsState {
    MetricsState::new(opts, "0.1.0")
}

/// The series lines of one family (`name{...} value`), in exposition order.
fn samples(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .map(String::from)
        .collect()
}

#[test]
fn a_small_snapshot_in_both_formats() {
    let mut s = state(MetricsOptions::default());
    s.update(&small(), Instant::now());
    let drops_help = "Drops on this node by the pod they belong to (empty pod_namespace and workload: the node itself), the kernel's reason and netdrop's classification.";
    let drop_line =
        r#"{node="node-a",pod_namespace="",workload="",reason="NETFILTER_DROP",classification="netfilter_rule"} 3"#;
    let stale_help = "Scrapes served from the previous snapshot because the agent did not answer in time.";
    let overflow_help =
        "Label sets beyond the per-family cap, whose values went into the family's overflow series (labels _overflow).";
    let overflow_lines = [
        "netdrop_drops_total",
        "netdrop_service_drops_total",
        "netdrop_service_attempts_total",
        "netdrop_lost_events_total",
    ]
    .map(|f| format!("netdrop_series_overflow_total{{node=\"node-a\",family=\"{f}\"}} 0\n"))
    .concat();
    let classic = format!(
        "# HELP netdrop_build_info The running netdrop version (value 1).
# TYPE netdrop_build_info gauge
netdrop_build_info{{version=\"0.1.0\"}} 1
# HELP netdrop_drops_total {drops_help}
# TYPE netdrop_drops_total counter
netdrop_drops_total{drop_line}
# HELP netdrop_interfaces_attached Workload interfaces with tc counters attached.
# TYPE netdrop_interfaces_attached gauge
netdrop_interfaces_attached{{node=\"node-a\"}} 2
# HELP netdrop_ready 1 when the programs are attached and the Kubernetes caches synced (what /readyz says).
# TYPE netdrop_ready gauge
netdrop_ready{{node=\"node-a\"}} 1
# HELP netdrop_series_overflow_total {overflow_help}
# TYPE netdrop_series_overflow_total counter
{overflow_lines}# HELP netdrop_stale_scrapes_total {stale_help}
# TYPE netdrop_stale_scrapes_total counter
netdrop_stale_scrapes_total{{node=\"node-a\"}} 0
"
    );
    assert_eq!(s.encode(Exposition::Classic), classic);
    let openmetrics = format!(
        "# HELP netdrop_build The running netdrop version (value 1).
# TYPE netdrop_build info
netdrop_build_info{{version=\"0.1.0\"}} 1
# HELP netdrop_drops {drops_help}
# TYPE netdrop_drops counter
netdrop_drops_total{drop_line}
# HELP netdrop_interfaces_attached Workload interfaces with tc counters attached.
# TYPE netdrop_interfaces_attached gauge
netdrop_interfaces_attached{{node=\"node-a\"}} 2
# HELP netdrop_ready 1 when the programs are attached and the Kubernetes caches synced (what /readyz says).
# TYPE netdrop_ready gauge
netdrop_ready{{node=\"node-a\"}} 1
# HELP netdrop_series_overflow {overflow_help}
# TYPE netdrop_series_overflow counter
{overflow_lines}# HELP netdrop_stale_scrapes {stale_help}
# TYPE netdrop_stale_scrapes counter
netdrop_stale_scrapes_total{{node=\"node-a\"}} 0
# EOF
"
    );
    assert_eq!(s.encode(Exposition::OpenMetrics), openmetrics);
}

#[test]
fn before_the_first_snapshot_only_the_build_info() {
    let s = state(MetricsOptions::default());
    assert_eq!(
        s.encode(Exposition::Classic),
        "# HELP netdrop_build_info The running netdrop version (value 1).\n# TYPE netdrop_build_info gauge\nnetdrop_build_info{version=\"0.1.0\"} 1\n"
    );
}

#[test]
fn a_pods_series_stays_for_gone_after_then_goes() {
    let opts = MetricsOptions {
        gone_after: Duration::from_mins(1),
        ..MetricsOptions::default()
    };
    let mut s = state(opts);
    let t0 = Instant::now();
    let mut m = small();
    m.drops.push(pod_drop("default", "Deployment/web", "web-1", 5));
    m.drops.push(pod_drop("default", "Deployment/api", "api-1", 7));
    s.update(&m, t0);
    let web = r#"netdrop_drops_total{node="node-a",pod_namespace="default",workload="Deployment/web",reason="NO_SOCKET",classification="no_socket"}"#;
    let api = r#"netdrop_drops_total{node="node-a",pod_namespace="default",workload="Deployment/api",reason="NO_SOCKET",classification="no_socket"}"#;
    assert!(s.encode(Exposition::Classic).contains(&format!("{web} 5\n")));
    // web-1 is gone; api-1 goes on counting.
    m.drops
        .retain(|d| !matches!(&d.owner, DropOwner::Pod { pod, .. } if pod == "web-1"));
    m.drops[1].count = 9;
    for (after, web_shown) in [(1, true), (30, true), (59, true), (60, false), (90, false)] {
        s.update(&m, t0 + Duration::from_secs(after));
        let text = s.encode(Exposition::Classic);
        assert_eq!(
            text.contains(&format!("{web} 5\n")),
            web_shown,
            "{after} s after web-1's last snapshot: {text}"
        );
        assert!(text.contains(&format!("{api} 9\n")), "{after} s: {text}");
    }
    // It comes back: a new series from its running total.
    m.drops.push(pod_drop("default", "Deployment/web", "web-1", 6));
    s.update(&m, t0 + Duration::from_secs(91));
    assert!(s.encode(Exposition::Classic).contains(&format!("{web} 6\n")));
}

#[test]
fn a_workload_series_sums_its_pods_and_does_not_drop_when_one_goes() {
    let mut s = state(MetricsOptions::default());
    let t0 = Instant::now();
    let web = r#"netdrop_drops_total{node="node-a",pod_namespace="default",workload="Deployment/web",reason="NO_SOCKET",classification="no_socket"}"#;
    let mut m = small();
    m.drops.push(pod_drop("default", "Deployment/web", "web-1", 5));
    m.drops.push(pod_drop("default", "Deployment/web", "web-2", 4));
    s.update(&m, t0);
    assert_eq!(
        samples(&s.encode(Exposition::Classic), "netdrop_drops_total")[1],
        format!("{web} 9")
    );
    // web-2 is deleted; web-1 counts on.
    m.drops.pop();
    m.drops[1].count = 6;
    for after in [10, 61, 200] {
        s.update(&m, t0 + Duration::from_secs(after));
        assert_eq!(
            samples(&s.encode(Exposition::Classic), "netdrop_drops_total")[1],
            format!("{web} 10"),
            "{after} s: web-2's 4 stay in the workload's total"
        );
    }
    // web-1 is recreated under its name (a StatefulSet's pod): its new total counts on top.
    m.drops[1].count = 2;
    s.update(&m, t0 + Duration::from_secs(201));
    assert_eq!(
        samples(&s.encode(Exposition::Classic), "netdrop_drops_total")[1],
        format!("{web} 12")
    );
    // With pod names: one series per pod, labelled pod_name.
    let mut s = state(MetricsOptions {
        pod_names: true,
        ..MetricsOptions::default()
    });
    m.drops[1].count = 6;
    m.drops.push(pod_drop("default", "Deployment/web", "web-2", 4));
    s.update(&m, t0);
    assert_eq!(
        samples(&s.encode(Exposition::Classic), "netdrop_drops_total")[1..],
        [
            r#"netdrop_drops_total{node="node-a",pod_namespace="default",workload="Deployment/web",pod_name="web-1",reason="NO_SOCKET",classification="no_socket"} 6"#,
            r#"netdrop_drops_total{node="node-a",pod_namespace="default",workload="Deployment/web",pod_name="web-2",reason="NO_SOCKET",classification="no_socket"} 4"#,
        ]
    );
}

#[test]
fn beyond_the_cap_label_sets_go_to_one_counted_overflow_series() {
    let mut s = state(MetricsOptions {
        max_series_per_family: 3,
        gone_after: Duration::from_mins(1),
        ..MetricsOptions::default()
    });
    let t0 = Instant::now();
    let mut m = small(); // the node's own series is one of the 3
    for i in 0..5 {
        m.drops.push(pod_drop(
            "default",
            &format!("Deployment/w{i}"),
            &format!("w{i}-a"),
            10 + i,
        ));
    }
    s.update(&m, t0);
    let text = s.encode(Exposition::Classic);
    let drops = samples(&text, "netdrop_drops_total");
    let overflow = r#"netdrop_drops_total{node="node-a",pod_namespace="_overflow",workload="_overflow",reason="_overflow",classification="_overflow"}"#;
    assert_eq!(drops.len(), 4, "3 admitted + the overflow series: {text}");
    // First come, first served: the node's series and w0, w1 are in; w2..w4 (12+13+14) are not.
    assert!(
        drops[1].contains(r#"workload="Deployment/w0""#) && drops[2].contains(r#"workload="Deployment/w1""#),
        "{text}"
    );
    assert_eq!(drops[3], format!("{overflow} 39"));
    assert_eq!(
        samples(&text, "netdrop_series_overflow_total")[0],
        r#"netdrop_series_overflow_total{node="node-a",family="netdrop_drops_total"} 3"#
    );
    // w0 goes; w3 counts on; a new workload takes w0's place; w3 stays in the overflow series.
    m.drops.remove(1);
    m.drops[3].count = 20; // w3: 13 -> 20
    s.update(&m, t0 + Duration::from_secs(61));
    m.drops.push(pod_drop("default", "Deployment/w5", "w5-a", 1));
    s.update(&m, t0 + Duration::from_secs(62));
    let text = s.encode(Exposition::Classic);
    let drops = samples(&text, "netdrop_drops_total");
    assert_eq!(drops.len(), 4, "{text}");
    assert!(drops[2].contains(r#"workload="Deployment/w5""#), "{text}");
    assert_eq!(drops[3], format!("{overflow} 46"), "12 + 20 + 14: {text}");
    // w2 goes too: the overflow series keeps what it counted (a counter does not go down).
    m.drops
        .retain(|d| !matches!(&d.owner, DropOwner::Pod { pod, .. } if pod == "w2-a"));
    s.update(&m, t0 + Duration::from_secs(200));
    m.drops.push(pod_drop("default", "Deployment/w6", "w6-a", 2));
    s.update(&m, t0 + Duration::from_secs(201));
    let text = s.encode(Exposition::Classic);
    assert_eq!(
        samples(&text, "netdrop_drops_total")[3],
        format!("{overflow} 48"),
        "{text}"
    );
    assert!(!text.contains("Deployment/w2"), "{text}");
    assert_eq!(
        samples(&text, "netdrop_series_overflow_total")[0],
        r#"netdrop_series_overflow_total{node="node-a",family="netdrop_drops_total"} 4"#,
        "w6 overflowed too (w2 had left room among the overflowed, not the admitted)"
    );
}

#[test]
fn a_total_that_goes_down_is_a_new_source_and_the_series_stays_monotonic() {
    let mut s = state(MetricsOptions::default());
    let t0 = Instant::now();
    let mut m = small();
    m.lost_events = vec![LostSeries {
        source: LostSource::Ring,
        count: 10,
    }];
    let lost = r#"netdrop_lost_events_total{node="node-a",source="ring"}"#;
    // 10, then a reset to 7 (the old 10 kept), 9, 12: the series counts 10 + 12.
    for (i, (count, shown)) in [(10, 10), (7, 17), (9, 19), (12, 22)].into_iter().enumerate() {
        m.lost_events[0].count = count;
        m.drops[0].count = count;
        s.update(&m, t0 + Duration::from_secs(i as u64));
        let text = s.encode(Exposition::Classic);
        assert_eq!(samples(&text, "netdrop_lost_events_total"), [format!("{lost} {shown}")]);
        assert!(
            samples(&text, "netdrop_drops_total")[0].ends_with(&format!(" {shown}")),
            "{text}"
        );
    }
}

#[test]
fn label_values_are_escaped() {
    let mut s = state(MetricsOptions::default());
    let mut m = small();
    m.drops = vec![pod_drop("default", "Job/a\"b\\c\nd", "x", 1)];
    s.update(&m, Instant::now());
    for f in [Exposition::Classic, Exposition::OpenMetrics] {
        let text = s.encode(f);
        assert!(text.contains(r#"workload="Job/a\"b\\c\nd","#), "{f:?}: {text}");
    }
}

#[test]
fn the_accept_header_chooses_the_format() {
    // Prometheus 2.42 (Debian 12) and 3.x.
    for accept in [
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
        "application/openmetrics-text",
    ] {
        assert_eq!(
            Exposition::from_accept(Some(accept)),
            Exposition::OpenMetrics,
            "{accept}"
        );
    }
    for accept in [
        None,
        Some("text/plain"),
        Some("*/*"),
        Some("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"),
        Some("application/openmetrics-text;q=0"),
        Some("garbage;;q=x,"),
    ] {
        assert_eq!(Exposition::from_accept(accept), Exposition::Classic, "{accept:?}");
    }
}

/// What an agent on a busy node exports: every family, pods and Services.
fn realistic() -> NodeMetrics {
    let mut drops = vec![
        node_drop("NETFILTER_DROP", Classification::InsertFailed, 17),
        node_drop("NETFILTER_DROP", Classification::NetfilterRule, 120),
        node_drop("NO_SOCKET", Classification::Reason(reason("NO_SOCKET")), 3),
        node_drop("TCP_OLD_DATA", Classification::Reason(reason("TCP_OLD_DATA")), 41),
    ];
    for i in 0..20 {
        drops.push(pod_drop(
            "shop",
            &format!("Deployment/svc-{}", i % 7),
            &format!("svc-{i}"),
            i * 3,
        ));
    }
    drops.push(DropSeries {
        owner: DropOwner::Pod {
            namespace: "kube-system".into(),
            workload: "DaemonSet/kube-proxy".into(),
            pod: "kube-proxy-x2".into(),
        },
        reason: "NETFILTER_DROP".into(),
        classification: Classification::TableFull,
        count: 12,
    });
    NodeMetrics {
        node: "node-a".into(),
        drops,
        services: vec![
            ServiceSeries {
                service_namespace: "default".into(),
                service: "web".into(),
                backend_pod: "default/web-2".into(),
                backend_node: "node-b".into(),
                drops: 152,
                attempts: 500,
            },
            ServiceSeries {
                service_namespace: "default".into(),
                service: "web".into(),
                backend_pod: String::new(),
                backend_node: String::new(),
                drops: 2,
                attempts: 0,
            },
        ],
        conntrack: Some(ConntrackCounts {
            entries: 1800,
            max: 262_144,
            insert_failed: 17,
            drop: 12,
            early_drop: 4,
            invalid: 90,
            clash_resolve: 33,
        }),
        lost_events: vec![
            LostSeries {
                source: LostSource::Ring,
                count: 5,
            },
            LostSeries {
                source: LostSource::RateLimit,
                count: 1000,
            },
            LostSeries {
                source: LostSource::CounterMapFull,
                count: 0,
            },
        ],
        interfaces_attached: 23,
        hooks: vec![
            HookInUse {
                program: Program::KfreeSkb,
                hook: AttachHook::TpBtf,
            },
            HookInUse {
                program: Program::Conntrack,
                hook: AttachHook::Inferred,
            },
            HookInUse {
                program: Program::Tc,
                hook: AttachHook::Tcx,
            },
        ],
        ready: true,
    }
}

#[test]
fn every_family_of_the_contract_is_there() {
    let mut s = state(MetricsOptions {
        max_series_per_family: 10,
        ..MetricsOptions::default()
    });
    s.update(&realistic(), Instant::now());
    s.stale_scrape();
    let text = s.encode(Exposition::Classic);
    for (name, series) in [
        ("netdrop_build_info", 1),
        ("netdrop_drops_total", 11), // the cap, + the overflow series
        ("netdrop_service_drops_total", 2),
        ("netdrop_service_attempts_total", 2),
        ("netdrop_conntrack_entries", 1),
        ("netdrop_conntrack_max", 1),
        ("netdrop_conntrack_insert_failed_total", 1),
        ("netdrop_conntrack_drop_total", 1),
        ("netdrop_conntrack_early_drop_total", 1),
        ("netdrop_conntrack_invalid_total", 1),
        ("netdrop_conntrack_clash_resolve_total", 1),
        ("netdrop_lost_events_total", 3),
        ("netdrop_interfaces_attached", 1),
        ("netdrop_hook_info", 3),
        ("netdrop_ready", 1),
        ("netdrop_series_overflow_total", 4),
        ("netdrop_stale_scrapes_total", 1),
    ] {
        assert_eq!(samples(&text, name).len(), series, "{name}: {text}");
    }
    assert_eq!(
        samples(&text, "netdrop_hook_info")[0],
        r#"netdrop_hook_info{node="node-a",program="kfree_skb",hook="tp_btf"} 1"#
    );
    assert_eq!(
        samples(&text, "netdrop_stale_scrapes_total"),
        [r#"netdrop_stale_scrapes_total{node="node-a"} 1"#]
    );
    for banned in ["namespace=", "pod=", "job=", "instance="] {
        assert!(
            !text.contains(&format!("{{{banned}")) && !text.contains(&format!(",{banned}")),
            "{banned}: {text}"
        );
    }
}

/// Debian 12's promtool reads the classic format only; it lints names, types and help.
#[test]
fn promtool_accepts_the_classic_output() {
    if !netdrop_tools::available("promtool") {
        println!(
            "skipping: promtool_accepts_the_classic_output: promtool is not installed (apt-get install prometheus)"
        );
        return;
    }
    let mut s = state(MetricsOptions {
        pod_names: true,
        max_series_per_family: 10,
        ..MetricsOptions::default()
    });
    s.update(&realistic(), Instant::now());
    let text = s.encode(Exposition::Classic);
    assert!(samples(&text, "netdrop_drops_total").len() > 5, "{text}");
    let out = netdrop_tools::filter("promtool", &["check", "metrics"], text.as_bytes());
    assert_eq!(String::from_utf8_lossy(&out), "", "promtool says: {text}");
}
