//! Per-pod traffic accounting on workload interfaces, following pod churn: owns the registry of
//! watched interfaces, the rtnetlink watchers that attach to interfaces as they appear and forget
//! them as they go, counter snapshots for the trace loop, and `netdrop interfaces`.
//!
//! One watcher thread per watched network namespace (a "node": the host itself, or each node
//! namespace of a kind/k3d-style lab on one kernel). The thread enters the namespace once, so its
//! netlink sockets, TCX attachments and ifindexes all refer to that namespace. It subscribes to
//! link events *before* listing the links present, so nothing created in between is missed, and
//! handles every event idempotently. Events come from the kernel as they happen (no polling); if
//! the socket overflows (ENOBUFS) the thread lists the links again and reconciles.
//!
//! Direction: on the host-side veth, tc ingress carries what the pod sends (`from_pod`), tc
//! egress what is delivered to it (`to_pod`).

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::PerCpuValues;
use netdrop_common::{TcDestCounters, TcDestKey, tc_stat};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use crate::probe::tc::{self, Attachment, LoadOptions, Owner, RouteSocket, TcError, TcInstance, TcMode, TcModeChoice};

/// `RTNLGRP_LINK`: link creation, change and removal notifications.
const RTNLGRP_LINK: u32 = 1;
/// Receive buffer of the event socket: a burst of a few thousand link messages fits.
const EVENT_BUFFER_BYTES: libc::c_int = 32 << 20;

/// Errors of the watcher; each is one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum InterfacesError {
    #[error(transparent)]
    Tc(#[from] TcError),
    #[error("network namespace of node {node} ({path}): {source}")]
    Netns {
        node: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("nodes {a} and {b} name the same network namespace (inode {inode})")]
    DuplicateNetns { a: String, b: String, inode: u32 },
    #[error("watching links in the namespace of node {node}: {source}")]
    Watch {
        node: String,
        #[source]
        source: io::Error,
    },
    #[error("the watcher of node {0} stopped before it was ready")]
    WatcherDied(String),
    #[error(
        "{count} destinations to count attempts for, the kernel map holds {max}: trace fewer Services or pods at once"
    )]
    TooManyDestinations { count: usize, max: u32 },
    #[error("invalid --node-netns {0:?}: expected NAME=PATH, e.g. node-a=/run/netns/node-a")]
    BadNodeNetns(String),
}

/// A network namespace to watch and the node name its interfaces and drops belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetns {
    pub node: String,
    /// `None`: the namespace this process runs in.
    pub path: Option<PathBuf>,
}

impl FromStr for NodeNetns {
    type Err = InterfacesError;

    /// `NAME=PATH`, PATH a file such as `/run/netns/x` or `/proc/PID/ns/net`, or a bare name
    /// from `ip netns list`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node, path) = s
            .split_once('=')
            .ok_or_else(|| InterfacesError::BadNodeNetns(s.into()))?;
        if node.is_empty() || path.is_empty() {
            return Err(InterfacesError::BadNodeNetns(s.into()));
        }
        let path = if path.contains('/') {
            PathBuf::from(path)
        } else {
            PathBuf::from("/run/netns").join(path)
        };
        Ok(Self {
            node: node.into(),
            path: Some(path),
        })
    }
}

/// Shell-style patterns (`*`, `?`) for interface names, e.g. `cali*`, `lxc*`, `veth*`.
#[derive(Clone, Debug)]
pub struct IfacePattern(Vec<String>);

impl IfacePattern {
    pub fn new(patterns: &[String]) -> Self {
        Self(patterns.to_vec())
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

impl std::fmt::Display for IfacePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with one backtrack point per `*` (linear enough for interface names).
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Settings of [`TcAccounting::start`].
#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub pattern: IfacePattern,
    pub mode: TcModeChoice,
    /// clsact filter priority.
    pub priority: u16,
    pub load: LoadOptions,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            pattern: IfacePattern::new(&["cali*".to_string()]),
            mode: TcModeChoice::Auto,
            priority: tc::DEFAULT_PRIORITY,
            load: LoadOptions::default(),
        }
    }
}

/// Counters of one interface and direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// TCP SYN without ACK (each SYN, retransmissions included).
    pub tcp_syn: u64,
    /// First packets of UDP flows (5-tuple unseen on this interface for 30 s).
    pub udp_new: u64,
}

impl Counters {
    /// Connection attempts: TCP SYNs and new UDP flows.
    pub fn attempts(&self) -> u64 {
        self.tcp_syn + self.udp_new
    }

    pub(crate) fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.tcp_syn += o.tcp_syn;
        self.udp_new += o.udp_new;
    }
}

impl From<netdrop_common::TcCounters> for Counters {
    fn from(c: netdrop_common::TcCounters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            tcp_syn: c.tcp_syn,
            udp_new: c.udp_new,
        }
    }
}

/// One watched interface with its counters.
#[derive(Clone, Debug, Serialize)]
pub struct InterfaceSnapshot {
    /// Node the interface belongs to (the namespace it lives in).
    pub node: String,
    /// Inode of that network namespace.
    pub netns: u32,
    pub ifindex: u32,
    pub name: String,
    /// ifindex of the veth peer (the pod's `eth0`) inside its own namespace.
    pub peer_ifindex: Option<u32>,
    /// The peer namespace's id as seen from `netns` (`IFLA_LINK_NETNSID`).
    pub peer_netnsid: Option<i32>,
    /// Inode of the peer (pod) namespace, when it could be found.
    pub peer_netns: Option<u32>,
    pub mode: TcMode,
    /// When the programs were attached (Unix ms).
    pub attached_unix_ms: u64,
    /// Sent by the pod (tc ingress of the host-side veth).
    pub from_pod: Counters,
    /// Delivered to the pod (tc egress of the host-side veth).
    pub to_pod: Counters,
}

/// A destination whose connection attempts are counted (a Service backend, a `ClusterIP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Destination {
    pub ip: IpAddr,
    pub port: u16,
    /// IP protocol: 6 (TCP) or 17 (UDP).
    pub proto: u8,
}

impl Destination {
    fn key(&self) -> TcDestKey {
        let mut addr = [0u8; 16];
        let family = match self.ip {
            IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                addr = v6.octets();
                6
            }
        };
        TcDestKey {
            addr,
            port: self.port,
            proto: self.proto,
            family,
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    /// `IP:PORT/PROTO`, e.g. `10.96.0.10:53/udp`, `[fd00::1]:443/tcp`; PROTO defaults to tcp.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match crate::resolve::parse_addr_port_proto(s)? {
            (ip, Some((port, crate::resolve::Proto::Tcp))) => Ok(Self { ip, port, proto: 6 }),
            (ip, Some((port, crate::resolve::Proto::Udp))) => Ok(Self { ip, port, proto: 17 }),
            (_, Some(_)) => Err(format!("{s:?}: attempts are counted for tcp and udp")),
            (_, None) => Err(format!("{s:?}: expected IP:PORT[/tcp|/udp], e.g. 10.96.0.10:53/udp")),
        }
    }
}

/// Attempts to one destination seen on one node's interfaces.
#[derive(Clone, Debug, Serialize)]
pub struct DestinationSnapshot {
    pub node: String,
    #[serde(flatten)]
    pub dest: Destination,
    /// Sent by pods on this node (TCP SYNs, UDP datagrams on a from-pod path).
    pub from_pod: u64,
    /// Delivered to pods on this node (TCP SYNs, UDP datagrams on a to-pod path).
    pub to_pod: u64,
}

/// What the watchers did, summed over nodes.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WatchStats {
    pub link_events: u64,
    pub attached: u64,
    pub forgotten: u64,
    pub attach_errors: u64,
    /// Times the event socket overflowed and the links were listed again.
    pub resyncs: u64,
    /// Filters of killed earlier runs removed at start-up.
    pub leftovers_removed: u64,
    /// Packets on an attached interface without a counter entry (should stay 0).
    pub unregistered_packets: u64,
    pub flow_insert_failed: u64,
    pub short_packets: u64,
}

/// Everything at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct TcSnapshot {
    pub interfaces: Vec<InterfaceSnapshot>,
    pub destinations: Vec<DestinationSnapshot>,
    pub stats: WatchStats,
}

impl TcSnapshot {
    /// The interface named `name` on `node`.
    pub fn interface(&self, node: &str, name: &str) -> Option<&InterfaceSnapshot> {
        self.interfaces.iter().find(|i| i.node == node && i.name == name)
    }

    /// Attempts to `dest` summed over nodes: (from pods, to pods).
    pub fn attempts_to(&self, dest: &Destination) -> (u64, u64) {
        self.destinations
            .iter()
            .filter(|d| d.dest == *dest)
            .fold((0, 0), |(a, b), d| (a + d.from_pod, b + d.to_pod))
    }
}

/// A change in the set of watched interfaces, as it happens.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum WatchEvent {
    Attached {
        node: String,
        ifindex: u32,
        name: String,
        unix_ms: u64,
    },
    Forgotten {
        node: String,
        ifindex: u32,
        name: String,
        unix_ms: u64,
    },
    Error {
        node: String,
        ifindex: u32,
        name: String,
        message: String,
    },
}

/// Metadata of a watched interface (the counters live in the kernel).
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    peer_ifindex: Option<u32>,
    peer_netnsid: Option<i32>,
    peer_netns: Option<u32>,
    mode: TcMode,
    attached_unix_ms: u64,
}

#[derive(Default)]
struct NodeStats {
    link_events: AtomicU64,
    attached: AtomicU64,
    forgotten: AtomicU64,
    attach_errors: AtomicU64,
    resyncs: AtomicU64,
    leftovers_removed: AtomicU64,
}

struct Node {
    name: String,
    netns: u32,
    path: Option<PathBuf>,
    instance: Mutex<TcInstance>,
    entries: Mutex<HashMap<u32, Entry>>,
    stats: NodeStats,
    /// eventfd the owner writes to stop the watcher.
    stop: OwnedFd,
    thread: Mutex<Option<thread::JoinHandle<usize>>>,
}

/// How start-up went, per node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub node: String,
    pub netns: u32,
    pub interfaces: usize,
    pub attach_ms: f64,
    pub leftovers_removed: usize,
}

/// The running accounting: watchers, kernel counters, and the registry. Query it with
/// [`TcAccounting::snapshot`] (about once a second is cheap: two map lookups per interface);
/// stop it with [`TcAccounting::shutdown`] (dropping it does the same).
pub struct TcAccounting {
    nodes: Vec<Arc<Node>>,
    mode: TcMode,
    mode_note: String,
    reports: Vec<NodeReport>,
    /// Entries the kernel's destination map holds.
    max_destinations: u32,
}

impl TcAccounting {
    /// Loads the programs (one instance per namespace), picks TCX or clsact, removes leftovers of
    /// killed earlier runs, attaches to every matching interface present, and starts following
    /// link events. Returns once every namespace's interfaces are attached.
    ///
    /// `nodes` empty means this process's namespace, named `default_node`.
    pub fn start(
        nodes: &[NodeNetns],
        default_node: &str,
        opts: &WatchOptions,
        events: Option<UnboundedSender<WatchEvent>>,
    ) -> Result<Self, InterfacesError> {
        let nodes: Vec<NodeNetns> = if nodes.is_empty() {
            vec![NodeNetns {
                node: default_node.to_string(),
                path: None,
            }]
        } else {
            nodes.to_vec()
        };
        crate::probe::raise_memlock(
            &nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let mut seen: HashMap<u32, String> = HashMap::new();
        let mut prepared = Vec::new();
        for spec in &nodes {
            let path = spec
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from("/proc/thread-self/ns/net"));
            let inode = fs::metadata(&path)
                .map_err(|source| InterfacesError::Netns {
                    node: spec.node.clone(),
                    path: path.display().to_string(),
                    source,
                })?
                .ino() as u32;
            if let Some(other) = seen.insert(inode, spec.node.clone()) {
                return Err(InterfacesError::DuplicateNetns {
                    a: other,
                    b: spec.node.clone(),
                    inode,
                });
            }
            let instance = TcInstance::load(inode, opts.load)?;
            prepared.push((spec.clone(), inode, instance));
        }
        let (mode, mode_note) = choose_mode(opts.mode, &prepared[0].2)?;

        let owner = Owner::current();
        let mut started = Self {
            nodes: Vec::new(),
            mode,
            mode_note,
            reports: Vec::new(),
            max_destinations: opts.load.max_destinations,
        };
        let mut waits = Vec::new();
        for (spec, netns, instance) in prepared {
            // SAFETY: plain syscall; the fd is checked and then owned.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(InterfacesError::Watch {
                    node: spec.node,
                    source: io::Error::last_os_error(),
                });
            }
            let node = Arc::new(Node {
                name: spec.node.clone(),
                netns,
                path: spec.path.clone(),
                instance: Mutex::new(instance),
                entries: Mutex::new(HashMap::new()),
                stats: NodeStats::default(),
                // SAFETY: eventfd just returned it.
                stop: unsafe { OwnedFd::from_raw_fd(efd) },
                thread: Mutex::new(None),
            });
            let (ready_tx, ready_rx) = mpsc::channel();
            let worker = Worker {
                node: node.clone(),
                pattern: opts.pattern.clone(),
                mode,
                priority: opts.priority,
                owner,
                events: events.clone(),
                attached: HashMap::new(),
                nsids: NsidCache::default(),
            };
            let handle = thread::Builder::new()
                .name(format!("netdrop-links-{}", spec.node))
                .spawn(move || worker.run(&ready_tx))
                .map_err(|source| InterfacesError::Watch {
                    node: spec.node.clone(),
                    source,
                })?;
            *node.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
            started.nodes.push(node);
            waits.push(ready_rx);
        }
        // Watchers of different namespaces attach in parallel; wait for all.
        for (node, rx) in started.nodes.clone().iter().zip(waits) {
            match rx.recv() {
                Ok(Ok(report)) => started.reports.push(report),
                Ok(Err(e)) => return Err(e), // `started` drops: the other watchers stop and detach
                Err(_) => return Err(InterfacesError::WatcherDied(node.name.clone())),
            }
        }
        Ok(started)
    }

    pub fn mode(&self) -> TcMode {
        self.mode
    }

    /// Which mode was chosen and why, in one line.
    pub fn mode_note(&self) -> &str {
        &self.mode_note
    }

    /// Start-up per node: interfaces attached, time taken, leftovers removed.
    pub fn reports(&self) -> &[NodeReport] {
        &self.reports
    }

    /// The nodes watched, with their namespace inodes.
    pub fn nodes(&self) -> Vec<(String, u32)> {
        self.nodes.iter().map(|n| (n.name.clone(), n.netns)).collect()
    }

    /// Every watched interface with its counters, the destination attempts, and the watcher
    /// statistics.
    pub fn snapshot(&self) -> TcSnapshot {
        let mut interfaces = Vec::new();
        let mut destinations = Vec::new();
        let mut stats = WatchStats::default();
        for node in &self.nodes {
            let entries: Vec<(u32, Entry)> = node
                .entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            let instance = node.instance.lock().unwrap_or_else(PoisonError::into_inner);
            for (ifindex, e) in entries {
                // An interface forgotten between the two locks has no counters any more: skip it.
                let Some([from_pod, to_pod]) = instance.read(ifindex) else {
                    continue;
                };
                interfaces.push(InterfaceSnapshot {
                    node: node.name.clone(),
                    netns: node.netns,
                    ifindex,
                    name: e.name,
                    peer_ifindex: e.peer_ifindex,
                    peer_netnsid: e.peer_netnsid,
                    peer_netns: e.peer_netns,
                    mode: e.mode,
                    attached_unix_ms: e.attached_unix_ms,
                    from_pod: from_pod.into(),
                    to_pod: to_pod.into(),
                });
            }
            for item in &instance.dests {
                let Ok((key, values)) = item else { continue };
                let sum = values.iter().fold([0u64; 2], |acc, v: &TcDestCounters| {
                    [acc[0] + v.attempts[0], acc[1] + v.attempts[1]]
                });
                destinations.push(DestinationSnapshot {
                    node: node.name.clone(),
                    dest: dest_from_key(&key),
                    from_pod: sum[0],
                    to_pod: sum[1],
                });
            }
            let k = instance.stats();
            drop(instance);
            let s = &node.stats;
            stats.link_events += s.link_events.load(Ordering::Relaxed);
            stats.attached += s.attached.load(Ordering::Relaxed);
            stats.forgotten += s.forgotten.load(Ordering::Relaxed);
            stats.attach_errors += s.attach_errors.load(Ordering::Relaxed);
            stats.resyncs += s.resyncs.load(Ordering::Relaxed);
            stats.leftovers_removed += s.leftovers_removed.load(Ordering::Relaxed);
            stats.unregistered_packets += k[tc_stat::UNREGISTERED as usize];
            stats.flow_insert_failed += k[tc_stat::FLOW_INSERT_FAILED as usize];
            stats.short_packets += k[tc_stat::SHORT_PACKETS as usize];
        }
        interfaces.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
        destinations.sort_by(|a, b| (&a.node, a.dest.ip, a.dest.port).cmp(&(&b.node, b.dest.ip, b.dest.port)));
        TcSnapshot {
            interfaces,
            destinations,
            stats,
        }
    }

    /// Sets the destinations whose attempts are counted (e.g. a Service's `ClusterIP` and
    /// backends), on every node. Destinations already set keep their counts; others start at 0.
    ///
    /// Locks here and below recover from poisoning: a watcher thread that panicked leaves the
    /// entry table and the loaded programs whole (each update is one insert or remove), and
    /// the trace must not go down with it.
    pub fn set_destinations(&self, dests: &[Destination]) -> Result<(), InterfacesError> {
        let wanted: HashSet<TcDestKey> = dests.iter().map(Destination::key).collect();
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| InterfacesError::Watch {
            node: "-".into(),
            source: e,
        })?;
        for node in &self.nodes {
            let mut instance = node.instance.lock().unwrap_or_else(PoisonError::into_inner);
            let present: HashSet<TcDestKey> = instance.dests.keys().filter_map(Result::ok).collect();
            for k in present.difference(&wanted) {
                let _ = instance.dests.remove(k);
            }
            for k in wanted.difference(&present) {
                let zero = PerCpuValues::try_from(vec![TcDestCounters::default(); cpus]).map_err(|e| TcError::Map {
                    name: "TC_DESTS",
                    source: e.into(),
                })?;
                if let Err(source) = instance.dests.insert(*k, zero, 0) {
                    if matches!(&source, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
                    {
                        return Err(InterfacesError::TooManyDestinations {
                            count: wanted.len(),
                            max: self.max_destinations,
                        });
                    }
                    return Err(TcError::Map {
                        name: "TC_DESTS",
                        source,
                    }
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Stops the watchers and detaches from every interface. Returns how many were detached.
    pub fn shutdown(mut self) -> usize {
        self.stop_all()
    }

    fn stop_all(&mut self) -> usize {
        for node in &self.nodes {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes to our eventfd.
            unsafe { libc::write(node.stop.as_raw_fd(), (&raw const one).cast(), 8) };
        }
        let mut detached = 0;
        for node in self.nodes.drain(..) {
            if let Some(h) = node.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
                detached += h.join().unwrap_or(0);
            }
        }
        detached
    }
}

impl Drop for TcAccounting {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn dest_from_key(k: &TcDestKey) -> Destination {
    let ip = if k.family == 4 {
        IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
    } else {
        IpAddr::from(k.addr)
    };
    Destination {
        ip,
        port: k.port,
        proto: k.proto,
    }
}

fn choose_mode(choice: TcModeChoice, instance: &TcInstance) -> Result<(TcMode, String), InterfacesError> {
    let clsact_note = format!(
        "clsact + netlink filters (priority {}, handle {:#x}, named {}/{}:pid=...)",
        tc::DEFAULT_PRIORITY,
        tc::FILTER_HANDLE,
        tc::INGRESS_PROGRAM,
        tc::EGRESS_PROGRAM
    );
    match choice {
        TcModeChoice::Clsact => Ok((TcMode::Clsact, format!("{clsact_note} (--tc-mode clsact)"))),
        TcModeChoice::Tcx => match tc::probe_tcx(instance) {
            Ok(()) => Ok((
                TcMode::Tcx,
                "tcx, first in each interface's chain (--tc-mode tcx)".into(),
            )),
            Err(e) => Err(TcError::NoTcx(e).into()),
        },
        TcModeChoice::Auto => match tc::probe_tcx(instance) {
            Ok(()) => Ok((TcMode::Tcx, "tcx (Linux 6.6+), first in each interface's chain".into())),
            Err(e) => Ok((
                TcMode::Clsact,
                format!("{clsact_note}: TCX unavailable ({e}; needs Linux 6.6+)"),
            )),
        },
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// nsid (as seen from the watched namespace) → namespace inode.
#[derive(Default)]
struct NsidCache {
    by_nsid: HashMap<i32, u32>,
    /// Namespaces already asked (with or without an id then); asked again on the next scan
    /// only if they had none.
    known: HashMap<u32, Option<i32>>,
}

impl NsidCache {
    fn resolve(&mut self, sock: &mut RouteSocket, nsid: i32) -> Option<u32> {
        if let Some(ino) = self.by_nsid.get(&nsid) {
            return Some(*ino);
        }
        self.scan(sock);
        self.by_nsid.get(&nsid).copied()
    }

    /// Asks the kernel for the id of every namespace that has a name (`/run/netns`) or a
    /// process (`/proc/PID/ns/net`).
    fn scan(&mut self, sock: &mut RouteSocket) {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(dir) = fs::read_dir("/run/netns") {
            candidates.extend(dir.filter_map(Result::ok).map(|e| e.path()));
        }
        if let Ok(dir) = fs::read_dir("/proc") {
            candidates.extend(
                dir.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .map(|e| e.path().join("ns/net")),
            );
        }
        let mut seen = HashSet::new();
        for path in candidates {
            let Ok(meta) = fs::metadata(&path) else { continue };
            let ino = meta.ino() as u32;
            if !seen.insert(ino) || matches!(self.known.get(&ino), Some(Some(_))) {
                continue;
            }
            let Ok(file) = fs::File::open(&path) else { continue };
            let id = sock.nsid_of(file.as_fd()).ok().flatten();
            self.known.insert(ino, id);
            if let Some(id) = id {
                self.by_nsid.insert(id, ino);
            }
        }
    }
}

/// What a link message says about an interface.
struct LinkInfo {
    ifindex: u32,
    name: String,
    peer_ifindex: Option<u32>,
    peer_netnsid: Option<i32>,
}

fn link_info(l: &LinkMessage) -> Option<LinkInfo> {
    let mut info = LinkInfo {
        ifindex: l.header.index,
        name: String::new(),
        peer_ifindex: None,
        peer_netnsid: None,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name.clone_from(n),
            LinkAttribute::Link(i) => info.peer_ifindex = Some(*i),
            LinkAttribute::LinkNetNsId(id) => info.peer_netnsid = Some(*id),
            _ => {}
        }
    }
    (!info.name.is_empty()).then_some(info)
}

/// The per-namespace watcher thread.
struct Worker {
    node: Arc<Node>,
    pattern: IfacePattern,
    mode: TcMode,
    priority: u16,
    owner: Owner,
    events: Option<UnboundedSender<WatchEvent>>,
    attached: HashMap<u32, (String, Attachment)>,
    nsids: NsidCache,
}

impl Worker {
    /// Runs until stopped; returns how many interfaces it detached at the end.
    fn run(mut self, ready: &mpsc::Sender<Result<NodeReport, InterfacesError>>) -> usize {
        let started = Instant::now();
        let (events_sock, mut ctl, leftovers) = match self.setup() {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return 0;
            }
        };
        if let Err(e) = self.resync(&mut ctl) {
            let _ = ready.send(Err(InterfacesError::Watch {
                node: self.node.name.clone(),
                source: e,
            }));
            return self.teardown(&mut ctl);
        }
        let report = NodeReport {
            node: self.node.name.clone(),
            netns: self.node.netns,
            interfaces: self.attached.len(),
            attach_ms: started.elapsed().as_secs_f64() * 1e3,
            leftovers_removed: leftovers,
        };
        if ready.send(Ok(report)).is_err() {
            return self.teardown(&mut ctl);
        }
        if let Err(e) = self.follow(&events_sock, &mut ctl) {
            warn!(
                "node {}: following link events failed ({e}); interfaces are no longer followed",
                self.node.name
            );
            // Keep what is attached until asked to stop.
            let mut pfd = libc::pollfd {
                fd: self.node.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            while unsafe { libc::poll(&raw mut pfd, 1, -1) } < 0 {}
        }
        self.teardown(&mut ctl)
    }

    fn setup(&mut self) -> Result<(Socket, RouteSocket, usize), InterfacesError> {
        let node = self.node.name.clone();
        if let Some(path) = &self.node.path {
            let file = fs::File::open(path).map_err(|source| InterfacesError::Netns {
                node: node.clone(),
                path: path.display().to_string(),
                source,
            })?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                InterfacesError::Netns {
                    node: node.clone(),
                    path: path.display().to_string(),
                    source: e.into(),
                }
            })?;
        }
        let watch = |source| InterfacesError::Watch {
            node: node.clone(),
            source,
        };
        // Subscribe first, list second: a link created in between shows up in one or both.
        let mut events = Socket::new(NETLINK_ROUTE).map_err(watch)?;
        events.bind_auto().map_err(watch)?;
        events.add_membership(RTNLGRP_LINK).map_err(watch)?;
        set_rcvbuf(&events);
        events.set_non_blocking(true).map_err(watch)?;
        let mut ctl = RouteSocket::open().map_err(watch)?;
        let removed = tc::remove_leftovers(&mut ctl)?;
        self.node
            .stats
            .leftovers_removed
            .fetch_add(removed as u64, Ordering::Relaxed);
        Ok((events, ctl, removed))
    }

    /// Lists the links and reconciles: attach the new, forget the gone.
    fn resync(&mut self, ctl: &mut RouteSocket) -> io::Result<()> {
        let links = ctl.dump_links()?;
        let mut present = HashSet::new();
        for l in &links {
            if let Some(info) = link_info(l) {
                present.insert(info.ifindex);
                self.on_link(ctl, info);
            }
        }
        let gone: Vec<u32> = self.attached.keys().filter(|i| !present.contains(i)).copied().collect();
        for ifindex in gone {
            self.forget(ctl, ifindex);
        }
        Ok(())
    }

    fn follow(&mut self, events: &Socket, ctl: &mut RouteSocket) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut fds = [
            libc::pollfd {
                fd: events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.node.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            if fds[0].revents == 0 {
                continue;
            }
            loop {
                match tc::recv_datagram(events, &mut buf) {
                    Ok(n) => self.on_datagram(ctl, &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        // Events were lost: the kernel's list is the truth.
                        self.node.stats.resyncs.fetch_add(1, Ordering::Relaxed);
                        debug!(
                            "node {}: link event socket overflowed; listing links again",
                            self.node.name
                        );
                        self.resync(ctl)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    fn on_datagram(&mut self, ctl: &mut RouteSocket, mut bytes: &[u8]) {
        while bytes.len() >= 16 {
            let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            if len < 16 || len > bytes.len() {
                break;
            }
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len]) {
                Ok(m) => {
                    if let NetlinkPayload::InnerMessage(inner) = m.payload {
                        self.node.stats.link_events.fetch_add(1, Ordering::Relaxed);
                        match inner {
                            RouteNetlinkMessage::NewLink(l) => {
                                if let Some(info) = link_info(&l) {
                                    self.on_link(ctl, info);
                                }
                            }
                            RouteNetlinkMessage::DelLink(l) => self.forget(ctl, l.header.index),
                            _ => {}
                        }
                    }
                }
                Err(e) => debug!("undecodable link message: {e}"),
            }
            bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
        }
    }

    /// A link exists (new, changed, renamed, or listed).
    fn on_link(&mut self, ctl: &mut RouteSocket, info: LinkInfo) {
        let matches = self.pattern.matches(&info.name);
        if let Some((name, _)) = self.attached.get_mut(&info.ifindex) {
            if *name == info.name {
                return;
            }
            if matches {
                // Renamed, still ours: keep the attachment, update the name.
                name.clone_from(&info.name);
                if let Some(e) = self
                    .node
                    .entries
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_mut(&info.ifindex)
                {
                    e.name.clone_from(&info.name);
                }
            } else {
                self.forget(ctl, info.ifindex);
            }
            return;
        }
        if matches {
            self.attach(ctl, info);
        }
    }

    fn attach(&mut self, ctl: &mut RouteSocket, info: LinkInfo) {
        let result = {
            let mut instance = self.node.instance.lock().unwrap_or_else(PoisonError::into_inner);
            // Counters first, so not one packet goes uncounted.
            instance.register(info.ifindex).and_then(|()| {
                tc::attach(
                    &instance,
                    ctl,
                    info.ifindex,
                    &info.name,
                    self.mode,
                    self.priority,
                    self.owner,
                )
                .inspect_err(|_| {
                    instance.unregister(info.ifindex);
                })
            })
        };
        match result {
            Ok(att) => {
                let peer_netns = info.peer_netnsid.and_then(|id| self.nsids.resolve(ctl, id));
                let at = unix_ms();
                self.node.entries.lock().unwrap_or_else(PoisonError::into_inner).insert(
                    info.ifindex,
                    Entry {
                        name: info.name.clone(),
                        peer_ifindex: info.peer_ifindex,
                        peer_netnsid: info.peer_netnsid,
                        peer_netns,
                        mode: att.mode(),
                        attached_unix_ms: at,
                    },
                );
                self.attached.insert(info.ifindex, (info.name.clone(), att));
                self.node.stats.attached.fetch_add(1, Ordering::Relaxed);
                self.emit(WatchEvent::Attached {
                    node: self.node.name.clone(),
                    ifindex: info.ifindex,
                    name: info.name,
                    unix_ms: at,
                });
            }
            Err(e) => {
                // The interface may be gone already (deleted right after it appeared): not an error.
                if let TcError::Attach { source, .. } = &e
                    && matches!(source.raw_os_error(), Some(libc::ENODEV | libc::ENXIO))
                {
                    return;
                }
                self.node.stats.attach_errors.fetch_add(1, Ordering::Relaxed);
                warn!("node {}: {e}", self.node.name);
                self.emit(WatchEvent::Error {
                    node: self.node.name.clone(),
                    ifindex: info.ifindex,
                    name: info.name,
                    message: e.to_string(),
                });
            }
        }
    }

    fn forget(&mut self, ctl: &mut RouteSocket, ifindex: u32) {
        let Some((name, att)) = self.attached.remove(&ifindex) else {
            return;
        };
        self.node
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ifindex);
        if let Err(e) = att.detach(ctl) {
            debug!("node {}: detaching from {name}: {e}", self.node.name);
        }
        self.node
            .instance
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unregister(ifindex);
        self.node.stats.forgotten.fetch_add(1, Ordering::Relaxed);
        self.emit(WatchEvent::Forgotten {
            node: self.node.name.clone(),
            ifindex,
            name,
            unix_ms: unix_ms(),
        });
    }

    fn teardown(&mut self, ctl: &mut RouteSocket) -> usize {
        let n = self.attached.len();
        let all: Vec<u32> = self.attached.keys().copied().collect();
        let events = self.events.take();
        for ifindex in all {
            self.forget(ctl, ifindex);
        }
        self.events = events;
        n
    }

    fn emit(&self, ev: WatchEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }
}

fn set_rcvbuf(sock: &Socket) {
    let size = EVENT_BUFFER_BYTES;
    // SAFETY: setsockopt with a valid int. SO_RCVBUFFORCE (CAP_NET_ADMIN) ignores rmem_max.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        let _ = sock.set_rx_buf_sz(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell() {
        let p = IfacePattern::new(&["cali*".into(), "lxc?x".into()]);
        assert!(p.matches("cali1b2c3d4e5f6"));
        assert!(p.matches("cali"));
        assert!(!p.matches("eth0"));
        assert!(!p.matches("xcali1"));
        assert!(p.matches("lxc1x"));
        assert!(!p.matches("lxc12x"));
        assert!(glob(b"*", b"anything"));
        assert!(glob(b"v*th*", b"veth0th"));
        assert!(!glob(b"v*th", b"veth0"));
    }

    #[test]
    fn node_netns_parses() {
        let n: NodeNetns = "node-a=/run/netns/node-a".parse().expect("parses");
        assert_eq!(
            n,
            NodeNetns {
                node: "node-a".into(),
                path: Some("/run/netns/node-a".into())
            }
        );
        let n: NodeNetns = "b=lab-b".parse().expect("bare name");
        assert_eq!(n.path, Some(PathBuf::from("/run/netns/lab-b")));
        assert!("nopath".parse::<NodeNetns>().is_err());
        assert!("=x".parse::<NodeNetns>().is_err());
    }

    #[test]
    fn destinations_parse_and_key() {
        let d: Destination = "10.96.0.10:53/udp".parse().expect("v4");
        assert_eq!(
            d,
            Destination {
                ip: "10.96.0.10".parse().expect("ip"),
                port: 53,
                proto: 17
            }
        );
        let k = d.key();
        assert_eq!(
            (k.family, k.port, k.proto, &k.addr[..4]),
            (4, 53, 17, &[10, 96, 0, 10][..])
        );
        assert_eq!(dest_from_key(&k), d);
        let d6: Destination = "[fd00::1]:443".parse().expect("v6");
        assert_eq!(d6.proto, 6);
        assert_eq!(dest_from_key(&d6.key()), d6);
        assert!("10.0.0.1:80/icmp".parse::<Destination>().is_err());
    }
}
