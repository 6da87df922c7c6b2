//! What to watch: node namespaces, interface name patterns, and how to attach.

use std::{path::PathBuf, str::FromStr};

use super::InterfacesError;
use crate::probe::tc::{self, LoadOptions, TcModeChoice};

/// A network namespace to watch and the node name its interfaces and drops belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetns {
    pub node: String,
    /// `None`: the namespace this process runs in.
    pub path: Option<PathBuf>,
}

impl FromStr for NodeNetns {
    type Err = InterfacesError;

    /// `NAME=PATH`, PATH a file such as `/run/netns/x` or `/proc/PID/ns/net`, or a bare name
    /// from `ip netns list`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node, path) = s
            .split_once('=')
            .ok_or_else(|| InterfacesError::BadNodeNetns(s.into()))?;
        if node.is_empty() || path.is_empty() {
            return Err(InterfacesError::BadNodeNetns(s.into()));
        }
        let path = if path.contains('/') {
            PathBuf::from(path)
        } else {
            PathBuf::from("/run/netns").join(path)
        };
        Ok(Self {
            node: node.into(),
            path: Some(path),
        })
    }
}

/// Shell-style patterns (`*`, `?`) for interface names, e.g. `cali*`, `lxc*`, `veth*`.
#[derive(Clone, Debug)]
pub struct IfacePattern(Vec<String>);

impl IfacePattern {
    pub fn new(patterns: &[String]) -> Self {
        Self(patterns.to_vec())
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

impl std::fmt::Display for IfacePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

pub(super) fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with one backtrack point per `*` (linear enough for interface names).
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Settings of [`TcAccounting::start`].
#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub pattern: IfacePattern,
    pub mode: TcModeChoice,
    /// clsact filter priority.
    pub priority: u16,
    pub load: LoadOptions,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            pattern: IfacePattern::new(&["cali*".to_string()]),
            mode: TcModeChoice::Auto,
            priority: tc::DEFAULT_PRIORITY,
            load: LoadOptions::default(),
        }
    }
}
