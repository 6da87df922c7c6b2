//! What a trace attached: per kernel program the hook it runs on, the better hooks it tried
//! first and why each failed, and the degraded modes the run is in. Plain data, made by the
//! command that attaches (`trace`, next the agent) and shown by every front-end: the start-up
//! notices on stderr, the text and JSON summaries, a status page, metrics.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::probe::{Hook, PreciseHook, tc::TcMode};

/// A kernel program (or set of programs) with a job of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    /// The drop hook on `kfree_skb`: counts every drop, sends the events.
    KfreeSkb,
    /// Conntrack verdicts (`__nf_conntrack_confirm`, `nf_conntrack_in`): which
    /// `NETFILTER_DROP` was a conntrack insert failure, a full table, an invalid packet.
    Conntrack,
    /// Segments answered and freed by `TIME_WAIT` sockets (`tcp_timewait_state_process`).
    Timewait,
    /// The tc programs on the workload interfaces that count attempts (target traces).
    Tc,
}

impl Program {
    pub fn name(self) -> &'static str {
        match self {
            Self::KfreeSkb => "kfree_skb",
            Self::Conntrack => "conntrack",
            Self::Timewait => "timewait",
            Self::Tc => "tc",
        }
    }
}

/// Where a program runs, or what stands in for it when none does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachHook {
    /// BTF-typed tracepoint (`tp_btf`, Linux 5.5+).
    TpBtf,
    /// Classic tracepoint through tracefs.
    Tracepoint,
    /// fexit on the kernel functions.
    Fexit,
    /// kprobe + kretprobe on the kernel functions.
    Kprobe,
    /// No program of its own: the `kfree_skb` tracepoint's receiving socket (6.11+).
    RxSk,
    /// No program: `TIME_WAIT` segments told by their TCP flags (FIN/RST) alone.
    Flags,
    /// No program: conntrack verdicts inferred from the drop's conntrack state and statistics.
    Inferred,
    /// TCX links (Linux 6.6+).
    Tcx,
    /// `clsact` qdisc + netlink `bpf` filters.
    Clsact,
    /// Not running: the feature is off.
    Off,
}

impl AttachHook {
    pub fn name(self) -> &'static str {
        match self {
            Self::TpBtf => "tp_btf",
            Self::Tracepoint => "tracepoint",
            Self::Fexit => "fexit",
            Self::Kprobe => "kprobe",
            Self::RxSk => "rx_sk",
            Self::Flags => "flags",
            Self::Inferred => "inferred",
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
            Self::Off => "off",
        }
    }

    /// As the drop hook's full name: `tp_btf/kfree_skb`, `tracepoint/skb/kfree_skb`.
    pub fn drop_hook_name(self) -> &'static str {
        match self {
            Self::TpBtf => Hook::TpBtf.name(),
            Self::Tracepoint => Hook::Tracepoint.name(),
            other => other.name(),
        }
    }
}

impl From<Hook> for AttachHook {
    fn from(h: Hook) -> Self {
        match h {
            Hook::TpBtf => Self::TpBtf,
            Hook::Tracepoint => Self::Tracepoint,
        }
    }
}

impl From<PreciseHook> for AttachHook {
    fn from(h: PreciseHook) -> Self {
        match h {
            PreciseHook::Fexit => Self::Fexit,
            PreciseHook::Kprobe => Self::Kprobe,
            PreciseHook::Inferred => Self::Inferred,
        }
    }
}

impl From<TcMode> for AttachHook {
    fn from(m: TcMode) -> Self {
        match m {
            TcMode::Tcx => Self::Tcx,
            TcMode::Clsact => Self::Clsact,
        }
    }
}

/// A better hook that was tried first and failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub hook: AttachHook,
    /// The error, in one line (a refused load quotes the verifier's last line).
    pub error: String,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.hook.name(), self.error)
    }
}

/// One program's attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub program: Program,
    pub hook: AttachHook,
    /// The better hooks tried first, in order, each with why it failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<Fallback>,
    /// The flag that chose the hook (`--ct-hook kprobe`, `--no-tc`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// Why a better hook was not tried, when no fallback says it: what the kernel lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl Attached {
    pub fn new(program: Program, hook: impl Into<AttachHook>) -> Self {
        Self {
            program,
            hook: hook.into(),
            fallbacks: Vec::new(),
            flag: None,
            why: None,
        }
    }

    #[must_use]
    pub fn fallbacks(mut self, fallbacks: Vec<Fallback>) -> Self {
        self.fallbacks = fallbacks;
        self
    }

    #[must_use]
    pub fn flag(mut self, flag: impl Into<String>) -> Self {
        self.flag = Some(flag.into());
        self
    }

    #[must_use]
    pub fn why(mut self, why: impl Into<String>) -> Self {
        self.why = Some(why.into());
        self
    }

    /// The fallbacks' errors, else the flag or the reason, for a notice's parentheses.
    fn because(&self) -> String {
        if self.fallbacks.is_empty() {
            self.flag.clone().or_else(|| self.why.clone()).unwrap_or_default()
        } else {
            self.fallbacks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        }
    }
}

/// A mode the run is degraded to: something works less well than it could on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DegradedMode {
    /// No kernel BTF: drops counted by reason and location, no per-packet events.
    CountsOnly,
    /// The verifier refused the full `kfree_skb` program: loaded without the per-drop effect
    /// decision (lossless/reset discards counted as drops, effect `unknown`).
    DropEffectsOff,
}

impl DegradedMode {
    /// In words, as the notices and the text summary say it.
    pub fn words(self) -> &'static str {
        match self {
            Self::CountsOnly => "counts only",
            Self::DropEffectsOff => "drop effects off",
        }
    }
}

/// A degraded mode and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Degraded {
    pub mode: DegradedMode,
    /// The error or the missing kernel feature, in one line.
    pub why: String,
}

/// What a trace attached. JSON: the summary's `attach` object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachReport {
    /// One entry per program, in the order they were attached.
    pub programs: Vec<Attached>,
    /// The degraded modes, empty when none.
    pub degraded: Vec<Degraded>,
}

impl AttachReport {
    /// Records a program's attachment (a later entry for the same program replaces it).
    pub fn attached(&mut self, a: Attached) {
        self.programs.retain(|p| p.program != a.program);
        self.programs.push(a);
    }

    pub fn degrade(&mut self, mode: DegradedMode, why: impl Into<String>) {
        self.degraded.retain(|d| d.mode != mode);
        self.degraded.push(Degraded { mode, why: why.into() });
    }

    pub fn get(&self, program: Program) -> Option<&Attached> {
        self.programs.iter().find(|p| p.program == program)
    }

    /// The hook a program runs on; `off` when it was not attached.
    pub fn hook(&self, program: Program) -> AttachHook {
        self.get(program).map_or(AttachHook::Off, |a| a.hook)
    }

    pub fn is_degraded(&self, mode: DegradedMode) -> bool {
        self.degraded.iter().any(|d| d.mode == mode)
    }

    /// The start-up notices, one line each without the `netdrop: ` prefix: the degraded modes
    /// and every choice that is not the best hook for a reason worth saying. A hook the user
    /// chose with a flag goes unsaid unless it changes what the trace can tell.
    pub fn notices(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.degraded {
            out.push(match d.mode {
                DegradedMode::CountsOnly => format!(
                    "degraded mode \"counts only\": no kernel BTF ({}); drops are counted by reason and location, no per-packet events",
                    d.why
                ),
                DegradedMode::DropEffectsOff => format!(
                    "drop effects off (lossless/reset discards counted as drops, effect \"unknown\"): this kernel's verifier refused the full program ({})",
                    d.why
                ),
            });
        }
        for a in &self.programs {
            let because = a.because();
            let line = match (a.program, a.hook) {
                (Program::KfreeSkb, AttachHook::Tracepoint) if !a.fallbacks.is_empty() => {
                    let why: Vec<&str> = a.fallbacks.iter().map(|f| f.error.as_str()).collect();
                    Some(format!(
                        "tp_btf/kfree_skb not usable ({}); using the tracepoint fallback",
                        why.join("; ")
                    ))
                }
                (Program::Conntrack, AttachHook::Off) => {
                    a.why.as_ref().map(|why| format!("conntrack classification off: {why}"))
                }
                (Program::Conntrack, AttachHook::Fexit) => Some("conntrack verdicts via fexit (exact)".into()),
                (Program::Conntrack, AttachHook::Kprobe) => {
                    Some(format!("conntrack verdicts via kprobe (exact; {because})"))
                }
                (Program::Conntrack, AttachHook::Inferred) => Some(format!(
                    "conntrack classification inferred from conntrack state and statistics ({because})"
                )),
                (Program::Timewait, AttachHook::Flags) if !a.fallbacks.is_empty() || a.why.is_some() => Some(format!(
                    "segments freed by TIME_WAIT sockets told by TCP flags only, a bare ACK stays visible ({because})"
                )),
                (Program::Tc, AttachHook::Off) => a
                    .why
                    .as_ref()
                    .map(|why| format!("no attempt counters ({why}); drops are still exact, ratios are not shown")),
                _ => None,
            };
            out.extend(line);
        }
        out
    }

    /// The report in the text summary: one line of hooks, then a line per degraded mode.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.programs.is_empty() {
            let hooks: Vec<String> = self
                .programs
                .iter()
                .map(|a| {
                    let because = a.because();
                    let what = if a.fallbacks.is_empty() { "" } else { "after " };
                    let why = if because.is_empty() {
                        String::new()
                    } else {
                        format!(" ({what}{because})")
                    };
                    format!("{} via {}{why}", a.program.name(), a.hook.name())
                })
                .collect();
            out.push(format!("attach: {}", hooks.join("; ")));
        }
        for d in &self.degraded {
            out.push(format!("degraded: {} ({})", d.mode.words(), d.why));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fell_back() -> AttachReport {
        let mut r = AttachReport::default();
        r.attached(
            Attached::new(Program::KfreeSkb, Hook::Tracepoint).fallbacks(vec![Fallback {
                hook: AttachHook::TpBtf,
                error: "kfree_skb_btf: load refused: Permission denied (os error 1)".into(),
            }]),
        );
        r.attached(
            Attached::new(Program::Conntrack, PreciseHook::Kprobe).fallbacks(vec![Fallback {
                hook: AttachHook::Fexit,
                error: "ct_confirm_exit: load refused: Permission denied (os error 1)".into(),
            }]),
        );
        r.attached(Attached::new(Program::Timewait, AttachHook::RxSk));
        r.attached(Attached::new(Program::Tc, TcMode::Clsact).fallbacks(vec![Fallback {
            hook: AttachHook::Tcx,
            error: "Invalid argument (os error 22)".into(),
        }]));
        r.degrade(
            DegradedMode::DropEffectsOff,
            "kfree_skb_btf: load refused: Argument list too long",
        );
        r
    }

    /// The notices keep the wording of the lines tests and users match on.
    #[test]
    fn notices_say_each_fallback_as_before() {
        let n = fell_back().notices();
        assert_eq!(
            n,
            [
                "drop effects off (lossless/reset discards counted as drops, effect \"unknown\"): this kernel's verifier refused the full program (kfree_skb_btf: load refused: Argument list too long)",
                "tp_btf/kfree_skb not usable (kfree_skb_btf: load refused: Permission denied (os error 1)); using the tracepoint fallback",
                "conntrack verdicts via kprobe (exact; fexit: ct_confirm_exit: load refused: Permission denied (os error 1))",
            ]
        );
        // What the user chose is not news; what the kernel lacks is.
        let mut r = AttachReport::default();
        r.attached(Attached::new(Program::Conntrack, AttachHook::Off).flag("--ct-hook off"));
        r.attached(Attached::new(Program::Timewait, AttachHook::Flags).flag("--tw-hook flags"));
        r.attached(Attached::new(Program::Tc, AttachHook::Off).flag("--no-tc"));
        assert!(r.notices().is_empty(), "{:?}", r.notices());
        r.attached(Attached::new(Program::Conntrack, PreciseHook::Inferred).flag("--ct-hook inferred"));
        r.attached(Attached::new(Program::Timewait, AttachHook::Flags).why("no tcp_timewait_state_process in BTF"));
        r.attached(Attached::new(Program::Tc, AttachHook::Off).why("node-a: no such file"));
        assert_eq!(
            r.notices(),
            [
                "conntrack classification inferred from conntrack state and statistics (--ct-hook inferred)",
                "segments freed by TIME_WAIT sockets told by TCP flags only, a bare ACK stays visible (no tcp_timewait_state_process in BTF)",
                "no attempt counters (node-a: no such file); drops are still exact, ratios are not shown",
            ]
        );
        let mut r = AttachReport::default();
        r.degrade(DegradedMode::CountsOnly, "/sys/kernel/btf/vmlinux: not found");
        assert_eq!(
            r.notices(),
            [
                "degraded mode \"counts only\": no kernel BTF (/sys/kernel/btf/vmlinux: not found); drops are counted by reason and location, no per-packet events"
            ]
        );
    }

    #[test]
    fn the_report_is_json_both_ways_and_names_hooks_as_the_summary_did() {
        let r = fell_back();
        let json = serde_json::to_string(&r).expect("json");
        assert!(
            json.starts_with(
                r#"{"programs":[{"program":"kfree_skb","hook":"tracepoint","fallbacks":[{"hook":"tp_btf","error":"#
            ),
            "{json}"
        );
        assert!(json.contains(r#"{"program":"timewait","hook":"rx_sk"}"#), "{json}");
        assert!(json.ends_with(r#""degraded":[{"mode":"drop_effects_off","why":"kfree_skb_btf: load refused: Argument list too long"}]}"#), "{json}");
        let back: AttachReport = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
        assert_eq!(r.hook(Program::Conntrack), AttachHook::Kprobe);
        assert_eq!(AttachReport::default().hook(Program::Conntrack), AttachHook::Off);
        assert_eq!(
            r.summary_lines(),
            [
                "attach: kfree_skb via tracepoint (after tp_btf: kfree_skb_btf: load refused: Permission denied (os error 1)); conntrack via kprobe (after fexit: ct_confirm_exit: load refused: Permission denied (os error 1)); timewait via rx_sk; tc via clsact (after tcx: Invalid argument (os error 22))",
                "degraded: drop effects off (kfree_skb_btf: load refused: Argument list too long)",
            ]
        );
    }
}
