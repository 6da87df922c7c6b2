//! TCX links (Linux 6.6+): BPF links on the interface's tc hook, first in its chain; they die
//! with the process.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use super::TcInstance;

// From include/uapi/linux/bpf.h (Debian 12's headers predate TCX, Linux 6.6).
const BPF_LINK_CREATE: libc::c_long = 28;
pub(super) const BPF_TCX_INGRESS: u32 = 46;
pub(super) const BPF_TCX_EGRESS: u32 = 47;
const BPF_F_BEFORE: u32 = 1 << 3;

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

pub(super) fn tcx_link_create(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
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

pub(super) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
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
