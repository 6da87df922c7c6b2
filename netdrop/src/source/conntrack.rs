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

/// Samples kept per namespace: at one a second plus one per drain batch, enough to bracket any
/// event still in flight.
const HISTORY: usize = 32;

/// CLOCK_MONOTONIC now, in ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Samples the conntrack statistics of every namespace drops were seen in.
#[derive(Default)]
pub struct CtMonitor {
    tracked: HashMap<u32, Tracked>,
    /// Namespaces that could not be opened (gone, or unnamed without processes).
    unreachable: HashMap<u32, Instant>,
    own: u32,
}

/// What the statistics say about the last moments in one namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
}

impl CtMonitor {
    pub fn new() -> Self {
        Self {
            own: own_netns(),
            ..Self::default()
        }
    }

    /// Starts tracking a namespace (first call reads its baseline). Returns whether it is tracked.
    pub fn track(&mut self, inode: u32) -> bool {
        if self.tracked.contains_key(&inode) {
            return true;
        }
        if self
            .unreachable
            .get(&inode)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return false;
        }
        let path = if inode == self.own || inode == 0 {
            None
        } else {
            netns_path(inode)
        };
        if path.is_none() && inode != self.own && inode != 0 {
            self.unreachable.insert(inode, Instant::now());
            return false;
        }
        let now = monotonic_ns();
        match read(path.as_deref()) {
            Ok(s) => {
                self.tracked.insert(
                    inode,
                    Tracked {
                        path,
                        first: s,
                        samples: VecDeque::from([(now, s)]),
                    },
                );
                true
            }
            Err(_) => {
                self.unreachable.insert(inode, Instant::now());
                false
            }
        }
    }

    fn refresh(t: &mut Tracked) {
        let now = monotonic_ns();
        if let Ok(s) = read(t.path.as_deref()) {
            if t.samples.len() == HISTORY {
                t.samples.pop_front();
            }
            t.samples.push_back((now, s));
        }
    }

    fn last(t: &Tracked) -> CtStats {
        t.samples.back().map_or(t.first, |(_, s)| *s)
    }

    /// Reads every tracked namespace (the once-a-second tick).
    pub fn sample_all(&mut self) {
        for t in self.tracked.values_mut() {
            Self::refresh(t);
        }
    }

    /// Evidence for a drop at `at_ns` (CLOCK_MONOTONIC) in `inode`: what rose between the last
    /// sample before the drop and the first one after it (read now if there is none yet).
    pub fn around(&mut self, inode: u32, at_ns: u64) -> Evidence {
        if !self.track(inode) {
            return Evidence::default();
        }
        let t = self.tracked.get_mut(&inode).expect("tracked above");
        if t.samples.back().is_none_or(|(ts, _)| *ts <= at_ns) {
            Self::refresh(t);
        }
        let before = t
            .samples
            .iter()
            .rev()
            .find(|(ts, _)| *ts <= at_ns)
            .map_or(t.first, |(_, s)| *s);
        let after = t
            .samples
            .iter()
            .find(|(ts, _)| *ts > at_ns)
            .map_or_else(|| Self::last(t), |(_, s)| *s);
        Evidence::from(&after.since(&before))
    }

    /// Evidence over the whole run in `inode` (for the summary's rows).
    pub fn over_run(&self, inode: u32) -> Evidence {
        self.tracked
            .get(&inode)
            .map(|t| Evidence::from(&Self::last(t).since(&t.first)))
            .unwrap_or_default()
    }

    /// (namespace, run delta) for every tracked namespace, after a final sample.
    pub fn report(&mut self) -> Vec<(u32, CtStats)> {
        self.sample_all();
        let mut v: Vec<(u32, CtStats)> = self
            .tracked
            .iter()
            .map(|(n, t)| (*n, Self::last(t).since(&t.first)))
            .collect();
        v.sort_by_key(|(n, _)| *n);
        v
    }
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
