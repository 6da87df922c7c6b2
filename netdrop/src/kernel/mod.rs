//! Read-only facts about the running kernel, found out once at start-up: BTF and the struct
//! offsets read from it, the drop reasons, kernel symbols, tracefs, network namespaces and
//! capabilities ([`KernelInfo`]). Nothing here loads or attaches a program.

pub mod benign;
pub mod caps;
pub mod netns;
pub mod offsets;
pub mod proto;
pub mod reasons;
pub mod symbols;
pub mod tracefs;

use std::fs;

use btf_rs::{Btf, Type};
use netdrop_common::{KernelOffsets, TracepointLayout};

use self::reasons::{ReasonError, ReasonTable};

/// What the running kernel offers, found out once at start-up.
pub struct KernelInfo {
    /// `uname -r`.
    pub release: String,
    /// The kernel's BTF, when /sys/kernel/btf/vmlinux is readable.
    pub btf: Option<Btf>,
    /// Why there is no BTF, when there is none.
    pub btf_error: Option<String>,
    /// Offsets for the skb reads; `None` without BTF (counts-only mode).
    pub offsets: Option<KernelOffsets>,
    /// The classic tracepoint's layout, when tracefs is readable.
    pub tracepoint: Option<TracepointLayout>,
    pub tracepoint_error: Option<String>,
    /// `tp_btf/kfree_skb` passes a `reason` argument (Linux 5.17+).
    pub btf_has_reason: bool,
    /// `tp_btf/kfree_skb` passes the receiving socket, `rx_sk` (Linux 6.11+).
    pub btf_has_rx_sk: bool,
    /// What the timewait hooks need from BTF (Ok), or why they cannot be used.
    pub timewait: Result<TimewaitFunction, String>,
    pub reasons: ReasonTable,
    /// Conntrack offsets are in `offsets` (Ok), or why not.
    pub conntrack: Result<(), String>,
}

impl KernelInfo {
    /// Reads BTF, tracefs and the reason table. Fails only when neither BTF nor tracefs work.
    pub fn discover() -> Result<Self, ReasonError> {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let (btf, btf_error) = match reasons::kernel_btf() {
            Ok(b) => (Some(b), None),
            Err(e) => (None, Some(format!("/sys/kernel/btf/vmlinux: {e}"))),
        };
        let format = tracefs::kfree_skb_format();
        let (tracepoint, format_text, tracepoint_error) = match &format {
            Ok((path, text)) => match tracefs::kfree_skb_layout(path, text) {
                Ok(l) => (Some(l), Some(text.as_str()), None),
                Err(e) => (None, Some(text.as_str()), Some(e.to_string())),
            },
            Err(e) => (None, None, Some(e.to_string())),
        };
        let mut reasons = ReasonTable::load(btf.as_ref(), format_text)?;
        let mut offsets = None;
        let mut btf_has_reason = false;
        let mut btf_has_rx_sk = false;
        let mut timewait = Err("no kernel BTF".to_string());
        let mut btf_error = btf_error;
        let mut conntrack = Err("no kernel BTF".to_string());
        if let Some(b) = &btf {
            match offsets::kernel_offsets(b) {
                Ok(mut o) => {
                    conntrack = conntrack_offsets(b, &mut o);
                    offsets = Some(o);
                }
                Err(e) => btf_error = Some(e.to_string()),
            }
            let args = tracepoint_arg_count(b, "btf_trace_kfree_skb");
            btf_has_reason = args.is_some_and(|n| n >= 4);
            btf_has_rx_sk = args.is_some_and(|n| n >= 5);
            timewait = TimewaitFunction::from_btf(b);
            for module in loaded_btf_modules() {
                if let Some(m) = reasons::module_btf(b, &module) {
                    reasons.add_module_btf(&m);
                }
            }
        }
        Ok(Self {
            release,
            btf,
            btf_error,
            offsets,
            tracepoint,
            tracepoint_error,
            btf_has_reason,
            btf_has_rx_sk,
            timewait,
            reasons,
            conntrack,
        })
    }

    /// The `kfree_skb` hooks pass the receiving socket (`rx_sk`, 6.11+): both hooks gained it
    /// together, so either one's view answers for whichever is attached.
    pub fn has_rx_sk(&self) -> bool {
        self.btf_has_rx_sk || self.tracepoint.is_some_and(|t| t.rx_sk != netdrop_common::ABSENT)
    }
}

/// `tcp_timewait_state_process` as this kernel declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitFunction {
    /// `TCP_TW_SYN` in `enum tcp_tw_status`: read, not assumed (the enum grew members over time).
    pub syn_status: u32,
}

impl TimewaitFunction {
    pub const NAME: &str = "tcp_timewait_state_process";

    fn from_btf(btf: &Btf) -> Result<Self, String> {
        let syn_status = reasons::enum_members(btf, "tcp_tw_status")
            .ok()
            .flatten()
            .and_then(|m| m.into_iter().find(|(n, _)| n == "TCP_TW_SYN"))
            .map(|(_, v)| v)
            .ok_or("kernel BTF has no enum tcp_tw_status with TCP_TW_SYN")?;
        Ok(Self { syn_status })
    }
}

/// `struct nf_conn` lives in vmlinux's BTF when conntrack is built in, in the nf_conntrack
/// module's BTF when it is a module (most distribution kernels).
fn conntrack_offsets(vmlinux: &Btf, into: &mut KernelOffsets) -> Result<(), String> {
    if offsets::conntrack_offsets(vmlinux, vmlinux, into).is_ok() {
        return Ok(());
    }
    let Some(module) = reasons::module_btf(vmlinux, "nf_conntrack") else {
        return Err(
            "nf_conntrack is not loaded (no /sys/kernel/btf/nf_conntrack); restart netdrop once conntrack is in use"
                .into(),
        );
    };
    offsets::conntrack_offsets(vmlinux, &module, into).map_err(|e| e.to_string())
}

/// Modules with BTF whose enums may hold subsystem drop reasons.
fn loaded_btf_modules() -> Vec<String> {
    ["openvswitch", "mac80211"]
        .into_iter()
        .filter(|m| fs::metadata(format!("/sys/kernel/btf/{m}")).is_ok())
        .map(String::from)
        .collect()
}

/// Parameters of a `btf_trace_<tp>` typedef (the first is the context pointer).
fn tracepoint_arg_count(btf: &Btf, typedef: &str) -> Option<usize> {
    let t = btf.resolve_types_by_name(typedef).ok()?.into_iter().next()?;
    let Type::Typedef(td) = t else { return None };
    let Type::Ptr(p) = btf.resolve_chained_type(&td).ok()? else {
        return None;
    };
    let Type::FuncProto(fp) = btf.resolve_chained_type(&p).ok()? else {
        return None;
    };
    Some(fp.parameters.len())
}
