//! What this process may do: its effective capabilities, and which of those a code path needs
//! are missing, by name.
//!
//! The effective set is read from `/proc/self/status`, never inferred from the user id: in a
//! container uid 0 may hold only the capabilities the pod spec adds (deploy/base/daemonset.yaml
//! names each one with the code path that needs it).

use std::{fmt, fs};

/// The capabilities netdrop's code paths need (numbers from `include/uapi/linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    /// tc program types, TCX/clsact attach, rtnetlink tc changes, `SO_RCVBUFFORCE`.
    NetAdmin = 12,
    /// Opening `/proc/PID/ns/net` of processes of other users (`ptrace_may_access`).
    SysPtrace = 19,
    /// `setns` into other network namespaces, mounting tracefs; before Linux 5.8 also `bpf(2)`.
    SysAdmin = 21,
    /// Lifting `RLIMIT_MEMLOCK` above the hard limit (BPF maps before Linux 5.11).
    SysResource = 24,
    /// Kernel addresses in `/proc/kallsyms` under `kptr_restrict` or `perf_event_paranoid` > 1.
    Syslog = 34,
    /// Tracing program types and the tracepoint's perf event (Linux 5.8+).
    Perfmon = 38,
    /// `bpf(2)`: maps and programs (Linux 5.8+).
    Bpf = 39,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Self::NetAdmin => "CAP_NET_ADMIN",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
            Self::SysResource => "CAP_SYS_RESOURCE",
            Self::Syslog => "CAP_SYSLOG",
            Self::Perfmon => "CAP_PERFMON",
            Self::Bpf => "CAP_BPF",
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability set (a `CapEff:` mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps(pub u64);

impl Caps {
    /// This process's effective capabilities (all of them if /proc cannot be read: the kernel
    /// then has the last word, and its refusal is reported as such).
    pub fn effective() -> Self {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| Self::parse_status(&s))
            .unwrap_or(Self(u64::MAX))
    }

    fn parse_status(status: &str) -> Option<Self> {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .map(Self)
    }

    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1u64 << (cap as u32)) != 0
    }

    /// The capabilities of `needed` this set lacks. `CAP_SYS_ADMIN` stands in for `CAP_BPF` and
    /// `CAP_PERFMON` (`bpf_capable()`, `perfmon_capable()` in include/linux/capability.h), as it
    /// is the only one before 5.8.
    pub fn missing(self, needed: &[Cap]) -> Vec<Cap> {
        needed
            .iter()
            .copied()
            .filter(|&c| !self.has(c) && (!matches!(c, Cap::Bpf | Cap::Perfmon) || !self.has(Cap::SysAdmin)))
            .collect()
    }
}

/// What loading and attaching the drop programs needs.
pub const DROP_PROGRAMS: &[Cap] = &[Cap::Bpf, Cap::Perfmon];
/// What loading tc programs and attaching them to interfaces needs.
pub const TC_PROGRAMS: &[Cap] = &[Cap::Bpf, Cap::NetAdmin];

/// `CAP_X and CAP_Y`.
pub fn names(caps: &[Cap]) -> String {
    let names: Vec<&str> = caps.iter().map(|c| c.name()).collect();
    match names.as_slice() {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The one-line refusal for `what` (e.g. "load its kernel programs"): the missing capabilities
/// by name, or — when none is missing and the kernel refused anyway — that a policy did.
pub fn refusal(missing: &[Cap], what: &str) -> String {
    if missing.is_empty() {
        return format!(
            "the kernel refused to let netdrop {what} (EPERM) although it holds the capabilities for it: a seccomp profile, an LSM or kernel lockdown refuses bpf(2) here"
        );
    }
    let n = names(missing);
    let alt = if missing.iter().any(|c| matches!(c, Cap::Bpf | Cap::Perfmon)) {
        " (CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON, and is needed instead before Linux 5.8)"
    } else {
        ""
    };
    format!("netdrop needs {n} to {what}{alt}: run it as root (sudo), or add {n} to its capabilities")
}

/// Whether this process may load BPF programs: CAP_BPF+CAP_PERFMON, or CAP_SYS_ADMIN.
pub fn may_load_bpf() -> bool {
    Caps::effective().missing(DROP_PROGRAMS).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_by_name() {
        let bit = |c: Cap| 1u64 << (c as u32);
        let caps = Caps(bit(Cap::Bpf) | bit(Cap::NetAdmin));
        assert_eq!(caps.missing(DROP_PROGRAMS), vec![Cap::Perfmon]);
        assert!(caps.missing(TC_PROGRAMS).is_empty());
        assert!(Caps(bit(Cap::SysAdmin)).missing(DROP_PROGRAMS).is_empty());
        assert_eq!(Caps(0).missing(DROP_PROGRAMS), vec![Cap::Bpf, Cap::Perfmon]);
        assert_eq!(names(&[Cap::Bpf, Cap::Perfmon]), "CAP_BPF and CAP_PERFMON");
        assert_eq!(names(&[Cap::Syslog]), "CAP_SYSLOG");
        let line = refusal(&[Cap::Perfmon], "load its kernel programs");
        assert!(
            line.starts_with("netdrop needs CAP_PERFMON to load its kernel programs"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert!(refusal(&[], "attach").contains("EPERM"));
        // Full root: CapEff 000001ffffffffff.
        let root = Caps::parse_status("Name:\tx\nCapEff:\t000001ffffffffff\n").expect("CapEff");
        assert!(
            root.missing(&[Cap::Bpf, Cap::Perfmon, Cap::NetAdmin, Cap::Syslog])
                .is_empty()
        );
    }
}
