//! Kernel text addresses → `symbol+0xoff`, from /proc/kallsyms.
//!
//! Hand-parsed on purpose: kallsyms is three whitespace-separated columns (plus an optional
//! `[module]`), and all netdrop needs is a sorted table and a binary search. blazesym can do this
//! too but brings DWARF/ELF symbolisation and a large dependency tree we would not use.

use std::{collections::HashMap, fmt, fs, io, sync::Arc, sync::Mutex};

/// A sorted table of kernel text symbols.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// (address, name, module) sorted by address.
    syms: Vec<(u64, Arc<str>, Option<Arc<str>>)>,
    cache: Mutex<HashMap<u64, String>>,
}

impl KernelSymbols {
    /// Reads /proc/kallsyms. Without root every address reads as 0; the table is then empty and
    /// locations print as raw addresses.
    pub fn load() -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string("/proc/kallsyms")?))
    }

    pub fn parse(text: &str) -> Self {
        let mut syms = Vec::new();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            // Text symbols only: drop locations are code addresses.
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if addr == 0 {
                continue;
            }
            let module = it.next().map(|m| m.trim_matches(|c| c == '[' || c == ']').into());
            syms.push((addr, name.into(), module));
        }
        syms.sort_unstable_by_key(|s| s.0);
        Self {
            syms,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// `__udp4_lib_rcv+0x52f`, `nf_hook_slow+0x44 [nf_conntrack]`-style, or `0xffff...`.
    pub fn symbolize(&self, addr: u64) -> String {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.entry(addr).or_insert_with(|| self.lookup(addr)).clone()
    }

    fn lookup(&self, addr: u64) -> String {
        let i = self.syms.partition_point(|s| s.0 <= addr);
        if i == 0 {
            return format!("{addr:#x}");
        }
        let (start, name, module) = &self.syms[i - 1];
        let off = addr - start;
        match module {
            Some(m) => format!("{name}+{off:#x} [{m}]"),
            None => format!("{name}+{off:#x}"),
        }
    }

    /// Where `addr` is: the function, offset and module, found once per event and carried in
    /// the record (visibility, classification and the sinks all read it from there).
    pub fn locate(&self, addr: u64) -> Location {
        let i = self.syms.partition_point(|s| s.0 <= addr);
        let symbol = (i > 0).then(|| {
            let (start, name, module) = &self.syms[i - 1];
            Symbol {
                function: name.clone(),
                offset: addr - start,
                module: module.clone(),
            }
        });
        Location { addr, symbol }
    }

    /// The function name only (no offset): what classification rules match on.
    pub fn function(&self, addr: u64) -> Option<&str> {
        let i = self.syms.partition_point(|s| s.0 <= addr);
        (i > 0).then(|| &*self.syms[i - 1].1)
    }
}

/// A kernel text address with the symbol it lies in. Prints as `symbol+0xoff [module]`, or the
/// address when no symbol covers it (kallsyms unreadable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub addr: u64,
    pub symbol: Option<Symbol>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub function: Arc<str>,
    pub offset: u64,
    pub module: Option<Arc<str>>,
}

impl Location {
    /// The function name (what classification rules match on).
    pub fn function(&self) -> Option<&str> {
        self.symbol.as_ref().map(|s| &*s.function)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.symbol {
            None => write!(f, "{:#x}", self.addr),
            Some(Symbol {
                function,
                offset,
                module: Some(m),
            }) => write!(f, "{function}+{offset:#x} [{m}]"),
            Some(Symbol {
                function,
                offset,
                module: None,
            }) => write!(f, "{function}+{offset:#x}"),
        }
    }
}

impl serde::Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "ffffffff81000000 T _stext\nffffffff81a00000 t __udp4_lib_rcv\nffffffff81a00800 T udp_rcv\nffffffff81b00000 d some_data\nffffffffc0100000 t nf_conntrack_in\t[nf_conntrack]\n";

    #[test]
    fn symbolizes_with_offset_and_module() {
        let k = KernelSymbols::parse(KALLSYMS);
        assert_eq!(k.symbolize(0xffff_ffff_81a0_052f), "__udp4_lib_rcv+0x52f");
        assert_eq!(k.symbolize(0xffff_ffff_81a0_0800), "udp_rcv+0x0");
        assert_eq!(
            k.symbolize(0xffff_ffff_c010_0010),
            "nf_conntrack_in+0x10 [nf_conntrack]"
        );
        assert_eq!(k.function(0xffff_ffff_81a0_0001), Some("__udp4_lib_rcv"));
        assert_eq!(k.symbolize(0x10), "0x10");
        for addr in [0xffff_ffff_81a0_052f, 0xffff_ffff_c010_0010, 0x10] {
            assert_eq!(k.locate(addr).to_string(), k.symbolize(addr), "one spelling");
        }
        assert_eq!(k.locate(0xffff_ffff_81a0_0001).function(), Some("__udp4_lib_rcv"));
    }

    #[test]
    fn unprivileged_kallsyms_gives_empty_table() {
        assert!(KernelSymbols::parse("0000000000000000 T _stext\n").is_empty());
    }
}
