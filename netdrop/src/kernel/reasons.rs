//! Drop-reason names, read from the running kernel.
//!
//! Reason numbers change between kernels (reasons are inserted mid-enum), so netdrop never keeps
//! a table of its own: names come from the BTF enum `skb_drop_reason` (plus the subsystem enums
//! in module BTF), or, without BTF, from the `__print_symbolic` list in the tracepoint's tracefs
//! `format` file. A number neither source knows is shown as a number.

use std::{collections::BTreeMap, fmt, path::Path, sync::Arc};

use btf_rs::{Btf, Type};
use fallible_iterator::FallibleIterator as _;

/// Subsystem-encoded reasons are `subsys << 16 | code` (`SKB_DROP_REASON_SUBSYS_SHIFT`, Linux 6.6+).
pub const SUBSYS_SHIFT: u32 = 16;

/// Where the table came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonSource {
    /// `enum skb_drop_reason` in /sys/kernel/btf/vmlinux.
    Btf,
    /// The tracepoint's `print fmt` line.
    Tracefs,
    /// The kernel has no drop reasons (before 5.17): every drop is reason 0.
    None,
}

/// Names for the reason numbers of one kernel.
#[derive(Clone, Debug)]
pub struct ReasonTable {
    names: BTreeMap<u32, Arc<str>>,
    /// Subsystem number → subsystem name (`OPENVSWITCH`, ...).
    subsystems: BTreeMap<u32, Arc<str>>,
    source: ReasonSource,
}

/// Errors reading reason names.
#[derive(Debug, thiserror::Error)]
pub enum ReasonError {
    /// Neither BTF nor a tracefs format file with a reason list was usable.
    #[error("cannot name drop reasons: no kernel BTF ({btf}) and no reason list in the tracepoint format ({tracefs})")]
    NoSource { btf: String, tracefs: String },
}

impl ReasonTable {
    /// Reads the table from BTF if it has the enum, else from the tracefs format text.
    pub fn load(btf: Option<&Btf>, format_text: Option<&str>) -> Result<Self, ReasonError> {
        let btf_err = match btf.map(Self::from_btf) {
            Some(Ok(Some(t))) => return Ok(t),
            // BTF without the enum is a kernel before 5.17: it has no reasons at all, whatever
            // tracefs says (or whether this user can read it).
            Some(Ok(None)) => return Ok(Self::empty(ReasonSource::None)),
            Some(Err(e)) => e.to_string(),
            None => "not available".to_string(),
        };
        match format_text.map(Self::from_print_fmt) {
            Some(Some(t)) => Ok(t),
            Some(None) if btf.is_some() => Ok(Self::empty(ReasonSource::None)),
            Some(None) => Err(ReasonError::NoSource {
                btf: btf_err,
                tracefs: "format has no reason list".into(),
            }),
            None => Err(ReasonError::NoSource {
                btf: btf_err,
                tracefs: "not readable".into(),
            }),
        }
    }

    fn empty(source: ReasonSource) -> Self {
        Self {
            names: BTreeMap::new(),
            subsystems: BTreeMap::new(),
            source,
        }
    }

    /// The number `NOT_SPECIFIED` has on this kernel; 0 on kernels without reasons, where every
    /// drop is 0.
    pub fn not_specified(&self) -> Option<u32> {
        self.lookup("NOT_SPECIFIED")
            .or((self.source == ReasonSource::None).then_some(0))
    }

    /// The table of a kernel without drop reasons (before 5.17).
    #[cfg(test)]
    pub(crate) fn without_reasons() -> Self {
        Self::empty(ReasonSource::None)
    }

    /// From `enum skb_drop_reason` (and `enum skb_drop_reason_subsys`); `None` if the kernel has
    /// no such enum.
    pub fn from_btf(btf: &Btf) -> Result<Option<Self>, btf_rs::Error> {
        let Some(core) = enum_members(btf, "skb_drop_reason")? else {
            return Ok(None);
        };
        let mut t = Self::empty(ReasonSource::Btf);
        for (name, value) in core {
            // A mask, not a reason. (`MAX` stays: the tracepoint's own list names it too.)
            if name == "SKB_DROP_REASON_SUBSYS_MASK" {
                continue;
            }
            t.names.insert(value, short_name(&name).into());
        }
        for (name, value) in enum_members(btf, "skb_drop_reason_subsys")?.unwrap_or_default() {
            if let Some(sub) = name.strip_prefix("SKB_DROP_REASON_SUBSYS_")
                && sub != "NUM"
                && sub != "CORE"
            {
                t.subsystems.insert(value, sub.into());
            }
        }
        Ok(Some(t))
    }

    /// Adds subsystem reasons (`enum ovs_drop_reason`, `enum mac80211_drop_reason`, ...) found
    /// in module BTF: any enum member whose value lies in a known subsystem's range.
    pub fn add_module_btf(&mut self, module: &Btf) {
        if self.subsystems.is_empty() {
            return;
        }
        let mut types = module.type_iter();
        while let Ok(Some(t)) = types.next() {
            let Type::Enum(e) = t else { continue };
            for m in &e.members {
                let v = m.val();
                if v >> SUBSYS_SHIFT != 0
                    && self.subsystems.contains_key(&(v >> SUBSYS_SHIFT))
                    && let Ok(name) = module.resolve_name(m)
                {
                    self.names.entry(v).or_insert_with(|| name.into());
                }
            }
        }
    }

    /// From the tracepoint format's `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)`.
    pub fn from_print_fmt(format_text: &str) -> Option<Self> {
        let pairs = print_symbolic_pairs(format_text, "REC->reason")?;
        let mut t = Self::empty(ReasonSource::Tracefs);
        t.names.extend(pairs.into_iter().map(|(v, n)| (v, Arc::from(n))));
        Some(t)
    }

    pub fn source(&self) -> ReasonSource {
        self.source
    }

    /// The reason's name, if this kernel has one for it.
    pub fn name(&self, reason: u32) -> Option<&str> {
        self.names.get(&reason).map(|n| &**n)
    }

    /// The typed reason of a drop: its number with this kernel's name for it (cheap to clone:
    /// the name is shared with the table).
    pub fn reason(&self, code: u32) -> Reason {
        if let Some(name) = self.names.get(&code) {
            return Reason::Named {
                code,
                name: name.clone(),
            };
        }
        match self.subsystems.get(&(code >> SUBSYS_SHIFT)) {
            Some(subsystem) => Reason::Subsystem {
                code,
                subsystem: subsystem.clone(),
            },
            None => Reason::Unnamed(code),
        }
    }

    /// A printable name: the kernel's, else `SUBSYS:code` for subsystem reasons, else the number.
    pub fn display(&self, reason: u32) -> ReasonName<'_> {
        ReasonName { table: self, reason }
    }

    /// The number of a reason name (case-insensitive, with or without `SKB_DROP_REASON_`).
    pub fn lookup(&self, name: &str) -> Option<u32> {
        let want = short_name(&name.to_ascii_uppercase()).to_string();
        self.names.iter().find(|(_, n)| ***n == *want).map(|(v, _)| *v)
    }

    /// Names close to `name`, for "did you mean" in errors.
    pub fn close_matches(&self, name: &str) -> Vec<&str> {
        let want = name.to_ascii_uppercase();
        let mut scored: Vec<(usize, &str)> = self
            .names
            .values()
            .map(|n| (edit_distance(&want, n), &**n))
            .filter(|(d, n)| *d <= 3 || n.contains(&want) || (want.len() >= 4 && want.contains(n)))
            .collect();
        scored.sort_unstable();
        scored.into_iter().take(5).map(|(_, n)| n).collect()
    }

    /// Every (number, name) pair, ordered by number.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names.iter().map(|(v, n)| (*v, &**n))
    }
}

/// A drop reason: the kernel's number, with the name this kernel's table gives it. Numbers differ
/// between kernels, so the name travels with the number; a number the table does not name keeps
/// the number (every drop on kernels without drop reasons is `Unnamed(0)`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A name from this kernel's table (`NO_SOCKET`).
    Named { code: u32, name: Arc<str> },
    /// A subsystem's reason the table has no name for: printed `SUBSYS:code`.
    Subsystem { code: u32, subsystem: Arc<str> },
    /// A number this kernel does not name.
    Unnamed(u32),
}

impl Reason {
    /// The raw `enum skb_drop_reason` value on this kernel.
    pub fn code(&self) -> u32 {
        match self {
            Self::Named { code, .. } | Self::Subsystem { code, .. } | Self::Unnamed(code) => *code,
        }
    }

    /// The kernel's name for it, if it has one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Named { name, .. } => Some(name),
            Self::Subsystem { .. } | Self::Unnamed(_) => None,
        }
    }

    /// Whether this is the reason the kernel names `name`.
    pub fn is(&self, name: &str) -> bool {
        self.name() == Some(name)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named { name, .. } => f.write_str(name),
            Self::Subsystem { code, subsystem } => write!(f, "{subsystem}:{}", code & 0xffff),
            Self::Unnamed(code) => write!(f, "{code}"),
        }
    }
}

/// Display adapter returned by [`ReasonTable::display`].
pub struct ReasonName<'a> {
    table: &'a ReasonTable,
    reason: u32,
}

impl fmt::Display for ReasonName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = self.table.name(self.reason) {
            return f.write_str(n);
        }
        let sub = self.reason >> SUBSYS_SHIFT;
        match self.table.subsystems.get(&sub) {
            Some(s) => write!(f, "{s}:{}", self.reason & 0xffff),
            None => write!(f, "{}", self.reason),
        }
    }
}

/// `SKB_DROP_REASON_NO_SOCKET` → `NO_SOCKET`, `SKB_CONSUMED` → `CONSUMED` (the tracepoint's
/// own spelling).
fn short_name(name: &str) -> &str {
    name.strip_prefix("SKB_DROP_REASON_")
        .or_else(|| name.strip_prefix("SKB_"))
        .unwrap_or(name)
}

/// The members of C enum `name`, `None` when this kernel has no such enum.
pub(crate) fn enum_members(btf: &Btf, name: &str) -> Result<Option<Vec<(String, u32)>>, btf_rs::Error> {
    // btf-rs reports a missing name as an error; for us that is "this kernel lacks it".
    let Ok(types) = btf.resolve_types_by_name(name) else {
        return Ok(None);
    };
    for t in types {
        match t {
            Type::Enum(e) => {
                let mut out = Vec::with_capacity(e.members.len());
                for m in &e.members {
                    out.push((btf.resolve_name(m)?, m.val()));
                }
                return Ok(Some(out));
            }
            Type::Enum64(e) => {
                let mut out = Vec::with_capacity(e.members.len());
                for m in &e.members {
                    out.push((btf.resolve_name(m)?, m.val() as u32));
                }
                return Ok(Some(out));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Parses `__print_symbolic(<field>, { 1, "A" }, { 2, "B" })` out of a tracefs format file.
///
/// Hand-written on purpose: the format is the kernel's own tiny mini-language (integers and
/// C string literals without escapes in practice); no crate parses tracefs print formats.
pub fn print_symbolic_pairs(format_text: &str, field: &str) -> Option<BTreeMap<u32, String>> {
    let start = format_text.find(&format!("__print_symbolic({field}"))?;
    let rest = &format_text[start..];
    let mut out = BTreeMap::new();
    let mut s = rest;
    while let Some(open) = s.find('{') {
        // Stop at the end of this __print_symbolic call.
        if let Some(close_paren) = s.find("})")
            && close_paren < open
        {
            break;
        }
        let body_end = s[open..].find('}')? + open;
        let body = &s[open + 1..body_end];
        let (num, name) = body.split_once(',')?;
        let num = num.trim();
        let value = if let Some(hex) = num.strip_prefix("0x") {
            u32::from_str_radix(hex, 16).ok()?
        } else {
            num.parse().ok()?
        };
        out.insert(value, name.trim().trim_matches('"').to_string());
        s = &s[body_end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

/// Reads the kernel's BTF, if it has any.
pub fn kernel_btf() -> Result<Btf, btf_rs::Error> {
    Btf::from_file("/sys/kernel/btf/vmlinux")
}

/// Reads one module's split BTF on top of vmlinux's.
pub fn module_btf(base: &Btf, module: &str) -> Option<Btf> {
    let path = Path::new("/sys/kernel/btf").join(module);
    Btf::from_split_file(path, base).ok()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = r#"print fmt: "skbaddr=%p location=%pS reason: %s", REC->skbaddr, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 0x10, "IP_RPFILTER" }, { 129, "MAX" })"#;

    #[test]
    fn parses_print_symbolic() {
        let t = ReasonTable::from_print_fmt(FORMAT).expect("has a list");
        assert_eq!(t.name(3), Some("NO_SOCKET"));
        assert_eq!(t.name(16), Some("IP_RPFILTER"));
        assert_eq!(t.lookup("no_socket"), Some(3));
        assert_eq!(t.lookup("SKB_DROP_REASON_NO_SOCKET"), Some(3));
        assert_eq!(t.source(), ReasonSource::Tracefs);
    }

    #[test]
    fn unknown_numbers_show_as_numbers() {
        let mut t = ReasonTable::from_print_fmt(FORMAT).expect("has a list");
        assert_eq!(t.display(77).to_string(), "77");
        t.subsystems.insert(3, "OPENVSWITCH".into());
        assert_eq!(t.display((3 << SUBSYS_SHIFT) | 5).to_string(), "OPENVSWITCH:5");
    }

    #[test]
    fn close_matches_suggest_typos() {
        let t = ReasonTable::from_print_fmt(FORMAT).expect("has a list");
        assert_eq!(t.close_matches("NO_SOCKT"), vec!["NO_SOCKET"]);
        assert!(t.close_matches("SOCKET").contains(&"NO_SOCKET"));
    }

    #[test]
    fn format_without_reasons_is_none() {
        assert!(ReasonTable::from_print_fmt("print fmt: \"skbaddr=%p\", REC->skbaddr").is_none());
    }

    #[test]
    fn short_names_match_the_tracepoint_spelling() {
        assert_eq!(short_name("SKB_DROP_REASON_NO_SOCKET"), "NO_SOCKET");
        assert_eq!(short_name("SKB_CONSUMED"), "CONSUMED");
        assert_eq!(short_name("SKB_NOT_DROPPED_YET"), "NOT_DROPPED_YET");
    }
}
