//! `cargo xtask demo`: the headline on one machine, without a cluster. Brings the lab up (two
//! Calico-style nodes, kube-proxy-style Services, the API stand-in), injects a fault (by default
//! a policy drop on one of `default/web`'s three backends), sends traffic, and runs `netdrop
//! trace` over it (`--svc` of the fault's Service, or `--ip` of the external host for the egress
//! faults); then takes the lab down (also when something fails).

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _},
    path::PathBuf,
    process::Stdio,
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::setup;

struct LabGuard(PathBuf);

impl LabGuard {
    fn lab(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = netdrop_tools::project(&self.0)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .context("running netdrop-lab")?;
        if !out.status.success() {
            bail!("netdrop-lab {} failed", args.join(" "));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = netdrop_tools::project(&self.0)
            .arg("down")
            .stdout(Stdio::null())
            .status();
    }
}

/// What the demo traces and what traffic it sends for a fault: `trace` arguments naming the
/// target, and `lab traffic` arguments.
fn scenario(fault: &str) -> (Vec<&'static str>, Vec<&'static str>) {
    const EXTERNAL: &str = "203.0.113.10:5432";
    match fault {
        "big-one-bad" => (vec!["--svc", "default/big"], vec!["--svc", "default/big"]),
        // Responses larger than the overlay's MTU.
        "mtu-blackhole" => (
            vec!["--svc", "default/web"],
            vec!["--svc", "default/web", "--reply-bytes", "4000"],
        ),
        // Not a Service: traced by the external address (before and after the node's SNAT).
        "egress-deny" | "snat-exhaustion" => (vec!["--ip", "203.0.113.10/32"], vec!["--to", EXTERNAL]),
        "dns-udp-drop" | "dns-conntrack-full" => (
            vec!["--svc", "kube-system/kube-dns"],
            vec!["--svc", "kube-system/kube-dns", "--proto", "udp"],
        ),
        "dns-race" => (
            vec!["--svc", "kube-system/kube-dns"],
            vec!["--svc", "kube-system/kube-dns", "--proto", "udp", "--pairs"],
        ),
        _ => (vec!["--svc", "default/web"], vec!["--svc", "default/web"]),
    }
}

pub fn run(fault: &str, seconds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo builds network namespaces and loads BPF programs: run as root"
    );
    setup::run()?;
    let root = setup::workspace_root();
    let status = netdrop_tools::try_tool("cargo")?
        .args([
            "build",
            "--quiet",
            "-p",
            "netdrop",
            "-p",
            "netdrop-tests",
            "--bin",
            "netdrop",
            "--bin",
            "netdrop-lab",
        ])
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(status.success(), "build failed");
    let lab = LabGuard(root.join("target/debug/netdrop-lab"));
    let _ = lab.lab(&["down"]);
    println!("==> lab up (two nodes, Calico-style veths, kube-proxy iptables, Kubernetes API stand-in)");
    lab.lab(&["up"])?;
    let status: serde_json::Value = serde_json::from_str(&lab.lab(&["-o", "json", "status"])?).context("lab status")?;
    println!("==> fault {fault}");
    print!("{}", lab.lab(&["fault", fault])?);

    let (target, traffic) = scenario(fault);
    let mut args = vec!["trace".to_string()];
    args.extend(target.iter().map(|a| (*a).to_string()));
    args.extend([
        "--kubeconfig".into(),
        status["kubeconfig"].as_str().context("kubeconfig")?.into(),
        "--duration".into(),
        format!("{}s", seconds + 4),
    ]);
    for n in status["nodes"].as_array().context("nodes")? {
        args.push("--node-netns".into());
        args.push(format!(
            "{}={}",
            n["name"].as_str().unwrap_or_default(),
            n["netns_path"].as_str().unwrap_or_default()
        ));
    }
    if !std::io::stdout().is_terminal() {
        args.extend(["-o".into(), "text".into()]);
    }
    println!("==> netdrop {}", args.join(" "));
    let mut nd = netdrop_tools::project(root.join("target/debug/netdrop"))
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = nd.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{l}");
            if l.starts_with("netdrop: attached") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_mins(1))
        .context("netdrop did not start")?;
    println!(
        "==> traffic: 100 requests/s ({}) for {seconds}s from the client pod",
        traffic.join(" ")
    );
    let duration = format!("{seconds}s");
    let mut targs = vec!["traffic"];
    targs.extend(traffic);
    targs.extend(["--rate", "100", "--duration", &duration]);
    let report = lab.lab(&targs)?;
    let status = nd.wait()?;
    println!("\n==> the traffic generator's own view:\n{report}");
    anyhow::ensure!(status.success(), "netdrop failed");
    println!("==> lab down");
    Ok(())
}
