//! Loading and attaching the kernel programs: feature probing, the preferred hook, and named
//! fallbacks. Everything that needs privileges or a particular kernel lives here.

pub mod filter;
pub mod netlink;
pub mod tc;

use std::io;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, ProgramError, TracePoint},
};
use netdrop_common::{AddrKey, Config, DropKey, stat};
use tracing::{debug, info, warn};

use crate::kernel::{KernelInfo, TimewaitFunction, caps, tracefs};

/// The kernel programs, built by build.rs and embedded in the binary.
pub(crate) static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netdrop"));

/// Which hook carries `kfree_skb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// BTF-typed tracepoint (`tp_btf/kfree_skb`, Linux 5.5+): typed arguments, no record copy.
    TpBtf,
    /// Classic tracepoint (`tracepoint/skb/kfree_skb`): any kernel with tracefs.
    Tracepoint,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Self::TpBtf => "tp_btf/kfree_skb",
            Self::Tracepoint => "tracepoint/skb/kfree_skb",
        }
    }
}

/// Errors a user can hit while loading; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Capabilities missing (named), or none missing and the kernel refused anyway.
    #[error("{}", caps::refusal(.missing, "load its kernel programs"))]
    NoPermission { missing: Vec<caps::Cap> },
    #[error("the kernel programs are missing from this build (built with AYA_BUILD_SKIP=1): rebuild without it")]
    NoPrograms,
    #[error("loading the kernel programs failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("kernel program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("no hook for kfree_skb works here: tp_btf ({tp_btf}); tracepoint ({tracepoint})")]
    NoHook { tp_btf: String, tracepoint: String },
    #[error("map {0} missing from the kernel programs")]
    Map(&'static str),
    #[error("program {0} missing from the kernel programs")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
}

/// Whether this process may load BPF programs: root, or CAP_BPF+CAP_PERFMON, or CAP_SYS_ADMIN.
pub fn check_permission() -> Result<(), ProbeError> {
    let missing = caps::Caps::effective().missing(caps::DROP_PROGRAMS);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ProbeError::NoPermission { missing })
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it. Newer kernels charge the
/// memory cgroup instead, so a refusal there (some sandboxes refuse even root) is harmless.
pub fn raise_memlock(release: &str) {
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer to a local.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rl) } != 0 {
        let mut v = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if (major, minor) >= (5, 11) {
            debug!(
                "RLIMIT_MEMLOCK not lifted ({}); not needed on {release}",
                io::Error::last_os_error()
            );
            return;
        }
        warn!(
            "could not lift RLIMIT_MEMLOCK ({}); on kernels before 5.11 loading may fail: run as root or raise `ulimit -l`",
            io::Error::last_os_error()
        );
    }
}

/// Options for [`attach`].
#[derive(Clone, Copy, Debug)]
pub struct AttachOptions {
    /// Force one hook instead of probing.
    pub hook: Option<Hook>,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
}

/// The loaded, attached drop programs and their maps.
pub struct DropProbe {
    /// Keeps programs and links alive; dropping it detaches everything.
    ebpf: Ebpf,
    pub hook: Hook,
    /// Why the preferred hook was not used, when it was not.
    pub fallback: Option<String>,
    /// Taken by the reader (it needs ownership to register the fd with tokio).
    pub events: Option<RingBuf<MapData>>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    stats: PerCpuArray<MapData, u64>,
    addrs: aya::maps::HashMap<MapData, AddrKey, u32>,
    /// What `addrs` holds now.
    addr_set: std::collections::HashMap<AddrKey, u32>,
}

/// Loads the programs with `config` and attaches `kfree_skb`: `tp_btf` first, the classic
/// tracepoint as the named fallback.
pub fn attach(kernel: &KernelInfo, config: &Config, opts: AttachOptions) -> Result<DropProbe, ProbeError> {
    if PROGRAMS.is_empty() {
        return Err(ProbeError::NoPrograms);
    }
    check_permission()?;
    raise_memlock(&kernel.release);
    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", config, true)
        .map_max_entries("EVENTS", opts.ring_bytes)
        .load(PROGRAMS)
        .map_err(|e| match &e {
            aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                if io_error.kind() == io::ErrorKind::PermissionDenied =>
            {
                ProbeError::NoPermission {
                    missing: caps::Caps::effective().missing(caps::DROP_PROGRAMS),
                }
            }
            _ => ProbeError::Load(e),
        })?;

    let try_btf = opts.hook.is_none_or(|h| h == Hook::TpBtf);
    let mut tp_btf_error = String::from("not tried (--hook tracepoint)");
    if try_btf {
        match attach_tp_btf(&mut ebpf, kernel) {
            Ok(()) => return finish(ebpf, Hook::TpBtf, None),
            Err(e) => {
                tp_btf_error = describe(&e);
                if opts.hook == Some(Hook::TpBtf) {
                    return Err(e);
                }
                info!("tp_btf/kfree_skb unavailable ({tp_btf_error}); falling back to tracepoint/skb/kfree_skb");
            }
        }
    }
    match attach_tracepoint(&mut ebpf, kernel) {
        Ok(()) => finish(ebpf, Hook::Tracepoint, try_btf.then_some(tp_btf_error)),
        Err(e) => Err(ProbeError::NoHook {
            tp_btf: tp_btf_error,
            tracepoint: describe(&e),
        }),
    }
}

fn attach_tp_btf(ebpf: &mut Ebpf, kernel: &KernelInfo) -> Result<(), ProbeError> {
    const NAME: &str = "kfree_skb_btf";
    if kernel.btf.is_none() {
        return Err(ProbeError::Program {
            program: NAME,
            source: ProgramError::Btf(aya::BtfError::FileError {
                path: "/sys/kernel/btf/vmlinux".into(),
                error: io::Error::from(io::ErrorKind::NotFound),
            }),
        });
    }
    let err = |source| ProbeError::Program { program: NAME, source };
    let btf = aya::Btf::from_sys_fs().map_err(|e| err(ProgramError::Btf(e)))?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(NAME)
        .ok_or(ProbeError::MissingProgram(NAME))?
        .try_into()
        .map_err(err)?;
    prog.load("kfree_skb", &btf).map_err(err)?;
    log_verified(NAME, prog.info());
    prog.attach().map_err(err)?;
    Ok(())
}

/// How many instructions the verifier walked for a loaded program (kernels 5.16+): how close it
/// came to the 1M limit, the number that decides whether the full program loads on older
/// verifiers.
fn log_verified(name: &str, info: Result<aya::programs::ProgramInfo, ProgramError>) {
    if let Some(n) = info.ok().and_then(|i| i.verified_instruction_count()) {
        debug!("{name}: the verifier processed {n} instructions");
    }
}

fn attach_tracepoint(ebpf: &mut Ebpf, kernel: &KernelInfo) -> Result<(), ProbeError> {
    const NAME: &str = "kfree_skb_tp";
    if kernel.tracepoint.is_none() {
        return Err(ProbeError::Tracefs(tracefs::TracefsError::MissingField {
            path: "events/skb/kfree_skb/format".into(),
            field: "skbaddr",
        }));
    }
    let err = |source| ProbeError::Program { program: NAME, source };
    let prog: &mut TracePoint = ebpf
        .program_mut(NAME)
        .ok_or(ProbeError::MissingProgram(NAME))?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(err)?;
    log_verified(NAME, prog.info());
    prog.attach("skb", "kfree_skb").map_err(err)?;
    Ok(())
}

/// One line for a load/attach failure; the verifier log goes to debug output.
fn describe(e: &ProbeError) -> String {
    if let ProbeError::Program {
        program,
        source: ProgramError::LoadError { io_error, verifier_log },
    } = e
    {
        debug!("verifier log:\n{verifier_log}");
        // The verifier's last words name what it refused; the whole log is at debug level.
        let log = verifier_log.to_string();
        let statistics = ["processed ", "stack depth", "verification time"];
        let why = log
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty() && !statistics.iter().any(|p| l.starts_with(p)))
            .unwrap_or("");
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(" (verifier: {why})")
        };
        return format!("{program}: load refused: {io_error}{why}");
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        // Some of aya's errors repeat their source in their own message.
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

/// How a precise hook set (conntrack verdicts, timewait segments) observes the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreciseHook {
    /// fexit on the functions (5.5+, BTF for the functions).
    Fexit,
    /// kprobe + kretprobe on the same functions.
    Kprobe,
    /// No hook: classify from what the drop itself carries (conntrack state and statistics,
    /// TCP flags).
    Inferred,
}

impl PreciseHook {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fexit => "fexit",
            Self::Kprobe => "kprobe",
            Self::Inferred => "inferred",
        }
    }
}

/// A kernel function a precise hook set watches, and its programs.
struct Watched {
    function: &'static str,
    fexit: &'static str,
    entry: &'static str,
    ret: &'static str,
}

const CT_FUNCTIONS: &[Watched] = &[
    Watched {
        function: "__nf_conntrack_confirm",
        fexit: "ct_confirm_exit",
        entry: "ct_confirm_entry",
        ret: "ct_confirm_return",
    },
    Watched {
        function: "nf_conntrack_in",
        fexit: "ct_in_exit",
        entry: "ct_in_entry",
        ret: "ct_in_return",
    },
];

const TW_FUNCTIONS: &[Watched] = &[Watched {
    function: TimewaitFunction::NAME,
    fexit: "tw_exit",
    entry: "tw_entry",
    ret: "tw_return",
}];

/// The better hooks a precise hook set tried before the one it uses, each with its error in
/// one line.
pub type Tried = Vec<(PreciseHook, String)>;

/// Attaches the precise conntrack hooks, fexit first, kprobes as the fallback. Returns the hook
/// used and the hooks that failed before it. Never fails: without hooks the classification is
/// inferred.
pub fn attach_conntrack(probe: &mut DropProbe, want: Option<PreciseHook>) -> (PreciseHook, Tried) {
    attach_precise(&mut probe.ebpf, CT_FUNCTIONS, want)
}

/// Attaches the timewait hooks (kernels whose `kfree_skb` does not pass `rx_sk`), fexit first,
/// kprobes as the fallback; without them a segment freed by a timewait socket is told by its
/// TCP flags alone.
pub fn attach_timewait(probe: &mut DropProbe, want: Option<PreciseHook>) -> (PreciseHook, Tried) {
    attach_precise(&mut probe.ebpf, TW_FUNCTIONS, want)
}

fn attach_precise(ebpf: &mut Ebpf, set: &[Watched], want: Option<PreciseHook>) -> (PreciseHook, Tried) {
    let mut tried = Vec::new();
    if want.is_none_or(|w| w == PreciseHook::Fexit) {
        match attach_fexit(ebpf, set) {
            Ok(()) => return (PreciseHook::Fexit, tried),
            Err(e) => tried.push((PreciseHook::Fexit, describe(&e))),
        }
    }
    if want.is_none_or(|w| w == PreciseHook::Kprobe) {
        match attach_kprobes(ebpf, set) {
            Ok(()) => return (PreciseHook::Kprobe, tried),
            Err(e) => tried.push((PreciseHook::Kprobe, describe(&e))),
        }
    }
    (PreciseHook::Inferred, tried)
}

fn attach_fexit(ebpf: &mut Ebpf, set: &[Watched]) -> Result<(), ProbeError> {
    use aya::programs::FExit;
    let Some(first) = set.first() else { return Ok(()) };
    let btf = aya::Btf::from_sys_fs().map_err(|e| ProbeError::Program {
        program: first.fexit,
        source: ProgramError::Btf(e),
    })?;
    for w in set {
        let program = w.fexit;
        let err = |source| ProbeError::Program { program, source };
        let prog: &mut FExit = ebpf
            .program_mut(program)
            .ok_or(ProbeError::MissingProgram(program))?
            .try_into()
            .map_err(err)?;
        prog.load(w.function, &btf).map_err(err)?;
        prog.attach().map_err(err)?;
    }
    Ok(())
}

fn attach_kprobes(ebpf: &mut Ebpf, set: &[Watched]) -> Result<(), ProbeError> {
    use aya::programs::KProbe;
    for w in set {
        for program in [w.entry, w.ret] {
            let err = |source| ProbeError::Program { program, source };
            let prog: &mut KProbe = ebpf
                .program_mut(program)
                .ok_or(ProbeError::MissingProgram(program))?
                .try_into()
                .map_err(err)?;
            prog.load().map_err(err)?;
            prog.attach(w.function, 0).map_err(err)?;
        }
    }
    Ok(())
}

fn finish(mut ebpf: Ebpf, hook: Hook, fallback: Option<String>) -> Result<DropProbe, ProbeError> {
    let events = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or(ProbeError::Map("EVENTS"))?)
        .map_err(|source| ProbeError::MapType { name: "EVENTS", source })?;
    let drops = PerCpuHashMap::try_from(ebpf.take_map("DROPS").ok_or(ProbeError::Map("DROPS"))?)
        .map_err(|source| ProbeError::MapType { name: "DROPS", source })?;
    let stats = PerCpuArray::try_from(ebpf.take_map("STATS").ok_or(ProbeError::Map("STATS"))?)
        .map_err(|source| ProbeError::MapType { name: "STATS", source })?;
    let addrs = aya::maps::HashMap::try_from(ebpf.take_map("ADDR_FILTER").ok_or(ProbeError::Map("ADDR_FILTER"))?)
        .map_err(|source| ProbeError::MapType {
            name: "ADDR_FILTER",
            source,
        })?;
    Ok(DropProbe {
        ebpf,
        hook,
        fallback,
        events: Some(events),
        drops,
        stats,
        addrs,
        addr_set: std::collections::HashMap::default(),
    })
}

/// Kernel-side totals: exact drop counts and what happened to events.
#[derive(Clone, Debug, Default)]
pub struct KernelCounts {
    /// (key, count summed over CPUs).
    pub drops: Vec<(DropKey, u64)>,
    pub stats: [u64; stat::COUNT as usize],
}

impl DropProbe {
    /// Makes the kernel's address filter hold exactly `entries` (only changes are written, so
    /// counters keyed by unchanged tags carry on).
    pub fn set_addr_filter(&mut self, entries: &[(AddrKey, u32)]) -> Result<(), ProbeError> {
        let want: std::collections::HashMap<AddrKey, u32> = entries.iter().copied().collect();
        let stale: Vec<AddrKey> = self
            .addr_set
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            let _ = self.addrs.remove(&k);
            self.addr_set.remove(&k);
        }
        for (k, v) in &want {
            if self.addr_set.get(k) != Some(v) {
                self.addrs.insert(k, v, 0).map_err(|source| ProbeError::MapType {
                    name: "ADDR_FILTER",
                    source,
                })?;
                self.addr_set.insert(*k, *v);
            }
        }
        Ok(())
    }

    /// Deletes drop counter keys (of namespaces that are gone; `source::counters` keeps their
    /// counts). Returns the keys the map no longer holds.
    pub fn remove_drop_keys(&mut self, keys: &[DropKey]) -> Vec<DropKey> {
        keys.iter()
            .filter(|k| match self.drops.remove(k) {
                Ok(()) => true,
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => true,
                Err(e) => {
                    debug!("deleting a drop counter: {e}");
                    false
                }
            })
            .copied()
            .collect()
    }

    /// Reads every counter, summing per-CPU values.
    pub fn counts(&self) -> KernelCounts {
        let mut out = KernelCounts::default();
        for item in &self.drops {
            match item {
                Ok((key, values)) => out.drops.push((key, values.iter().sum())),
                Err(e) => warn!("reading drop counters: {e}"),
            }
        }
        for (i, slot) in out.stats.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}
