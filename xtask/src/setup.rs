//! `cargo xtask setup`: everything netdrop's build and tests need on a Debian machine, installed
//! idempotently (a second run only checks). Where a step cannot run (not root, not Debian) it
//! says exactly what to install instead.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Debian packages the build, the tests, the benchmarks and the kernel matrix use.
pub const PACKAGES: &[&str] = &[
    "iproute2",        // ip, tc: namespaces and veths in tests
    "iptables",        // iptables-nft and iptables-legacy: rule-drop tests
    "nftables",        // nft
    "conntrack",       // conntrack -S: the kernel's conntrack statistics
    "util-linux",      // setpriv: the unprivileged-user test
    "iperf3",          // benchmarks
    "bpftrace",        // benchmark baseline
    "kmod",            // modprobe
    "busybox-static",  // kernel matrix: the guests' /init
    "cpio",            // kernel matrix: initramfs
    "xz-utils",        // kernel matrix: compressed modules
    "zstd",            // kernel matrix: compressed modules (newer kernels)
    "qemu-system-x86", // kernel matrix
    "kubectl",         // checks the Kubernetes API stand-in against the real client
];

/// bpf-linker version known to build against the nightly toolchain's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    packages()?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn packages() -> anyhow::Result<()> {
    if which::which("apt-get").is_err() || which::which("dpkg-query").is_err() {
        eprintln!(
            "setup: not a Debian system; install the equivalents of: {}",
            PACKAGES.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("setup: missing Debian packages; run as root, or: sudo apt-get install -y {}", missing.join(" "));
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let status = Command::new("apt-get").args(["update", "-qq"]).status().context("apt-get update")?;
    if !status.success() {
        bail!("setup: apt-get update failed ({status})");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !status.success() {
        bail!("setup: apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "setup: no nightly toolchain (the eBPF programs need it): rustup toolchain install nightly --component rust-src"
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .context("rustup component add")?;
    if !status.success() {
        bail!("setup: `rustup component add rust-src --toolchain nightly` failed ({status})");
    }
    Ok(())
}

/// bpf-linker links against the nightly toolchain's own libLLVM (same LLVM as rustc's BPF
/// backend). The prefix with the two symlinks lives in a stable place because the binary keeps
/// an rpath to it.
fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && out.status.success()
    {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let lib = fs::read_dir(sysroot.join("lib"))
        .context("reading the nightly sysroot")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .context("the nightly toolchain has no libLLVM.so.*: cannot build bpf-linker")?;
    let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    // libLLVM.so.22.1-rust-1.97.0-nightly → 22
    let major: String = name.trim_start_matches("libLLVM.so.").chars().take_while(char::is_ascii_digit).collect();
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let prefix = home.join(".local/share/netdrop/llvm");
    fs::create_dir_all(prefix.join("lib"))?;
    for link in ["libLLVM.so", name.as_str()] {
        let dst = prefix.join("lib").join(link);
        let _ = fs::remove_file(&dst);
        std::os::unix::fs::symlink(&lib, &dst).with_context(|| format!("symlink {}", dst.display()))?;
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)", lib.display());
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("setup: building bpf-linker failed ({status}); see the cargo output above");
    }
    Ok(())
}

/// The workspace root (xtask's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}
