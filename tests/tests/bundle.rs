//! `netdrop capture --bundle` on the lab's policy-drop fault:
//! - the tarball holds every node-state item for each node namespace, as the manifest says and
//!   as the files show: the fault node's `iptables-save -c` has the lab's DROP rule with a packet
//!   counter equal to the drops netdrop counted (and to the rule's own counter read by the lab);
//! - the secrets of a planted Calico CNI kubeconfig are redacted, the rest kept;
//! - every file is mode 0600, the tarball too;
//! - `netdrop report` on a copy elsewhere, as an unprivileged user without capabilities (no BPF,
//!   no cluster), prints the live run's diagnosis and summary; a cut or changed copy is refused
//!   in one line.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    time::Duration,
};

use netdrop_tests::{
    TraceOutput, Tracer,
    lab::{
        Lab, LabOptions, Status,
        faults::{FaultKind, FaultRequest},
        traffic::{TrafficOptions, TrafficReport},
    },
    require_root,
};
use serde_json::Value;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6Im5ldGRyb3AtdGVzdCJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl";
const KEY_DATA: &str = "LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLW5ldGRyb3A=";
const PASSWORD: &str = "hunter2-netdrop";

/// A CNI directory as Calico leaves it: the conflist, and the kubeconfig with the CNI plugin's
/// ServiceAccount token.
fn plant_cni(dir: &Path) {
    fs::create_dir_all(dir).expect("cni dir");
    fs::write(
        dir.join("10-calico.conflist"),
        format!(
            r#"{{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{{"type":"calico","datastore_type":"kubernetes","etcd_password":"{PASSWORD}","ipam":{{"type":"calico-ipam"}},"kubernetes":{{"kubeconfig":"/etc/cni/net.d/calico-kubeconfig"}}}},{{"type":"portmap","capabilities":{{"portMappings":true}}}}]}}"#
        ),
    )
    .expect("conflist");
    fs::write(
        dir.join("calico-kubeconfig"),
        format!(
            "# Kubeconfig file for Calico CNI plugin.\napiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://10.96.0.1:443\nusers:\n- name: calico\n  user:\n    token: {TOKEN}\n    client-key-data: {KEY_DATA}\ncontexts:\n- name: calico-context\n  context:\n    cluster: local\n    user: calico\ncurrent-context: calico-context\n"
        ),
    )
    .expect("kubeconfig");
}

/// The tarball's entries: name → (mode, bytes).
fn untar(path: &Path) -> Files {
    let f = fs::File::open(path).expect("open bundle");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut out = BTreeMap::new();
    for e in archive.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = e.path().expect("path").to_string_lossy().into_owned();
        let mode = e.header().mode().expect("mode");
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read entry");
        out.insert(name, (mode, data));
    }
    out
}

fn text(files: &Files, name: &str) -> String {
    let (_, data) = files
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing from the bundle"));
    String::from_utf8_lossy(data).into_owned()
}

/// `netdrop report` as nobody, every capability dropped: BPF is out of reach.
fn report_unprivileged(args: &[&str]) -> (bool, String, String) {
    let out = netdrop_tools::tool("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(netdrop_tests::netdrop_bin())
        .arg("report")
        .args(args)
        .output()
        .expect("setpriv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

type Files = BTreeMap<String, (u32, Vec<u8>)>;

/// Every item the manifest lists is in the archive with its size; every node namespace has every
/// item; the nodes' watched interfaces have their tc filters.
fn check_node_state(files: &Files, items: &[Value], st: &Status) {
    let mut slowest: Vec<(u64, &str)> = items
        .iter()
        .map(|i| {
            (
                i["duration_ms"].as_u64().unwrap_or(0),
                i["command"].as_str().unwrap_or(""),
            )
        })
        .collect();
    slowest.sort_unstable();
    println!(
        "{} items, {} ms in all; slowest: {:?}",
        items.len(),
        slowest.iter().map(|s| s.0).sum::<u64>(),
        &slowest[slowest.len().saturating_sub(3)..]
    );
    for it in items {
        let file = it["file"].as_str().expect("file");
        let (_, data) = files
            .get(file)
            .unwrap_or_else(|| panic!("{file} listed, not in the archive"));
        assert_eq!(it["bytes"].as_u64(), Some(data.len() as u64), "{file}'s size");
        if let Some(err) = it["stderr_file"].as_str() {
            assert!(files.contains_key(err), "{err}");
        }
        for key in ["command", "phase", "truncated", "timed_out", "duration_ms", "exit_code"] {
            assert!(it.get(key).is_some(), "{file} has no {key}: {it}");
        }
    }
    let labels: Vec<String> = std::iter::once("host".to_string())
        .chain(st.nodes.iter().map(|n| n.name.clone()))
        .collect();
    let item = |label: &str, name: &str| {
        items
            .iter()
            .find(|i| i["file"] == format!("netns/{label}/{name}.out"))
            .unwrap_or_else(|| panic!("no {name} for {label} in the manifest"))
    };
    for label in &labels {
        for name in netdrop::source::node_state::netns_items() {
            let it = item(label, name);
            if name == "ipvsadm" && !netdrop_tools::available("ipvsadm") {
                assert!(
                    it["error"].as_str().is_some_and(|e| e.contains("not installed")),
                    "{it}"
                );
                continue;
            }
            // Programs that ran; legacy iptables and IPv6 may have nothing to say, but they ran.
            assert!(it["exit_code"].is_i64(), "{label}/{name} did not run: {it}");
            if [
                "iptables-save",
                "nft-ruleset",
                "ip-addr",
                "ip-route",
                "conntrack-stats",
                "nstat",
                "sysctl",
            ]
            .contains(&name)
            {
                assert_eq!(it["exit_code"], 0, "{label}/{name}: {it}");
                // This machine's own namespace may have no rules; the lab's nodes have kube-proxy's.
                let rules = name == "iptables-save" || name == "nft-ruleset";
                if label != "host" || !rules {
                    assert!(it["bytes"].as_u64().unwrap_or(0) > 0, "{label}/{name} is empty: {it}");
                }
            }
        }
        assert!(
            items
                .iter()
                .any(|i| i["file"] == format!("start/netns/{label}/conntrack-stats.out") && i["exit_code"] == 0)
                && items
                    .iter()
                    .any(|i| i["file"] == format!("start/netns/{label}/nstat.out") && i["exit_code"] == 0),
            "the start's conntrack statistics and SNMP counters of {label}"
        );
    }
    // tc filters of the watched (cali*) interfaces of the nodes.
    for n in &st.nodes {
        for i in &n.workload_interfaces {
            for dir in ["ingress", "egress"] {
                let f = format!("netns/{}/tc-filter-{i}-{dir}.out", n.name);
                assert!(files.contains_key(&f), "{f}");
            }
        }
    }
    assert!(
        text(files, &format!("netns/{}/ip-addr.out", st.nodes[0].name)).contains(&st.nodes[0].underlay_ip.to_string())
    );
    assert!(text(files, "netns/host/sysctl.out").contains("net.ipv4.ip_forward"));
    assert!(text(files, "node/kernel.out").contains(&netdrop_tests::run("uname", &["-r"]).trim().to_string()));
    assert!(text(files, "node/btf.out").contains("present"));
    assert!(!text(files, "node/softnet_stat.out").is_empty());
}

/// The CNI directory: secrets gone, the rest kept.
fn check_cni(files: &Files, items: &[Value]) {
    let kc = text(files, "node/cni/calico-kubeconfig");
    let conf = text(files, "node/cni/10-calico.conflist");
    for secret in [TOKEN, KEY_DATA, PASSWORD] {
        assert!(
            !files.values().any(|(_, d)| String::from_utf8_lossy(d).contains(secret)),
            "{secret} leaked"
        );
    }
    assert!(
        kc.contains("    token: <redacted>") && kc.contains("client-key-data: <redacted>"),
        "{kc}"
    );
    assert!(kc.contains("server: https://10.96.0.1:443"), "{kc}");
    assert!(
        conf.contains(r#""etcd_password":"<redacted>""#) && conf.contains("calico-ipam"),
        "{conf}"
    );
    let redactions: u64 = items
        .iter()
        .filter(|i| i["file"].as_str().is_some_and(|f| f.starts_with("node/cni/")))
        .map(|i| i["redactions"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(redactions, 3);
}

/// `netdrop report` on a copy elsewhere, as nobody: the live run's diagnosis and summary; cut or
/// changed copies refused in one line.
fn check_offline_report(tgz: &Path, out: &TraceOutput, fault_node: &str) {
    // Offline: a copy elsewhere, read by nobody without capabilities.
    let elsewhere = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(elsewhere.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let copy = elsewhere.path().join("copy.tar.gz");
    fs::copy(tgz, &copy).expect("copy");
    nix::unistd::chown(&copy, Some(65534.into()), Some(65534.into())).expect("chown");
    let copy_s = copy.to_str().expect("utf-8");
    let (ok, stdout, stderr) = report_unprivileged(&[copy_s]);
    assert!(ok, "report as nobody: {stderr}");
    let diagnosis = out.summary["diagnosis"].as_array().expect("diagnosis");
    assert!(!diagnosis.is_empty());
    for d in diagnosis {
        let d = d.as_str().expect("line");
        assert!(
            stdout.contains(&format!("diagnosis: {d}\n")),
            "missing {d:?} in\n{stdout}"
        );
    }
    assert!(stdout.contains(&format!("netns {fault_node} ")), "{stdout}");
    println!("report:\n{stdout}");
    let (ok, json, stderr) = report_unprivileged(&["-o", "json", copy_s]);
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = json.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(lines[0], out.summary, "the same summary as the live run");
    assert_eq!(lines[1]["packets"].as_u64(), Some(out.drops.len() as u64));
    assert_eq!(lines[2]["type"], "bundle");

    // Cut, or one byte changed: one line, non-zero, no panic.
    let bytes = fs::read(&copy).expect("read copy");
    let cut = elsewhere.path().join("cut.tar.gz");
    fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let mut changed = bytes.clone();
    let mid = changed.len() / 2;
    changed[mid] ^= 0xff;
    let bad_copy = elsewhere.path().join("changed.tar.gz");
    fs::write(&bad_copy, &changed).expect("write");
    for p in [&cut, &bad_copy] {
        let (ok, _, err) = netdrop_tests::netdrop(&["report", p.to_str().expect("utf-8")]);
        assert!(!ok, "{} is an error", p.display());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("truncated or corrupted") && !err.contains("panicked"),
            "{err}"
        );
    }
}

/// The run's own files: its summary, events, attach report and capture; the Kubernetes objects.
fn check_run_files(files: &Files, out: &TraceOutput, pcap: &Path, bad_name: &str) {
    assert_eq!(
        serde_json::from_str::<Value>(&text(files, "summary.json")).expect("summary"),
        out.summary
    );
    let events: Vec<Value> = text(files, "events.ndjson")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .filter(|v: &Value| v["type"] == "drop")
        .collect();
    assert_eq!(events, out.drops, "the bundle's events are the run's");
    assert_eq!(
        serde_json::from_str::<Value>(&text(files, "attach.json")).expect("attach"),
        drop_summary(&out.summary)["attach"]
    );
    assert_eq!(files["capture.pcapng"].1, fs::read(pcap).expect("pcapng"));
    let kube: Value = serde_json::from_str(&text(files, "kube/objects.json")).expect("kube objects");
    assert!(
        kube["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|o| o["kind"] == "Pod" && o["metadata"]["name"] == bad_name),
        "the bad backend's pod is in the snapshot"
    );
}

/// `capture --svc default/web --bundle BUNDLE` over both lab nodes during 5 s of TCP requests;
/// returns the capture (still running, its last drops drained) and the generator's report.
fn bundle_capture(lab: &Lab, pcap: &Path, bundle: &Path, cni: &Path) -> (Tracer, TrafficReport) {
    let st = lab.status();
    let mut args: Vec<String> = vec![
        "--svc".into(),
        "default/web".into(),
        "--kubeconfig".into(),
        st.kubeconfig.display().to_string(),
        "--bundle".into(),
        bundle.display().to_string(),
        "--cni-dir".into(),
        cni.display().to_string(),
    ];
    for n in &st.nodes {
        args.push("--node-netns".into());
        args.push(format!("{}={}", n.name, n.netns_path.display()));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let capture = Tracer::start_capture(pcap, &refs);
    let opts = TrafficOptions::one_syn_per_request(Duration::from_secs(5));
    let traffic = lab
        .traffic("default/web", &opts)
        .unwrap_or_else(|e| panic!("traffic: {e}"));
    std::thread::sleep(Duration::from_millis(1200));
    (capture, traffic)
}

fn drop_summary(s: &Value) -> &Value {
    if s["detail"].is_object() { &s["detail"] } else { s }
}

#[test]
fn policy_drop_bundle_holds_the_node_state_and_reports_offline() {
    require_root!("policy_drop_bundle_holds_the_node_state_and_reports_offline");
    let lab = Lab::up(&LabOptions::for_test()).unwrap_or_else(|e| panic!("lab up: {e}"));
    let fault = lab.fault(&FaultRequest::new(FaultKind::PolicyDrop)).expect("fault");
    let bad = fault.backend.clone().expect("targets a backend");
    let tmp = tempfile::tempdir().expect("temp dir");
    let cni = tmp.path().join("cni");
    plant_cni(&cni);
    let pcap = tmp.path().join("incident.pcapng");
    let tgz = tmp.path().join("incident.tar.gz");

    let st = lab.status();
    let (capture, traffic) = bundle_capture(&lab, &pcap, &tgz, &cni);
    let started = std::time::Instant::now();
    let out: TraceOutput = capture.stop();
    let stop_secs = started.elapsed().as_secs_f64();
    let rule = lab.fault_packets(&fault).expect("rule counter");
    let bundle_line = out
        .stderr
        .iter()
        .find(|l| l.starts_with("netdrop: bundle "))
        .unwrap_or_else(|| panic!("no bundle line: {:#?}", out.stderr));
    println!("generator {traffic:?}; rule {rule}; {bundle_line}; stop took {stop_secs:.1} s");
    assert!(rule > 0, "the fault dropped packets");
    let bad_name = bad.pod.split('/').nth(1).expect("ns/name");
    let counted = out
        .drops
        .iter()
        .filter(|e| e["reason"] == "NETFILTER_DROP" && e["dst"]["pod"] == bad_name)
        .count() as u64;
    assert_eq!(
        counted, rule,
        "netdrop's events for the bad backend = the DROP rule's counter"
    );

    // The tarball, and every file in it, 0600.
    let meta = fs::metadata(&tgz).expect("bundle written");
    assert_eq!(meta.mode() & 0o777, 0o600, "the tarball's mode");
    assert!(
        !tgz.with_extension("gz.events.tmp").exists(),
        "the temporary events file is gone"
    );
    let files = untar(&tgz);
    for (name, (mode, _)) in &files {
        assert_eq!(*mode, 0o600, "{name}'s mode");
    }
    println!(
        "bundle: {} bytes compressed, {} files, {} bytes uncompressed",
        meta.len(),
        files.len(),
        files.values().map(|f| f.1.len()).sum::<usize>()
    );

    // The manifest lists every item of every node namespace, with its file in the archive.
    let manifest: Value = serde_json::from_str(&text(&files, "manifest.json")).expect("manifest JSON");
    let items = manifest["items"].as_array().expect("items");
    check_node_state(&files, items, &st);

    // The fault node's iptables-save: the DROP rule with the count netdrop saw.
    let saved = text(&files, &format!("netns/{}/iptables-save.out", fault.node));
    let comment = &fault.rules[0].comment;
    let line = saved
        .lines()
        .find(|l| l.contains(comment.as_str()) && l.contains("-j DROP"))
        .unwrap_or_else(|| panic!("no DROP rule with {comment:?} in\n{saved}"));
    let packets: u64 = line
        .strip_prefix('[')
        .and_then(|l| l.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line}"));
    assert_eq!(packets, counted, "iptables-save -c's counter = netdrop's drops: {line}");

    check_cni(&files, items);

    check_run_files(&files, &out, &pcap, bad_name);
    check_offline_report(&tgz, &out, &fault.node);
}

/// A backend not listening: its NO_SOCKET drops are in the pod's own namespace, which no flag
/// names: the bundle finds it by inode and collects it too. `--bundle DIR/`: a directory, 0700,
/// its files 0600, which `netdrop report` reads as it reads a tarball.
#[test]
fn not_listening_bundle_directory_has_the_pods_namespace() {
    require_root!("not_listening_bundle_directory_has_the_pods_namespace");
    let lab = Lab::up(&LabOptions::for_test()).unwrap_or_else(|e| panic!("lab up: {e}"));
    let fault = lab.fault(&FaultRequest::new(FaultKind::NotListening)).expect("fault");
    let bad = fault.backend.clone().expect("targets a backend");
    let st = lab.status();
    let pod = st
        .pods
        .iter()
        .find(|p| format!("{}/{}", p.namespace, p.name) == bad.pod)
        .unwrap_or_else(|| panic!("{} not in the lab's status", bad.pod));
    let tmp = tempfile::tempdir().expect("temp dir");
    let cni = tmp.path().join("no-cni-here");
    let pcap = tmp.path().join("incident.pcapng");
    let dir = tmp.path().join("bundle/");
    let (capture, traffic) = bundle_capture(&lab, &pcap, &dir, &cni);
    let out = capture.stop();
    assert!(traffic.failures > 0, "{traffic:?}");
    let in_pod = out
        .drops
        .iter()
        .filter(|e| e["reason"] == "NO_SOCKET" && e["netns"].as_u64() == Some(pod.netns_inode))
        .count() as u64;
    assert_eq!(
        in_pod, traffic.failures,
        "one NO_SOCKET in the pod's namespace per refused request"
    );

    assert_eq!(fs::metadata(&dir).expect("bundle dir").mode() & 0o777, 0o700);
    let manifest: Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).expect("manifest")).expect("JSON");
    let label = format!("netns-{}", pod.netns_inode);
    let ns = manifest["namespaces"]
        .as_array()
        .expect("namespaces")
        .iter()
        .find(|n| n["label"] == label.as_str())
        .unwrap_or_else(|| panic!("the pod's namespace {label} is not in {}", manifest["namespaces"]));
    assert_eq!(ns["why"], "drops were seen in it");
    let items = manifest["items"].as_array().expect("items");
    for name in netdrop::source::node_state::netns_items() {
        let file = format!("netns/{label}/{name}.out");
        let it = items
            .iter()
            .find(|i| i["file"] == file.as_str())
            .unwrap_or_else(|| panic!("no {file} in the manifest"));
        let meta = fs::metadata(dir.join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.mode() & 0o777, 0o600, "{file}");
        assert_eq!(it["bytes"].as_u64(), Some(meta.len()), "{file}");
    }
    // The pod's own address, seen from inside its namespace.
    let addr = fs::read_to_string(dir.join(format!("netns/{label}/ip-addr.out"))).expect("ip-addr");
    assert!(addr.contains(&pod.ip.to_string()), "{addr}");
    // No CNI directory: one item says so.
    let none = fs::read_to_string(dir.join("node/cni/.none")).expect("the CNI note");
    assert!(none.contains("no CNI configuration"), "{none}");

    // The Kubernetes objects replay offline: the backend's address resolves to its pod.
    let snapshot = dir.join("kube/objects.json");
    let ip = pod.ip.to_string();
    let (ok, resolved, stderr) = netdrop_tests::netdrop(&[
        "resolve",
        "-o",
        "json",
        "--kube-snapshot",
        snapshot.to_str().expect("utf-8"),
        &ip,
    ]);
    assert!(ok, "{stderr}");
    assert!(
        resolved.contains(&format!("\"{}\"", pod.name)) && resolved.contains(&pod.node),
        "{ip} in the bundle's snapshot: {resolved}"
    );

    let (ok, stdout, stderr) = netdrop_tests::netdrop(&["report", dir.to_str().expect("utf-8")]);
    assert!(ok, "{stderr}");
    for d in out.summary["diagnosis"].as_array().expect("diagnosis") {
        let d = d.as_str().expect("line");
        assert!(
            stdout.contains(&format!("diagnosis: {d}\n")),
            "missing {d:?} in\n{stdout}"
        );
    }
    assert!(stdout.contains(&format!("netns {label} ")), "{stdout}");
}
