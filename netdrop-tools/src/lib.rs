//! Every external program that netdrop's build, tests, benchmarks, lab, demo and kernel matrix
//! run, with where it comes from — and the only way to run one.
//!
//! A fresh machine has only what `cargo xtask setup` installs, and setup installs the packages of
//! [`TOOLS`]. [`tool`] refuses a program the table lacks and names the package of one that is
//! missing, so a command that works only because someone installed it by hand fails on the
//! developer's machine first, with the fix in the message. `clippy.toml` forbids
//! `Command::new` everywhere else, and this crate's tests scan the workspace's sources for
//! programs named in code that the table lacks (paths the test run does not take, such as
//! benchmarks).
//!
//! The project's own binaries (netdrop, the lab, test helpers) are started with [`project`].

pub mod image;

use std::{
    ffi::OsStr,
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// Where a program comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian package (`cargo xtask setup` installs it).
    Debian(&'static str),
    /// The Rust toolchain (rustup), present on every development and CI machine.
    Rustup,
    /// Built from crates.io by `cargo xtask setup` (`cargo install`).
    CargoInstall(&'static str),
    /// A PyPI package at a pinned version (`name==version`), installed by `cargo xtask setup`
    /// into the project's own virtual environment ([`venv_dir`]): Debian 12's pip refuses to
    /// install into the system Python (PEP 668), and a pinned venv is the same on every machine.
    Pip(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Debian(p) => write!(f, "Debian package `{p}`"),
            Self::Rustup => f.write_str("the Rust toolchain (rustup)"),
            Self::CargoInstall(c) => write!(f, "crate `{c}` (cargo install)"),
            Self::Pip(p) => write!(f, "PyPI package `{p}` (in {})", venv_dir().display()),
        }
    }
}

/// One external program.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    /// The name it is run by.
    pub name: &'static str,
    pub source: Source,
    /// Copied (with its libraries) into the kernel matrix's guests, where the integration
    /// tests run it too.
    pub guest: bool,
}

const fn deb(name: &'static str, package: &'static str, guest: bool) -> Tool {
    Tool {
        name,
        source: Source::Debian(package),
        guest,
    }
}

const fn pip(name: &'static str, requirement: &'static str) -> Tool {
    Tool {
        name,
        source: Source::Pip(requirement),
        guest: false,
    }
}

/// The table. Grouped by what needs it; `guest: true` for what the integration tests run, since
/// the kernel matrix runs them in guests too.
pub const TOOLS: &[Tool] = &[
    // Namespaces, veths, routes, tc (tests, lab, benchmarks).
    deb("ip", "iproute2", true),
    deb("tc", "iproute2", true),
    deb("ss", "iproute2", true),
    deb("nstat", "iproute2", true),
    deb("bridge", "iproute2", true),
    // Rule drops (tests, lab): iptables-nft by default, legacy by name.
    deb("iptables", "iptables", true),
    deb("iptables-save", "iptables", true),
    deb("iptables-restore", "iptables", true),
    deb("ip6tables", "iptables", true),
    deb("ip6tables-save", "iptables", true),
    deb("ip6tables-restore", "iptables", true),
    deb("iptables-nft", "iptables", true),
    deb("iptables-nft-save", "iptables", true),
    deb("iptables-nft-restore", "iptables", true),
    deb("iptables-legacy", "iptables", true),
    deb("iptables-legacy-save", "iptables", true),
    deb("iptables-legacy-restore", "iptables", true),
    deb("ip6tables-legacy", "iptables", true),
    deb("nft", "nftables", true),
    // The kernel's conntrack statistics and table.
    deb("conntrack", "conntrack", true),
    deb("sysctl", "procps", true),
    // IPVS state in `capture --bundle` (kube-proxy's ipvs mode); optional: the bundle says when
    // it is not installed.
    deb("ipvsadm", "ipvsadm", false),
    // Privileges and namespaces: the unprivileged-user and no-BTF tests.
    deb("setpriv", "util-linux", true),
    deb("unshare", "util-linux", true),
    deb("nsenter", "util-linux", true),
    deb("mount", "mount", true),
    deb("umount", "mount", true),
    // Traffic generators and inspection.
    deb("ping", "iputils-ping", true),
    deb("socat", "socat", true),
    deb("hping3", "hping3", true),
    deb("iperf3", "iperf3", true),
    deb("tcpdump", "tcpdump", true),
    // Reads `netdrop capture` files as Wireshark does, with contrib/wireshark/netdrop.lua (tests/
    // tests/capture.rs). Not in the guests (libwireshark is large): their capture tests skip
    // the tshark checks and say so.
    deb("tshark", "tshark", false),
    deb("ethtool", "ethtool", true),
    // Reading another namespace's /proc/net files (`ip netns exec NS cat ...`), kernel version.
    deb("cat", "coreutils", true),
    deb("uname", "coreutils", true),
    // A program that outlives its timeout (the bundle's per-item timeout, unit-tested).
    deb("sleep", "coreutils", false),
    // BPF state (tc tests check links and programs with the kernel's own listing).
    deb("bpftool", "bpftool", true),
    // Benchmark baseline.
    deb("bpftrace", "bpftrace", false),
    deb("modprobe", "kmod", false),
    // The real Kubernetes client, checked against the API stand-in.
    deb("kubectl", "kubectl", true),
    // Independent checks of hashes the lab computes (Calico interface names, kube-proxy chains).
    deb("sha1sum", "coreutils", false),
    deb("sha256sum", "coreutils", false),
    deb("base32", "coreutils", false),
    deb("xxd", "xxd", false),
    // Kernel matrix: Debian kernels fetched and unpacked, guests built and booted.
    deb("apt-get", "apt", false),
    deb("apt-cache", "apt", false),
    deb("dpkg", "dpkg", false),
    deb("dpkg-query", "dpkg", false),
    deb("qemu-system-x86_64", "qemu-system-x86", false),
    deb("busybox", "busybox-static", false),
    deb("ldd", "libc-bin", false),
    deb("strip", "binutils", false),
    deb("xz", "xz-utils", false),
    deb("zstd", "zstd", false),
    // Deployment checks (tests/tests/deploy.rs): manifests, alerts, the image.
    deb("promtool", "prometheus", false),
    // A real Prometheus server scraping the agent's /metrics (tests/tests/metrics.rs).
    deb("prometheus", "prometheus", false),
    deb("python3", "python3-venv", false),
    deb("buildah", "buildah", false),
    deb("podman", "podman", false),
    // podman's runtime here: crun refuses this machine's hybrid cgroup layout, runc does not.
    deb("runc", "runc", false),
    pip("kubernetes-validate", "kubernetes-validate==1.37.0"),
    pip("checkov", "checkov==3.3.30"),
    // Build.
    Tool {
        name: "cargo",
        source: Source::Rustup,
        guest: false,
    },
    Tool {
        name: "rustc",
        source: Source::Rustup,
        guest: false,
    },
    Tool {
        name: "rustup",
        source: Source::Rustup,
        guest: false,
    },
    Tool {
        name: "bpf-linker",
        source: Source::CargoInstall("bpf-linker"),
        guest: false,
    },
];

/// Why a program cannot be run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolError {
    /// The code names a program the table does not list.
    NotInTable { name: String },
    /// Listed, but not installed here.
    Missing { name: &'static str, source: Source },
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInTable { name } => write!(
                f,
                "`{name}` is not in the tool table (netdrop-tools/src/lib.rs): add it with the package that has it, so `cargo xtask setup` installs it on a fresh machine"
            ),
            Self::Missing {
                name,
                source: source @ Source::Debian(p),
            } => write!(
                f,
                "`{name}` is not installed: it comes from {source} (`cargo xtask setup` installs it, or: apt-get install {p})"
            ),
            Self::Missing { name, source } => {
                write!(
                    f,
                    "`{name}` is not installed: it comes from {source} (`cargo xtask setup` installs it)"
                )
            }
        }
    }
}

impl std::error::Error for ToolError {}

/// The table's entry for `name`.
pub fn lookup(name: &str) -> Result<&'static Tool, ToolError> {
    TOOLS
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| ToolError::NotInTable { name: name.to_string() })
}

/// Where `name` is installed (searched on `PATH`, then in the sbin directories a non-login
/// root shell may lack; PyPI programs only in the project's virtual environment).
pub fn path(name: &str) -> Result<PathBuf, ToolError> {
    let tool = lookup(name)?;
    let found = match tool.source {
        Source::Pip(_) => Some(venv_dir().join("bin").join(name)).filter(|p| is_executable(p)),
        _ => find_on_path(name),
    };
    found.ok_or(ToolError::Missing {
        name: tool.name,
        source: tool.source,
    })
}

/// The virtual environment `cargo xtask setup` installs the PyPI programs into:
/// `$NETDROP_TOOLS_VENV`, else `target/tools/venv` in the workspace.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("NETDROP_TOOLS_VENV")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join("target/tools/venv")
            },
            PathBuf::from,
        )
}

/// The PyPI requirements of the table (`name==version`), in table order.
pub fn pip_requirements() -> Vec<&'static str> {
    TOOLS
        .iter()
        .filter_map(|t| match t.source {
            Source::Pip(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [Path::new("/usr/local/sbin"), Path::new("/usr/sbin"), Path::new("/sbin")];
    std::env::split_paths(&path)
        .chain(extra.iter().map(|p| p.to_path_buf()))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// A `Command` for a program of the table, or why there is none.
pub fn try_tool(name: &str) -> Result<Command, ToolError> {
    let path = path(name)?;
    #[expect(clippy::disallowed_methods, reason = "the one place external programs are started")]
    Ok(Command::new(path))
}

/// A `Command` for a program of the table. Panics with the package to install when it is
/// missing, and with the table to extend when it is not listed: meant for tests and developer
/// commands, where that is the failure to report.
pub fn tool(name: &str) -> Command {
    try_tool(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether a program of the table is installed (panics for one the table lacks: the question
/// itself is then a mistake).
pub fn available(name: &str) -> bool {
    match path(name) {
        Ok(_) => true,
        Err(ToolError::Missing { .. }) => false,
        Err(e) => panic!("{e}"),
    }
}

/// A `Command` for one of the project's own binaries (built by cargo: netdrop, the lab, test
/// helpers, the running executable itself).
pub fn project(program: impl AsRef<OsStr>) -> Command {
    #[expect(
        clippy::disallowed_methods,
        reason = "the project's own binaries, not external programs"
    )]
    Command::new(program)
}

/// Runs a program of the table with `input` on its standard input and returns its standard
/// output; panics with its standard error when it fails (for tests that check a value with an
/// independent implementation, such as `sha256sum`).
pub fn filter(name: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::{io::Write as _, process::Stdio};
    let mut child = tool(name)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Written from a thread: a program that answers before reading all of its input would
    // otherwise deadlock on a full pipe.
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    writer
        .join()
        .expect("stdin writer")
        .unwrap_or_else(|e| panic!("writing to {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The Debian packages of the table, each once, in table order.
pub fn debian_packages() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for t in TOOLS {
        if let Source::Debian(p) = t.source
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, t) in TOOLS.iter().enumerate() {
            assert!(TOOLS[..i].iter().all(|u| u.name != t.name), "{} listed twice", t.name);
        }
    }

    #[test]
    fn errors_name_the_package() {
        assert_eq!(
            lookup("definitely-not-a-tool").map(|t| t.name),
            Err(ToolError::NotInTable {
                name: "definitely-not-a-tool".into()
            })
        );
        let e = ToolError::Missing {
            name: "bpftool",
            source: Source::Debian("bpftool"),
        }
        .to_string();
        assert!(e.contains("apt-get install bpftool"), "{e}");
        let e = ToolError::Missing {
            name: "checkov",
            source: Source::Pip("checkov==3.3.30"),
        }
        .to_string();
        assert!(
            e.contains("PyPI package `checkov==3.3.30`") && e.contains("cargo xtask setup"),
            "{e}"
        );
    }

    #[test]
    fn pip_tools_are_pinned_and_resolved_in_the_venv() {
        let reqs = pip_requirements();
        assert!(reqs.contains(&"checkov==3.3.30"), "{reqs:?}");
        for r in &reqs {
            let (name, version) = r.split_once("==").unwrap_or_else(|| panic!("{r} is not pinned"));
            assert!(!name.is_empty() && !version.is_empty(), "{r}");
        }
        // Never a program of the same name elsewhere on PATH.
        if let Ok(p) = path("checkov") {
            assert!(p.starts_with(venv_dir()), "{}", p.display());
        }
    }

    #[test]
    fn shells_are_not_tools() {
        // `sh -c "..."` would run programs the table never sees.
        for sh in ["sh", "bash", "dash"] {
            assert!(lookup(sh).is_err(), "{sh} must not be in the table");
        }
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if p.is_dir() {
                if name != "target" && name != ".git" {
                    rust_files(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// Programs named in code: the first string literal passed to `tool`, `try_tool`,
    /// `available`, `path`, and the tests', lab's and xtask's command helpers (`run`, `cmd`, `exec`,
    /// `sh`, `ns_sh`, `ns_exec`, `command`) — so a benchmark or lab path the tests do not take cannot name a program the
    /// table lacks. Also: nothing outside this crate calls `Command::new`.
    #[test]
    fn every_program_named_in_the_sources_is_in_the_table() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let mut files = Vec::new();
        for crate_dir in ["netdrop", "netdrop-common", "netdrop-ebpf", "xtask", "tests"] {
            rust_files(&root.join(crate_dir), &mut files);
        }
        assert!(
            files.len() > 20,
            "found the workspace's sources ({} files)",
            files.len()
        );
        let callers = [
            "tool(\"",
            "try_tool(\"",
            "available(\"",
            "tools::path(\"",
            "run(\"",
            "cmd(\"",
            "exec(\"",
            "sh(\"",
            "ns_sh(\"",
            "ns_exec(\"",
            "command(\"",
        ];
        let mut unknown = Vec::new();
        let mut spawns = Vec::new();
        for f in &files {
            let src = fs::read_to_string(f).expect("read source");
            for (n, line) in src.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if code.contains("Command::new(") {
                    spawns.push(format!("{}:{}", f.display(), n + 1));
                }
                // `ip netns exec NS program ...`: the program after the namespace.
                if let Some(i) = code.find("\"netns\", \"exec\", ") {
                    let after_ns = code[i + 17..].split_once(", \"").map(|(_, r)| r);
                    if let Some(name) = after_ns.and_then(|r| r.split('"').next())
                        && lookup(name).is_err()
                    {
                        unknown.push(format!("{}:{}: {name}", f.display(), n + 1));
                    }
                }
                for c in callers {
                    let mut rest = code;
                    while let Some(i) = rest.find(c) {
                        // `foo_run("` is another function.
                        let before = rest[..i].chars().last();
                        rest = &rest[i + c.len()..];
                        if before.is_some_and(|b| b.is_alphanumeric() || b == '_') {
                            continue;
                        }
                        let name: String = rest.chars().take_while(|ch| *ch != '"').collect();
                        let plausible = !name.is_empty()
                            && name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.+".contains(ch));
                        if plausible && lookup(&name).is_err() {
                            unknown.push(format!("{}:{}: {name}", f.display(), n + 1));
                        }
                    }
                }
            }
        }
        assert!(
            unknown.is_empty(),
            "programs named in code but missing from TOOLS:\n{}",
            unknown.join("\n")
        );
        assert!(
            spawns.is_empty(),
            "Command::new outside netdrop-tools (use netdrop_tools::tool or ::project):\n{}",
            spawns.join("\n")
        );
    }
}
