//! `cargo xtask setup`: everything netdrop's build and tests need on a Debian machine, installed
//! idempotently (a second run only checks). Where a step cannot run (not root, not Debian) it
//! says exactly what to install instead.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// bpf-linker version known to build against the nightly toolchain's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    packages()?;
    rust_src()?;
    lint_components()?;
    bpf_linker()?;
    pip_tools()?;
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn installed(pkg: &str) -> bool {
    netdrop_tools::try_tool("dpkg-query")
        .map(|mut c| c.args(["-W", "-f=${Status}", pkg]).output())
        .is_ok_and(|o| o.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed")))
}

fn packages() -> anyhow::Result<()> {
    if !netdrop_tools::available("apt-get") || !netdrop_tools::available("dpkg-query") {
        eprintln!(
            "setup: not a Debian system; install the equivalents of: {}",
            netdrop_tools::debian_packages().join(" ")
        );
        return Ok(());
    }
    // Every package of the tool table: the one list of what the build, tests, benchmarks, lab
    // and kernel matrix run.
    let missing: Vec<&str> = netdrop_tools::debian_packages()
        .into_iter()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "setup: missing Debian packages; run as root, or: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let status = netdrop_tools::try_tool("apt-get")?
        .args(["update", "-qq"])
        .status()
        .context("apt-get update")?;
    if !status.success() {
        bail!("setup: apt-get update failed ({status})");
    }
    let status = netdrop_tools::try_tool("apt-get")?
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
    let out = netdrop_tools::try_tool("rustc")?
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
    let status = netdrop_tools::try_tool("rustup")?
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .context("rustup component add")?;
    if !status.success() {
        bail!("setup: `rustup component add rust-src --toolchain nightly` failed ({status})");
    }
    Ok(())
}

/// `cargo xtask test` checks formatting and lints: rustfmt and clippy on the stable toolchain,
/// clippy on the nightly one (the eBPF crate builds only there). `rustup component add` is a
/// no-op for components already present.
fn lint_components() -> anyhow::Result<()> {
    for (toolchain, components) in [("stable", &["rustfmt", "clippy"][..]), ("nightly", &["clippy"][..])] {
        let out = netdrop_tools::try_tool("rustup")?
            .args(["component", "list", "--installed", "--toolchain", toolchain])
            .output()
            .context("rustup component list")?;
        let installed = String::from_utf8_lossy(&out.stdout);
        let missing: Vec<&str> = components
            .iter()
            .copied()
            .filter(|c| !installed.lines().any(|l| l.starts_with(&format!("{c}-"))))
            .collect();
        if missing.is_empty() {
            continue;
        }
        eprintln!("setup: adding {} to the {toolchain} toolchain", missing.join(", "));
        let status = netdrop_tools::try_tool("rustup")?
            .args(["component", "add", "--toolchain", toolchain])
            .args(&missing)
            .status()
            .context("rustup component add")?;
        if !status.success() {
            bail!(
                "setup: `rustup component add --toolchain {toolchain} {}` failed ({status})",
                missing.join(" ")
            );
        }
    }
    Ok(())
}

/// bpf-linker links against the nightly toolchain's own libLLVM (same LLVM as rustc's BPF
/// backend). The prefix with the two symlinks lives in a stable place because the binary keeps
/// an rpath to it.
fn bpf_linker() -> anyhow::Result<()> {
    // Not installed yet is the case this function exists for: no `?`.
    if let Ok(mut cmd) = netdrop_tools::try_tool("bpf-linker")
        && let Ok(out) = cmd.arg("--version").output()
        && out.status.success()
    {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let lib = fs::read_dir(sysroot.join("lib"))
        .context("reading the nightly sysroot")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("the nightly toolchain has no libLLVM.so.*: cannot build bpf-linker")?;
    let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    // libLLVM.so.22.1-rust-1.97.0-nightly → 22
    let major: String = name
        .trim_start_matches("libLLVM.so.")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let prefix = home.join(".local/share/netdrop/llvm");
    fs::create_dir_all(prefix.join("lib"))?;
    for link in ["libLLVM.so", name.as_str()] {
        let dst = prefix.join("lib").join(link);
        let _ = fs::remove_file(&dst);
        std::os::unix::fs::symlink(&lib, &dst).with_context(|| format!("symlink {}", dst.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        lib.display()
    );
    let status = netdrop_tools::try_tool("cargo")?
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("setup: building bpf-linker failed ({status}); see the cargo output above");
    }
    Ok(())
}

/// The PyPI programs of the tool table (deployment checks), pinned, in the project's own virtual
/// environment (`netdrop_tools::venv_dir`): Debian 12's pip refuses the system Python. A
/// marker file records what was installed, so a second run only compares it.
fn pip_tools() -> anyhow::Result<()> {
    let venv = netdrop_tools::venv_dir();
    let reqs = netdrop_tools::pip_requirements();
    if reqs.is_empty() {
        return Ok(());
    }
    let marker = venv.join("netdrop-requirements.txt");
    let want = reqs.join("\n") + "\n";
    let all_there = reqs
        .iter()
        .filter_map(|r| r.split_once("==").map(|(n, _)| n))
        .all(|n| netdrop_tools::path(n).is_ok());
    if all_there && fs::read_to_string(&marker).is_ok_and(|m| m == want) {
        return Ok(());
    }
    if !venv.join("bin/pip").is_file() {
        eprintln!("setup: creating the Python environment {}", venv.display());
        let status = netdrop_tools::try_tool("python3")?
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 -m venv")?;
        if !status.success() {
            bail!("setup: `python3 -m venv {}` failed ({status})", venv.display());
        }
    }
    eprintln!("setup: installing {} into {}", reqs.join(" "), venv.display());
    let status = netdrop_tools::project(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(&reqs)
        .status()
        .context("pip install")?;
    if !status.success() {
        bail!("setup: pip install {} failed ({status})", reqs.join(" "));
    }
    fs::write(&marker, want).with_context(|| format!("writing {}", marker.display()))?;
    Ok(())
}

/// The workspace root (xtask's parent).
/// Runs setup, builds netdrop in release mode and returns the binary's path (under
/// `$CARGO_TARGET_DIR` when set): what the benchmarks and the image run.
pub fn release_netdrop() -> anyhow::Result<PathBuf> {
    run()?;
    let root = workspace_root();
    let status = netdrop_tools::try_tool("cargo")?
        .args(["build", "--release", "-p", "netdrop"])
        .current_dir(&root)
        .status()
        .context("cargo build --release -p netdrop")?;
    if !status.success() {
        bail!("building netdrop failed ({status})");
    }
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release/netdrop"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}
