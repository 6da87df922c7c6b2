//! Least privilege, proven in the image: the binary under test in an image built from scratch
//! (netdrop_tools::image, what `cargo xtask image` builds), run by podman with exactly the
//! DaemonSet's capability set (read from deploy/base), host network and PID namespaces, a
//! read-only root and the runtime's default seccomp profile — it attaches, names the location
//! of a drop it is shown, and lists reasons. With one capability taken away it fails (or, for
//! CAP_SYSLOG, degrades) with one line that names the capability.

use std::{net::UdpSocket, process::Output, time::Duration};

use netdrop_tests::{deploy, require_root, skip};

struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = netdrop_tools::tool("podman").args(["rmi", "--force", &self.0]).output();
    }
}

/// `podman run` as a kubelet would start the DaemonSet's container.
fn podman_run(image: &str, caps: &[String], args: &[&str]) -> Output {
    let mut cmd = netdrop_tools::tool("podman");
    // This machine: crun refuses the hybrid cgroup layout, runc does not; the sandbox refuses
    // raising RLIMIT_NOFILE/NPROC to podman's defaults, so the limits are given explicitly.
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "run", "--rm"])
        .args(["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"])
        .args(["--network=host", "--pid=host", "--read-only", "--user", "0:0"])
        .args(["--security-opt", "no-new-privileges"])
        .args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro"])
        .arg("--cap-drop=ALL");
    if !caps.is_empty() {
        cmd.arg(format!("--cap-add={}", caps.join(",")));
    }
    cmd.arg(image).args(args);
    cmd.output().expect("podman run")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn podman_works() -> Result<(), String> {
    if !netdrop_tests::have("podman") || !netdrop_tests::have("buildah") || !netdrop_tests::have("runc") {
        return Err("podman, buildah or runc not installed (cargo xtask setup)".into());
    }
    Ok(())
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one image built once, then every capability case on it"
)]
fn image_runs_with_exactly_the_daemonsets_capabilities() {
    require_root!("image_runs_with_exactly_the_daemonsets_capabilities");
    if let Err(why) = podman_works() {
        skip("image_runs_with_exactly_the_daemonsets_capabilities", &why);
        return;
    }
    let tag = format!("localhost/netdrop-test:{}", std::process::id());
    let image = netdrop_tools::image::build(&netdrop_tests::netdrop_bin(), &tag, "test").expect("image builds");
    let _guard = ImageGuard(tag.clone());
    assert!(image.files.iter().any(|f| f.ends_with("usr/bin/netdrop")));
    assert!(
        image.files.len() <= 8,
        "only the binary and its libraries: {:?}",
        image.files
    );

    let caps = deploy::daemonset_capabilities();
    assert!(
        caps.contains(&"BPF".to_owned()) && caps.contains(&"PERFMON".to_owned()),
        "{caps:?}"
    );

    // `reasons`: names from this kernel's BTF.
    let out = podman_run(&tag, &caps, &["reasons"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NO_SOCKET"),
        "{}",
        text(&out)
    );

    // `trace`, with drops to a closed UDP port on loopback sent while it runs: attached,
    // counted, and the location named (a kernel function, not an address).
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        for _ in 0..20 {
            let _ = s.send_to(b"netdrop-image-test", ("127.0.0.1", port));
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let port_s = port.to_string();
    let out = podman_run(
        &tag,
        &caps,
        &[
            "trace",
            "--duration",
            "8s",
            "--no-kube",
            "-o",
            "json",
            "--port",
            &port_s,
        ],
    );
    sender.join().expect("sender");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("attached tp_btf/kfree_skb") || all.contains("attached"),
        "{all}"
    );
    assert!(!all.contains("CAP_"), "a capability was reported missing: {all}");
    let drops: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["reason"] == "NO_SOCKET")
        .collect();
    assert!(!drops.is_empty(), "no NO_SOCKET drop seen: {all}");
    let location = drops[0]["location"].as_str().unwrap_or("");
    assert!(
        location.contains("udp") && !location.starts_with("0x"),
        "location not named: {location:?} ({})",
        drops[0]
    );

    // One capability fewer: one line naming it. CAP_SYS_ADMIN (in the set for setns) also
    // satisfies the kernel's bpf_capable()/perfmon_capable(), so CAP_BPF and CAP_PERFMON are
    // shown to be needed with it taken away too; with it, dropping either changes nothing.
    let without =
        |gone: &[&str]| -> Vec<String> { caps.iter().filter(|c| !gone.contains(&c.as_str())).cloned().collect() };
    for (gone, named, fatal) in [
        (&["BPF", "SYS_ADMIN"][..], "CAP_BPF", true),
        (&["PERFMON", "SYS_ADMIN"][..], "CAP_PERFMON", true),
        (&["SYSLOG"][..], "CAP_SYSLOG", false),
    ] {
        let out = podman_run(
            &tag,
            &without(gone),
            &["trace", "--duration", "3s", "--no-kube", "-o", "json"],
        );
        let all = text(&out);
        let naming: Vec<&str> = all
            .lines()
            .filter(|l| l.contains(&format!("netdrop needs {named}")))
            .collect();
        assert_eq!(
            naming.len(),
            1,
            "without {gone:?}: one line naming {named} expected:\n{all}"
        );
        assert_eq!(out.status.success(), !fatal, "without {gone:?}:\n{all}");
        assert!(!all.contains("panicked"), "{all}");
    }
    let out = podman_run(&tag, &without(&["BPF", "PERFMON"]), &["reasons"]);
    assert!(
        out.status.success(),
        "CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON: {}",
        text(&out)
    );
}
