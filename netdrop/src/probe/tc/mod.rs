//! The passive tc programs on workload interfaces: loading one instance per watched network
//! namespace, attaching with TCX (Linux 6.6+) or clsact + netlink filters, detaching, and
//! removing the filters a killed earlier run left behind.
//!
//! Everything that attaches works on the calling thread's network namespace: TCX resolves the
//! ifindex in `current`'s namespace and a netlink socket talks to the namespace it was created
//! in. `netdrop::interfaces` runs one thread per watched namespace for that reason.
//!
//! Coexistence with other tc users (Calico's and Cilium's eBPF dataplanes):
//! - TCX: our link is inserted *first* (`BPF_F_BEFORE` without a relative program), so it sees
//!   every packet before any verdict; nothing is replaced, and our programs return `TCX_NEXT`.
//! - clsact: our filters have their own priority ([`DEFAULT_PRIORITY`]) and handle
//!   ([`FILTER_HANDLE`]), are created with `NLM_F_EXCL` (never replacing a filter), return
//!   `TC_ACT_UNSPEC` (continue with the next filter), and carry a name that says who owns them
//!   (`netdrop_ingress:pid=<pid>:start=<ticks>`), which is how leftovers are recognised.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya::{
    EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{ProgramError, SchedClassifier},
};
use netdrop_common::{TcConfig, TcCounters, TcDestCounters, TcDestKey, TcKey, tc_stat};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::LinkMessage,
    nsid::{NsidAttribute, NsidMessage},
    tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Program names in the object, also the kernel's names for them (at most 15 characters).
pub const INGRESS_PROGRAM: &str = "netdrop_ingress";
pub const EGRESS_PROGRAM: &str = "netdrop_egress";

/// clsact filter priority: low numbers run first, and we want to see packets before other
/// filters decide their fate. Cilium uses 1 and tc's automatic priorities start at 49152.
pub const DEFAULT_PRIORITY: u16 = 1;
/// clsact filter handle (`0x6e64`, "nd"): with the priority it identifies our filter.
pub const FILTER_HANDLE: u32 = 0x6e64;

const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const TC_H_INGRESS_PARENT: u32 = 0xFFFF_FFF2;
const TC_H_EGRESS_PARENT: u32 = 0xFFFF_FFF3;
const ETH_P_ALL: u16 = 0x0003;
// From include/uapi/linux/bpf.h (Debian 12's headers predate TCX, Linux 6.6).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_F_BEFORE: u32 = 1 << 3;

/// How the programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcMode {
    /// BPF links on the TCX hook (Linux 6.6+): die with the process.
    Tcx,
    /// `clsact` qdisc + `bpf` filters over netlink: outlive a killed process.
    Clsact,
}

impl TcMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

/// Which tc attachment to use (`--tc-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcModeChoice {
    /// TCX when the kernel has it (6.6+), else clsact.
    #[default]
    Auto,
    Tcx,
    Clsact,
}

/// Errors of the tc layer; each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("the kernel programs are missing from this build (built with AYA_BUILD_SKIP=1): rebuild without it")]
    NoPrograms,
    #[error("netdrop needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, to attach tc programs: run it with sudo")]
    NoPermission,
    #[error("loading the tc programs failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("tc program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {0} missing from the kernel programs")]
    MissingMap(&'static str),
    #[error("program {0} missing from the kernel programs")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("TCX is not available on this kernel (needs Linux 6.6+): {0}; use --tc-mode clsact or auto")]
    NoTcx(#[source] io::Error),
    #[error("attaching to {ifname} (ifindex {ifindex}) with {mode}: {source}")]
    Attach {
        ifname: String,
        ifindex: u32,
        mode: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "a filter with priority {priority} and handle {FILTER_HANDLE:#x} already exists on {ifname} (another netdrop running? choose another --tc-priority)"
    )]
    FilterExists { ifname: String, priority: u16 },
    #[error("netlink {what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl TcError {
    fn netlink(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Netlink { what, source }
    }
}

/// One loaded instance of the tc programs, serving the interfaces of one network namespace.
pub struct TcInstance {
    /// Keeps programs and maps alive.
    _ebpf: aya::Ebpf,
    ingress: OwnedFd,
    egress: OwnedFd,
    /// Inode of the network namespace the instance serves.
    pub netns: u32,
    pub counters: PerCpuHashMap<MapData, TcKey, TcCounters>,
    pub dests: PerCpuHashMap<MapData, TcDestKey, TcDestCounters>,
    stats: PerCpuArray<MapData, u64>,
}

/// Settings of [`TcInstance::load`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Interfaces the counter map must hold (two entries each).
    pub max_interfaces: u32,
    /// Destinations whose attempts can be counted.
    pub max_destinations: u32,
    /// Count first UDP packets of flows.
    pub udp_flows: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_interfaces: 4096,
            max_destinations: 4096,
            udp_flows: true,
        }
    }
}

impl TcInstance {
    /// Loads the tc programs for the interfaces of network namespace `netns` (an inode).
    ///
    /// The object also holds the `kfree_skb` programs; their maps are created (shrunk to the
    /// minimum) but their programs are never loaded here.
    pub fn load(netns: u32, opts: LoadOptions) -> Result<Self, TcError> {
        let object = crate::probe::PROGRAMS;
        if object.is_empty() {
            return Err(TcError::NoPrograms);
        }
        let config = TcConfig {
            netns,
            udp_flows: u32::from(opts.udp_flows),
            ..TcConfig::DEFAULT
        };
        // SAFETY: sysconf has no preconditions.
        let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let mut ebpf = EbpfLoader::new()
            .override_global("TC_CONFIG", &config, true)
            .map_max_entries("TC_COUNTERS", opts.max_interfaces.saturating_mul(2).max(2))
            .map_max_entries("TC_DESTS", opts.max_destinations.max(1))
            // The drop tracer's maps come with the object: make them as small as they can be.
            .map_max_entries("EVENTS", page)
            .map_max_entries("DROPS", 1)
            .load(object)
            .map_err(|e| match &e {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.kind() == io::ErrorKind::PermissionDenied =>
                {
                    TcError::NoPermission
                }
                _ => TcError::Load(e),
            })?;
        let ingress = load_program(&mut ebpf, INGRESS_PROGRAM)?;
        let egress = load_program(&mut ebpf, EGRESS_PROGRAM)?;
        let counters = take_map(&mut ebpf, "TC_COUNTERS", PerCpuHashMap::try_from)?;
        let dests = take_map(&mut ebpf, "TC_DESTS", PerCpuHashMap::try_from)?;
        let stats = take_map(&mut ebpf, "TC_STATS", PerCpuArray::try_from)?;
        Ok(Self {
            _ebpf: ebpf,
            ingress,
            egress,
            netns,
            counters,
            dests,
            stats,
        })
    }

    pub fn ingress_fd(&self) -> BorrowedFd<'_> {
        self.ingress.as_fd()
    }

    pub fn egress_fd(&self) -> BorrowedFd<'_> {
        self.egress.as_fd()
    }

    /// `TC_STATS`, summed over CPUs.
    pub fn stats(&self) -> [u64; tc_stat::COUNT as usize] {
        let mut out = [0; tc_stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Registers an interface: zeroed counters for both directions, before attaching.
    pub fn register(&mut self, ifindex: u32) -> Result<(), TcError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| TcError::netlink("counting CPUs")(e))?;
        for direction in [netdrop_common::TC_DIR_FROM_POD, netdrop_common::TC_DIR_TO_POD] {
            let key = TcKey {
                ifindex,
                netns: self.netns,
                direction,
                _pad: 0,
            };
            let zero = PerCpuValues::try_from(vec![TcCounters::default(); cpus]).map_err(|e| TcError::Map {
                name: "TC_COUNTERS",
                source: e.into(),
            })?;
            self.counters.insert(key, zero, 0).map_err(|source| TcError::Map {
                name: "TC_COUNTERS",
                source,
            })?;
        }
        Ok(())
    }

    /// Forgets an interface's counters.
    pub fn unregister(&mut self, ifindex: u32) {
        for direction in [netdrop_common::TC_DIR_FROM_POD, netdrop_common::TC_DIR_TO_POD] {
            let _ = self.counters.remove(&TcKey {
                ifindex,
                netns: self.netns,
                direction,
                _pad: 0,
            });
        }
    }

    /// One interface's counters for both directions (from pod, to pod), summed over CPUs.
    pub fn read(&self, ifindex: u32) -> Option<[TcCounters; 2]> {
        let mut out = [TcCounters::default(); 2];
        for (direction, slot) in out.iter_mut().enumerate() {
            let key = TcKey {
                ifindex,
                netns: self.netns,
                direction: direction as u32,
                _pad: 0,
            };
            let values = self.counters.get(&key, 0).ok()?;
            for v in values.iter() {
                slot.packets += v.packets;
                slot.bytes += v.bytes;
                slot.tcp_syn += v.tcp_syn;
                slot.udp_new += v.udp_new;
            }
        }
        Some(out)
    }
}

fn load_program(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<OwnedFd, TcError> {
    let err = |source| TcError::Program { program: name, source };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(TcError::MissingProgram(name))?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(|e| match &e {
        ProgramError::LoadError { io_error, .. } if io_error.kind() == io::ErrorKind::PermissionDenied => {
            TcError::NoPermission
        }
        _ => err(e),
    })?;
    let fd = prog.fd().map_err(err)?;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| err(ProgramError::IOError(e)))
}

fn take_map<T>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, TcError> {
    convert(ebpf.take_map(name).ok_or(TcError::MissingMap(name))?).map_err(|source| TcError::Map { name, source })
}

// ---- TCX ----

/// `union bpf_attr` for `BPF_LINK_CREATE` with the `tcx` member (Linux 6.6+).
#[repr(C)]
#[derive(Default)]
struct LinkCreateTcx {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn tcx_link_create(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let attr = LinkCreateTcx {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        // Before every program already there, relative to none: first in the chain.
        flags: BPF_F_BEFORE,
        ..LinkCreateTcx::default()
    };
    // SAFETY: bpf(2) with a valid, fully initialised attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &raw const attr,
            size_of::<LinkCreateTcx>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let attr: [u32; 2] = [link.as_raw_fd() as u32, 0];
    // SAFETY: bpf(2) with a valid attr of the size passed.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), size_of_val(&attr)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this kernel has TCX: creating a TCX link on ifindex 0 fails with ENODEV where the
/// attach type exists (the device lookup comes after the type check) and EINVAL where it does not.
pub fn probe_tcx(instance: &TcInstance) -> Result<(), io::Error> {
    match tcx_link_create(instance.ingress_fd(), 0, BPF_TCX_INGRESS) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(e),
        // Cannot happen (no device 0); dropping the fd detaches it anyway.
        Ok(_fd) => Ok(()),
    }
}

// ---- attachments ----

/// Who owns a clsact filter, encoded in its name: `<program>:pid=<pid>:start=<ticks>`, `start`
/// being the process's start time (field 22 of /proc/PID/stat) so a reused PID is not mistaken
/// for the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    fn filter_name(self, program: &str) -> String {
        format!("{program}:pid={}:start={}", self.pid, self.start)
    }

    /// The owner of a filter named by netdrop; `None` for anyone else's filter.
    pub fn parse(name: &str) -> Option<Self> {
        let (program, rest) = name.split_once(':')?;
        if program != INGRESS_PROGRAM && program != EGRESS_PROGRAM {
            return None;
        }
        let (pid, start) = rest.split_once(':')?;
        Some(Self {
            pid: pid.strip_prefix("pid=")?.parse().ok()?,
            start: start.strip_prefix("start=")?.parse().ok()?,
        })
    }

    /// Whether the owning process still runs.
    pub fn is_alive(self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    // Fields after the command: state is field 3, starttime field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// One interface's attachment; detach with [`Attachment::detach`] (dropping a TCX attachment
/// also detaches it; dropping a clsact one leaves the filters, as a killed process would).
#[derive(Debug)]
pub enum Attachment {
    Tcx {
        ingress: OwnedFd,
        egress: OwnedFd,
    },
    Clsact {
        ifindex: u32,
        priority: u16,
        created_qdisc: bool,
    },
}

impl Attachment {
    pub fn mode(&self) -> TcMode {
        match self {
            Self::Tcx { .. } => TcMode::Tcx,
            Self::Clsact { .. } => TcMode::Clsact,
        }
    }

    /// Detaches. For clsact, `sock` must live in the interface's namespace; a vanished
    /// interface (its filters went with it) is not an error.
    pub fn detach(self, sock: &mut RouteSocket) -> Result<(), TcError> {
        match self {
            Self::Tcx { ingress, egress } => {
                // Closing the fd alone detaches later, from a workqueue (the last reference is
                // dropped asynchronously); BPF_LINK_DETACH (Linux 5.9+) detaches now, so
                // "stopped" means "off the interface". Closing stays the fallback.
                for link in [&ingress, &egress] {
                    let _ = link_detach(link.as_fd());
                }
                drop((ingress, egress));
                Ok(())
            }
            Self::Clsact {
                ifindex,
                priority,
                created_qdisc,
            } => {
                let mut first_err = None;
                for parent in [TC_H_INGRESS_PARENT, TC_H_EGRESS_PARENT] {
                    match sock.del_filter(ifindex, parent, our_info(priority), FILTER_HANDLE) {
                        Ok(()) => {}
                        Err(e) if gone(&e) => return Ok(()),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = first_err {
                    return Err(TcError::Netlink {
                        what: "deleting a tc filter",
                        source: e,
                    });
                }
                if created_qdisc {
                    sock.del_clsact_if_empty(ifindex)
                        .map_err(TcError::netlink("deleting the clsact qdisc"))?;
                }
                Ok(())
            }
        }
    }
}

/// The interface or its qdisc/filter is gone already.
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT | libc::EINVAL))
}

/// Attaches both programs of `instance` to `ifindex` (in the calling thread's namespace).
pub fn attach(
    instance: &TcInstance,
    sock: &mut RouteSocket,
    ifindex: u32,
    ifname: &str,
    mode: TcMode,
    priority: u16,
    owner: Owner,
) -> Result<Attachment, TcError> {
    let err = |source| TcError::Attach {
        ifname: ifname.to_string(),
        ifindex,
        mode: mode.name(),
        source,
    };
    match mode {
        TcMode::Tcx => {
            let ingress = tcx_link_create(instance.ingress_fd(), ifindex, BPF_TCX_INGRESS).map_err(err)?;
            let egress = tcx_link_create(instance.egress_fd(), ifindex, BPF_TCX_EGRESS).map_err(err)?;
            Ok(Attachment::Tcx { ingress, egress })
        }
        TcMode::Clsact => {
            let created_qdisc = match sock.add_clsact(ifindex) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                Err(e) => return Err(err(e)),
            };
            let pairs = [
                (TC_H_INGRESS_PARENT, instance.ingress_fd(), INGRESS_PROGRAM),
                (TC_H_EGRESS_PARENT, instance.egress_fd(), EGRESS_PROGRAM),
            ];
            for (i, (parent, fd, program)) in pairs.into_iter().enumerate() {
                if let Err(e) = sock.add_bpf_filter(ifindex, parent, priority, fd, &owner.filter_name(program)) {
                    // Undo the half-done attachment (only what is ours: our priority and handle).
                    if i == 1 {
                        let _ = sock.del_filter(ifindex, TC_H_INGRESS_PARENT, our_info(priority), FILTER_HANDLE);
                    }
                    if created_qdisc {
                        let _ = sock.del_clsact_if_empty(ifindex);
                    }
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        return Err(TcError::FilterExists {
                            ifname: ifname.to_string(),
                            priority,
                        });
                    }
                    return Err(err(e));
                }
            }
            Ok(Attachment::Clsact {
                ifindex,
                priority,
                created_qdisc,
            })
        }
    }
}

/// `tcm_info` of our filters: priority in the upper half, protocol (`ETH_P_ALL`, network byte
/// order) in the lower.
fn our_info(priority: u16) -> u32 {
    (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be())
}

/// Removes the clsact filters that netdrop runs which no longer exist left behind, on every
/// interface of the calling thread's namespace. Others' filters and live runs' filters stay.
/// Returns how many were removed.
pub fn remove_leftovers(sock: &mut RouteSocket) -> Result<usize, TcError> {
    let qdiscs = sock.clsact_interfaces().map_err(TcError::netlink("listing qdiscs"))?;
    let mut removed = 0;
    for ifindex in qdiscs {
        let mut ours_removed = false;
        for parent in [TC_H_INGRESS_PARENT, TC_H_EGRESS_PARENT] {
            let filters = match sock.bpf_filters(ifindex, parent) {
                Ok(f) => f,
                Err(e) if gone(&e) => continue,
                Err(e) => {
                    return Err(TcError::Netlink {
                        what: "listing tc filters",
                        source: e,
                    });
                }
            };
            for f in filters {
                let Some(owner) = f.name.as_deref().and_then(Owner::parse) else {
                    continue;
                };
                if owner.is_alive() {
                    continue;
                }
                match sock.del_filter(ifindex, parent, f.info, f.handle) {
                    Ok(()) => {
                        removed += 1;
                        ours_removed = true;
                    }
                    Err(e) if gone(&e) => {}
                    Err(e) => {
                        return Err(TcError::Netlink {
                            what: "deleting a leftover tc filter",
                            source: e,
                        });
                    }
                }
            }
        }
        if ours_removed {
            // The qdisc was most likely ours too; it goes only if nobody else has filters on it.
            let _ = sock.del_clsact_if_empty(ifindex);
        }
    }
    Ok(removed)
}

// ---- netlink ----

/// A bpf filter as listed by the kernel.
#[derive(Clone, Debug)]
pub struct FilterInfo {
    pub priority: u16,
    /// Raw `tcm_info`: priority and protocol, as needed to delete the filter.
    pub info: u32,
    pub handle: u32,
    pub name: Option<String>,
    pub prog_id: Option<u32>,
}

/// A blocking `NETLINK_ROUTE` socket in the namespace of the thread that opened it.
pub struct RouteSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl RouteSocket {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Error replies without the whole request echoed back.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and collects the replies up to the ACK or the end of the dump.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let n = recv(&self.sock, &mut self.buf)?;
            let mut offset = 0;
            while offset < n {
                let bytes = &self.buf[offset..n];
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                offset += len.max(16).next_multiple_of(4);
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every link of the namespace.
    pub fn dump_links(&mut self) -> io::Result<Vec<LinkMessage>> {
        let replies = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// The id this namespace gives the namespace behind `fd`; `None` when it has none yet.
    pub fn nsid_of(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
        let mut msg = NsidMessage::default();
        msg.attributes.push(NsidAttribute::Fd(fd.as_raw_fd() as u32));
        let replies = self.request(RouteNetlinkMessage::GetNsId(msg), 0)?;
        for r in replies {
            if let RouteNetlinkMessage::NewNsId(m) = r {
                for a in m.attributes {
                    if let NsidAttribute::Id(id) = a {
                        return Ok((id >= 0).then_some(id));
                    }
                }
            }
        }
        Ok(None)
    }

    fn add_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.parent = TcHandle::from(TC_H_CLSACT);
        m.header.handle = TcHandle::from(0xFFFF_0000);
        m.attributes.push(TcAttribute::Kind("clsact".into()));
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Interfaces with a clsact qdisc.
    fn clsact_interfaces(&mut self) -> io::Result<Vec<u32>> {
        let replies = self.request(
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q)
                    if q.attributes
                        .iter()
                        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact")) =>
                {
                    Some(q.header.index as u32)
                }
                _ => None,
            })
            .collect())
    }

    fn del_clsact_if_empty(&mut self, ifindex: u32) -> io::Result<()> {
        for parent in [TC_H_INGRESS_PARENT, TC_H_EGRESS_PARENT] {
            if !self.filters(ifindex, parent)?.is_empty() {
                return Ok(());
            }
        }
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.parent = TcHandle::from(TC_H_CLSACT);
        m.header.handle = TcHandle::from(0xFFFF_0000);
        m.attributes.push(TcAttribute::Kind("clsact".into()));
        match self.request(RouteNetlinkMessage::DelQueueDiscipline(m), NLM_F_ACK) {
            Err(e) if gone(&e) => Ok(()),
            r => r.map(drop),
        }
    }

    fn add_bpf_filter(
        &mut self,
        ifindex: u32,
        parent: u32,
        priority: u16,
        prog: BorrowedFd<'_>,
        name: &str,
    ) -> io::Result<()> {
        // The kernel copies the name with nla_strdup; a NUL inside would cut it.
        let name = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.parent = TcHandle::from(parent);
        m.header.handle = TcHandle::from(FILTER_HANDLE);
        m.header.info = our_info(priority);
        m.attributes.push(TcAttribute::Kind("bpf".into()));
        m.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.as_raw_fd() as u32)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.to_string_lossy().into_owned())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    fn del_filter(&mut self, ifindex: u32, parent: u32, info: u32, handle: u32) -> io::Result<()> {
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.parent = TcHandle::from(parent);
        m.header.handle = TcHandle::from(handle);
        m.header.info = info;
        m.attributes.push(TcAttribute::Kind("bpf".into()));
        self.request(RouteNetlinkMessage::DelTrafficFilter(m), NLM_F_ACK)
            .map(drop)
    }

    /// Every filter under `parent` (each priority's chain head included, handle 0).
    fn filters(&mut self, ifindex: u32, parent: u32) -> io::Result<Vec<TcMessage>> {
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.parent = TcHandle::from(parent);
        let replies = self.request(RouteNetlinkMessage::GetTrafficFilter(m), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
                _ => None,
            })
            .collect())
    }

    /// The `bpf` filters under `parent` (clsact ingress or egress) with their names.
    pub fn bpf_filters(&mut self, ifindex: u32, parent: u32) -> io::Result<Vec<FilterInfo>> {
        let mut out = Vec::new();
        for f in self.filters(ifindex, parent)? {
            let handle = u32::from(f.header.handle);
            if handle == 0
                || !f
                    .attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"))
            {
                continue;
            }
            let mut info = FilterInfo {
                priority: (f.header.info >> 16) as u16,
                info: f.header.info,
                handle,
                name: None,
                prog_id: None,
            };
            for a in &f.attributes {
                if let TcAttribute::Options(opts) = a {
                    for o in opts {
                        match o {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => info.name = Some(n.clone()),
                            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => info.prog_id = Some(*id),
                            _ => {}
                        }
                    }
                }
            }
            out.push(info);
        }
        Ok(out)
    }
}

/// clsact parents, for callers listing filters.
pub const CLSACT_PARENTS: [u32; 2] = [TC_H_INGRESS_PARENT, TC_H_EGRESS_PARENT];

fn recv(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut slice = &mut buf[..];
        match sock.recv(&mut slice, 0) {
            Ok(n) => return Ok(n.min(buf.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Receives one datagram of link events into `buf` (see `interfaces`).
pub(crate) fn recv_datagram(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    recv(sock, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names_round_trip() {
        let o = Owner {
            pid: 4242,
            start: 123_456,
        };
        let name = o.filter_name(INGRESS_PROGRAM);
        assert_eq!(name, "netdrop_ingress:pid=4242:start=123456");
        assert_eq!(Owner::parse(&name), Some(o));
        assert_eq!(Owner::parse(&o.filter_name(EGRESS_PROGRAM)), Some(o));
        assert_eq!(Owner::parse("cil_from_container"), None);
        assert_eq!(Owner::parse("netdrop_ingress"), None);
        assert_eq!(Owner::parse("other:pid=1:start=2"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_stale_owner_is_not() {
        let me = Owner::current();
        assert!(me.start > 0);
        assert!(me.is_alive());
        assert!(
            !Owner {
                start: me.start + 1,
                ..me
            }
            .is_alive()
        );
    }
}
