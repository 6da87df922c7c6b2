//! The passive tc programs on workload interfaces: loading one instance per watched network
//! namespace, attaching with TCX (Linux 6.6+) or clsact + netlink filters, detaching, and
//! removing the filters a killed earlier run left behind.
//!
//! Everything that attaches works on the calling thread's network namespace: TCX resolves the
//! ifindex in `current`'s namespace and a netlink socket talks to the namespace it was created
//! in. `source::interfaces` runs one thread per watched namespace for that reason.
//!
//! Coexistence with other tc users (Calico's and Cilium's eBPF dataplanes):
//! - TCX: our link is inserted *first* (`BPF_F_BEFORE` without a relative program), so it sees
//!   every packet before any verdict; nothing is replaced, and our programs return `TCX_NEXT`.
//! - clsact: our filters have their own priority ([`DEFAULT_PRIORITY`]) and handle
//!   ([`FILTER_HANDLE`]), are created with `NLM_F_EXCL` (never replacing a filter), return
//!   `TC_ACT_UNSPEC` (continue with the next filter), and carry a name that says who owns them
//!   (`netdrop_ingress:pid=<pid>:start=<ticks>`), which is how leftovers are recognised.

mod clsact;
mod tcx;

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use aya::{
    EbpfLoader,
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{ProgramError, SchedClassifier},
};
use netdrop_common::{TcConfig, TcCounters, TcDestCounters, TcDestKey, TcKey, tc_stat};

pub use self::{
    clsact::{CLSACT_PARENTS, FilterInfo, Owner, remove_leftovers},
    tcx::probe_tcx,
};
use self::{
    clsact::{TC_H_EGRESS_PARENT, TC_H_INGRESS_PARENT, gone, our_info},
    tcx::{BPF_TCX_EGRESS, BPF_TCX_INGRESS, link_detach, tcx_link_create},
};
pub use crate::probe::netlink::RouteSocket;

/// Program names in the object, also the kernel's names for them (at most 15 characters).
pub const INGRESS_PROGRAM: &str = "netdrop_ingress";
pub const EGRESS_PROGRAM: &str = "netdrop_egress";

/// clsact filter priority: low numbers run first, and we want to see packets before other
/// filters decide their fate. Cilium uses 1 and tc's automatic priorities start at 49152.
pub const DEFAULT_PRIORITY: u16 = 1;
/// clsact filter handle (`0x6e64`, "nd"): with the priority it identifies our filter.
pub const FILTER_HANDLE: u32 = 0x6e64;

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
    /// Capabilities missing (named), or none missing and the kernel refused anyway.
    #[error("{}", crate::kernel::caps::refusal(.missing, "attach tc programs to interfaces"))]
    NoPermission { missing: Vec<crate::kernel::caps::Cap> },
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
    /// Which kinds of `dests` entries exist (`netdrop_common::tc_dest_kind` bits).
    dest_kinds: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
}

/// Settings of [`TcInstance::load`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Interfaces the counter map must hold (two entries each).
    pub max_interfaces: u32,
    /// Destinations whose attempts can be counted.
    pub max_destinations: u32,
    /// Count first UDP packets of flows (`udp_new`): a flow-table lookup and a clock read per
    /// UDP datagram. Only `netdrop interfaces` shows them; attempts per destination do not need it.
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
                    TcError::NoPermission {
 missing: crate::kernel::caps::Caps::effective().missing(crate::kernel::caps::TC_PROGRAMS),
}
                }
                _ => TcError::Load(e),
            })?;
        let ingress = load_program(&mut ebpf, INGRESS_PROGRAM)?;
        let egress = load_program(&mut ebpf, EGRESS_PROGRAM)?;
        let counters = take_map(&mut ebpf, "TC_COUNTERS", PerCpuHashMap::try_from)?;
        let dests = take_map(&mut ebpf, "TC_DESTS", PerCpuHashMap::try_from)?;
        let dest_kinds = take_map(&mut ebpf, "TC_DEST_KINDS", Array::try_from)?;
        let stats = take_map(&mut ebpf, "TC_STATS", PerCpuArray::try_from)?;
        Ok(Self {
            _ebpf: ebpf,
            ingress,
            egress,
            netns,
            counters,
            dests,
            dest_kinds,
            stats,
        })
    }

    pub fn ingress_fd(&self) -> BorrowedFd<'_> {
        self.ingress.as_fd()
    }

    pub fn egress_fd(&self) -> BorrowedFd<'_> {
        self.egress.as_fd()
    }

    /// Tells the programs which kinds of destination entries exist (`tc_dest_kind` bits): they
    /// look up only those. Set it to cover an entry before inserting it and after removing it.
    pub fn set_dest_kinds(&mut self, kinds: u32) -> Result<(), TcError> {
        self.dest_kinds.set(0, kinds, 0).map_err(|source| TcError::Map {
            name: "TC_DEST_KINDS",
            source,
        })
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
            TcError::NoPermission {
                missing: crate::kernel::caps::Caps::effective().missing(crate::kernel::caps::TC_PROGRAMS),
            }
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
