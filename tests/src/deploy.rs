//! deploy/ as data: the rendered manifests, the DaemonSet's capability set and the ClusterRole,
//! read from the files people apply, for the tests that check them against the code.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// `deploy/` in the workspace.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy")
}

/// `kubectl kustomize deploy/<which>`.
pub fn render(which: &str) -> String {
    crate::run("kubectl", &["kustomize", &dir().join(which).display().to_string()])
}

/// The documents of a YAML stream.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("YAML does not parse: {e}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The one document of `kind` in the rendered base.
pub fn object(docs: &[Value], kind: &str) -> Value {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in deploy/base"))
        .clone();
    assert!(found.next().is_none(), "more than one {kind} in deploy/base");
    first
}

/// The capabilities the DaemonSet adds (`BPF`, `PERFMON`, ...), in file order.
pub fn daemonset_capabilities() -> Vec<String> {
    let ds = object(&documents(&render("base")), "DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_owned())
        .collect()
}

/// deploy/base/clusterrole.yaml, as applied.
pub fn clusterrole_yaml() -> String {
    let path = dir().join("base/clusterrole.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
