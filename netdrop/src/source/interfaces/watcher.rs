//! The per-namespace watcher: a thread that enters one network namespace, attaches the tc
//! programs to every matching interface there, and follows rtnetlink link events (attach as
//! interfaces appear, forget them as they go, list again after an overflow).

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Instant,
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use super::{IfacePattern, InterfacesError, NodeReport, WatchEvent, unix_ms};
use crate::probe::tc::{self, Attachment, Owner, RouteSocket, TcError, TcInstance, TcMode};

/// `RTNLGRP_LINK`: link creation, change and removal notifications.
const RTNLGRP_LINK: u32 = 1;
/// Receive buffer of the event socket: a burst of a few thousand link messages fits.
const EVENT_BUFFER_BYTES: libc::c_int = 32 << 20;

/// Metadata of a watched interface (the counters live in the kernel).
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) name: String,
    pub(super) peer_ifindex: Option<u32>,
    pub(super) peer_netnsid: Option<i32>,
    pub(super) peer_netns: Option<u32>,
    pub(super) mode: TcMode,
    pub(super) attached_unix_ms: u64,
}

#[derive(Default)]
pub(super) struct NodeStats {
    pub(super) link_events: AtomicU64,
    pub(super) attached: AtomicU64,
    pub(super) forgotten: AtomicU64,
    pub(super) attach_errors: AtomicU64,
    pub(super) resyncs: AtomicU64,
    pub(super) leftovers_removed: AtomicU64,
}

/// One watched network namespace: its tc programs, the interfaces attached there, and the
/// thread that follows its link events.
pub(super) struct NetnsWatcher {
    pub(super) name: String,
    pub(super) netns: u32,
    pub(super) path: Option<PathBuf>,
    pub(super) instance: Mutex<TcInstance>,
    pub(super) entries: Mutex<HashMap<u32, Entry>>,
    pub(super) stats: NodeStats,
    /// eventfd the owner writes to stop the watcher.
    pub(super) stop: OwnedFd,
    pub(super) thread: Mutex<Option<thread::JoinHandle<usize>>>,
}

/// nsid (as seen from the watched namespace) → namespace inode.
#[derive(Default)]
pub(super) struct NsidCache {
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
pub(super) struct Worker {
    pub(super) node: Arc<NetnsWatcher>,
    pub(super) pattern: IfacePattern,
    pub(super) mode: TcMode,
    pub(super) priority: u16,
    pub(super) owner: Owner,
    pub(super) events: Option<UnboundedSender<WatchEvent>>,
    pub(super) attached: HashMap<u32, (String, Attachment)>,
    pub(super) nsids: NsidCache,
}

impl Worker {
    /// Runs until stopped; returns how many interfaces it detached at the end.
    pub(super) fn run(mut self, ready: &mpsc::Sender<Result<NodeReport, InterfacesError>>) -> usize {
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
                match crate::probe::netlink::recv_datagram(events, &mut buf) {
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
