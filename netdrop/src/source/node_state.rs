//! Node state for `netdrop capture --bundle`: what the node looked like around the drops — per
//! network namespace the conntrack statistics and table, the rule sets, addresses, routes,
//! rules, neighbours, qdiscs and filters, sysctls and SNMP counters; once per node the kernel,
//! BTF, softnet statistics and the CNI configuration (secrets redacted).
//!
//! Every item runs a program of the tool table (`netdrop_tools`), inside the namespace through
//! `nsenter --net=PATH`, with a timeout ([`ITEM_TIMEOUT`]) and a size cap per stream
//! ([`ITEM_MAX_BYTES`]; `conntrack -L` also [`CONNTRACK_LIST_LINES`] lines); its stdout, stderr,
//! exit code, size, whether it was cut and how long it took are kept ([`ManifestEntry`]).
//! Nothing here leaves the node: local programs and local files only.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// How long one item may run before it is killed.
pub const ITEM_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes kept of one item's stdout (and, separately, of its stderr).
pub const ITEM_MAX_BYTES: usize = 8 << 20;
/// Most lines kept of `conntrack -L` (a busy node's table has a million entries).
pub const CONNTRACK_LIST_LINES: usize = 10_000;
/// Most interfaces per namespace whose tc filters are listed.
pub const MAX_TC_INTERFACES: usize = 64;
/// The CNI directory: most files, and bytes per file, copied.
pub const CNI_MAX_FILES: usize = 100;
pub const CNI_MAX_FILE_BYTES: usize = 1 << 20;
/// The default CNI configuration directory.
pub const CNI_DIR: &str = "/etc/cni/net.d";

/// Sysctls of each namespace (`sysctl -a -r PATTERN`): forwarding, reverse-path filtering,
/// conntrack, listen queues, backlogs, local ports, neighbour table sizes.
const SYSCTL_PATTERN: &str = r"^net\.(ipv4\.(ip_forward|ip_local_port_range|conf\.(all|default)\.rp_filter|tcp_max_syn_backlog|tcp_syncookies|tcp_tw_reuse|neigh\.default\.gc_thresh.)|ipv6\.conf\.all\.forwarding|netfilter\.nf_conntrack_.*|core\.(somaxconn|netdev_max_backlog|rmem_max|wmem_max)|bridge\.bridge-nf-call-.*)$";

/// Items run in every namespace: (file name, program, arguments).
const PER_NETNS: &[(&str, &str, &[&str])] = &[
    ("conntrack-stats", "conntrack", &["-S"]),
    ("conntrack-list", "conntrack", &["-L"]),
    (
        "conntrack-count",
        "sysctl",
        &["net.netfilter.nf_conntrack_count", "net.netfilter.nf_conntrack_max"],
    ),
    ("iptables-save", "iptables-save", &["-c"]),
    ("ip6tables-save", "ip6tables-save", &["-c"]),
    ("iptables-legacy-save", "iptables-legacy-save", &["-c"]),
    ("nft-ruleset", "nft", &["list", "ruleset"]),
    ("ipvsadm", "ipvsadm", &["-Ln"]),
    ("ip-addr", "ip", &["-d", "addr"]),
    ("ip-link", "ip", &["-d", "-s", "link"]),
    ("ip-route", "ip", &["route", "show", "table", "all"]),
    ("ip6-route", "ip", &["-6", "route", "show", "table", "all"]),
    ("ip-rule", "ip", &["rule"]),
    ("ip6-rule", "ip", &["-6", "rule"]),
    ("ip-neigh", "ip", &["neigh"]),
    ("tc-qdisc", "tc", &["-s", "qdisc", "show"]),
    ("sysctl", "sysctl", &["-a", "-r", SYSCTL_PATTERN]),
    // -s: do not update nstat's history file (the bundle changes nothing on the node).
    ("nstat", "nstat", &["-asz"]),
];

/// Items also taken before the trace attaches: counters, so the bundle has their rise.
const START_ITEMS: &[&str] = &["conntrack-stats", "nstat"];

/// Items of the node as a whole, run in this process's namespace.
const PER_NODE: &[(&str, &str, &[&str])] = &[
    ("kernel", "uname", &["-a"]),
    ("softnet_stat", "cat", &["/proc/net/softnet_stat"]),
];

/// The names of every item's file in a namespace (tc filters aside), for checks of a bundle.
pub fn netns_items() -> impl Iterator<Item = &'static str> {
    PER_NETNS.iter().map(|i| i.0)
}

/// The programs the collector runs (all in the tool table).
pub fn programs() -> impl Iterator<Item = &'static str> {
    PER_NETNS
        .iter()
        .chain(PER_NODE)
        .map(|i| i.1)
        .chain(["nsenter", "ip", "tc"])
}

/// Errors that stop the collection (an item that fails is recorded, not an error).
#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    /// The place the items go failed.
    #[error("writing the bundle")]
    Write(#[source] std::io::Error),
}

/// A network namespace to collect from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netns {
    /// Directory name in the bundle: `host` (this process's), a `--node-netns` name, or
    /// `netns-INODE` for one drops were seen in.
    pub label: String,
    pub inode: u32,
    /// How to enter it (`None`: this process's own, or one no path opens any more).
    pub path: Option<PathBuf>,
    /// Why it is in the bundle.
    pub why: String,
}

/// When an item was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Before the trace attached (the baseline of counters that rise).
    Start,
    /// After it stopped.
    End,
}

/// One item of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Where its output is in the bundle.
    pub file: String,
    /// Where its stderr is (absent when it wrote none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_file: Option<String>,
    /// The namespace's label (absent for node-wide items and the run's own files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u32>,
    pub phase: Phase,
    /// The command as run (inside the namespace), or `read PATH` for a copied file.
    pub command: String,
    /// Its exit code (absent: killed, not started, or a file).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Why it did not run or did not finish (not installed, timeout, signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes kept of its output.
    pub bytes: u64,
    pub stderr_bytes: u64,
    /// Its output was cut at the size (or line) cap.
    pub truncated: bool,
    pub timed_out: bool,
    /// Secrets replaced (CNI files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redactions: u64,
    pub duration_ms: u64,
}

impl ManifestEntry {
    /// It did not run, or failed — not counting a program stopped because its output reached
    /// the cap (that is `truncated`).
    pub fn failed(&self) -> bool {
        !self.truncated && (self.error.is_some() || self.exit_code.is_some_and(|c| c != 0))
    }
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if signature")]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One collected item: its manifest entry and its bytes.
#[derive(Debug)]
pub struct Collected {
    pub entry: ManifestEntry,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Caps of one item.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub max_bytes: usize,
    pub max_lines: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: ITEM_TIMEOUT,
            max_bytes: ITEM_MAX_BYTES,
            max_lines: None,
        }
    }
}

/// Output kept up to a byte and a line cap.
#[derive(Debug, Default)]
pub struct Capped {
    pub data: Vec<u8>,
    pub truncated: bool,
    lines: usize,
    max_bytes: usize,
    max_lines: Option<usize>,
}

impl Capped {
    pub fn new(max_bytes: usize, max_lines: Option<usize>) -> Self {
        Self {
            max_bytes,
            max_lines,
            ..Self::default()
        }
    }

    /// Adds a chunk; returns whether more is wanted (false once a cap is reached: what is past
    /// it is dropped, whole lines are kept under a line cap).
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        if self.truncated {
            return false;
        }
        let mut take = chunk.len().min(self.max_bytes - self.data.len());
        if let Some(max) = self.max_lines {
            for (i, b) in chunk[..take].iter().enumerate() {
                if *b == b'\n' {
                    self.lines += 1;
                    if self.lines == max {
                        take = i + 1;
                        break;
                    }
                }
            }
            if self.lines == max && take < chunk.len() {
                self.data.extend_from_slice(&chunk[..take]);
                self.truncated = true;
                return false;
            }
        }
        self.data.extend_from_slice(&chunk[..take]);
        if take < chunk.len() {
            self.truncated = true;
        }
        !self.truncated
    }
}

/// What running one command gave.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub stdout: Capped,
    pub stderr: Capped,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub timed_out: bool,
    pub duration: Duration,
}

/// Runs `cmd` with no input, its outputs capped, killed after the timeout.
pub fn run_capped(mut cmd: Command, limits: Limits) -> RunOutput {
    let started = Instant::now();
    let mut out = RunOutput::default();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("not started: {e}"));
            return out;
        }
    };
    // Readers stop at the cap and close their pipe: a program with more to say gets EPIPE.
    let cut = Arc::new(AtomicBool::new(false));
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>, max_lines, cut: Arc<AtomicBool>| {
        thread::spawn(move || {
            let mut capped = Capped::new(limits.max_bytes, max_lines);
            let Some(mut pipe) = pipe else { return capped };
            let mut buf = vec![0_u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !capped.push(&buf[..n]) {
                            cut.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            capped
        })
    };
    let so = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        limits.max_lines,
        cut.clone(),
    );
    let se = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        None,
        cut.clone(),
    );
    let deadline = started + limits.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                out.timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            // Cut: the rest is not wanted; a program that ignores EPIPE is stopped.
            Ok(None) if cut.load(Ordering::Relaxed) && Instant::now() >= started + Duration::from_millis(200) => {
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                out.error = Some(format!("waiting for it: {e}"));
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    out.stdout = so.join().unwrap_or_default();
    out.stderr = se.join().unwrap_or_default();
    out.duration = started.elapsed();
    if let Some(s) = status {
        out.exit_code = s.code();
        if out.timed_out {
            out.error = Some(format!("timed out after {} s: killed", limits.timeout.as_secs()));
        } else if let Some(sig) = std::os::unix::process::ExitStatusExt::signal(&s) {
            out.error.get_or_insert_with(|| {
                if out.stdout.truncated {
                    format!("stopped by signal {sig} once its output reached the cap")
                } else {
                    format!("killed by signal {sig}")
                }
            });
        }
    }
    out
}

/// The command for `program args` in `ns` (directly in this process's own namespace).
fn command_in(ns: &Netns, own: u32, program: &str, args: &[&str]) -> Result<(Command, String), String> {
    let shown = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    if ns.inode == own {
        let mut c = netdrop_tools::try_tool(program).map_err(|e| e.to_string())?;
        c.args(args);
        return Ok((c, shown));
    }
    let path = ns.path.as_ref().ok_or_else(|| {
        format!(
            "namespace {} has no path any more (no process, no /run/netns name)",
            ns.inode
        )
    })?;
    let exe = netdrop_tools::path(program).map_err(|e| e.to_string())?;
    let mut c = netdrop_tools::try_tool("nsenter").map_err(|e| e.to_string())?;
    c.arg(format!("--net={}", path.display())).arg("--").arg(exe).args(args);
    Ok((c, format!("nsenter --net={} -- {shown}", path.display())))
}

/// Runs one item and describes it.
fn item(
    file: &str,
    ns: Option<&Netns>,
    phase: Phase,
    made: Result<(Command, String), String>,
    limits: Limits,
    shown_if_err: String,
) -> Collected {
    let (out, command) = match made {
        Ok((cmd, shown)) => (run_capped(cmd, limits), shown),
        Err(why) => (
            RunOutput {
                error: Some(why),
                ..RunOutput::default()
            },
            shown_if_err,
        ),
    };
    let stderr_file = (!out.stderr.data.is_empty()).then(|| format!("{file}.err"));
    Collected {
        entry: ManifestEntry {
            file: format!("{file}.out"),
            stderr_file,
            netns: ns.map(|n| n.label.clone()),
            netns_inode: ns.map(|n| n.inode),
            phase,
            command,
            exit_code: out.exit_code,
            error: out.error,
            bytes: out.stdout.data.len() as u64,
            stderr_bytes: out.stderr.data.len() as u64,
            truncated: out.stdout.truncated || out.stderr.truncated,
            timed_out: out.timed_out,
            redactions: 0,
            duration_ms: u64::try_from(out.duration.as_millis()).unwrap_or(u64::MAX),
        },
        stdout: out.stdout.data,
        stderr: out.stderr.data,
    }
}

/// The namespaces of a bundle: this process's, the `--node-netns` ones, and those drops were
/// seen in (found by inode under /run/netns and /proc/*/ns/net), each once.
pub fn namespaces(nodes: &[(String, Option<PathBuf>)], seen: &BTreeSet<u32>) -> Vec<Netns> {
    let own = crate::kernel::netns::own_netns();
    let mut out = vec![Netns {
        label: "host".into(),
        inode: own,
        path: None,
        why: "this process's namespace".into(),
    }];
    for (name, path) in nodes {
        let inode = path
            .as_deref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.ino() as u32);
        if out.iter().any(|n| n.inode == inode && inode != 0) {
            continue;
        }
        let mut label = sanitize(name);
        if out.iter().any(|n| n.label == label) {
            label = format!("{label}-{inode}");
        }
        out.push(Netns {
            label,
            inode,
            path: path.clone(),
            why: "--node-netns".into(),
        });
    }
    for &inode in seen {
        if inode == 0 || out.iter().any(|n| n.inode == inode) {
            continue;
        }
        out.push(Netns {
            label: format!("netns-{inode}"),
            inode,
            path: crate::kernel::netns::netns_path(inode),
            why: "drops were seen in it".into(),
        });
    }
    out
}

fn sanitize(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() || t.starts_with('.') {
        format!("_{t}")
    } else {
        t
    }
}

/// Collects from each namespace: the counters of [`START_ITEMS`] at [`Phase::Start`], everything
/// at [`Phase::End`] (tc filters of the interfaces matching `watched` or named in
/// `drop_ifaces`), each item handed to `out` as it is taken.
pub fn collect_netns(
    namespaces: &[Netns],
    phase: Phase,
    watched: &dyn Fn(&str) -> bool,
    drop_ifaces: &BTreeMap<u32, BTreeSet<String>>,
    out: &mut dyn FnMut(Collected) -> Result<(), NodeStateError>,
) -> Result<(), NodeStateError> {
    let own = crate::kernel::netns::own_netns();
    let dir = match phase {
        Phase::Start => "start/netns",
        Phase::End => "netns",
    };
    for ns in namespaces {
        for (name, program, args) in PER_NETNS {
            // Before the run: the counters whose rise during it matters.
            if phase == Phase::Start && !START_ITEMS.contains(name) {
                continue;
            }
            let limits = Limits {
                max_lines: (*name == "conntrack-list").then_some(CONNTRACK_LIST_LINES),
                ..Limits::default()
            };
            let shown = format!("{program} {}", args.join(" "));
            let made = if *program == "ipvsadm"
                && matches!(
                    netdrop_tools::path(program),
                    Err(netdrop_tools::ToolError::Missing { .. })
                ) {
                Err("ipvsadm is not installed (Debian package ipvsadm): no IPVS state".to_string())
            } else {
                command_in(ns, own, program, args)
            };
            out(item(
                &format!("{dir}/{}/{name}", ns.label),
                Some(ns),
                phase,
                made,
                limits,
                shown,
            ))?;
        }
        if phase == Phase::End {
            let mut ifaces: BTreeSet<String> = drop_ifaces.get(&ns.inode).cloned().unwrap_or_default();
            if let Ok((cmd, _)) = command_in(ns, own, "ip", &["-j", "link", "show"]) {
                let links = run_capped(cmd, Limits::default());
                ifaces.extend(link_names(&links.stdout.data).into_iter().filter(|n| watched(n)));
            }
            for ifname in ifaces.iter().take(MAX_TC_INTERFACES) {
                for dir_ in ["ingress", "egress"] {
                    let args = ["-s", "filter", "show", "dev", ifname.as_str(), dir_];
                    let made = command_in(ns, own, "tc", &args);
                    out(item(
                        &format!("{dir}/{}/tc-filter-{}-{dir_}", ns.label, sanitize(ifname)),
                        Some(ns),
                        phase,
                        made,
                        Limits::default(),
                        format!("tc {}", args.join(" ")),
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// Interface names of `ip -j link show`.
fn link_names(json: &[u8]) -> Vec<String> {
    serde_json::from_slice::<Vec<serde_json::Value>>(json)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.get("ifname")?.as_str().map(String::from))
        .collect()
}

/// The node-wide items: kernel, BTF, softnet statistics, the CNI directory (redacted).
pub fn collect_node(
    cni_dir: &Path,
    out: &mut dyn FnMut(Collected) -> Result<(), NodeStateError>,
) -> Result<(), NodeStateError> {
    let own = crate::kernel::netns::own_netns();
    let host = Netns {
        label: "host".into(),
        inode: own,
        path: None,
        why: String::new(),
    };
    for (name, program, args) in PER_NODE {
        let made = command_in(&host, own, program, args);
        let shown = format!("{program} {}", args.join(" "));
        out(item(
            &format!("node/{name}"),
            None,
            Phase::End,
            made,
            Limits::default(),
            shown,
        ))?;
    }
    out(btf())?;
    for c in cni(cni_dir) {
        out(c)?;
    }
    Ok(())
}

/// Whether the kernel has BTF (what netdrop reads offsets and reasons from).
fn btf() -> Collected {
    let started = Instant::now();
    let text = match std::fs::metadata("/sys/kernel/btf/vmlinux") {
        Ok(m) => format!("/sys/kernel/btf/vmlinux: present, {} bytes\n", m.len()),
        Err(e) => format!("/sys/kernel/btf/vmlinux: absent ({e})\n"),
    };
    file_item(
        "node/btf.out".into(),
        "stat /sys/kernel/btf/vmlinux".into(),
        text.into_bytes(),
        false,
        0,
        started,
        None,
    )
}

fn file_item(
    file: String,
    command: String,
    data: Vec<u8>,
    truncated: bool,
    redactions: u64,
    started: Instant,
    error: Option<String>,
) -> Collected {
    Collected {
        entry: ManifestEntry {
            file,
            stderr_file: None,
            netns: None,
            netns_inode: None,
            phase: Phase::End,
            command,
            exit_code: None,
            error,
            bytes: data.len() as u64,
            stderr_bytes: 0,
            truncated,
            timed_out: false,
            redactions,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        },
        stdout: data,
        stderr: Vec::new(),
    }
}

/// The CNI configuration files (regular files, three levels deep at most), each redacted.
fn cni(dir: &Path) -> Vec<Collected> {
    let started = Instant::now();
    let mut files = Vec::new();
    walk(dir, 0, &mut files);
    files.sort();
    if files.is_empty() {
        let why = match std::fs::read_dir(dir) {
            Ok(_) => "empty".to_string(),
            Err(e) => e.to_string(),
        };
        return vec![file_item(
            "node/cni/.none".into(),
            format!("read {}", dir.display()),
            format!("no CNI configuration in {}: {why}\n", dir.display()).into_bytes(),
            false,
            0,
            started,
            None,
        )];
    }
    let extra = files.len().saturating_sub(CNI_MAX_FILES);
    let mut out: Vec<Collected> = files
        .iter()
        .take(CNI_MAX_FILES)
        .map(|p| {
            let started = Instant::now();
            let rel = p.strip_prefix(dir).unwrap_or(p);
            let name = format!(
                "node/cni/{}",
                rel.components()
                    .map(|c| sanitize(&c.as_os_str().to_string_lossy()))
                    .collect::<Vec<_>>()
                    .join("/")
            );
            let command = format!("read {}", p.display());
            let mut data = Vec::new();
            let read =
                std::fs::File::open(p).and_then(|f| f.take(CNI_MAX_FILE_BYTES as u64 + 1).read_to_end(&mut data));
            if let Err(e) = read {
                return file_item(name, command, Vec::new(), false, 0, started, Some(e.to_string()));
            }
            let truncated = data.len() > CNI_MAX_FILE_BYTES;
            data.truncate(CNI_MAX_FILE_BYTES);
            match String::from_utf8(data) {
                Ok(text) => {
                    let (clean, n) = redact(&text);
                    file_item(name, command, clean.into_bytes(), truncated, n as u64, started, None)
                }
                // A secret could be anywhere in a file that is not text: kept out.
                Err(_) => file_item(
                    name,
                    command,
                    Vec::new(),
                    truncated,
                    0,
                    started,
                    Some("not text: not copied (it could hold a secret redaction cannot find)".into()),
                ),
            }
        })
        .collect();
    if extra > 0 {
        out.push(file_item(
            "node/cni/.more".into(),
            format!("read {}", dir.display()),
            format!("{extra} more files not copied (at most {CNI_MAX_FILES})\n").into_bytes(),
            true,
            0,
            started,
            None,
        ));
    }
    out
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        // symlink_metadata: a link is not followed out of the directory.
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_file() {
            out.push(e.path());
        } else if m.is_dir() && depth < 2 {
            walk(&e.path(), depth + 1, out);
        }
    }
}

/// Keys whose values are secrets (lowercase substrings): Calico's CNI kubeconfig carries a
/// ServiceAccount `token:`; kubeconfigs carry `client-key-data`; plugins carry passwords.
const SECRET_KEYS: &[&str] = &[
    "token",
    "password",
    "passwd",
    "secret",
    "client-key-data",
    "private-key",
    "private_key",
    "privatekey",
    "api-key",
    "api_key",
    "apikey",
    "credential",
    "authorization",
];

pub const REDACTED: &str = "<redacted>";

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|s| k.contains(s))
}

/// Replaces secret values: `"key": "value"` (JSON, anywhere in a line), `key: value` (YAML,
/// with `|`/`>` blocks), and PEM private key blocks. Returns the text and how many values were
/// replaced.
pub fn redact(text: &str) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut n = 0;
    // Inside a YAML block scalar of a secret key: lines indented deeper than this.
    let mut block: Option<usize> = None;
    let mut pem = false;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let eol = &line[body.len()..];
        let indent = body.len() - body.trim_start().len();
        if let Some(level) = block {
            if body.trim().is_empty() || indent > level {
                continue;
            }
            block = None;
        }
        if pem {
            if body.contains("-----END") {
                pem = false;
            }
            continue;
        }
        if body.contains("-----BEGIN") && body.contains("PRIVATE KEY") {
            n += 1;
            out.push_str(&" ".repeat(indent));
            out.push_str("<redacted private key>");
            out.push_str(eol);
            pem = !body.contains("-----END");
            continue;
        }
        let (mut line_out, k) = redact_json(body);
        n += k;
        if k == 0
            && let Some((yaml, blk)) = redact_yaml(body)
        {
            n += 1;
            line_out = yaml;
            if blk {
                block = Some(indent);
            }
        }
        out.push_str(&line_out);
        out.push_str(eol);
    }
    (out, n)
}

/// `"key": "value"` pairs of secret keys anywhere in the line.
fn redact_json(line: &str) -> (String, usize) {
    let b = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut n = 0;
    let mut i = 0;
    let mut last = 0;
    // The end (index after the closing quote) of the string starting at `s` (a quote).
    let string_end = |s: usize| -> Option<usize> {
        let mut j = s + 1;
        while j < b.len() {
            match b[j] {
                b'\\' => j += 2,
                b'"' => return Some(j + 1),
                _ => j += 1,
            }
        }
        None
    };
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        let Some(kend) = string_end(i) else { break };
        let key = &line[i + 1..kend - 1];
        let mut j = kend;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        if j < b.len() && b[j] == b':' {
            j += 1;
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            if j < b.len()
                && b[j] == b'"'
                && let Some(vend) = string_end(j)
            {
                if is_secret_key(key) && &line[j + 1..vend - 1] != REDACTED && vend - j > 2 {
                    out.push_str(&line[last..=j]);
                    out.push_str(REDACTED);
                    out.push('"');
                    last = vend;
                    n += 1;
                }
                i = vend;
                continue;
            }
        }
        i = kend;
    }
    out.push_str(&line[last..]);
    (out, n)
}

/// `key: value` of a secret key (YAML); `(line, starts a block)`.
fn redact_yaml(line: &str) -> Option<(String, bool)> {
    let trimmed = line.trim_start();
    let lead = line.len() - trimmed.len();
    let item = trimmed.strip_prefix("- ").map_or(0, |_| 2);
    let rest = &trimmed[item..];
    let colon = rest.find(':')?;
    let key = rest[..colon].trim_matches(['"', '\'', ' ']);
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || !is_secret_key(key) {
        return None;
    }
    let value = rest[colon + 1..].trim();
    if value.is_empty() || value == REDACTED || value.starts_with('#') {
        return None;
    }
    let block = value.starts_with('|') || value.starts_with('>');
    Some((format!("{} {REDACTED}", &line[..=lead + item + colon]), block))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Calico's CNI kubeconfig, as calico-node writes it (token and key shortened).
    const CALICO_KUBECONFIG: &str = "\
# Kubeconfig file for Calico CNI plugin. Installed by calico/node.
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://10.96.0.1:443
    certificate-authority-data: \"LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t\"
users:
- name: calico
  user:
    token: eyJhbGciOiJSUzI1NiIsImtpZCI6IkFCQyJ9.eyJpc3MiOiJrdWJlcm5ldGVzIn0.c2lnbmF0dXJl
    client-key-data: LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQ==
contexts:
- name: calico-context
  context:
    cluster: local
    user: calico
current-context: calico-context
";

    #[test]
    fn calicos_kubeconfig_loses_its_token_and_key_and_keeps_the_rest() {
        let (out, n) = redact(CALICO_KUBECONFIG);
        assert_eq!(n, 2, "{out}");
        assert!(
            !out.contains("eyJhbGci") && !out.contains("LS0tLS1CRUdJTiBSU0E"),
            "{out}"
        );
        assert!(out.contains("    token: <redacted>\n"), "{out}");
        assert!(out.contains("    client-key-data: <redacted>\n"), "{out}");
        assert!(out.contains("server: https://10.96.0.1:443"), "{out}");
        assert!(
            out.contains("certificate-authority-data: \"LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t\""),
            "a CA is public: {out}"
        );
        assert_eq!(out.lines().count(), CALICO_KUBECONFIG.lines().count());
        assert_eq!(redact(&out), (out.clone(), 0), "redacting twice changes nothing");
    }

    #[test]
    fn json_values_yaml_blocks_and_pem_keys_are_redacted() {
        let conflist = r#"{"name":"k8s-pod-network","plugins":[{"type":"calico","etcd_password":"s3cret","kubernetes":{"kubeconfig":"/etc/cni/net.d/calico-kubeconfig"}},{"type":"x", "apiKey" : "abc\"def", "n": 1}]}"#;
        let (out, n) = redact(conflist);
        assert_eq!(n, 2, "{out}");
        assert!(!out.contains("s3cret") && !out.contains("abc"), "{out}");
        assert!(
            out.contains(r#""etcd_password":"<redacted>""#) && out.contains(r#""apiKey" : "<redacted>""#),
            "{out}"
        );
        assert!(out.contains("/etc/cni/net.d/calico-kubeconfig"), "{out}");
        serde_json::from_str::<serde_json::Value>(&out).expect("still JSON");

        let yaml = "a: 1\nsecret: |\n  line1\n  line2\nb: 2\n";
        let (out, n) = redact(yaml);
        assert_eq!((out.as_str(), n), ("a: 1\nsecret: <redacted>\nb: 2\n", 1));

        let pem = "cert: ok\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\nabc\n-----END EC PRIVATE KEY-----\nend\n";
        let (out, n) = redact(pem);
        assert_eq!((out.as_str(), n), ("cert: ok\n<redacted private key>\nend\n", 1));
    }

    #[test]
    fn the_byte_cap_and_the_line_cap_keep_a_prefix_and_say_so() {
        let mut c = Capped::new(10, None);
        assert!(c.push(b"01234"));
        assert!(!c.push(b"56789abc"));
        assert_eq!((c.data.as_slice(), c.truncated), (&b"0123456789"[..], true));
        assert!(!c.push(b"x"), "nothing after the cap");
        let mut exact = Capped::new(10, None);
        assert!(exact.push(b"0123456789"), "exactly the cap is not cut");
        assert!(!exact.truncated);

        let mut l = Capped::new(1000, Some(2));
        assert!(l.push(b"a\nb"));
        assert!(!l.push(b"b\nc\nd\n"));
        assert_eq!((l.data.as_slice(), l.truncated), (&b"a\nbb\n"[..], true));
        let mut two = Capped::new(1000, Some(2));
        two.push(b"a\nb\n");
        assert!(!two.truncated, "exactly the line cap is not cut");
    }

    #[test]
    fn a_command_is_capped_timed_out_and_its_exit_code_kept() {
        let mut cat = netdrop_tools::tool("cat");
        cat.arg("/proc/self/status");
        let out = run_capped(
            cat,
            Limits {
                max_bytes: 64,
                ..Limits::default()
            },
        );
        assert_eq!((out.stdout.data.len(), out.stdout.truncated), (64, true), "{out:?}");
        assert!(!out.timed_out);

        let mut missing = netdrop_tools::tool("cat");
        missing.arg("/nonexistent/netdrop");
        let out = run_capped(missing, Limits::default());
        assert_eq!(out.exit_code, Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr.data).contains("No such file"),
            "{out:?}"
        );
        assert!(out.error.is_none() && !out.stdout.truncated);

        let mut sleep = netdrop_tools::tool("sleep");
        sleep.arg("30");
        let started = Instant::now();
        let out = run_capped(
            sleep,
            Limits {
                timeout: Duration::from_millis(300),
                ..Limits::default()
            },
        );
        assert!(out.timed_out && out.exit_code.is_none(), "{out:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "killed at the timeout");
        assert!(out.error.as_deref().is_some_and(|e| e.contains("timed out")), "{out:?}");
    }

    #[test]
    fn manifest_entries_round_trip_and_name_their_files() {
        let ns = Netns {
            label: "node-a".into(),
            inode: 4_026_532_177,
            path: None,
            why: "--node-netns".into(),
        };
        let c = item(
            "netns/node-a/iptables-save",
            Some(&ns),
            Phase::End,
            Err("namespace gone".into()),
            Limits::default(),
            "iptables-save -c".into(),
        );
        assert_eq!(c.entry.file, "netns/node-a/iptables-save.out");
        assert_eq!(
            (c.entry.netns.as_deref(), c.entry.netns_inode),
            (Some("node-a"), Some(4_026_532_177))
        );
        assert_eq!(c.entry.error.as_deref(), Some("namespace gone"));
        let json = serde_json::to_string(&c.entry).expect("json");
        assert!(
            json.contains(r#""phase":"end""#) && json.contains(r#""exit_code":null"#),
            "{json}"
        );
        let back: ManifestEntry = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, c.entry);
    }

    #[test]
    fn every_program_is_in_the_tool_table() {
        for p in programs() {
            assert!(netdrop_tools::lookup(p).is_ok(), "{p} is not in netdrop-tools' table");
        }
        assert!(netns_items().any(|i| i == "iptables-save"));
    }

    #[test]
    fn a_node_named_host_does_not_collide_with_this_namespace() {
        let own = PathBuf::from("/proc/self/ns/net");
        let ns = namespaces(
            &[
                ("host".into(), Some("/nonexistent".into())),
                ("node-a".into(), Some(own)),
            ],
            &BTreeSet::new(),
        );
        let labels: Vec<&str> = ns.iter().map(|n| n.label.as_str()).collect();
        assert_eq!(
            labels,
            ["host", "host-0"],
            "a node called host gets its inode; this namespace given again is listed once"
        );
    }

    #[test]
    fn an_item_cut_at_the_cap_is_not_a_failure() {
        let mut e = item("x", None, Phase::End, Err("gone".into()), Limits::default(), "x".into()).entry;
        assert!(e.failed());
        e.error = Some("stopped by signal 13 once its output reached the cap".into());
        e.truncated = true;
        assert!(!e.failed());
        (e.error, e.truncated, e.exit_code) = (None, false, Some(1));
        assert!(e.failed());
    }

    #[test]
    fn labels_are_safe_file_names() {
        assert_eq!(sanitize("node-a"), "node-a");
        assert_eq!(sanitize("../etc"), "_.._etc");
        assert_eq!(sanitize("a/b c"), "a_b_c");
    }
}
