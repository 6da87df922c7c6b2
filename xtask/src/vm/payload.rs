//! What the guests run: the netdrop binary (with its embedded eBPF object) and the integration
//! test executables of `netdrop-tests`, built on the host by cargo.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, bail};

pub struct Payload {
    pub netdrop: PathBuf,
    /// (test target name, executable), e.g. (`vm_smoke`, `target/debug/deps/vm_smoke-0123abcd`).
    pub tests: Vec<(String, PathBuf)>,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Builds netdrop and the integration tests the way `cargo test` would (same profile and target
/// dir, so after a host test run nothing is rebuilt).
pub fn build(release: bool, only: &[String]) -> anyhow::Result<Payload> {
    let netdrop = cargo_artifacts(&["build", "-p", "netdrop", "--bin", "netdrop"], release)?
        .into_iter()
        .find(|a| a.kind == "bin" && a.name == "netdrop")
        .map(|a| a.executable)
        .context("cargo built no netdrop binary")?;
    let mut tests: Vec<(String, PathBuf)> = cargo_artifacts(&["test", "-p", "netdrop-tests", "--no-run"], release)?
            .into_iter()
            // `kind == "test"`: the tests/*.rs integration tests, not the support library's unit tests.
            .filter(|a| a.kind == "test" && a.is_test)
            .map(|a| (a.name, a.executable))
            .collect();
    tests.sort();
    if tests.is_empty() {
        bail!("netdrop-tests has no integration tests (tests/tests/*.rs)");
    }
    if let Some(unknown) = only.iter().find(|o| !tests.iter().any(|(n, _)| n == *o)) {
        let names: Vec<&str> = tests.iter().map(|(n, _)| n.as_str()).collect();
        bail!("no test binary {unknown:?}; there are: {}", names.join(", "));
    }
    if !only.is_empty() {
        tests.retain(|(n, _)| only.contains(n));
    }
    Ok(Payload { netdrop, tests })
}

struct Artifact {
    name: String,
    kind: String,
    is_test: bool,
    executable: PathBuf,
}

fn cargo_artifacts(args: &[&str], release: bool) -> anyhow::Result<Vec<Artifact>> {
    let args: Vec<&str> = args.iter().copied().chain(release.then_some("--release")).collect();
    eprintln!("vm-test: cargo {}", args.join(" "));
    let mut child = netdrop_tools::try_tool("cargo")?
        .args(&args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut artifacts = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = msg["executable"].as_str() else {
            continue;
        };
        artifacts.push(Artifact {
            name: msg["target"]["name"].as_str().unwrap_or_default().to_owned(),
            kind: msg["target"]["kind"][0].as_str().unwrap_or_default().to_owned(),
            is_test: msg["profile"]["test"].as_bool().unwrap_or(false),
            executable: executable.into(),
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed (its errors are above)", args.join(" "));
    }
    Ok(artifacts)
}
