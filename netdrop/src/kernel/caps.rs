//! What this process may do: the capabilities loading BPF programs needs.

use std::fs;

/// Whether this process may load BPF programs: root, or CAP_BPF+CAP_PERFMON, or CAP_SYS_ADMIN.
pub fn may_load_bpf() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}
