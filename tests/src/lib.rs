//! Support for netdrop's integration tests: RAII guards for network namespaces, sysctls and
//! tracer processes (so a failing test still cleans up), traffic from inside a namespace, the
//! kernel's own counters, and the skip protocol.
//!
//! Skips: a test that cannot run here calls [`skip`], which prints `skipping: <test>: <why>` and
//! appends the test to `$NETDROP_SKIP_FILE`; `cargo xtask test` subtracts those from libtest's
//! passes, so a skip is never counted as a pass.

pub mod apiserver;
pub mod deploy;
pub mod lab;
pub mod prometheus;

use std::{
    collections::HashMap,
    fs::{self, OpenOptions},
    io::{BufRead, BufReader, Write as _},
    net::{SocketAddr, UdpSocket},
    os::fd::AsFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Records a skip and says why. The caller returns right after.
pub fn skip(test: &str, why: &str) {
    println!("skipping: {test}: {why}");
    eprintln!("skipping: {test}: {why}");
    if let Ok(path) = std::env::var("NETDROP_SKIP_FILE")
        && let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(f, "{test}\t{why}");
    }
}

/// Why this process cannot run root-only tests, if it cannot.
pub fn needs_root() -> Option<String> {
    (!nix::unistd::geteuid().is_root()).then(|| "needs root (network namespaces, BPF)".to_string())
}

/// Skips the calling test unless running as root. Use: `require_root!("name");`
#[macro_export]
macro_rules! require_root {
    ($test:expr) => {
        if let Some(why) = $crate::needs_root() {
            $crate::skip($test, &why);
            return;
        }
    };
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = netdrop_tools::tool(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a program of the tool table is installed.
pub fn have(program: &str) -> bool {
    netdrop_tools::available(program)
}

/// One line of `/proc/net/tcp{,6}` (`tcp4_seq_show`/`tcp6_seq_show`, `net/ipv4/tcp_ipv4.c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    /// `sk_state`: 0x0A `LISTEN`, 0x05 `FIN_WAIT2`; a timewait socket shows its substate.
    pub state: u8,
    /// The timer column: 2 a full socket's keepalive timer, 3 a timewait socket's own timer.
    pub timer: u8,
}

impl TcpSocket {
    pub const LISTEN: u8 = 0x0a;
    pub const FIN_WAIT2: u8 = 0x05;
    pub const TIMER_TIMEWAIT: u8 = 3;

    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit_once(':')?.1, 16).ok();
        Some(Self {
            local_port: port(f.get(1)?)?,
            remote_port: port(f.get(2)?)?,
            state: u8::from_str_radix(f.get(3)?, 16).ok()?,
            timer: u8::from_str_radix(f.get(5)?.split_once(':')?.0, 16).ok()?,
        })
    }

    /// A timewait socket (`struct inet_timewait_sock`), not a full socket in the same state.
    pub fn is_timewait(&self) -> bool {
        self.timer == Self::TIMER_TIMEWAIT
    }
}

/// Shuts down `s`'s sending side and waits until the peer's kernel has acknowledged the FIN
/// (`TCP_INFO` reports `FIN_WAIT2`). Closing the socket then makes it a timewait socket at once
/// (`__tcp_close` in `net/ipv4/tcp.c` calls `tcp_time_wait` for a `FIN_WAIT2` socket).
///
/// Closing before the ACK is in (`FIN_WAIT1`) leaves it to the ACK, and when the ACK arrives
/// while `close()` still owns the socket it is processed from the socket's backlog in
/// `release_sock`, where `tcp_rcv_state_process` sees `sock_owned_by_user` and keeps a full
/// orphaned `FIN_WAIT2` socket on a keepalive timer instead ("Bad case. We could lose such FIN
/// otherwise."). Such a socket answers segments as a full socket does (`tcp_validate_incoming`),
/// so a test that needs a timewait socket must not leave this to timing.
pub fn fin_and_wait_fin_wait2(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    s.shutdown(std::net::Shutdown::Write).expect("shutdown(SHUT_WR)");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: getsockopt on an open socket into a zeroed tcp_info of the size we pass.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        if info.tcpi_state == TcpSocket::FIN_WAIT2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the peer did not acknowledge our FIN within 10 s (state {})",
            info.tcpi_state
        );
        thread::sleep(Duration::from_millis(5));
    }
}

static NS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace made for one test, deleted on drop (also when the test panics).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `nd-<tag>-<pid>-<seq>` with loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "nd-{tag}-{}-{}",
            std::process::id(),
            NS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        // `ip` runs it: check it against the tool table here.
        netdrop_tools::path(cmd).unwrap_or_else(|e| panic!("{e}"));
        let mut a = vec!["netns", "exec", self.name.as_str(), cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace's inode, as netdrop reports it.
    pub fn inode(&self) -> u32 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(self.path()).expect("netns file").ino() as u32
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live there.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = fs::File::open(self.path()).expect("open netns");
        thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns panicked")
    }

    /// A counter from the namespace's /proc/net/snmp (or snmp6), e.g. `("Udp", "NoPorts")`.
    pub fn snmp(&self, table: &str, field: &str) -> u64 {
        netns_snmp(&self.name)
            .get(table)
            .and_then(|t| t.get(field))
            .copied()
            .unwrap_or_else(|| panic!("no {table}:{field}"))
    }

    /// A counter from the namespace's /proc/net/netstat, e.g. `("TcpExt", "ListenOverflows")`.
    pub fn netstat(&self, table: &str, field: &str) -> u64 {
        parse_snmp(&self.exec("cat", &["/proc/net/netstat"]))
            .get(table)
            .and_then(|t| t.get(field))
            .copied()
            .unwrap_or_else(|| panic!("no {table}:{field} in netstat"))
    }

    /// The namespace's TCP sockets (`/proc/net/tcp`, or `tcp6`), as the kernel lists them.
    pub fn tcp_sockets(&self, ipv6: bool) -> Vec<TcpSocket> {
        let file = if ipv6 { "/proc/net/tcp6" } else { "/proc/net/tcp" };
        self.exec("cat", &[file])
            .lines()
            .skip(1)
            .filter_map(TcpSocket::parse)
            .collect()
    }

    /// A counter from /proc/net/snmp6 (`Udp6NoPorts`).
    pub fn snmp6(&self, field: &str) -> u64 {
        let text = self.exec("cat", &["/proc/net/snmp6"]);
        text.lines()
            .filter_map(|l| l.split_once(char::is_whitespace))
            .find(|(k, _)| *k == field)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in snmp6"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = netdrop_tools::tool("ip").args(["netns", "del", &self.name]).status();
    }
}

/// /proc/net/snmp of the named namespace (`ip netns` name), parsed.
pub fn netns_snmp(name: &str) -> HashMap<String, HashMap<String, u64>> {
    parse_snmp(&run("ip", &["netns", "exec", name, "cat", "/proc/net/snmp"]))
}

/// Runs `cmd` in a private mount namespace where /sys/kernel/btf is an empty tmpfs: a kernel
/// without BTF, as far as the program can tell.
pub fn hide_btf(cmd: &mut Command) {
    use nix::mount::{MsFlags, mount};
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some("none"),
                "/sys/kernel/btf",
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )?;
            Ok(())
        });
    }
}

/// Parses /proc/net/snmp's header/value line pairs.
pub fn parse_snmp(text: &str) -> HashMap<String, HashMap<String, u64>> {
    let mut out: HashMap<String, HashMap<String, u64>> = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [head, vals] = pair else { continue };
        let (Some((t, names)), Some((_, values))) = (head.split_once(':'), vals.split_once(':')) else {
            continue;
        };
        let table = out.entry(t.to_string()).or_default();
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse() {
                table.insert(n.to_string(), v);
            }
        }
    }
    out
}

/// How long netdrop may take to print that it attached before a test calls it hung: 60 s, or
/// `$NETDROP_ATTACH_TIMEOUT_S` — the kernel matrix's guests set more, as a debug netdrop under
/// software emulation spends tens of seconds parsing BTF and in the verifier.
pub fn attach_timeout() -> Duration {
    let secs = std::env::var("NETDROP_ATTACH_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Sends `count` UDP datagrams from `from` (port 0: any) to `to`. Returns how many were sent.
pub fn send_udp(from: SocketAddr, to: SocketAddr, count: usize) -> usize {
    let s = UdpSocket::bind(from).expect("bind udp");
    let mut sent = 0;
    for _ in 0..count {
        // ICMP port-unreachable replies can surface as ECONNREFUSED on later sends of a
        // connected socket; this one is unconnected, so every send either works or errs loudly.
        if s.send_to(b"netdrop-test", to).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// The netdrop binary under test: `$NETDROP_BIN`, else `target/<profile>/netdrop` next to the
/// test executable's `deps/` directory.
pub fn netdrop_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NETDROP_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("netdrop")
}

/// Runs netdrop with `args`; returns (exit success, stdout, stderr).
pub fn netdrop(args: &[&str]) -> (bool, String, String) {
    let out = netdrop_tools::project(netdrop_bin())
        .args(args)
        .output()
        .expect("run netdrop");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `netdrop trace -o json`, stopped (SIGINT) and parsed by [`Tracer::stop`], killed on
/// drop if still running.
pub struct Tracer {
    child: Option<Child>,
    stderr: std::sync::Arc<Mutex<Vec<String>>>,
    /// Reads stdout while netdrop runs (a full pipe would block it).
    stdout: Option<thread::JoinHandle<String>>,
}

/// What a tracer printed.
#[derive(Debug, Default)]
pub struct TraceOutput {
    pub drops: Vec<Value>,
    pub summary: Value,
    pub stderr: Vec<String>,
}

impl Tracer {
    /// Starts `netdrop trace -o json <args>` and waits until it says it is attached.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(Self::command(args))
    }

    /// Like [`Tracer::start`], but netdrop runs in a private mount namespace where
    /// /sys/kernel/btf is an empty tmpfs: a kernel without BTF, as far as netdrop can tell.
    pub fn start_without_btf(args: &[&str]) -> Self {
        let mut cmd = Self::command(args);
        hide_btf(&mut cmd);
        Self::spawn(cmd)
    }

    /// Like [`Tracer::start`], with `-o text`; stop it with [`Tracer::stop_text`].
    pub fn start_text(args: &[&str]) -> Self {
        Self::spawn(Self::command_with("text", args))
    }

    fn command(args: &[&str]) -> Command {
        Self::command_with("json", args)
    }

    /// `netdrop capture -o FILE --format json <args>`: stopped and parsed as a trace's output by
    /// [`Tracer::stop`] (the same JSON lines).
    pub fn start_capture(file: &std::path::Path, args: &[&str]) -> Self {
        let mut cmd = netdrop_tools::project(netdrop_bin());
        cmd.arg("capture")
            .arg("-o")
            .arg(file)
            .args(["--format", "json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self::spawn(cmd)
    }

    fn command_with(output: &str, args: &[&str]) -> Command {
        let mut cmd = netdrop_tools::project(netdrop_bin());
        cmd.args(["trace", "-o", output])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", netdrop_bin().display()));
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let keep = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("netdrop: attached") {
                    let _ = tx.send(true);
                }
                keep.lock().expect("lock").push(line);
            }
            let _ = tx.send(false);
        });
        let mut out = child.stdout.take().expect("stdout");
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        let mut t = Self {
            child: Some(child),
            stderr: lines,
            stdout: Some(stdout),
        };
        if let Ok(true) = rx.recv_timeout(attach_timeout()) {
            t
        } else {
            let err = t.stderr.lock().expect("lock").join("\n");
            t.kill();
            panic!("netdrop did not attach:\n{err}");
        }
    }

    /// Starts `netdrop agent <args>` and waits until it says it is attached; stop it with
    /// [`Tracer::terminate`].
    pub fn start_agent(args: &[&str]) -> Self {
        let mut cmd = netdrop_tools::project(netdrop_bin());
        cmd.arg("agent")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self::spawn(cmd)
    }

    /// SIGTERM, wait: whether it exited 0, and what it said on stderr.
    pub fn terminate(mut self) -> (bool, Vec<String>) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "netdrop did not exit after SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait().expect("wait");
        thread::sleep(Duration::from_millis(50));
        (status.success(), self.stderr.lock().expect("lock").clone())
    }

    /// The netdrop process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGINT, wait, parse the JSON lines.
    pub fn stop(self) -> TraceOutput {
        let (stdout, stderr) = self.stop_text();
        let mut out = TraceOutput {
            stderr,
            ..TraceOutput::default()
        };
        for line in stdout.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            match v["type"].as_str() {
                Some("drop") => out.drops.push(v),
                Some("summary") => out.summary = v,
                other => panic!("unexpected line type {other:?}: {line}"),
            }
        }
        assert!(
            out.summary.is_object(),
            "no summary line; stderr: {}",
            out.stderr.join("\n")
        );
        out
    }

    /// SIGINT, wait; what netdrop wrote to stdout, and its stderr lines.
    pub fn stop_text(mut self) -> (String, Vec<String>) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "netdrop did not exit after SIGINT");
            thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait().expect("wait");
        let stdout = self.stdout.take().expect("reader").join().expect("stdout reader");
        // Let the stderr reader catch up.
        thread::sleep(Duration::from_millis(50));
        let stderr = self.stderr.lock().expect("lock").clone();
        assert!(status.success(), "netdrop exited with {status}: {}", stderr.join("\n"));
        (stdout, stderr)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl TraceOutput {
    /// Summary count for a reason in one netns (all locations).
    pub fn count(&self, reason: &str, netns: u32) -> u64 {
        self.summary["drops"]
            .as_array()
            .expect("drops array")
            .iter()
            .filter(|r| r["reason"] == reason && r["netns"] == netns)
            .map(|r| r["count"].as_u64().expect("count"))
            .sum()
    }

    /// Drop events with this reason.
    pub fn events(&self, reason: &str) -> Vec<&Value> {
        self.drops.iter().filter(|d| d["reason"] == reason).collect()
    }
}

/// Waits until events have surely been drained: netdrop drains every 100 ms.
pub fn settle() {
    thread::sleep(Duration::from_millis(300));
}

/// A sysctl set for one test and restored on drop (also when the test panics).
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    /// `key` in dotted form (`net.netfilter.nf_conntrack_max`), in this process's namespace.
    pub fn set(key: &str, value: &str) -> Self {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let old = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string();
        fs::write(&path, value).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        Self { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!("could not restore {}: {e}", self.path.display());
        }
    }
}

impl NetNs {
    /// A column of the namespace's /proc/net/stat/nf_conntrack, summed over CPUs (0 when the
    /// namespace has no conntrack yet).
    pub fn ct_stat(&self, column: &str) -> u64 {
        let text = self.exec("cat", &["/proc/net/stat/nf_conntrack"]);
        ct_stat_column(&text, column).unwrap_or_else(|| panic!("no column {column} in nf_conntrack stats"))
    }

    /// Moves one end of a veth pair into this namespace and configures it.
    pub fn take_link(&self, link: &str, addr: &str) {
        run("ip", &["link", "set", link, "netns", &self.name]);
        self.ip(&["addr", "add", addr, "dev", link]);
        self.ip(&["link", "set", link, "up"]);
    }
}

/// A column of `/proc/net/stat/nf_conntrack` (hex, one row per CPU) summed over CPUs; `None` when
/// the kernel has no such column.
pub fn ct_stat_column(text: &str, column: &str) -> Option<u64> {
    let mut lines = text.lines();
    let idx = lines.next()?.split_whitespace().position(|c| c == column)?;
    Some(
        lines
            .filter_map(|l| l.split_whitespace().nth(idx))
            .filter_map(|v| u64::from_str_radix(v, 16).ok())
            .sum(),
    )
}

/// Connects two namespaces with a veth pair: `a_if` (addr `a_addr`) in `a`, `b_if` in `b`.
pub fn veth(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) {
    run("ip", &["link", "add", a_if, "type", "veth", "peer", "name", b_if]);
    a.take_link(a_if, a_addr);
    b.take_link(b_if, b_addr);
}

impl TraceOutput {
    /// Summary count of one classification in one netns.
    pub fn class_count(&self, classification: &str, netns: u32) -> u64 {
        self.rows_in(netns)
            .into_iter()
            .filter(|r| r["classification"] == classification)
            .map(|r| r["count"].as_u64().expect("count"))
            .sum()
    }

    /// The summary's counter rows of one netns.
    pub fn rows_in(&self, netns: u32) -> Vec<&Value> {
        self.summary["drops"]
            .as_array()
            .expect("drops array")
            .iter()
            .filter(|r| r["netns"] == netns)
            .collect()
    }
}

/// An interface name unique to this test process (≤ 15 bytes).
pub fn ifname(tag: &str) -> String {
    let name = format!(
        "v{}{}{tag}",
        std::process::id() % 10000,
        NS_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    name.chars().take(15).collect()
}

// ---- tc accounting: workload veths, `netdrop interfaces`, kernel tc listings ----

/// A "node" namespace with Calico-style workload veths: `cali<11 hex>` on the node side, `eth0`
/// in a pod namespace, static neighbours and no IPv6 so that only the test's own packets cross.
pub struct TcNode {
    pub ns: NetNs,
}

/// One pod joined to a [`TcNode`].
pub struct TcPod {
    pub ns: NetNs,
    /// Host-side interface name.
    pub host_if: String,
    pub node_ip: std::net::Ipv4Addr,
    pub pod_ip: std::net::Ipv4Addr,
}

/// Turns IPv6 off in a namespace (no ND/MLD/RS packets to disturb exact counts).
pub fn no_ipv6(ns: &NetNs) {
    for key in ["net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"] {
        ns.exec("sysctl", &["-qw", &format!("{key}=1")]);
    }
}

/// `cali` + 11 hex characters, unique per call in this process.
pub fn cali_name(n: u32) -> String {
    format!("cali{:05x}{:06x}", std::process::id() & 0xfffff, n & 0xff_ffff)
}

impl TcNode {
    pub fn new(tag: &str) -> Self {
        let ns = NetNs::new(tag);
        no_ipv6(&ns);
        Self { ns }
    }

    /// `--node-netns` value for netdrop.
    pub fn arg(&self, node: &str) -> String {
        format!("{node}={}", self.ns.path().display())
    }

    /// Adds pod number `n` (1..=250) with /24 addressing `10.<subnet>.n.{1,2}`.
    pub fn add_pod(&self, subnet: u8, n: u8) -> TcPod {
        let pod = NetNs::new("tcpod");
        no_ipv6(&pod);
        let host_if = cali_name(u32::from(subnet) << 8 | u32::from(n));
        let (hmac, pmac) = (
            format!("02:00:00:{subnet:02x}:{n:02x}:01"),
            format!("02:00:00:{subnet:02x}:{n:02x}:02"),
        );
        self.ns.ip(&[
            "link", "add", &host_if, "address", &hmac, "type", "veth", "peer", "name", "eth0", "address", &pmac,
            "netns", &pod.name,
        ]);
        let node_ip = std::net::Ipv4Addr::new(10, subnet, n, 1);
        let pod_ip = std::net::Ipv4Addr::new(10, subnet, n, 2);
        self.ns.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", &host_if]);
        self.ns.ip(&["link", "set", &host_if, "up"]);
        pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        self.ns.ip(&[
            "neigh",
            "replace",
            &pod_ip.to_string(),
            "lladdr",
            &pmac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ]);
        pod.ip(&[
            "neigh",
            "replace",
            &node_ip.to_string(),
            "lladdr",
            &hmac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        TcPod {
            ns: pod,
            host_if,
            node_ip,
            pod_ip,
        }
    }

    /// `/sys/class/net/<if>/statistics/<stat>` of a node interface.
    pub fn if_stat(&self, ifname: &str, stat: &str) -> u64 {
        self.ns
            .exec("cat", &[&format!("/sys/class/net/{ifname}/statistics/{stat}")])
            .trim()
            .parse()
            .expect("statistics counter")
    }

    /// Names of the TCX programs on an interface, in chain order (ingress, egress), from the
    /// kernel's BPF_PROG_QUERY (Debian 12's bpftool 7.1 predates TCX listings).
    pub fn tcx_programs(&self, ifnames: &[String]) -> HashMap<String, (Vec<String>, Vec<String>)> {
        use aya::programs::{SchedClassifier, TcAttachType};
        let names = ifnames.to_vec();
        self.ns.within(move || {
            let query = |ifname: &str, t| -> Vec<String> {
                match SchedClassifier::query_tcx(ifname, t) {
                    Ok((_, progs)) => progs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_string())
                        .collect(),
                    Err(_) => Vec::new(),
                }
            };
            names
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        (query(n, TcAttachType::Ingress), query(n, TcAttachType::Egress)),
                    )
                })
                .collect()
        })
    }

    /// `bpftool -j net show` in the node: (device, kind, name) of every tc program it lists.
    pub fn bpftool_tc(&self) -> Vec<(String, String, String)> {
        let text = self.ns.exec("bpftool", &["-j", "net", "show"]);
        let v: Value = serde_json::from_str(&text).expect("bpftool json");
        v[0]["tc"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["devname"].as_str().unwrap_or("").to_string(),
                            e["kind"].as_str().unwrap_or("").to_string(),
                            e["name"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Interfaces of the node whose names start with `cali`.
    pub fn cali_links(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ns.ip(&["-j", "link", "show"])).expect("ip -j");
        v.as_array()
            .expect("array")
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("cali"))
            .map(String::from)
            .collect()
    }
}

/// Prog ids of programs called `name` (`bpftool -j prog show`).
pub fn prog_ids(name: &str) -> Vec<u64> {
    let v: Value = serde_json::from_str(&run("bpftool", &["-j", "prog", "show"])).expect("bpftool json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|p| p["name"] == name)
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Links (`bpftool -j link show`) whose program is one of `progs`.
pub fn links_of(progs: &[u64]) -> usize {
    // `bpftool link show` fails when a link vanishes between its listing and its lookup (as
    // links of a killed process do): try again.
    let mut text = None;
    for _ in 0..20 {
        let out = netdrop_tools::tool("bpftool")
            .args(["-j", "link", "show"])
            .output()
            .expect("bpftool");
        if out.status.success() {
            text = Some(String::from_utf8_lossy(&out.stdout).into_owned());
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let v: Value = serde_json::from_str(&text.expect("bpftool link show kept failing")).expect("bpftool json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
        .count()
}

/// Entries of the map called `map` used by program `prog` (`bpftool map dump`).
pub fn map_entries_of(prog: u64, map: &str) -> usize {
    let p: Value =
        serde_json::from_str(&run("bpftool", &["-j", "prog", "show", "id", &prog.to_string()])).expect("json");
    for id in p["map_ids"].as_array().cloned().unwrap_or_default() {
        let id = id.as_u64().expect("id").to_string();
        let m: Value = serde_json::from_str(&run("bpftool", &["-j", "map", "show", "id", &id])).expect("json");
        if m["name"] == map {
            let d: Value = serde_json::from_str(&run("bpftool", &["-j", "map", "dump", "id", &id])).expect("json");
            return d.as_array().map_or(0, Vec::len);
        }
    }
    panic!("program {prog} has no map {map}")
}

/// The id of the BPF map called `name` that process `pid` holds open (its fdinfo names the map
/// ids; `bpftool map show` their names).
pub fn map_id_of_pid(pid: u32, name: &str) -> u64 {
    let mut ids: Vec<u64> = fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let text = fs::read_to_string(e.path()).ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let m: Value =
            serde_json::from_str(&run("bpftool", &["-j", "map", "show", "id", &id.to_string()])).expect("json");
        if m["name"] == name {
            return id;
        }
    }
    panic!("process {pid} holds no map {name}")
}

/// Entries of the BPF map with this id (`bpftool map dump`).
pub fn map_entries(id: u64) -> usize {
    let d: Value = serde_json::from_str(&run("bpftool", &["-j", "map", "dump", "id", &id.to_string()])).expect("json");
    d.as_array().map_or(0, Vec::len)
}

/// A running `netdrop interfaces -o json`: its JSON lines are collected as they come.
pub struct TcWatch {
    child: Option<Child>,
    pub lines: std::sync::Arc<Mutex<Vec<Value>>>,
    pub stderr: std::sync::Arc<Mutex<Vec<String>>>,
}

impl TcWatch {
    /// Starts `netdrop interfaces -o json <args>` and waits until it has attached.
    pub fn start(args: &[&str]) -> Self {
        let mut child = netdrop_tools::project(netdrop_bin())
            .args(["interfaces", "-o", "json", "--interval", "1h"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", netdrop_bin().display()));
        let (stdout, stderr) = (
            child.stdout.take().expect("stdout"),
            child.stderr.take().expect("stderr"),
        );
        let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
        let errs = std::sync::Arc::new(Mutex::new(Vec::new()));
        let keep = lines.clone();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                keep.lock().expect("lock").push(v);
            }
        });
        let (tx, rx) = mpsc::channel();
        let keep = errs.clone();
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let attached = l.starts_with("netdrop: attached");
                keep.lock().expect("lock").push(l);
                if attached {
                    let _ = tx.send(true);
                }
            }
            let _ = tx.send(false);
        });
        let mut w = Self {
            child: Some(child),
            lines,
            stderr: errs,
        };
        if rx.recv_timeout(attach_timeout()) != Ok(true) {
            w.kill();
            panic!(
                "netdrop interfaces did not attach:\n{}",
                w.stderr.lock().expect("lock").join("\n")
            );
        }
        w
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Live interfaces according to the attach/forget events so far.
    pub fn attached(&self) -> std::collections::BTreeSet<String> {
        let mut set = std::collections::BTreeSet::new();
        for v in self
            .lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|v| v["type"] == "interface")
        {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            match v["action"].as_str() {
                Some("attached") => {
                    set.insert(name);
                }
                Some("forgotten") => {
                    set.remove(&name);
                }
                _ => {}
            }
        }
        set
    }

    /// Waits until `pred` holds (checked every 50 ms) or panics after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut pred: impl FnMut(&Self) -> bool) {
        let end = Instant::now() + timeout;
        while !pred(self) {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; stderr:\n{}",
                self.stderr.lock().expect("lock").join("\n")
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` and waits for the exit; returns whether it exited successfully.
    pub fn signal(&mut self, sig: nix::sys::signal::Signal) -> bool {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("kill");
        let status = child.wait().expect("wait");
        // Let the readers catch up with the last lines.
        thread::sleep(Duration::from_millis(100));
        status.success()
    }

    /// The final `{"type":"summary"}` line (after SIGINT/SIGTERM).
    pub fn summary(&self) -> Value {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .rev()
            .find(|v| v["type"] == "summary")
            .cloned()
            .expect("no summary line")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TcWatch {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A hand-assembled SCHED_CLS program standing in for another dataplane's: drops (TC_ACT_SHOT)
/// packets whose `skb->len` is `len`, lets every other packet go on (TCX_NEXT / TC_ACT_UNSPEC).
pub fn load_len_dropper(len: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // (opcode, regs dst|src<<4, off, imm)
    let insns: [(u8, u8, i16, i32); 6] = [
        (0x61, 0x10, 0, 0),          // r0 = *(u32 *)(r1 + 0)   (__sk_buff.len)
        (0x55, 0x00, 2, len as i32), // if r0 != len goto +2
        (0xb7, 0x00, 0, 2),          // r0 = TC_ACT_SHOT
        (0x95, 0, 0, 0),             // exit
        (0xb7, 0x00, 0, -1),         // r0 = TC_ACT_UNSPEC / TCX_NEXT
        (0x95, 0, 0, 0),             // exit
    ];
    let mut code = Vec::new();
    for (op, regs, off, imm) in insns {
        code.push(u64::from(op) | u64::from(regs) << 8 | u64::from(off as u16) << 16 | u64::from(imm as u32) << 32);
    }
    let license = b"GPL\0";
    let name = b"test_len_drop\0\0\0";
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size,
    // log_buf, kern_version, prog_flags, prog_name[16].
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&3u32.to_ne_bytes()); // BPF_PROG_TYPE_SCHED_CLS
    attr[4..8].copy_from_slice(&(code.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..64].copy_from_slice(name);
    // SAFETY: bpf(BPF_PROG_LOAD) with pointers valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) };
    assert!(fd >= 0, "loading the test dropper: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd from the kernel.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// Attaches `prog` with TCX to `ifname` in `ns` (ingress, appended last); the link lives as long
/// as the returned fd.
pub fn tcx_attach_last(ns: &NetNs, prog: &std::os::fd::OwnedFd, ifname: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let prog_fd = prog.as_raw_fd() as u32;
    let ifname = ifname.to_string();
    ns.within(move || {
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).expect("ifindex");
        let mut attr = [0u8; 32];
        attr[0..4].copy_from_slice(&prog_fd.to_ne_bytes());
        attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        attr[8..12].copy_from_slice(&46u32.to_ne_bytes()); // BPF_TCX_INGRESS
        attr[12..16].copy_from_slice(&(1u32 << 4).to_ne_bytes()); // BPF_F_AFTER: last
        // SAFETY: bpf(BPF_LINK_CREATE) with a valid attr.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, 28, attr.as_ptr(), attr.len()) };
        assert!(
            fd >= 0,
            "TCX attach of the test dropper: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fresh fd from the kernel.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
    })
}

/// Ids of the tc (`sched_cls`) programs process `pid` holds, from /proc/PID/fdinfo.
pub fn sched_cls_prog_ids(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(Result::ok)
    {
        let text = fs::read_to_string(e.path()).unwrap_or_default();
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
        if field("prog_type:") == Some("3")
            && field("link_id:").is_none()
            && let Some(id) = field("prog_id:").and_then(|v| v.parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether a BPF program with this id still exists.
pub fn prog_exists(id: u64) -> bool {
    netdrop_tools::tool("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Adds another dataplane's clsact filter at `prio` on `ifname`'s ingress: the
/// [`load_len_dropper`] program in direct-action mode, handed to `tc` through a pin in a
/// private bpffs mount (unmounted again; the filter keeps its own reference).
pub fn add_foreign_clsact_dropper(ns: &NetNs, ifname: &str, prio: u16, len: u32) {
    use std::os::fd::AsRawFd as _;
    let prog = load_len_dropper(len);
    let dir = std::env::temp_dir().join(format!(
        "netdrop-bpffs-{}-{}",
        std::process::id(),
        NS_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).expect("bpffs dir");
    run("mount", &["-t", "bpf", "bpf", dir.to_str().expect("utf-8")]);
    let pin = dir.join("dropper");
    let path = std::ffi::CString::new(pin.to_str().expect("utf-8")).expect("path");
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: bpf(BPF_OBJ_PIN) with a valid path and fd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_ptr(), attr.len()) };
    let result = std::panic::catch_unwind(|| {
        assert!(rc == 0, "pinning the test dropper: {}", std::io::Error::last_os_error());
        let _ = netdrop_tools::tool("ip")
            .args(["netns", "exec", &ns.name, "tc", "qdisc", "add", "dev", ifname, "clsact"])
            .status();
        ns.exec(
            "tc",
            &[
                "filter",
                "add",
                "dev",
                ifname,
                "ingress",
                "prio",
                &prio.to_string(),
                "handle",
                "7",
                "bpf",
                "object-pinned",
                pin.to_str().expect("utf-8"),
                "direct-action",
            ],
        );
    });
    let _ = netdrop_tools::tool("umount").arg(&dir).status();
    let _ = fs::remove_dir(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Sends `count` UDP datagrams of `payload` bytes from `from` (in `src`) to `to`.
pub fn udp_burst(src: &NetNs, from: std::net::Ipv4Addr, to: SocketAddr, payload: usize, count: usize) {
    src.within(move || {
        let s = UdpSocket::bind((from, 0)).expect("bind");
        for _ in 0..count {
            s.send_to(&vec![0x5a; payload], to).expect("send");
        }
    });
}

/// A UDP receiver in `ns` counting datagrams until `stop` is called.
pub struct UdpCounter {
    handle: Option<thread::JoinHandle<usize>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpCounter {
    pub fn start(ns: &NetNs, at: SocketAddr) -> Self {
        let sock = ns.within(move || UdpSocket::bind(at).expect("bind receiver"));
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut n = 0;
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    n += 1;
                }
            }
            while sock.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        });
        Self {
            handle: Some(handle),
            stop,
        }
    }

    /// Datagrams received.
    pub fn stop(mut self) -> usize {
        thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().expect("running").join().expect("receiver")
    }
}

/// pod (10.10.0.2) — node (10.10.0.1 | 10.20.0.1, forwarding) — remote (10.20.0.2)
pub struct NatLab {
    pub pod: NetNs,
    pub node: NetNs,
    pub remote: NetNs,
    /// The node's interface towards `remote` (where MASQUERADE applies).
    pub uplink: String,
}

impl NatLab {
    /// Builds the three namespaces, NAT active on the node (`iptables`: the binary to use).
    pub fn new(iptables: &str) -> Self {
        let pod = NetNs::new("pod");
        let node = NetNs::new("node");
        let remote = NetNs::new("remote");
        let (p, n1) = (ifname("p"), ifname("n"));
        veth(&pod, &p, "10.10.0.2/24", &node, &n1, "10.10.0.1/24");
        let (n2, r) = (ifname("u"), ifname("r"));
        veth(&node, &n2, "10.20.0.1/24", &remote, &r, "10.20.0.2/24");
        pod.ip(&["route", "add", "default", "via", "10.10.0.1"]);
        remote.ip(&["route", "add", "default", "via", "10.20.0.1"]);
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        // Conntrack and NAT become active in a namespace once a rule needs them, as with kube-proxy.
        node.exec(
            iptables,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "10.99.99.0/24",
                "-j",
                "MASQUERADE",
            ],
        );
        Self {
            pod,
            node,
            remote,
            uplink: n2,
        }
    }
}

/// `threads` threads each send `per_thread` datagrams to `to`, each from a new socket (a new
/// source port, so a new flow). Returns how many were sent.
pub fn send_flows(ns: &NetNs, threads: usize, per_thread: usize, to: &'static str) -> usize {
    let mut handles = Vec::new();
    for _ in 0..threads {
        let path = ns.path();
        handles.push(thread::spawn(move || {
            let f = fs::File::open(path).expect("netns");
            nix::sched::setns(std::os::fd::AsFd::as_fd(&f), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let to: SocketAddr = to.parse().expect("addr");
            (0..per_thread)
                .filter(|_| {
                    // A new socket per datagram: a new source port, so a new flow.
                    let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    s.send_to(b"flow", to).is_ok()
                })
                .count()
        }));
    }
    handles.into_iter().map(|h| h.join().expect("sender")).sum()
}

/// The running kernel's (major, minor) from its release (`uname -r`), e.g. (6, 1) for "6.1.0-56-cloud-amd64".
pub fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("/proc/sys/kernel/osrelease");
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

/// Whether the kernel has TCX (Linux 6.6+), judged from its version, not from netdrop's own
/// probe: the tests check netdrop's probe against this.
pub fn has_tcx() -> bool {
    kernel_version() >= (6, 6)
}

/// Skips the calling test on kernels without TCX (before 6.6). Use after `require_root!`.
#[macro_export]
macro_rules! require_tcx {
    ($test:expr) => {
        if !$crate::has_tcx() {
            let (major, minor) = $crate::kernel_version();
            $crate::skip($test, &format!("kernel {major}.{minor} has no TCX (Linux 6.6+)"));
            return;
        }
    };
}

/// Why the running kernel cannot run tests that name drop reasons (none before Linux 5.17), if
/// it cannot. Asks netdrop itself, once.
pub fn needs_reasons() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(|| {
        let (ok, out, err) = netdrop(&["reasons", "-o", "json"]);
        if !ok {
            return Some(format!("netdrop reasons failed: {}", err.trim()));
        }
        let v: Value = serde_json::from_str(&out).ok()?;
        (v["source"] == "none").then(|| {
            format!(
                "kernel {} has no drop reasons (Linux 5.17+)",
                v["kernel"].as_str().unwrap_or("?")
            )
        })
    })
    .clone()
}

/// Skips the calling test on kernels without drop reasons. Use after `require_root!`.
#[macro_export]
macro_rules! require_reasons {
    ($test:expr) => {
        if let Some(why) = $crate::needs_reasons() {
            $crate::skip($test, &why);
            return;
        }
    };
}

/// A program running with its stdout on a pseudo-terminal of a given size (stderr piped), as a
/// person at a terminal would run it; what it draws is read from the terminal's other end.
pub struct Terminal {
    pub child: Child,
    /// Everything written to the terminal, once the program exits.
    screen: Option<thread::JoinHandle<Vec<u8>>>,
}

impl Terminal {
    /// Starts `cmd` with its stdout on a new `cols`×`rows` terminal; `Err` says why no terminal
    /// can be made here (no `/dev/pts`, as in a minimal guest).
    pub fn spawn(mut cmd: Command, cols: u16, rows: u16) -> Result<Self, String> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two new descriptors to the pointers, which are valid; the name
        // and termios pointers may be null; the window size is read only.
        let rc = unsafe {
            libc::openpty(
                &raw mut master,
                &raw mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &raw const ws,
            )
        };
        if rc != 0 {
            return Err(format!(
                "no pseudo-terminal (openpty: {})",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let child = cmd
            .stdout(Stdio::from(slave))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn on a terminal");
        // The parent's copy of the terminal's end goes with `cmd`: the reader sees EOF (EIO)
        // when the child exits.
        drop(cmd);
        let screen = thread::spawn(move || {
            let mut f = fs::File::from(master);
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut f, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
            out
        });
        Ok(Self {
            child,
            screen: Some(screen),
        })
    }

    /// Waits for the program to exit; what it wrote to the terminal.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().expect("wait");
        let screen = self.screen.take().expect("reader").join().expect("terminal reader");
        (status, String::from_utf8_lossy(&screen).into_owned())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
