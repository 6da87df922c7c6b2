//! Conntrack statistics per network namespace: the evidence that tells a table-full drop from
//! an insert failure from a rule drop when the precise hooks are not available, and the usage
//! numbers (`count`/`max`) the summary reports.
//!
//! Source: `/proc/net/stat/nf_conntrack` (one hex row per CPU; the kernel's own per-CPU
//! `ip_conntrack_stat`, the same numbers `conntrack -S` prints) and
//! `/proc/sys/net/netfilter/nf_conntrack_{count,max}`. Both are per network namespace, resolved
//! by the reading thread's namespace, so other namespaces are read from a thread that entered
//! them. Hand-parsed on purpose: a header line and hex columns, no crate reads this file.

use std::{
    collections::{HashMap, VecDeque},
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::kernel::netns::{netns_path, own_netns};

/// Totals over all CPUs, plus the table's use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CtStats {
    /// Entries in the table now (`nf_conntrack_count`).
    pub count: u64,
    /// Table size limit (`nf_conntrack_max`).
    pub max: u64,
    pub found: u64,
    pub invalid: u64,
    pub insert: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub clash_resolve: u64,
    pub search_restart: u64,
}

impl CtStats {
    /// What rose from `earlier` to `self` (counters only; `count`/`max` are `self`'s).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            count: self.count,
            max: self.max,
            found: self.found.saturating_sub(earlier.found),
            invalid: self.invalid.saturating_sub(earlier.invalid),
            insert: self.insert.saturating_sub(earlier.insert),
            insert_failed: self.insert_failed.saturating_sub(earlier.insert_failed),
            drop: self.drop.saturating_sub(earlier.drop),
            early_drop: self.early_drop.saturating_sub(earlier.early_drop),
            clash_resolve: self.clash_resolve.saturating_sub(earlier.clash_resolve),
            search_restart: self.search_restart.saturating_sub(earlier.search_restart),
        }
    }

    /// The table is at least 90% full.
    pub fn near_full(&self) -> bool {
        self.max > 0 && self.count * 10 >= self.max * 9
    }
}

/// Parses `/proc/net/stat/nf_conntrack`, summing the per-CPU rows. Unknown columns are
/// ignored and missing ones stay 0 (the column set changed over the years: `clashres` is 5.x+).
pub fn parse_stat(text: &str) -> CtStats {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return CtStats::default();
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    let mut s = CtStats::default();
    for line in lines {
        for (name, value) in names.iter().zip(line.split_whitespace()) {
            let Ok(v) = u64::from_str_radix(value, 16) else {
                continue;
            };
            match *name {
                // Same value on every row: the namespace's entry count.
                "entries" => s.count = v,
                "found" => s.found += v,
                "invalid" => s.invalid += v,
                "insert" => s.insert += v,
                "insert_failed" => s.insert_failed += v,
                "drop" => s.drop += v,
                "early_drop" => s.early_drop += v,
                "clashres" => s.clash_resolve += v,
                "search_restart" => s.search_restart += v,
                _ => {}
            }
        }
    }
    s
}

fn read_here() -> io::Result<CtStats> {
    // /proc/thread-self: the calling thread's namespace, which may differ from the process's.
    let mut s = parse_stat(&fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")?);
    let num = |p: &str| fs::read_to_string(p).ok().and_then(|t| t.trim().parse().ok());
    if let Some(c) = num("/proc/sys/net/netfilter/nf_conntrack_count") {
        s.count = c;
    }
    s.max = num("/proc/sys/net/netfilter/nf_conntrack_max").unwrap_or(0);
    Ok(s)
}

/// Reads the statistics of the namespace at `netns` (None: this process's own).
pub fn read(netns: Option<&Path>) -> io::Result<CtStats> {
    let Some(path) = netns else { return read_here() };
    let file = fs::File::open(path)?;
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        read_here()
    })
    .join()
    .map_err(|_| io::Error::other("conntrack stats reader panicked"))?
}

struct Tracked {
    /// None: our own namespace.
    path: Option<PathBuf>,
    first: CtStats,
    /// Recent samples, oldest first, stamped with CLOCK_MONOTONIC ns (the clock of the kernel's
    /// drop timestamps), so a drop is judged by the samples taken just before and after it.
    samples: VecDeque<(u64, CtStats)>,
}

impl Tracked {
    fn last(&self) -> CtStats {
        self.samples.back().map_or(self.first, |(_, s)| *s)
    }

    fn push(&mut self, at: u64, s: CtStats) {
        if self.samples.len() == HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back((at, s));
    }

    /// What rose between the last sample before `at_ns` and the first one after it; `None`
    /// while no sample after it has been taken.
    fn around(&self, at_ns: u64) -> Option<Evidence> {
        let after = self.samples.iter().find(|(ts, _)| *ts > at_ns)?.1;
        let before = self
            .samples
            .iter()
            .rev()
            .find(|(ts, _)| *ts <= at_ns)
            .map_or(self.first, |(_, s)| *s);
        Some(Evidence::from(&after.since(&before)))
    }
}

/// Samples kept per namespace: at one a second plus one per drain batch that asked, enough to
/// bracket any event still in flight.
const HISTORY: usize = 64;

/// How often every tracked namespace is sampled when nobody asks sooner.
const PERIOD: Duration = Duration::from_secs(1);

/// How long a namespace that could not be opened is not tried again.
const RETRY_UNREACHABLE: Duration = Duration::from_secs(10);

/// CLOCK_MONOTONIC now, in ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// What the statistics say about the last moments in one namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts, each read on its own by the classifier"
)]
pub struct Evidence {
    /// Statistics could be read.
    pub known: bool,
    pub insert_failed: bool,
    /// `drop` or `early_drop` rose, or the table is nearly full.
    pub table_full: bool,
    pub invalid: bool,
}

impl Evidence {
    fn from(delta: &CtStats) -> Self {
        Self {
            known: true,
            insert_failed: delta.insert_failed > 0,
            // insert failures also bump `drop`: only a rise beyond them points at allocation.
            table_full: delta.drop > delta.insert_failed || delta.early_drop > 0 || delta.near_full(),
            invalid: delta.invalid > 0,
        }
    }

    /// What either said (a counter row's evidence is what any of its drops' was).
    #[must_use]
    pub fn or(self, other: Self) -> Self {
        Self {
            known: self.known || other.known,
            insert_failed: self.insert_failed || other.insert_failed,
            table_full: self.table_full || other.table_full,
            invalid: self.invalid || other.invalid,
        }
    }
}

/// What the sampler thread and its readers share. The lock is held only to copy numbers in and
/// out: reading /proc and entering namespaces happen outside it, on the sampler's own thread.
#[derive(Default)]
struct State {
    tracked: HashMap<u32, Tracked>,
    /// Namespaces that could not be opened (gone, or unnamed without processes).
    unreachable: HashMap<u32, Instant>,
    /// Namespaces to start tracking.
    requests: Vec<u32>,
    /// A reader wants a sample sooner than the period.
    want_sample: bool,
    /// Completed sampling passes (readers wait for the next one at exit).
    passes: u64,
    /// A pass is reading.
    in_pass: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Signalled after each pass.
    passed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The sampler never leaves the state half-updated: a panic elsewhere does not make it wrong.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Samples the conntrack statistics of every namespace drops were seen in, on its own thread
/// (reading another namespace's statistics means entering it from a thread of its own: neither
/// belongs on the event drain). Readers get evidence and reports from the samples it keeps,
/// without waiting for it; cloning gives another reader.
#[derive(Clone)]
pub struct CtSampler {
    shared: Arc<Shared>,
    own: u32,
    thread: Option<Arc<SamplerThread>>,
}

/// Stops and joins the thread when the last handle goes.
struct SamplerThread {
    shared: Arc<Shared>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for SamplerThread {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.handle.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = h.join();
        }
    }
}

impl CtSampler {
    /// Reads the baselines of `initial` now (before the first drop: the summary reports rises
    /// over the whole run), then samples on a thread of its own.
    pub fn start(initial: &[u32]) -> io::Result<Self> {
        let mut sampler = Self::idle();
        {
            let mut st = sampler.shared.lock();
            st.requests.extend_from_slice(initial);
        }
        pass(&sampler.shared, sampler.own);
        let shared = sampler.shared.clone();
        let own = sampler.own;
        let handle = std::thread::Builder::new()
            .name("netdrop-conntrack".into())
            .spawn(move || run(&shared, own))?;
        sampler.thread = Some(Arc::new(SamplerThread {
            shared: sampler.shared.clone(),
            handle: Mutex::new(Some(handle)),
        }));
        Ok(sampler)
    }

    /// A sampler without a thread (conntrack classification off): no evidence, empty reports.
    pub fn idle() -> Self {
        Self {
            shared: Arc::default(),
            own: own_netns(),
            thread: None,
        }
    }

    /// Starts tracking `inode` (its baseline is read on the sampler's next pass).
    pub fn track(&self, inode: u32) {
        if self.thread.is_none() {
            return;
        }
        let mut st = self.shared.lock();
        if !st.tracked.contains_key(&inode) && !st.requests.contains(&inode) {
            st.requests.push(inode);
            drop(st);
            self.shared.wake.notify_one();
        }
    }

    /// Evidence for a drop at `at_ns` (CLOCK_MONOTONIC) in `inode`: what rose between the last
    /// sample before the drop and the first one after it. `None` while that sample is still to
    /// be taken (the sampler is asked to take it now: ask again after the next drain); evidence
    /// that says nothing when the namespace cannot be read.
    pub fn around(&self, inode: u32, at_ns: u64) -> Option<Evidence> {
        let thread = self.thread.as_ref()?;
        let mut st = self.shared.lock();
        if let Some(t) = st.tracked.get(&inode) {
            if let Some(e) = t.around(at_ns) {
                return Some(e);
            }
            st.want_sample = true;
        } else if st
            .unreachable
            .get(&inode)
            .is_some_and(|t| t.elapsed() < RETRY_UNREACHABLE)
        {
            return Some(Evidence::default());
        } else if !st.requests.contains(&inode) {
            st.requests.push(inode);
        }
        drop(st);
        thread.shared.wake.notify_one();
        None
    }

    /// Evidence over the whole run in `inode`.
    pub fn over_run(&self, inode: u32) -> Evidence {
        self.shared
            .lock()
            .tracked
            .get(&inode)
            .map(|t| Evidence::from(&t.last().since(&t.first)))
            .unwrap_or_default()
    }

    /// (namespace, run delta) for every tracked namespace, from the latest samples.
    pub fn report(&self) -> Vec<(u32, CtStats)> {
        let st = self.shared.lock();
        let mut v: Vec<(u32, CtStats)> = st.tracked.iter().map(|(n, t)| (*n, t.last().since(&t.first))).collect();
        v.sort_by_key(|(n, _)| *n);
        v
    }

    /// Waits (at most `timeout`) for a sampling pass that starts after this call: the final
    /// summary's numbers, and evidence for the last events.
    pub fn sample_now(&self, timeout: Duration) {
        let Some(thread) = &self.thread else { return };
        let mut st = self.shared.lock();
        // A pass under way may have read before this call: then wait for the one after it.
        let want = st.passes + if st.in_pass { 2 } else { 1 };
        st.want_sample = true;
        thread.shared.wake.notify_one();
        let deadline = Instant::now() + timeout;
        while st.passes < want && !st.stop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .passed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A sampler holding these samples and no thread, for tests of the classifier.
    #[cfg(test)]
    pub(crate) fn with_samples(samples: &[(u32, &[(u64, CtStats)])]) -> Self {
        let s = Self::idle();
        {
            let mut st = s.shared.lock();
            for (inode, v) in samples {
                st.tracked.insert(
                    *inode,
                    Tracked {
                        path: None,
                        first: v[0].1,
                        samples: v.iter().copied().collect(),
                    },
                );
            }
        }
        Self {
            thread: Some(Arc::new(SamplerThread {
                shared: s.shared.clone(),
                handle: Mutex::new(None),
            })),
            ..s
        }
    }
}

fn run(shared: &Shared, own: u32) {
    loop {
        {
            let mut st = shared.lock();
            let deadline = Instant::now() + PERIOD;
            while !st.stop && !st.want_sample && st.requests.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = shared
                    .wake
                    .wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if st.stop {
                return;
            }
        }
        pass(shared, own);
    }
}

/// One sampling pass: baselines for new namespaces, a sample of every tracked one. The lock is
/// taken only to copy the work list in and the numbers out.
fn pass(shared: &Shared, own: u32) {
    let (requests, paths) = {
        let mut st = shared.lock();
        st.want_sample = false;
        st.in_pass = true;
        let requests: Vec<u32> = std::mem::take(&mut st.requests)
            .into_iter()
            .filter(|n| {
                !st.tracked.contains_key(n) && st.unreachable.get(n).is_none_or(|t| t.elapsed() >= RETRY_UNREACHABLE)
            })
            .collect();
        let paths: Vec<(u32, Option<PathBuf>)> = st.tracked.iter().map(|(n, t)| (*n, t.path.clone())).collect();
        (requests, paths)
    };
    let mut new = Vec::new();
    let mut unreachable = Vec::new();
    for inode in requests {
        let path = if inode == own || inode == 0 {
            None
        } else {
            let Some(p) = netns_path(inode) else {
                unreachable.push(inode);
                continue;
            };
            Some(p)
        };
        let now = monotonic_ns();
        match read(path.as_deref()) {
            Ok(s) => new.push((
                inode,
                Tracked {
                    path,
                    first: s,
                    samples: VecDeque::from([(now, s)]),
                },
            )),
            Err(_) => unreachable.push(inode),
        }
    }
    let mut samples = Vec::with_capacity(paths.len());
    for (inode, path) in paths {
        let now = monotonic_ns();
        if let Ok(s) = read(path.as_deref()) {
            samples.push((inode, now, s));
        }
    }
    let mut st = shared.lock();
    for (inode, t) in new {
        st.tracked.entry(inode).or_insert(t);
    }
    for inode in unreachable {
        st.unreachable.insert(inode, Instant::now());
    }
    for (inode, at, s) in samples {
        if let Some(t) = st.tracked.get_mut(&inode) {
            t.push(at, s);
        }
    }
    st.passes += 1;
    st.in_pass = false;
    drop(st);
    shared.passed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000010  00000001 00000000 00000000 00000002 00000000 00000000 00000000 00000000 0000000a 0000000b 00000000 00000000  00000000 00000000 00000000 00000000
00000010  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000005 00000005 00000003 00000000  00000000 00000000 00000000 00000001
";

    #[test]
    fn sums_cpus_and_keeps_entries() {
        let s = parse_stat(STAT);
        assert_eq!(s.count, 16);
        assert_eq!(s.insert_failed, 15);
        assert_eq!(s.drop, 16);
        assert_eq!(s.early_drop, 3);
        assert_eq!(s.invalid, 3);
        assert_eq!(s.clash_resolve, 1);
        assert_eq!(s.search_restart, 1);
    }

    #[test]
    fn evidence_separates_insert_failures_from_allocation_drops() {
        let before = CtStats {
            max: 100,
            ..CtStats::default()
        };
        let insert = CtStats {
            insert_failed: 10,
            drop: 10,
            count: 5,
            max: 100,
            ..CtStats::default()
        };
        let e = Evidence::from(&insert.since(&before));
        assert!(e.insert_failed && !e.table_full);
        let full = CtStats {
            drop: 7,
            early_drop: 7,
            count: 100,
            max: 100,
            ..CtStats::default()
        };
        let e = Evidence::from(&full.since(&before));
        assert!(e.table_full && !e.insert_failed);
    }
}
