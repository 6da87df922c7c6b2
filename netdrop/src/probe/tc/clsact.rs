//! clsact qdiscs with `bpf` filters over netlink: our filters have their own priority and
//! handle, never replace a filter, and carry their owner in their name, which is how the
//! filters of a killed earlier run are found and removed.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};

use super::{EGRESS_PROGRAM, FILTER_HANDLE, INGRESS_PROGRAM, TcError};
use crate::probe::netlink::RouteSocket;

const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
pub(super) const TC_H_INGRESS_PARENT: u32 = 0xFFFF_FFF2;
pub(super) const TC_H_EGRESS_PARENT: u32 = 0xFFFF_FFF3;
const ETH_P_ALL: u16 = 0x0003;

/// clsact parents, for callers listing filters.
pub const CLSACT_PARENTS: [u32; 2] = [TC_H_INGRESS_PARENT, TC_H_EGRESS_PARENT];

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

    pub(super) fn filter_name(self, program: &str) -> String {
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

/// The interface or its qdisc/filter is gone already.
pub(super) fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT | libc::EINVAL))
}

/// `tcm_info` of our filters: priority in the upper half, protocol (`ETH_P_ALL`, network byte
/// order) in the lower.
pub(super) fn our_info(priority: u16) -> u32 {
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

/// The clsact requests of [`RouteSocket`].
impl RouteSocket {
    pub(super) fn add_clsact(&mut self, ifindex: u32) -> io::Result<()> {
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
    pub(super) fn clsact_interfaces(&mut self) -> io::Result<Vec<u32>> {
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

    pub(super) fn del_clsact_if_empty(&mut self, ifindex: u32) -> io::Result<()> {
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

    pub(super) fn add_bpf_filter(
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

    pub(super) fn del_filter(&mut self, ifindex: u32, parent: u32, info: u32, handle: u32) -> io::Result<()> {
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.parent = TcHandle::from(parent);
        m.header.handle = TcHandle::from(handle);
        m.header.info = info;
        m.attributes.push(TcAttribute::Kind("bpf".into()));
        self.request(RouteNetlinkMessage::DelTrafficFilter(m), NLM_F_ACK)
            .map(drop)
    }

    /// Every filter under `parent` (each priority's chain head included, handle 0).
    pub(super) fn filters(&mut self, ifindex: u32, parent: u32) -> io::Result<Vec<TcMessage>> {
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
