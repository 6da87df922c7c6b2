//! Per-pod traffic accounting on workload interfaces, following pod churn: owns the registry of
//! watched interfaces, the rtnetlink watchers that attach to interfaces as they appear and forget
//! them as they go, and counter snapshots for the trace loop (`netdrop interfaces` and `netdrop trace`
//! show them).
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

mod options;
mod snapshot;
mod watcher;

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering, mpsc},
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::PerCpuValues;
use netdrop_common::{TcDestCounters, TcDestKey, tc_stat};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::probe::tc::{self, Owner, TcError, TcInstance, TcMode, TcModeChoice};

pub use self::{
    options::{IfacePattern, NodeNetns, WatchOptions},
    snapshot::{Counters, Destination, DestinationSnapshot, InterfaceSnapshot, TcSnapshot, WatchEvent, WatchStats},
};
use self::{
    snapshot::dest_from_key,
    watcher::{Entry, NetnsWatcher, NodeStats, NsidCache, Worker},
};

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

/// Removes, from every interface of each node namespace (none given: this process's own), the
/// clsact filters netdrop runs that no longer exist left behind (`netdrop cleanup`: an agent
/// killed or uninstalled). Filters of live runs and everyone else's stay; TCX links need nothing
/// (they go with the process). Returns (node, filters removed).
pub fn remove_leftovers_in(nodes: &[NodeNetns]) -> Result<Vec<(String, usize)>, InterfacesError> {
    let nodes: Vec<NodeNetns> = if nodes.is_empty() {
        vec![NodeNetns {
            node: nix::unistd::gethostname().map_or_else(|_| "this host".into(), |h| h.to_string_lossy().into_owned()),
            path: None,
        }]
    } else {
        nodes.to_vec()
    };
    let mut out = Vec::new();
    for spec in nodes {
        let name = spec.node.clone();
        // A thread of its own: setns changes the calling thread's namespace.
        let worker = thread::spawn(move || -> Result<usize, InterfacesError> {
            if let Some(path) = &spec.path {
                let netns = |source| InterfacesError::Netns {
                    node: spec.node.clone(),
                    path: path.display().to_string(),
                    source,
                };
                let file = fs::File::open(path).map_err(netns)?;
                nix::sched::setns(std::os::fd::AsFd::as_fd(&file), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| netns(e.into()))?;
            }
            let mut sock = tc::RouteSocket::open().map_err(|source| InterfacesError::Watch {
                node: spec.node.clone(),
                source,
            })?;
            Ok(tc::remove_leftovers(&mut sock)?)
        });
        let removed = worker
            .join()
            .map_err(|_| InterfacesError::WatcherDied(name.clone()))??;
        out.push((name, removed));
    }
    Ok(out)
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
    nodes: Vec<Arc<NetnsWatcher>>,
    mode: TcMode,
    mode_note: String,
    /// Why TCX was not used, when `auto` fell back to clsact.
    tcx_error: Option<String>,
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
        events: Option<&UnboundedSender<WatchEvent>>,
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
        let (mode, mode_note, tcx_error) = choose_mode(opts.mode, &prepared[0].2)?;

        let owner = Owner::current();
        let mut started = Self {
            nodes: Vec::new(),
            mode,
            mode_note,
            tcx_error,
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
            let node = Arc::new(NetnsWatcher {
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
                events: events.cloned(),
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

    /// Why TCX was not used, when `auto` fell back to clsact.
    pub fn tcx_error(&self) -> Option<&str> {
        self.tcx_error.as_deref()
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
            let kinds = |keys: &HashSet<TcDestKey>| keys.iter().fold(0, |k, d| k | d.kind());
            // The programs look up only the kinds of entries there are: cover the new ones
            // before they count, and forget the old ones once they are gone.
            instance.set_dest_kinds(kinds(&present) | kinds(&wanted))?;
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
            instance.set_dest_kinds(kinds(&wanted))?;
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

/// The tc mode, a line saying which and why, and the TCX error when auto fell back to clsact.
fn choose_mode(
    choice: TcModeChoice,
    instance: &TcInstance,
) -> Result<(TcMode, String, Option<String>), InterfacesError> {
    let clsact_note = format!(
        "clsact + netlink filters (priority {}, handle {:#x}, named {}/{}:pid=...)",
        tc::DEFAULT_PRIORITY,
        tc::FILTER_HANDLE,
        tc::INGRESS_PROGRAM,
        tc::EGRESS_PROGRAM
    );
    match choice {
        TcModeChoice::Clsact => Ok((TcMode::Clsact, format!("{clsact_note} (--tc-mode clsact)"), None)),
        TcModeChoice::Tcx => match tc::probe_tcx(instance) {
            Ok(()) => Ok((
                TcMode::Tcx,
                "tcx, first in each interface's chain (--tc-mode tcx)".into(),
                None,
            )),
            Err(e) => Err(TcError::NoTcx(e).into()),
        },
        TcModeChoice::Auto => match tc::probe_tcx(instance) {
            Ok(()) => Ok((
                TcMode::Tcx,
                "tcx (Linux 6.6+), first in each interface's chain".into(),
                None,
            )),
            Err(e) => Ok((
                TcMode::Clsact,
                format!("{clsact_note}: TCX unavailable ({e}; needs Linux 6.6+)"),
                Some(format!("{e} (needs Linux 6.6+)")),
            )),
        },
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{options::glob, snapshot::dest_from_key, *};

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
