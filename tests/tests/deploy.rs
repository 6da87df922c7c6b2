//! deploy/ checked as CI runs it: the Kustomize base and the Operator overlay render, validate
//! against the Kubernetes schemas offline (`kubernetes-validate`), pass `checkov` with every
//! remaining finding skipped by a justified annotation, and keep the agent's contract (the
//! DaemonSet, the ClusterRole against the resolver's kinds); the alerts pass `promtool check
//! rules` and `promtool test rules`, and the PrometheusRule carries the same groups as the rules
//! file. No root, no cluster: the tools run on files. They come from `cargo xtask setup`
//! (netdrop-tools: Debian `kubectl`, `prometheus`; PyPI `kubernetes-validate`, `checkov` in the
//! project's venv).

use std::{collections::BTreeSet, path::Path};

use netdrop::resolve::Kind;
use netdrop_tests::deploy::{self, documents, object, render};
use serde_json::Value;

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().expect("kind").to_owned())
        .collect()
}

#[test]
fn base_and_overlay_render() {
    let base = documents(&render("base"));
    assert_eq!(
        kinds(&base),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Namespace",
            "Service",
            "ServiceAccount"
        ]
        .map(String::from)
        .into(),
        "the base applies without the Prometheus Operator's CRDs"
    );
    for d in &base {
        let cluster_scoped =
            ["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&d["kind"].as_str().unwrap_or(""));
        if !cluster_scoped {
            assert_eq!(d["metadata"]["namespace"], "netdrop", "{}", d["kind"]);
        }
    }
    let operator = documents(&render("overlays/operator"));
    let mut expected = kinds(&base);
    expected.extend(["PodMonitor".to_owned(), "PrometheusRule".to_owned()]);
    assert_eq!(kinds(&operator), expected);
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = tmp.path().join("base.yaml");
    std::fs::write(&good, render("base")).expect("write");
    let good = good.display().to_string();
    // The oldest Kubernetes still supported upstream that has every field used, and the newest
    // the validator knows.
    for version in ["1.30.0", "1.37.0"] {
        let out = netdrop_tools::tool("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version, &good])
            .output()
            .expect("kubernetes-validate");
        assert!(
            out.status.success(),
            "deploy/base does not validate against Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The validator bites: a misspelt field in the pod spec is refused.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, render("base").replace("hostPID: true", "hostPid: true")).expect("write");
    let out = netdrop_tools::tool("kubernetes-validate")
        .args(["--strict", "--quiet", &bad.display().to_string()])
        .output()
        .expect("kubernetes-validate");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("hostPid"), "{text}");
}

#[test]
fn checkov_has_no_unjustified_finding() {
    // Not a hidden directory (`/tmp/.tmpXXXX`): checkov skips those.
    let tmp = tempfile::Builder::new()
        .prefix("netdrop-checkov-")
        .tempdir()
        .expect("tempdir");
    // The overlay: the base plus the Operator's objects.
    std::fs::write(tmp.path().join("netdrop.yaml"), render("overlays/operator")).expect("write");
    let out = netdrop_tools::tool("checkov")
        .args(["--framework", "kubernetes", "--compact", "-o", "json"])
        // Offline: no guideline download (this machine and CI reach no vendor API).
        .arg("--skip-download")
        .arg("-d")
        .arg(tmp.path())
        .output()
        .expect("checkov");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov did not print JSON ({e}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let summary = &report["summary"];
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("{} {} ({})", c["check_id"], c["check_name"], c["resource"]))
        .collect();
    assert!(
        failed.is_empty(),
        "checkov findings (fix them, or skip each with a `checkov.io/skipN: ID=why` annotation):\n{}",
        failed.join("\n")
    );
    assert_eq!(summary["parsing_errors"], 0, "{summary}");
    assert!(summary["resource_count"].as_u64().unwrap_or(0) >= 8, "{summary}");
    assert!(summary["passed"].as_u64().unwrap_or(0) > 50, "{summary}");
    // Every skip says why, in words.
    for s in report["results"]["skipped_checks"].as_array().into_iter().flatten() {
        let why = s["check_result"]["suppress_comment"].as_str().unwrap_or("");
        assert!(
            why.split_whitespace().count() >= 5,
            "{} skipped without a reason: {why:?}",
            s["check_id"]
        );
    }
}

#[test]
fn alerts_check_and_pass_their_unit_tests() {
    let alerts = deploy::dir().join("alerts");
    let rules = alerts.join("netdrop.rules.yml").display().to_string();
    let out = netdrop_tools::tool("promtool")
        .args(["check", "rules", &rules])
        .output()
        .expect("promtool");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = netdrop_tools::tool("promtool")
        .args(["test", "rules", "netdrop.rules.test.yml"])
        .current_dir(&alerts)
        .output()
        .expect("promtool");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");

    // Every alert has a test case that expects it to fire.
    let rule_docs = documents(&std::fs::read_to_string(&rules).expect("rules"));
    let tests = std::fs::read_to_string(alerts.join("netdrop.rules.test.yml")).expect("tests");
    let test_doc = &documents(&tests)[0];
    let fired: BTreeSet<&str> = test_doc["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str())
        .collect();
    let alerts_defined: BTreeSet<&str> = rule_docs[0]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts_defined.len() >= 6, "{alerts_defined:?}");
    assert_eq!(fired, alerts_defined, "every alert needs a firing test case");
    // Each alert's text names where to look and the next command.
    for g in rule_docs[0]["groups"].as_array().expect("groups") {
        for r in g["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["alert"].is_string())
        {
            let d = r["annotations"]["description"].as_str().unwrap_or("");
            assert!(d.contains("Next:") && d.contains('`'), "{}: {d}", r["alert"]);
        }
    }
}

#[test]
fn prometheusrule_carries_the_rules_file() {
    let dir = deploy::dir();
    let rules = documents(&std::fs::read_to_string(dir.join("alerts/netdrop.rules.yml")).expect("rules"));
    let pr_path = dir.join("components/prometheusrule/prometheusrule.yaml");
    let pr = documents(&std::fs::read_to_string(&pr_path).expect("PrometheusRule"));
    assert_eq!(pr[0]["kind"], "PrometheusRule");
    assert!(
        pr[0]["spec"]["groups"] == rules[0]["groups"],
        "{} differs from deploy/alerts/netdrop.rules.yml: regenerate it (the command is in its header)",
        pr_path.display()
    );
}

#[test]
fn daemonset_keeps_the_agent_contract() {
    let docs = documents(&render("base"));
    let ns = object(&docs, "Namespace");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let ds = object(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["serviceAccountName"], "netdrop");
    assert_eq!(pod["tolerations"], serde_json::json!([{"operator": "Exists"}]));
    let c = &pod["containers"][0];
    assert_eq!(
        c["args"],
        serde_json::json!(["agent", "--node-name=$(NODE_NAME)", "--listen=0.0.0.0:9965"])
    );
    assert_eq!(c["env"][0]["name"], "NODE_NAME");
    assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(c["ports"][0]["containerPort"], 9965);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(c["resources"]["limits"]["memory"].is_string() && c["resources"]["requests"]["cpu"].is_string());
    // Every added capability is explained where it is granted.
    let text = std::fs::read_to_string(deploy::dir().join("base/daemonset.yaml")).expect("daemonset");
    for cap in deploy::daemonset_capabilities() {
        let line = text
            .lines()
            .position(|l| l.trim() == format!("- {cap}"))
            .unwrap_or_else(|| panic!("{cap} not listed on its own line"));
        let comment = text.lines().nth(line - 1).unwrap_or("");
        assert!(comment.trim_start().starts_with('#'), "{cap} has no comment above it");
    }
    let svc = object(&docs, "Service");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9965);
    assert_eq!(svc["spec"]["selector"], ds["spec"]["selector"]["matchLabels"]);
}

#[test]
fn clusterrole_grants_list_and_watch_on_what_the_resolver_reads() {
    let rbac = netdrop_tests::apiserver::Rbac::from_yaml(&deploy::clusterrole_yaml()).expect("ClusterRole");
    let mut granted = BTreeSet::new();
    for r in rbac.rules() {
        assert!(r.resource_names.is_empty(), "{r:?}");
        assert_eq!(r.verbs, ["list", "watch"], "read-only, list+watch only: {r:?}");
        for g in &r.api_groups {
            for res in &r.resources {
                assert!(g != "*" && res != "*", "no wildcards: {r:?}");
                granted.insert(if g.is_empty() {
                    res.clone()
                } else {
                    format!("{res}.{g}")
                });
            }
        }
    }
    let read: BTreeSet<String> = Kind::ALL.iter().map(|k| k.resource().to_owned()).collect();
    assert_eq!(
        granted, read,
        "the ClusterRole must grant exactly the kinds the resolver watches"
    );
    assert!(Path::new(&deploy::dir().join("base/clusterrolebinding.yaml")).is_file());
}
