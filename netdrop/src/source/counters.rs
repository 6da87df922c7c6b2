//! The drop counters as a source: the kernel's per-CPU `DROPS` map harvested into totals and
//! deltas, with the keys of network namespaces that no longer exist evicted from it.
//!
//! Without eviction a long-running netdrop on a node with pod churn fills the map (16k keys)
//! with dead pods' counters. Eviction keeps every exported count exact and monotonic:
//! - The kernel program keys a namespace by its cookie as well as its inode
//!   (`DropKey::netns_cookie`): inodes are reused as soon as a namespace is freed, cookies never,
//!   so a dead namespace's keys stay its own and can be told apart from a new one's.
//! - A thread ([`NetnsLister`]) lists the namespaces alive — every process's `/proc/PID/ns/net`
//!   and every nsfs bind mount (`/run/netns/NAME`, CNI's `/var/run/netns/cni-…`) — and learns
//!   the cookie of those that have keys: `NS_GET_ID` on the namespace file (6.18+, where the
//!   cookie is the namespace id), else `SO_NETNS_COOKIE` (5.14+) of a socket made inside it.
//! - A key is evicted only when its namespace is missing from a listing begun after the key was
//!   first read (a namespace born after a listing is never judged by it), and its count did not
//!   change between the last two harvests (no drop still in flight in a dying namespace).
//! - Its last count is added to a userspace total under the same key without the cookie — what
//!   the kernel would have held, keyed by inode alone — before the key is deleted: the exported
//!   counts are the ones netdrop reported before eviction existed, and never go down.
//!
//! Older kernels: without a usable cookie (before 5.12; 5.7 to 5.11 have an `atomic64_t` made
//! only on demand, 0 in most namespaces) keys carry the inode alone; a key is evicted once no
//! process or mount holds its inode and it stayed idle, and a new namespace that takes a dead
//! one's inode before that adds to its counts (as before). With the cookie but without a way to
//! read it from userspace (5.12, 5.13), namespaces are judged by inode: a reused inode only delays
//! the eviction of the old namespace's keys until the new one is gone.
//!
//! One race remains: a drop counted in a dead namespace between the last read of its (idle) key
//! and the delete — microseconds, after a whole interval without drops there — is lost.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::{fs::MetadataExt as _, net::UnixDatagram},
    },
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use netdrop_common::{DropKey, stat};
use tracing::{debug, warn};

use crate::probe::{DropProbe, KernelCounts};

/// How often the watcher lists the namespaces alive (and the trace harvests, once a second).
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// How long a namespace's learnt cookie is trusted: an inode taken over by a new namespace
/// that has no drops yet cannot be told from its dead predecessor any other way, so the old
/// keys wait at most this long.
const COOKIE_TTL: Duration = Duration::from_secs(30);

/// A key's last count and the harvests (generations) it was first read and last changed in.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    count: u64,
    first_seen: u64,
    changed_at: u64,
    read_at: u64,
}

/// The exported key: the kernel's key without the cookie (the namespace as users know it, by
/// inode).
fn exported(key: &DropKey) -> DropKey {
    DropKey {
        netns_cookie: 0,
        ..*key
    }
}

/// The counters between harvests. No syscalls: [`DropCounters`] reads and deletes.
#[derive(Debug, Default)]
pub struct CounterState {
    generation: u64,
    /// Keys in the kernel map, as last read.
    live: HashMap<DropKey, Tracked>,
    /// Counts of evicted keys, by exported key.
    folded: HashMap<DropKey, u64>,
    /// Totals at the previous snapshot, for the deltas.
    previous: HashMap<DropKey, u64>,
    evicted_keys: u64,
}

impl CounterState {
    /// The number of the last harvest.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Takes one read of the kernel map (key, count summed over CPUs). Returns the keys whose
    /// namespace `alive` says is gone and that stayed idle since the previous read: delete them
    /// from the kernel map, then pass the ones deleted to [`CounterState::evicted`].
    pub fn harvest(&mut self, read: &[(DropKey, u64)], alive: Option<&LiveSet>) -> Vec<DropKey> {
        self.generation += 1;
        let g = self.generation;
        for (key, count) in read {
            match self.live.entry(*key) {
                Entry::Occupied(mut e) => {
                    let t = e.get_mut();
                    if *count != t.count {
                        // A kernel count only rises while its key exists; `max` keeps the
                        // export monotonic whatever happens.
                        t.count = t.count.max(*count);
                        t.changed_at = g;
                    }
                    t.read_at = g;
                }
                Entry::Vacant(e) => {
                    e.insert(Tracked {
                        count: *count,
                        first_seen: g,
                        changed_at: g,
                        read_at: g,
                    });
                }
            }
        }
        let Some(alive) = alive else { return Vec::new() };
        self.live
            .iter()
            .filter(|(key, t)| {
                t.read_at == g && t.changed_at < g && alive.after_generation >= t.first_seen && !alive.holds(key)
            })
            .map(|(key, _)| *key)
            .collect()
    }

    /// Folds the counts of keys deleted from the kernel map into the userspace totals.
    pub fn evicted(&mut self, deleted: &[DropKey]) {
        for key in deleted {
            if let Some(t) = self.live.remove(key) {
                *self.folded.entry(exported(key)).or_default() += t.count;
                self.evicted_keys += 1;
            }
        }
    }

    /// Every count since the start, by exported key (cookies merged), evicted keys included.
    pub fn totals(&self) -> HashMap<DropKey, u64> {
        let mut totals = self.folded.clone();
        for (key, t) in &self.live {
            *totals.entry(exported(key)).or_default() += t.count;
        }
        totals
    }

    /// The totals, and what each rose by since the previous snapshot.
    pub fn snapshot(&mut self, stats: [u64; stat::COUNT as usize]) -> CounterSnapshot {
        let totals = self.totals();
        let deltas = totals
            .iter()
            .filter_map(|(k, n)| {
                let d = n.saturating_sub(self.previous.get(k).copied().unwrap_or(0));
                (d > 0).then_some((*k, d))
            })
            .collect();
        let snapshot = CounterSnapshot {
            counts: KernelCounts {
                drops: totals.iter().map(|(k, n)| (*k, *n)).collect(),
                stats,
            },
            deltas,
            kernel_keys: self.live.len(),
            evicted_keys: self.evicted_keys,
        };
        self.previous = totals;
        snapshot
    }

    /// The namespaces the kernel map has keys of: inode → cookies.
    pub fn namespaces(&self) -> HashMap<u32, HashSet<u64>> {
        let mut m: HashMap<u32, HashSet<u64>> = HashMap::new();
        for key in self.live.keys().filter(|k| k.netns != 0) {
            m.entry(key.netns).or_default().insert(key.netns_cookie);
        }
        m
    }
}

/// One harvest of the drop counters.
#[derive(Clone, Debug, Default)]
pub struct CounterSnapshot {
    /// Every count since the start by exported key (inode, cookie merged), with the counts of
    /// evicted keys; and the kernel's event statistics.
    pub counts: KernelCounts,
    /// What each total rose by since the previous harvest (rises only).
    pub deltas: Vec<(DropKey, u64)>,
    /// Keys in the kernel map at this harvest (after eviction).
    pub kernel_keys: usize,
    /// Keys evicted since the start, their counts kept in `counts`.
    pub evicted_keys: u64,
}

/// The network namespaces alive at one listing.
#[derive(Clone, Debug, Default)]
pub struct LiveSet {
    /// The last harvest that finished before the listing began: keys first read later may
    /// belong to namespaces the listing could not see.
    pub after_generation: u64,
    /// Inodes of the namespaces alive.
    pub inodes: HashSet<u32>,
    /// Cookies of the namespaces alive, where learnt.
    pub cookies: HashMap<u32, u64>,
}

impl LiveSet {
    /// Whether the key's namespace may still be alive. A key of an unknown namespace (inode 0)
    /// always is; one whose inode is alive is, unless that inode's namespace is known to have
    /// another cookie (the key's namespace died and a new one took its inode).
    pub fn holds(&self, key: &DropKey) -> bool {
        if key.netns == 0 {
            return true;
        }
        if !self.inodes.contains(&key.netns) {
            return false;
        }
        match self.cookies.get(&key.netns) {
            Some(c) if key.netns_cookie != 0 => *c == key.netns_cookie,
            _ => true,
        }
    }
}

/// How this kernel tells a namespace's cookie to userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieSource {
    /// `ioctl(NS_GET_ID)` on the namespace file (6.18+, where the cookie is the namespace id).
    NsGetId,
    /// `SO_NETNS_COOKIE` of a socket made inside the namespace (5.14+): one `setns` each.
    SocketInside,
    /// Neither: namespaces are judged by inode.
    None,
}

impl CookieSource {
    /// Which way works here, checked on this thread's own namespace.
    pub fn probe() -> Self {
        let Ok(own) = socket_cookie() else { return Self::None };
        let id = fs::File::open("/proc/thread-self/ns/net").and_then(|f| ns_get_id(&f));
        match id {
            Ok(id) if id == own => Self::NsGetId,
            _ => Self::SocketInside,
        }
    }

    /// The cookies of the namespaces at these paths (inode, path); those that cannot be read
    /// (gone meanwhile, the path now another namespace's) are left out.
    fn resolve(self, ask: Vec<(u32, PathBuf)>) -> Vec<(u32, u64)> {
        let one = move |(ino, path): &(u32, PathBuf), enter: bool| -> Option<(u32, u64)> {
            let f = fs::File::open(path).ok()?;
            // The path may name another namespace by now (a PID reused): trust the open file.
            if f.metadata().ok()?.ino() as u32 != *ino {
                return None;
            }
            if !enter {
                return Some((*ino, ns_get_id(&f).ok()?));
            }
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            Some((*ino, socket_cookie().ok()?))
        };
        match self {
            Self::None => Vec::new(),
            Self::NsGetId => ask.iter().filter_map(|a| one(a, false)).collect(),
            // A thread of its own, which enters one namespace after the other and ends: the
            // watcher's own thread never leaves its namespace.
            Self::SocketInside => thread::Builder::new()
                .name("netdrop-nscookie".into())
                .spawn(move || ask.iter().filter_map(|a| one(a, true)).collect::<Vec<_>>())
                .ok()
                .and_then(|h| h.join().ok())
                .unwrap_or_default(),
        }
    }
}

/// `NS_GET_ID`, `_IOR(NSIO, 13, __u64)` (include/uapi/linux/nsfs.h, 6.18+).
const NS_GET_ID: u64 = (2 << 30) | (8 << 16) | (0xb7 << 8) | 0x0d;

fn ns_get_id(f: &fs::File) -> io::Result<u64> {
    let mut id = 0u64;
    // SAFETY: a valid fd and a pointer to a local u64, which is what the kernel writes.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_ID as libc::Ioctl, &raw mut id) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(id)
}

/// `SO_NETNS_COOKIE` of a socket made in the calling thread's namespace.
fn socket_cookie() -> io::Result<u64> {
    let s = UnixDatagram::unbound()?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a pointer/length pair describing a local u64.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Whether the watcher must (re)learn the cookie of live namespace `ino`: only namespaces the
/// kernel map has keys of need one; then when none is known, when its keys carry another
/// cookie too (a dead predecessor's, or a new namespace's), or when the learnt one is old.
fn needs_cookie(
    ino: u32,
    namespaces: &HashMap<u32, HashSet<u64>>,
    known: Option<&(u64, Instant)>,
    now: Instant,
) -> bool {
    let Some(cookies) = namespaces.get(&ino) else {
        return false;
    };
    match known {
        None => true,
        Some((c, at)) => cookies.iter().any(|k| k != c) || now.duration_since(*at) >= COOKIE_TTL,
    }
}

/// Mount points of nsfs mounts in a `/proc/self/mountinfo` text (`ip netns add` and CNI plugins
/// keep namespaces alive by such bind mounts).
fn nsfs_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split(' ').next()? == "nsfs").then_some(())?;
            left.split(' ').nth(4).map(|p| PathBuf::from(unescape_octal(p)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match digits {
            Some(d) if b[i] == b'\\' => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every network namespace a process or an nsfs mount holds: inode → a path that opens it.
fn list_namespaces() -> HashMap<u32, PathBuf> {
    let mut found = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if !e
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                continue;
            }
            let path = e.path().join("ns/net");
            if let Ok(m) = fs::metadata(&path) {
                found.entry(m.ino() as u32).or_insert(path);
            }
        }
    }
    for path in nsfs_mounts(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()) {
        let Ok(f) = fs::File::open(&path) else { continue };
        // Other namespace types share the inode numbers' space: keep network namespaces only.
        // SAFETY: a valid fd; NS_GET_NSTYPE takes no argument (4.11+).
        let kind = unsafe { libc::ioctl(f.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if kind >= 0 && kind != libc::CLONE_NEWNET {
            continue;
        }
        if let Ok(m) = f.metadata() {
            found.entry(m.ino() as u32).or_insert(path);
        }
    }
    found
}

/// What the harvest and the watcher thread share.
#[derive(Default)]
struct Shared {
    /// The last harvest finished.
    generation: AtomicU64,
    /// The namespaces the kernel map has keys of, as of that harvest.
    namespaces: Mutex<HashMap<u32, HashSet<u64>>>,
    /// The latest listing.
    latest: Mutex<Option<Arc<LiveSet>>>,
}

/// The thread that lists the namespaces alive, once per [`SCAN_INTERVAL`] (the interfaces'
/// `NetnsWatcher` is another thing: it follows one namespace's links).
pub struct NetnsLister {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NetnsLister {
    pub fn start(cookies: CookieSource) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = mpsc::channel();
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("netdrop-netns".into())
            .spawn(move || watch(&s, &stopped, cookies))?;
        Ok(Self {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn latest(&self) -> Option<Arc<LiveSet>> {
        self.shared
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn publish(&self, generation: u64, namespaces: HashMap<u32, HashSet<u64>>) {
        *self.shared.namespaces.lock().unwrap_or_else(PoisonError::into_inner) = namespaces;
        self.shared.generation.store(generation, Ordering::Release);
    }
}

impl Drop for NetnsLister {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(shared: &Shared, stopped: &mpsc::Receiver<()>, cookies: CookieSource) {
    let mut known: HashMap<u32, (u64, Instant)> = HashMap::new();
    loop {
        let after_generation = shared.generation.load(Ordering::Acquire);
        let namespaces = shared.namespaces.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let found = list_namespaces();
        known.retain(|ino, _| found.contains_key(ino));
        let now = Instant::now();
        let ask: Vec<(u32, PathBuf)> = found
            .iter()
            .filter(|(ino, _)| cookies != CookieSource::None && needs_cookie(**ino, &namespaces, known.get(ino), now))
            .map(|(ino, p)| (*ino, p.clone()))
            .collect();
        for (ino, cookie) in cookies.resolve(ask) {
            known.insert(ino, (cookie, now));
        }
        let set = LiveSet {
            after_generation,
            inodes: found.keys().copied().collect(),
            cookies: known.iter().map(|(ino, (c, _))| (*ino, *c)).collect(),
        };
        *shared.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(set));
        match stopped.recv_timeout(SCAN_INTERVAL) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// The drop counters of a run: harvested from the kernel map, dead namespaces' keys evicted.
pub struct DropCounters {
    state: CounterState,
    /// `None`: no eviction (counts-only mode, whose keys carry no namespace).
    watcher: Option<NetnsLister>,
}

impl DropCounters {
    /// `evict`: the keys carry namespaces (the program reads the skb). Cookies are learnt when
    /// `cookies` (the program keys by cookie too) and the kernel tells them to userspace.
    pub fn start(evict: bool, cookies: bool) -> Self {
        let watcher = if evict {
            let source = if cookies {
                CookieSource::probe()
            } else {
                CookieSource::None
            };
            debug!("namespace eviction: cookies from {source:?}");
            match NetnsLister::start(source) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!("counters of namespaces that are gone stay in the kernel map: {e}");
                    None
                }
            }
        } else {
            None
        };
        Self {
            state: CounterState::default(),
            watcher,
        }
    }

    /// Reads the kernel map, evicts the keys of namespaces that are gone (their counts kept),
    /// and returns every count since the start.
    pub fn harvest(&mut self, probe: &mut DropProbe) -> CounterSnapshot {
        let read = probe.counts();
        let alive = self.watcher.as_ref().and_then(NetnsLister::latest);
        let evict = self.state.harvest(&read.drops, alive.as_deref());
        if !evict.is_empty() {
            let deleted = probe.remove_drop_keys(&evict);
            debug!(
                "evicted {} of {} counter keys of namespaces that are gone",
                deleted.len(),
                evict.len()
            );
            self.state.evicted(&deleted);
        }
        if let Some(w) = &self.watcher {
            w.publish(self.state.generation(), self.state.namespaces());
        }
        self.state.snapshot(read.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(netns: u32, cookie: u64, reason: u32) -> DropKey {
        DropKey {
            location: 0x1000,
            reason,
            netns,
            ip_version: 4,
            netns_cookie: cookie,
            ..DropKey::default()
        }
    }

    fn alive(after_generation: u64, ns: &[(u32, Option<u64>)]) -> LiveSet {
        LiveSet {
            after_generation,
            inodes: ns.iter().map(|(i, _)| *i).collect(),
            cookies: ns.iter().filter_map(|(i, c)| c.map(|c| (*i, c))).collect(),
        }
    }

    fn total(s: &CounterState, k: DropKey) -> u64 {
        s.totals().get(&exported(&k)).copied().unwrap_or(0)
    }

    /// A dead namespace's key is evicted once idle, its count kept; a new namespace that took
    /// its inode counts on top of it, and the export never goes down.
    #[test]
    fn dead_namespace_folded_then_evicted_and_totals_stay() {
        let mut s = CounterState::default();
        let dead = key(7, 100, 2);
        let host = key(1, 1, 2);
        assert!(s.harvest(&[(dead, 5), (host, 3)], None).is_empty());
        // Namespace 7 (cookie 100) is gone at this listing; still dropping (5 → 6): kept.
        let gone = alive(1, &[(1, Some(1))]);
        assert!(s.harvest(&[(dead, 6), (host, 3)], Some(&gone)).is_empty());
        assert_eq!(total(&s, dead), 6);
        // Idle now: evicted; the host's idle key stays (its namespace is alive).
        let evict = s.harvest(&[(dead, 6), (host, 3)], Some(&gone));
        assert_eq!(evict, vec![dead]);
        s.evicted(&evict);
        assert_eq!(total(&s, dead), 6, "the count survives the eviction");
        assert_eq!(s.namespaces().keys().copied().collect::<Vec<_>>(), vec![1]);
        // A new namespace takes inode 7 (cookie 200): same exported row, counts add up.
        let new = key(7, 200, 2);
        assert!(s.harvest(&[(new, 4), (host, 3)], Some(&gone)).is_empty());
        assert_eq!(total(&s, new), 10);
        // While it lives, its idle key is not evicted, whatever became of the old cookie.
        let reused = alive(4, &[(1, Some(1)), (7, Some(200))]);
        assert!(s.harvest(&[(new, 4), (host, 3)], Some(&reused)).is_empty());
        assert_eq!(total(&s, new), 10);
    }

    /// The old namespace's key is evicted while a new one lives with the same inode: the cookie
    /// tells them apart.
    #[test]
    fn reused_inode_does_not_keep_the_dead_key() {
        let mut s = CounterState::default();
        let old = key(9, 50, 3);
        let new = key(9, 51, 3);
        s.harvest(&[(old, 2)], None);
        s.harvest(&[(old, 2), (new, 1)], None);
        let listing = alive(2, &[(9, Some(51))]);
        let evict = s.harvest(&[(old, 2), (new, 1)], Some(&listing));
        assert_eq!(evict, vec![old]);
        s.evicted(&evict);
        assert_eq!(total(&s, new), 3);
        // Without a learnt cookie the inode alone keeps both.
        let mut s = CounterState::default();
        s.harvest(&[(old, 2)], None);
        s.harvest(&[(old, 2)], None);
        assert!(s.harvest(&[(old, 2)], Some(&alive(2, &[(9, None)]))).is_empty());
    }

    /// A listing that began before a key was first read cannot judge it: the namespace may have
    /// been made after the listing.
    #[test]
    fn listing_older_than_the_key_does_not_judge_it() {
        let mut s = CounterState::default();
        s.harvest(&[], None);
        let born = key(11, 77, 2);
        s.harvest(&[(born, 1)], None);
        let stale = alive(1, &[]);
        assert!(s.harvest(&[(born, 1)], Some(&stale)).is_empty());
        assert!(s.harvest(&[(born, 1)], Some(&stale)).is_empty());
        let fresh = alive(2, &[]);
        assert_eq!(s.harvest(&[(born, 1)], Some(&fresh)), vec![born]);
    }

    /// Keys of an unknown namespace (0, also every key in counts-only mode) are never evicted,
    /// and a key missing from a read is not judged on it.
    #[test]
    fn unknown_namespace_and_unread_keys_stay() {
        let mut s = CounterState::default();
        let unknown = key(0, 0, 2);
        let k = key(5, 9, 2);
        s.harvest(&[(unknown, 1), (k, 1)], None);
        s.harvest(&[(unknown, 1), (k, 1)], None);
        let none = alive(2, &[]);
        assert!(s.harvest(&[(unknown, 1)], Some(&none)).is_empty(), "k was not read");
        assert_eq!(total(&s, k), 1);
        assert_eq!(s.harvest(&[(unknown, 1), (k, 1)], Some(&none)), vec![k]);
    }

    /// A key whose delete failed stays tracked with its count; only deleted keys are folded.
    #[test]
    fn failed_delete_keeps_the_key() {
        let mut s = CounterState::default();
        let a = key(3, 1, 2);
        let b = key(4, 2, 2);
        s.harvest(&[(a, 1), (b, 2)], None);
        let evict = s.harvest(&[(a, 1), (b, 2)], Some(&alive(1, &[])));
        assert_eq!(evict.len(), 2);
        s.evicted(&[a]);
        assert_eq!((total(&s, a), total(&s, b)), (1, 2));
        assert_eq!(s.namespaces().keys().copied().collect::<Vec<_>>(), vec![4]);
        // Counted again after its delete: a fresh key adds to the folded count.
        s.harvest(&[(a, 4), (b, 2)], None);
        assert_eq!(total(&s, a), 5);
    }

    /// Deltas add up to the totals and are never negative, through evictions and inode reuse,
    /// against a stand-in for the kernel map.
    #[test]
    fn deltas_sum_to_totals_through_churn() {
        let mut s = CounterState::default();
        let mut kernel: HashMap<DropKey, u64> = HashMap::new();
        let mut sums: HashMap<DropKey, u64> = HashMap::new();
        let mut added = 0;
        let mut listing_gen = 0;
        for round in 0..40u64 {
            // Inode 7 is taken by a new namespace every 8 rounds, which drops in its first 4.
            let cookie = 1000 + round / 8;
            if round % 8 < 4 {
                *kernel.entry(key(7, cookie, 2)).or_default() += round + 1;
                added += round + 1;
            }
            let listing = alive(listing_gen, &[(7, Some(cookie))]);
            let read: Vec<(DropKey, u64)> = kernel.iter().map(|(k, n)| (*k, *n)).collect();
            let evict = s.harvest(&read, Some(&listing));
            for k in &evict {
                kernel.remove(k);
            }
            s.evicted(&evict);
            let snap = s.snapshot([0; stat::COUNT as usize]);
            for (k, d) in &snap.deltas {
                *sums.entry(*k).or_default() += d;
            }
            let totals: HashMap<DropKey, u64> = snap.counts.drops.iter().copied().collect();
            assert_eq!(totals, sums, "round {round}");
            listing_gen = s.generation();
        }
        assert_eq!(total(&s, key(7, 0, 2)), added);
        assert_eq!(
            kernel.keys().copied().collect::<Vec<_>>(),
            vec![key(7, 1004, 2)],
            "the dead namespaces' keys are evicted"
        );
    }

    #[test]
    fn cookies_are_asked_only_where_needed() {
        let now = Instant::now();
        let ns: HashMap<u32, HashSet<u64>> = [(7, HashSet::from([5])), (8, HashSet::from([5, 6]))].into();
        assert!(!needs_cookie(9, &ns, None, now), "no keys: no cookie needed");
        assert!(needs_cookie(7, &ns, None, now));
        assert!(!needs_cookie(7, &ns, Some(&(5, now)), now));
        assert!(needs_cookie(8, &ns, Some(&(6, now)), now), "keys with another cookie");
        let old = now.checked_sub(COOKIE_TTL).expect("monotonic clock past the TTL");
        assert!(needs_cookie(7, &ns, Some(&(5, old)), now));
    }

    #[test]
    fn nsfs_mounts_from_mountinfo() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
570 29 0:4 net:[4026532288] /run/netns/nd-a rw shared:274 - nsfs nsfs rw
571 29 0:4 net:[4026532300] /run/netns/with\\040space rw - nsfs nsfs rw
600 29 0:4 mnt:[4026532301] /run/mnt-x rw - nsfs nsfs rw
";
        assert_eq!(
            nsfs_mounts(text),
            vec![
                PathBuf::from("/run/netns/nd-a"),
                PathBuf::from("/run/netns/with space"),
                PathBuf::from("/run/mnt-x"),
            ]
        );
    }

    /// Runs where `/proc` is readable (any Linux): this process's own namespace is listed.
    #[test]
    fn own_namespace_is_listed() {
        let own = fs::metadata("/proc/self/ns/net").expect("own netns").ino() as u32;
        assert!(list_namespaces().contains_key(&own));
    }
}
